"""Whole-volume segmentation of new scans from annotated support scans: the library behind ``predict.py``.

``run`` plans and runs a prediction (every option and file checked first); ``correspondence`` places each support
scan along the query from the images alone; ``volume`` segments a whole query volume (docs/method.md#ep2);
``report`` draws the overlays and the self-contained HTML page.
"""
