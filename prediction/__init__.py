"""Whole-volume segmentation of new scans from annotated support scans (``predict.py``).

``volume`` scores a query volume with the EP2 rule (SPEC 8.6, util/protocol.py); ``report`` draws the overlays and
the self-contained HTML page.
"""
