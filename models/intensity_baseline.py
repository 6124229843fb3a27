"""A trivial, learning-free intensity baseline with the EP1-ALP ``predict`` signature (:mod:`evaluation.ep1_alp`).

For one chunk: the organ's intensity range is fitted on the support slices (the ``low_pct``..``high_pct``
percentiles of the support-foreground intensities, pooled over the support slices); the query slices are
thresholded to that range, opened with a small in-plane disc to cut thin bridges, and the largest **3D**
connected component (6-connectivity) of the chunk's stack of query slices is kept, with its in-plane holes
filled. The chunk's query slices are consecutive (EP1-ALP groups a contiguous z-range per chunk), so the stack
is a sub-volume and a 3D component is the natural choice for one organ. No learning, no position prior.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


class IntensityBaseline:
    """Percentile-range thresholding + largest 3D connected component.

    Args:
        low_pct, high_pct: percentiles of the support-foreground intensities bounding the organ's range.
        opening_radius: radius (pixels) of the in-plane binary opening before the component search (0: none).
        fill_holes: fill in-plane holes of the kept component.
    """

    def __init__(self, low_pct: float = 5.0, high_pct: float = 95.0, opening_radius: int = 1,
                 fill_holes: bool = True) -> None:
        if not 0 <= low_pct < high_pct <= 100:
            raise ValueError(f"need 0 <= low_pct < high_pct <= 100, got {low_pct}, {high_pct}")
        self.low_pct, self.high_pct = low_pct, high_pct
        self.opening_radius, self.fill_holes = opening_radius, fill_holes

    def fit_range(self, support_images: np.ndarray, support_masks: np.ndarray) -> tuple[float, float]:
        """Intensity range of the organ from (S, H, W) support images and (S, H, W) bool masks."""
        fg = np.asarray(support_images)[np.asarray(support_masks, bool)]
        if fg.size == 0:
            raise ValueError("support masks are empty: the organ's intensity range cannot be fitted")
        lo, hi = np.percentile(fg, [self.low_pct, self.high_pct])
        return float(lo), float(hi)

    def __call__(self, support_images: np.ndarray, support_masks: np.ndarray,
                 query_images: np.ndarray) -> np.ndarray:
        """Predict (N, H, W) bool masks for (N, H, W) consecutive query slices from (S, H, W) supports."""
        lo, hi = self.fit_range(support_images, support_masks)
        q = np.asarray(query_images)
        mask = (q >= lo) & (q <= hi)
        if self.opening_radius > 0:
            r = self.opening_radius
            yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
            mask = ndimage.binary_opening(mask, structure=(xx * xx + yy * yy <= r * r)[None])
        cc, n = ndimage.label(mask)  # default structure: 6-connectivity in 3D
        if n == 0:
            return np.zeros(q.shape, bool)
        sizes = np.bincount(cc.ravel())
        sizes[0] = 0
        out = cc == int(np.argmax(sizes))
        if self.fill_holes:
            out = np.stack([ndimage.binary_fill_holes(s) for s in out])
        return out
