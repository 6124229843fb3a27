"""The original's unused ASPP modules, built only so that its state dicts load key for key
(docs/method.md#q7-unused-aspp).

A module of its own so that both the encoder (:mod:`models.backbone`) and the state-dict export
(:mod:`models.weights`) can build them without importing each other.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP


def build_unused_aspp_modules() -> tuple[nn.Sequential, nn.Conv2d]:
    """Build the original's never-used ``aspp_out`` and ``asppconv`` modules, only for state-dict parity
    (docs/method.md#q7-unused-aspp).

    ``aspp_out`` = torchvision ASPP(2048, [12, 24, 36]) followed by a 3x3 conv 256->256 without bias (36 + 1 keys),
    ``asppconv`` = 1x1 conv 256->256 without bias (1 key); 16.19 M parameters together.

    Returns:
        ``(aspp_out, asppconv)``.
    """
    aspp_out = nn.Sequential(ASPP(2048, [12, 24, 36]), nn.Conv2d(256, 256, 3, padding=1, bias=False))
    asppconv = nn.Conv2d(256, 256, 1, bias=False)
    return aspp_out, asppconv
