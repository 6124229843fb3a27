"""Synthetic abdominal phantom: the project's embedded default dataset (``PHANTOM``).

Writes ``image_<id>.nii.gz`` (float32) and ``label_<id>.nii.gz`` (uint8) for ids ``0..N-1`` in the processed format
of docs/method.md#datasets, with CHAOST2 label ids (0 BG, 1 LIVER, 2 RK, 3 LK, 4 SPLEEN), plus a ``dataset.json5``
description of the folder. Class maps and superpixels are built by their own modules.

Anatomy (axial slices, radiological display: anterior at the top, the patient's right on the image's left; the
grid carries an identity direction, i.e. LPS with slice 0 the most inferior):

- body outline: a per-scan superellipse, flatter at the back, with a smooth angular and slice-wise perturbation;
  skin, subcutaneous fat of varying thickness, an abdominal muscle wall; the cavity holds visceral fat;
- spine: vertebral body (marrow, cortical rim, intervertebral discs every ~3 cm), canal with CSF, spinous
  process, paraspinal muscles, psoas muscles that grow towards the pelvis, aorta and IVC; ribs in the upper half;
  lung bases in the top slices;
- bowel: loops of a thresholded 3D random field (wall, gas, fluid or mottled chyme), a stomach with an air-fluid
  level, a gallbladder and a pancreas as distractors;
- organs: the liver (a large wedge on the image-left, a left lobe crossing the midline in its upper part,
  tapering to the right-lobe tip), the spleen (a crescent, image-right, posterior), the kidneys (bean-shaped,
  either side of the spine, corticomedullary pattern and renal sinus), each on its own contiguous slice range;
  all shapes go through a smooth random 3D deformation, and each organ is wrapped in a fat plane.

Image formation: per-scan random tissue intensities (global gain and per-tissue contrast, so organ intensity
ranges overlap each other and their surroundings across scans), multiplicative texture, partial-volume blur
(in-plane and across slices), a smooth multiplicative bias field (coil-like) and Rician noise (MR), or
windowed HU in [0, 255] with Gaussian noise (CT). MR air stays below the body-mask threshold of 50.
Labels are the organ masks before blur. A scan is a pure function of ``(seed, scan_id)``.

Usage::

    python -m data_preprocessing.phantom --out data/PHANTOM/phantom_normalized --n-scans 10 --seed 0 \
        --preview runs/phantom.png
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from dataloaders.dataset_info import BODY_THRESHOLD
from dataloaders.niftiio import Geometry, image_path, label_path, write_json, write_volume
from util.atomic import atomic_file
from util.options import OptionParser, int_at_least

Appearance = Literal["mr", "ct"]
LABELS = {0: "BG", 1: "LIVER", 2: "RK", 3: "LK", 4: "SPLEEN"}
LIVER, RK, LK, SPLEEN = 1, 2, 3, 4

# Tissue classes of the anatomy map (painted in order; later structures override earlier ones).
TISSUES = ("AIR", "SKIN", "SUBCUT_FAT", "MUSCLE", "VISCERAL_FAT", "CORTEX", "MARROW", "DISC", "CSF", "AORTA", "IVC",
           "LIVER", "LIVER_VESSEL", "SPLEEN", "KID_CORTEX", "KID_MEDULLA", "RENAL_SINUS", "GALLBLADDER",
           "STOMACH_WALL", "GAS", "FLUID", "BOWEL_WALL", "CHYME", "LUNG", "PANCREAS")
T = {name: i for i, name in enumerate(TISSUES)}

# Texture amplitudes (fine, mid) per tissue, relative for MR; the MR means come from _mr_means.
_MR_TEXTURE = {
    "AIR": (0, 0), "SKIN": (0.05, 0.05), "SUBCUT_FAT": (0.06, 0.08), "MUSCLE": (0.05, 0.05),
    "VISCERAL_FAT": (0.10, 0.12), "CORTEX": (0.1, 0.1), "MARROW": (0.08, 0.06), "DISC": (0.05, 0.05),
    "CSF": (0.03, 0.03), "AORTA": (0.1, 0.05), "IVC": (0.1, 0.05), "LIVER": (0.05, 0.06), "LIVER_VESSEL": (0.05, 0),
    "SPLEEN": (0.04, 0.05), "KID_CORTEX": (0.05, 0.05), "KID_MEDULLA": (0.05, 0.05), "RENAL_SINUS": (0.1, 0.1),
    "GALLBLADDER": (0.03, 0.03), "STOMACH_WALL": (0.06, 0.06), "GAS": (0, 0), "FLUID": (0.04, 0.05),
    "BOWEL_WALL": (0.08, 0.08), "CHYME": (0.2, 0.25), "LUNG": (0.1, 0), "PANCREAS": (0.08, 0.06),
}
# CT: HU base, per-scan additive offset range, texture in HU (fine, mid).
_CT = {
    "AIR": (-1000, 0, 0, 0), "SKIN": (40, 10, 10, 5), "SUBCUT_FAT": (-100, 15, 12, 8), "MUSCLE": (50, 10, 10, 6),
    "VISCERAL_FAT": (-90, 15, 15, 12), "CORTEX": (700, 150, 60, 30), "MARROW": (220, 60, 30, 20),
    "DISC": (80, 15, 10, 5), "CSF": (15, 8, 8, 4), "AORTA": (150, 100, 8, 4), "IVC": (120, 70, 8, 4),
    "LIVER": (100, 40, 8, 6), "LIVER_VESSEL": (140, 60, 8, 4), "SPLEEN": (105, 45, 8, 6),
    "KID_CORTEX": (170, 60, 10, 6), "KID_MEDULLA": (120, 50, 10, 6), "RENAL_SINUS": (-60, 25, 15, 10),
    "GALLBLADDER": (12, 8, 6, 4), "STOMACH_WALL": (70, 20, 10, 6), "GAS": (-950, 30, 20, 0),
    "FLUID": (10, 10, 8, 4), "BOWEL_WALL": (75, 25, 10, 6), "CHYME": (30, 30, 40, 30), "LUNG": (-850, 40, 40, 20),
    "PANCREAS": (80, 25, 12, 8),
}
CT_WINDOW = (-125.0, 275.0)  # HU window mapped to [0, 255] (docs/method.md#sabs-ct)
MR_SLICE_MM, CT_SLICE_MM = 7.7, 5.0
MR_PIXEL_MM, CT_PIXEL_MM = 1.25, 1.17  # at 256x256; scaled by 256/size so the field of view stays fixed


# ----------------------------------------------------------------------------------------------- random fields
def _resize_linear(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Separable linear (align-corners) resize of ``arr`` to ``shape``."""
    for axis, n in enumerate(shape):
        m = arr.shape[axis]
        if m == n:
            continue
        pos = np.linspace(0.0, m - 1.0, n)
        i0 = np.clip(np.floor(pos).astype(np.intp), 0, max(m - 2, 0))
        w = (pos - i0).astype(np.float32).reshape([n if a == axis else 1 for a in range(arr.ndim)])
        a0 = np.take(arr, i0, axis=axis)
        a1 = np.take(arr, np.minimum(i0 + 1, m - 1), axis=axis)
        arr = a0 + (a1 - a0) * w
    return arr


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int],
                 sigma: tuple[float, float, float]) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with Gaussian correlation ``sigma`` (voxels per axis).

    Drawn on a grid coarsened by about ``sigma / 2`` and linearly upsampled, so large correlation lengths are cheap.

    Returns:
        float32 array of ``shape`` (Z, H, W).
    """
    down = [max(1, int(s // 2)) for s in sigma]
    small = tuple(max(2, -(-n // d) + 1) for n, d in zip(shape, down))
    field = rng.standard_normal(small, dtype=np.float32)
    field = ndimage.gaussian_filter(field, [s / d for s, d in zip(sigma, down)], mode="wrap")
    field = _resize_linear(field, shape)
    field -= field.mean()
    field /= field.std() + 1e-8
    return field


# ----------------------------------------------------------------------------------------------- anatomy
def _ellipse(x: np.ndarray, y: np.ndarray, cx, cy, ax, ay, angle: float = 0.0) -> np.ndarray:
    """Normalised elliptic radius (1 on the boundary) of points ``(x, y)``; centre/axes broadcast per slice."""
    dx, dy = x - cx, y - cy
    if angle:
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    return np.sqrt((dx / ax) ** 2 + (dy / ay) ** 2)


def _organ_range(nz: int, rng: np.random.Generator, frac: tuple[float, float], centre: float) -> tuple[int, int]:
    """A contiguous slice range of random length ``frac`` of ``nz`` around relative height ``centre``."""
    n = int(np.clip(round(nz * rng.uniform(*frac)), 3, nz - 2))
    mid = centre * (nz - 1)
    z0 = int(np.clip(round(mid - (n - 1) / 2), 1, nz - 1 - n))
    return z0, z0 + n - 1


@dataclass
class _Painter:
    """Tissue map and label map, painted in order on a (Z, H, W) grid."""

    tissue: np.ndarray
    label: np.ndarray

    def paint(self, zs: slice, mask: np.ndarray, tissue: str, label: int = 0) -> None:
        self.tissue[zs][mask] = T[tissue]
        self.label[zs][mask] = label


class _Anatomy:
    """One scan's anatomy, drawn in named steps that share the body frame (units of 1.25 mm, centred on the body).

    The steps run in a fixed order (:func:`build_anatomy`); each draws from the scan's generator in turn, so the order
    of the steps is part of the phantom's definition (a scan is a pure function of its seed).
    """

    def __init__(self, rng: np.random.Generator, n_slices: int, size: int) -> None:
        self.rng, self.nz, self.size = rng, n_slices, size
        self.s = size / 256.0  # pixels per unit; one unit = 1.25 mm (the MR pixel at 256x256)
        self.shape = (n_slices, size, size)
        self.zc = ((np.arange(n_slices) + 0.5) / n_slices).astype(np.float32)  # 0 inferior .. 1 superior
        self.p = _Painter(np.zeros(self.shape, np.uint8), np.zeros(self.shape, np.uint8))

    # ---------------------------------------------------------------- body frame and wall
    def body(self) -> None:
        """Body frame with a smooth global deformation, the superellipse outline, skin, fat and the muscle wall."""
        rng, s, shape, zc = self.rng, self.s, self.shape, self.zc
        cx, cy = rng.uniform(-4, 4), rng.uniform(-6, 4)
        coords = ((np.arange(self.size) + 0.5) / s - 128.0).astype(np.float32)
        warp_amp = rng.uniform(3.0, 6.0)
        sig = (1.5, 40 * s, 40 * s)
        self.x = x = coords[None, None, :] - cx + warp_amp * smooth_noise(rng, shape, sig)
        self.y = y = coords[None, :, None] - cy + warp_amp * smooth_noise(rng, shape, sig)
        self.shape_noise = smooth_noise(rng, shape, (1.2, 10 * s, 10 * s))  # boundary irregularity of organs

        a = rng.uniform(106, 122) * (1 + 0.04 * np.sin(2 * np.pi * (zc * rng.uniform(0.5, 1.2) + rng.uniform())))
        self.a = a = (a - rng.uniform(0, 8) * (zc - 0.5))[:, None, None]  # slightly wider at the bottom of the chest
        self.b = b = (rng.uniform(80, 94) * (1 + 0.03 * np.sin(2 * np.pi * (zc + rng.uniform()))))[:, None, None]
        self.p_post = p_post = rng.uniform(2.4, 3.4)
        rho = np.sqrt(x * x + y * y) + 1e-3
        cth, sth = x / rho, y / rho
        pw = np.where(y > 0, np.float32(p_post), np.float32(2.0))
        r = (np.abs(x / a) ** pw + np.abs(y / b) ** pw) ** (1 / pw)
        c2, c3 = 2 * cth * cth - 1, 4 * cth ** 3 - 3 * cth
        s2 = 2 * sth * cth
        rb = 1 + rng.uniform(-0.03, 0.03) * c2 + rng.uniform(-0.02, 0.02) * c3 + rng.uniform(-0.02, 0.02) * s2
        reach = rho / r  # distance from centre to the boundary along the ray, in units (for r = 1)
        self.depth = depth = (rb - r) * reach  # approximate depth below the skin, units

        self.tf_base, self.tm0 = tf_base, tm0 = rng.uniform(7, 24), rng.uniform(6, 10)
        tf = tf_base * (1 + 0.35 * cth * cth - 0.15 * np.maximum(sth, 0))  # fat thicker at the flanks, thin at the back
        tm = tm0 * (0.75 + 0.5 * sth * sth + 0.3 * np.clip(-sth, 0, None))  # wall thicker front and back
        body = depth > 0
        self.inner_depth = depth - tf - tm  # depth below the muscle wall (units)
        self.cavity = cavity = self.inner_depth > 0
        p, al = self.p, slice(None)
        p.paint(al, body, "SUBCUT_FAT")
        p.paint(al, body & (depth < 2.0), "SKIN")
        p.paint(al, (depth > tf) & ~cavity & ((np.abs(x) > 2.5 * (1 + tf_base / 20)) | (y > 0)), "MUSCLE")  # linea alba
        p.paint(al, cavity, "VISCERAL_FAT")
        self.a_c = float(np.mean(a)) - tf_base * 1.3 - tm0 * 0.8  # approximate cavity half-axes (units)
        self.b_c = float(np.mean(b)) - tf_base * 0.9 - tm0 * 1.1
        self.back = float(np.mean(b)) - tf_base * 0.85  # posterior muscle surface at the midline

    def spine_frame(self) -> None:
        """Vertebral body size and the positions of the canal and the vertebral body (drawn, not painted yet)."""
        rng = self.rng
        self.ax_vb, self.ay_vb = rng.uniform(14, 18), rng.uniform(11, 14)
        self.y_canal = self.back - rng.uniform(28, 34)
        self.y_vb = self.y_canal - 8 - self.ay_vb

    def bowel(self) -> None:
        """Bowel loops, painted first: every organ overrides them."""
        rng, s, shape, p, al = self.rng, self.s, self.shape, self.p, slice(None)
        g = smooth_noise(rng, shape, (0.9, 6.5 * s, 6.5 * s))
        content = smooth_noise(rng, shape, (2.0, 18 * s, 18 * s))
        thr = (0.15 + 0.9 * np.clip(self.zc - 0.55, 0, None))[:, None, None]  # fewer loops under the diaphragm
        inner = self.inner_depth > 3
        lumen = inner & (g > thr + 0.35)
        wall = inner & (g > thr) & ~lumen
        p.paint(al, wall, "BOWEL_WALL")
        p.paint(al, lumen & (content < -0.6), "GAS")
        p.paint(al, lumen & (content >= -0.6) & (content < 0.6), "CHYME")
        p.paint(al, lumen & (content >= 0.6), "FLUID")

    # ---------------------------------------------------------------- helpers of the organ steps
    def slab(self, z0: int, z1: int) -> tuple[slice, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                               np.ndarray]:
        """Slices z0..z1: (slice, relative height u 0..1 within the slab, x, y, shape noise, cavity, inner depth)."""
        zs = slice(z0, z1 + 1)
        u = ((np.arange(z0, z1 + 1) - z0) / max(z1 - z0, 1)).astype(np.float32)  # 0 inferior end .. 1 superior
        return zs, u, self.x[zs], self.y[zs], self.shape_noise[zs], self.cavity[zs], self.inner_depth[zs]

    def with_halo(self, zs: slice, f: np.ndarray, halo: float, tissue: str, label: int, cav: np.ndarray,
                  tissue_halo: str = "VISCERAL_FAT") -> np.ndarray:
        """Paint a fat plane ``f < 1 + halo`` (inside the cavity), then the organ ``f < 1``; return the organ mask."""
        self.p.paint(zs, (f < 1 + halo) & cav, tissue_halo)
        m = (f < 1) & cav
        self.p.paint(zs, m, tissue, label)
        return m

    # ---------------------------------------------------------------- organs
    def lungs_and_heart(self) -> None:
        """Lungs and heart on the top slices."""
        rng, nz, a_c, b_c, p = self.rng, self.nz, self.a_c, self.b_c, self.p
        lz0 = int(round(nz * rng.uniform(0.80, 0.88)))
        zs, u, xs, ys, ns, cav, dep = self.slab(lz0, nz - 1)
        grow = (0.35 + 0.65 * u)[:, None, None]
        for side in (-1, 1):
            f = _ellipse(xs, ys, side * a_c * 0.5, b_c * 0.2, a_c * 0.45 * grow, b_c * 0.75 * grow) + 0.08 * ns
            self.with_halo(zs, f, 0.12, "LUNG", 0, dep > -2, "MUSCLE")
        f = _ellipse(xs, ys, a_c * 0.12, -b_c * 0.15, a_c * 0.5 * grow, b_c * 0.55 * grow, 0.4) + 0.05 * ns  # heart
        self.with_halo(zs, f, 0.1, "MUSCLE", 0, cav)
        p.paint(zs, (f < 0.75) & cav, "AORTA")  # blood pool: same flow appearance as the aorta

    def stomach(self) -> None:
        """Stomach, upper left and anterior, with an air-fluid level."""
        rng, nz, a_c, b_c, p = self.rng, self.nz, self.a_c, self.b_c, self.p
        z0, z1 = _organ_range(nz, rng, (0.25, 0.35), rng.uniform(0.66, 0.74))
        zs, u, xs, ys, ns, cav, dep = self.slab(z0, z1)
        sc = (0.55 + 0.45 * np.sin(np.pi * u))[:, None, None]
        st_cx, st_cy = a_c * rng.uniform(0.2, 0.35), -b_c * rng.uniform(0.15, 0.35)
        st_ax, st_ay = a_c * rng.uniform(0.2, 0.32) * sc, b_c * rng.uniform(0.22, 0.34) * sc
        f = _ellipse(xs, ys, st_cx, st_cy, st_ax, st_ay, rng.uniform(-0.5, 0.5)) + 0.1 * ns
        p.paint(zs, (f < 1) & cav, "STOMACH_WALL")
        lum = (f < 1 - 4.0 / (np.minimum(st_ax, st_ay) + 1)) & cav
        level = st_cy - st_ay * rng.uniform(0.0, 0.7)  # air-fluid level; gas rises anteriorly (supine)
        p.paint(zs, lum & (ys < level), "GAS")
        p.paint(zs, lum & (ys >= level), "FLUID" if rng.uniform() < 0.6 else "CHYME")

    def pancreas(self) -> None:
        """Pancreas, a flat oblique ellipse in front of the spine."""
        rng, nz, a_c = self.rng, self.nz, self.a_c
        pz0, pz1 = _organ_range(nz, rng, (0.1, 0.16), rng.uniform(0.5, 0.58))
        zs, u, xs, ys, ns, cav, dep = self.slab(pz0, pz1)
        f = _ellipse(xs, ys, a_c * 0.12, self.y_vb - self.ay_vb - rng.uniform(18, 26), a_c * 0.42,
                     rng.uniform(6, 9), rng.uniform(0.15, 0.4)) + 0.1 * ns
        self.p.paint(zs, (f < 1) & cav, "PANCREAS")

    def liver(self) -> None:
        """Liver (right lobe and a left lobe on the upper slices) with vessels."""
        rng, nz, a_c, b_c, p, s = self.rng, self.nz, self.a_c, self.b_c, self.p, self.s
        lvz1 = nz - 1 - int(rng.integers(1, max(2, round(0.06 * nz)) + 1))
        lvz0 = max(1, lvz1 - int(round(nz * rng.uniform(0.55, 0.66))) + 1)
        self.liver_range = (lvz0, lvz1)
        zs, u, xs, ys, ns, cav, dep = self.slab(lvz0, lvz1)
        prof = np.where(u < 0.75, 0.3 + 0.7 * (u / 0.75) ** 0.6, 1 - 0.55 * ((u - 0.75) / 0.25) ** 2)
        prof = (prof * rng.uniform(0.9, 1.08))[:, None, None]
        u3 = u[:, None, None]
        rcx = -a_c * (0.38 + 0.22 * (1 - u3)) + rng.uniform(-4, 4)
        rcy = b_c * (-0.08 + 0.3 * (1 - u3) ** 2) + rng.uniform(-4, 4)
        f_right = _ellipse(xs, ys, rcx, rcy, a_c * rng.uniform(0.5, 0.6) * prof,
                           b_c * rng.uniform(0.72, 0.85) * prof)
        u_ll = rng.uniform(0.35, 0.5)
        v = np.clip((u3 - u_ll) / (1 - u_ll), 0, 1)
        lax = a_c * (0.08 + rng.uniform(0.35, 0.5) * np.sqrt(v)) + 1e-3
        lcx = -a_c * 0.1 + lax * 0.8
        lcy = -b_c * rng.uniform(0.4, 0.55)
        lay = (b_c * rng.uniform(0.22, 0.3) * (1 - 0.5 * np.clip((xs - lcx) / lax, 0, 1))) * np.sqrt(v) + 1e-3
        f_left = np.where(v > 0, _ellipse(xs, ys, lcx, lcy, lax, lay), 9.0)
        f_liver = np.minimum(f_right, f_left) + 0.07 * ns
        self.with_halo(zs, f_liver, 0.05, "LIVER", LIVER, dep > 1.5)
        ves = smooth_noise(rng, xs.shape, (0.8, 4 * s, 4 * s))
        liv = p.label[zs] == LIVER
        p.paint(zs, liv & (np.abs(ves - 1.6) < 0.12), "LIVER_VESSEL", LIVER)

    def gallbladder(self) -> None:
        """Gallbladder under the right lobe on the lower liver slices (most scans; not liver)."""
        rng, nz, a_c, b_c = self.rng, self.nz, self.a_c, self.b_c
        if rng.uniform() >= 0.8:
            return
        lvz0, lvz1 = self.liver_range
        gz0 = lvz0 + int(round((lvz1 - lvz0) * rng.uniform(0.05, 0.2)))
        gz1 = min(gz0 + max(2, int(round(nz * rng.uniform(0.08, 0.14)))), lvz1 - 2)
        zs, u, xs, ys, ns, cav, dep = self.slab(gz0, gz1)
        sc = (0.5 + 0.5 * np.sin(np.pi * u))[:, None, None]
        f = _ellipse(xs, ys, -a_c * rng.uniform(0.15, 0.3), -b_c * rng.uniform(0.1, 0.3), 13 * sc, 9 * sc,
                     rng.uniform(-0.8, 0.8)) + 0.05 * ns
        self.with_halo(zs, f, 0.15, "GALLBLADDER", 0, cav)

    def spleen(self) -> None:
        """Spleen: a posterior crescent on the image right, ending near the liver's top."""
        rng, nz, a_c, b_c = self.rng, self.nz, self.a_c, self.b_c
        sz1 = min(self.liver_range[1] - int(rng.integers(0, 3)), nz - 2)
        sz0 = max(1, sz1 - int(round(nz * rng.uniform(0.28, 0.38))) + 1)
        zs, u, xs, ys, ns, cav, dep = self.slab(sz0, sz1)
        sc = (0.45 + 0.55 * np.sin(np.pi * (0.1 + 0.8 * u)))[:, None, None] * rng.uniform(0.85, 1.1)
        ang = rng.uniform(0.5, 0.9)  # long axis along the posterolateral wall
        scx, scy = a_c * rng.uniform(0.48, 0.58), b_c * rng.uniform(0.15, 0.3)
        sp_long, sp_short = b_c * rng.uniform(0.42, 0.55) * sc, a_c * rng.uniform(0.2, 0.26) * sc
        f_out = _ellipse(xs, ys, scx, scy, sp_short, sp_long, -ang)
        off = sp_short * rng.uniform(1.25, 1.6)
        f_in = _ellipse(xs, ys, scx - off * np.cos(ang), scy - off * np.sin(ang), sp_short * 0.9, sp_long * 1.15,
                        -ang)
        f_spleen = np.where(f_in < 1, 9.0, f_out) + 0.06 * ns
        self.with_halo(zs, f_spleen, 0.1, "SPLEEN", SPLEEN, dep > 1.5)

    def kidneys(self) -> None:
        """Kidneys on either side of the spine: cortex, medullary pyramids, renal sinus at the hilum."""
        rng, nz, p = self.rng, self.nz, self.p
        kc = rng.uniform(0.42, 0.5)
        for lab, side, shift in ((RK, -1, -rng.uniform(0.02, 0.07)), (LK, 1, 0.0)):
            z0, z1 = _organ_range(nz, rng, (0.32, 0.42), kc + shift)
            zs, u, xs, ys, ns, cav, dep = self.slab(z0, z1)
            sc = (0.4 + 0.6 * np.sqrt(np.clip(1 - (2 * u - 1) ** 2, 0, 1)))[:, None, None] * rng.uniform(0.9, 1.1)
            beta = rng.uniform(0.5, 0.9)  # long axis tilted anterolaterally
            k_long, k_short = rng.uniform(24, 30) * sc, rng.uniform(14, 18) * sc
            kcx, kcy = side * (self.ax_vb + rng.uniform(30, 38)), self.y_vb + rng.uniform(-4, 8)
            dxl, dyl = side * np.sin(beta), -np.cos(beta)  # long-axis direction
            nx, ny = -side * np.cos(beta), -np.sin(beta)  # towards the hilum (anteromedial)
            dx, dy = xs - kcx, ys - kcy
            pl, pq = dx * dxl + dy * dyl, dx * nx + dy * ny
            f_k = np.sqrt((pl / k_long) ** 2 + (pq / k_short) ** 2)
            mid = (np.abs(u - 0.5) < 0.28)[:, None, None]
            notch = np.sqrt((pl / (k_long * 0.38)) ** 2 + ((pq - k_short * 0.95) / (k_short * 0.45)) ** 2) < 1
            f_k = np.where(notch & mid, 9.0, f_k) + 0.05 * ns
            m = self.with_halo(zs, f_k, 0.25, "KID_CORTEX", lab, cav)
            phi = np.arctan2(pq, pl)
            pyramids = (f_k < 0.72) & (f_k > 0.3) & (np.cos(7 * phi) > -0.2)
            p.paint(zs, m & pyramids, "KID_MEDULLA", lab)
            sinus = mid & (np.sqrt((pl / (k_long * 0.45)) ** 2 + ((pq - k_short * 0.45) / (k_short * 0.4)) ** 2) < 1)
            p.paint(zs, m & sinus, "RENAL_SINUS", lab)

    def vessels_spine_muscles(self) -> None:
        """Aorta, IVC, psoas and paraspinal muscles, the vertebral body with discs, the canal and spinous process."""
        rng, p, al, x, y = self.rng, self.p, slice(None), self.x, self.y
        ax_vb, ay_vb, y_vb, y_canal = self.ax_vb, self.ay_vb, self.y_vb, self.y_canal
        zi = np.arange(self.nz)
        p.paint(al, _ellipse(x, y, rng.uniform(5, 10), y_vb - ay_vb - 10, 10, 10) < 1, "AORTA")
        p.paint(al, _ellipse(x, y, -rng.uniform(18, 24), y_vb - ay_vb - 6, 12, 8, 0.2) < 1, "IVC")
        r_ps = np.clip(18 * (0.55 - self.zc) / 0.55, 0, None)[:, None, None] + 1e-3
        for side in (-1, 1):
            p.paint(al, (_ellipse(x, y, side * (ax_vb + 0.8 * r_ps + 2), y_vb + 2, r_ps, r_ps * 0.9) < 1)
                    & (r_ps > 3), "MUSCLE")
            p.paint(al, _ellipse(x, y, side * rng.uniform(20, 25), y_canal + 9, rng.uniform(18, 22), 16) < 1,
                    "MUSCLE")
        f_vb = _ellipse(x, y, 0, y_vb, ax_vb, ay_vb)
        disc = ((zi * MR_SLICE_MM + rng.uniform(0, 30)) % 30.0 < 8.0)[:, None, None]  # a disc every ~4 slices
        p.paint(al, f_vb < 1, "CORTEX")
        p.paint(al, (f_vb < 0.85) & ~disc, "MARROW")
        p.paint(al, (f_vb < 1) & disc, "DISC")
        p.paint(al, _ellipse(x, y, 0, y_canal, 11, 10) < 1, "CORTEX")
        p.paint(al, (np.abs(x) < 3.5) & (y > y_canal) & (self.depth > self.tf_base * 0.85 + 2), "CORTEX")
        p.paint(al, _ellipse(x, y, 0, y_canal, 7, 6) < 1, "CSF")

    def ribs(self) -> None:
        """Ribs on the upper half: small oblique ovals in the muscle wall along the rib cage."""
        rng, nz, p = self.rng, self.nz, self.p
        rz0 = int(round(nz * rng.uniform(0.4, 0.5)))
        a_m, b_m = float(np.mean(self.a)), float(np.mean(self.b))
        for z in range(rz0, nz):
            h = (z - rz0) / max(nz - 1 - rz0, 1)
            xz, yz, free = self.x[z], self.y[z], p.label[z] == 0
            for side in (-1, 1):
                n_rib = 3 + int(round(3 * h))
                phase = (z * 0.37 + rng.uniform(-0.05, 0.05)) % 1.0
                for k in range(n_rib):
                    phi = -0.9 * h - 0.3 + (k + phase) * (1.7 + 0.9 * h) / n_rib  # anterolateral to posterior
                    if phi > 1.35:
                        continue
                    cp, sp = np.cos(phi), np.sin(phi)
                    pw = self.p_post if sp > 0 else 2.0
                    reach = 1.0 / ((cp / a_m) ** pw + (abs(sp) / b_m) ** pw) ** (1 / pw)
                    wall = self.tm0 * (0.75 + 0.5 * sp * sp + 0.3 * max(-sp, 0))  # muscle wall at this angle
                    rr = reach - self.tf_base * (1 + 0.35 * cp * cp - 0.15 * max(sp, 0)) - 0.5 * wall
                    px, py = side * cp * rr, sp * rr
                    f = _ellipse(xz, yz, px, py, 3.5, rng.uniform(5, 7), side * phi)
                    p.tissue[z][(f < 1) & free] = T["CORTEX"]
                    p.tissue[z][(f < 0.6) & free] = T["MARROW"]

    def one_piece_per_organ(self) -> None:
        """Keep the largest connected piece of each labelled organ (the rest becomes visceral fat).

        Raises:
            RuntimeError: an organ vanished (a generator bug; reported with the seed).
        """
        p = self.p
        for lab in (LIVER, RK, LK, SPLEEN):
            m = p.label == lab
            cc, n = ndimage.label(m)
            if n == 0:
                raise RuntimeError(f"phantom: organ {LABELS[lab]} vanished; report this seed")
            if n > 1:
                keep = np.argmax(np.bincount(cc.ravel())[1:]) + 1
                drop = m & (cc != keep)
                p.tissue[drop] = T["VISCERAL_FAT"]
                p.label[drop] = 0


def build_anatomy(rng: np.random.Generator, n_slices: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scan's anatomy, step by step (:class:`_Anatomy`; later steps paint over earlier ones).

    Args:
        rng: the scan's random generator.
        n_slices: number of axial slices Z (>= 12).
        size: in-plane size H = W (>= 48).

    Returns:
        ``(tissue, label)``: uint8 ``(Z, H, W)`` tissue classes (:data:`TISSUES`) and organ labels (:data:`LABELS`).

    Raises:
        ValueError: fewer than 12 slices or 48 pixels.
    """
    if n_slices < 12 or size < 48:
        raise ValueError(f"phantom needs at least 12 slices and 48x48 pixels, got {n_slices} x {size}x{size}")
    body = _Anatomy(rng, n_slices, size)
    for step in (body.body, body.spine_frame, body.bowel, body.lungs_and_heart, body.stomach, body.pancreas,
                 body.liver, body.gallbladder, body.spleen, body.kidneys, body.vessels_spine_muscles, body.ribs,
                 body.one_piece_per_organ):
        step()
    return body.p.tissue, body.p.label


# ----------------------------------------------------------------------------------------------- image formation
def _mr_means(rng: np.random.Generator) -> np.ndarray:
    """Per-scan mean MR intensity of every tissue (float32, indexed by tissue id).

    Contrasts are drawn relative to fat (T2 with imperfect fat suppression): neighbouring tissues always differ
    by a visible factor within a scan, while their absolute and relative levels vary between scans, so organ
    intensity ranges overlap each other and their surroundings across the dataset.
    """
    def e(lo: float, hi: float) -> float:
        return float(np.exp(rng.uniform(lo, hi)))

    fat = rng.uniform(250, 420)
    m = {"AIR": 0.0, "GAS": 6.0, "LUNG": 20.0, "SUBCUT_FAT": fat, "VISCERAL_FAT": fat * e(-0.12, 0.08)}
    m["SKIN"] = fat * e(0.25, 0.5)
    m["MUSCLE"] = fat * e(-0.65, -0.3)
    m["LIVER"] = m["VISCERAL_FAT"] * e(0.3, 0.55) ** (1 if rng.uniform() < 0.9 else -1)
    m["SPLEEN"] = m["LIVER"] * e(0.3, 0.8)
    m["KID_CORTEX"] = m["LIVER"] * e(0.35, 0.9)
    m["KID_MEDULLA"] = m["KID_CORTEX"] * e(0.08, 0.3)
    m["RENAL_SINUS"] = m["VISCERAL_FAT"] * e(-0.3, 0.0)
    m["PANCREAS"] = m["LIVER"] * e(0.1, 0.55)
    m["BOWEL_WALL"] = m["LIVER"] * e(0.1, 0.7)
    m["STOMACH_WALL"] = m["LIVER"] * e(0.0, 0.5)
    m["CHYME"] = fat * e(0.0, 1.0)
    m["FLUID"] = fat * e(1.1, 1.5)
    m["GALLBLADDER"] = fat * e(1.2, 1.6)
    m["CSF"] = fat * e(1.2, 1.6)
    m["MARROW"] = fat * e(-0.1, 0.3)
    m["DISC"] = m["MARROW"] * e(0.4, 0.8)
    m["CORTEX"] = m["MUSCLE"] * e(-1.0, -0.6)
    bright = m["FLUID"] * e(-0.5, -0.2)
    m["AORTA"] = bright if rng.uniform() < 0.3 else m["MUSCLE"] * e(-0.8, -0.4)  # bright flow or flow void
    m["IVC"] = bright if rng.uniform() < 0.3 else m["MUSCLE"] * e(-0.5, -0.1)
    m["LIVER_VESSEL"] = m["LIVER"] * (e(0.4, 0.8) if rng.uniform() < 0.3 else e(-0.6, -0.3))
    gain = rng.uniform(0.75, 1.35)
    return np.array([m[n] * gain for n in TISSUES], np.float32)


def render(rng: np.random.Generator, tissue: np.ndarray, appearance: Appearance = "mr") -> np.ndarray:
    """Turn a tissue map into an image with per-scan contrast, texture, blur, bias field and noise.

    Args:
        rng: the scan's random generator.
        tissue: uint8 ``(Z, H, W)`` tissue classes.
        appearance: ``"mr"`` (raw-like T2-SPIR intensities, air < 50) or ``"ct"`` (windowed HU in [0, 255]).

    Returns:
        float32 ``(Z, H, W)`` image.
    """
    nz, h, w = tissue.shape
    s = w / 256.0
    if appearance == "mr":
        mean = _mr_means(rng)
        amp_f = np.array([_MR_TEXTURE[n][0] for n in TISSUES], np.float32)
        amp_m = np.array([_MR_TEXTURE[n][1] for n in TISSUES], np.float32)
    else:
        mean = np.array([_CT[n][0] + rng.uniform(-1, 1) * _CT[n][1] for n in TISSUES], np.float32)
        amp_f = np.array([_CT[n][2] for n in TISSUES], np.float32)
        amp_m = np.array([_CT[n][3] for n in TISSUES], np.float32)
    fine = smooth_noise(rng, tissue.shape, (0.5, 1.0 * s, 1.0 * s))
    mid = smooth_noise(rng, tissue.shape, (1.0, 3.5 * s, 3.5 * s))
    if appearance == "mr":
        img = mean[tissue] * (1 + amp_f[tissue] * fine + amp_m[tissue] * mid)
    else:
        img = mean[tissue] + amp_f[tissue] * fine + amp_m[tissue] * mid
    del fine, mid
    img = ndimage.gaussian_filter(img, (rng.uniform(0.35, 0.55), rng.uniform(0.5, 0.8) * s, rng.uniform(0.5, 0.8) * s))

    if appearance == "mr":
        # Coil-like bias: smooth polynomial in-plane and along z, brighter near the body surface.
        yy, xx = np.meshgrid(np.linspace(-1, 1, h, dtype=np.float32), np.linspace(-1, 1, w, dtype=np.float32),
                             indexing="ij")
        c = rng.normal(0, 1, 6).astype(np.float32)
        bias2d = (0.12 * c[0] * xx + 0.12 * c[1] * yy + 0.08 * c[2] * xx * xx + 0.08 * c[3] * yy * yy
                  + 0.08 * c[4] * xx * yy + rng.uniform(0.05, 0.3) * (xx * xx + yy * yy))
        zz = np.linspace(-1, 1, nz, dtype=np.float32)
        bias_z = 0.08 * c[5] * zz + rng.uniform(-0.1, 0.1) * zz * zz
        bias2d -= bias2d[h // 4: 3 * h // 4, w // 4: 3 * w // 4].mean()
        img *= np.exp(bias2d[None] + bias_z[:, None, None])
        sigma = rng.uniform(4.0, 7.0)
        n1 = rng.standard_normal(img.shape, dtype=np.float32)
        img += sigma * n1
        np.square(img, out=img)
        n1 = rng.standard_normal(img.shape, dtype=np.float32)
        img += np.square(sigma * n1)
        np.sqrt(img, out=img)
        img = np.minimum(img, np.percentile(img, 99.5))  # the processed CHAOS clip (docs/method.md#chaos-t2-mri)
    else:
        img += rng.normal(0, rng.uniform(8, 15), img.shape).astype(np.float32)
        lo, hi = CT_WINDOW
        img = (np.clip(img, lo, hi) - lo) / (hi - lo) * 255.0
    return img.astype(np.float32)


def scan_geometry(rng: np.random.Generator, shape: tuple[int, int, int], appearance: Appearance) -> Geometry:
    """Spacing (x, y, z) in mm, an origin centring the field of view, identity (LPS) direction."""
    nz, h, w = shape
    px = (MR_PIXEL_MM if appearance == "mr" else CT_PIXEL_MM) * 256.0 / w
    dz = MR_SLICE_MM if appearance == "mr" else CT_SLICE_MM
    origin = (-(w - 1) / 2 * px, -(h - 1) / 2 * px + rng.uniform(-15, 15), -(nz - 1) / 2 * dz + rng.uniform(-40, 40))
    return Geometry((px, px, dz), tuple(float(o) for o in origin), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def synthesize_scan(seed: int, scan_id: int, size: int = 256, n_slices_range: tuple[int, int] = (30, 40),
                    appearance: Appearance = "mr") -> tuple[np.ndarray, np.ndarray, Geometry]:
    """One phantom scan, a pure function of ``(seed, scan_id)`` and the sizes.

    Returns:
        ``(image, label, geometry)``: float32 ``(Z, H, W)`` image, uint8 ``(Z, H, W)`` labels, grid geometry.
    """
    if appearance not in ("mr", "ct"):
        raise ValueError(f"appearance must be 'mr' or 'ct', got {appearance!r}")
    lo, hi = n_slices_range
    if not 12 <= lo <= hi:
        raise ValueError(f"n_slices range must satisfy 12 <= min <= max, got {n_slices_range}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(scan_id)]))
    n_slices = int(rng.integers(lo, hi + 1))
    tissue, label = build_anatomy(rng, n_slices, size)
    image = render(rng, tissue, appearance)
    return image, label, scan_geometry(rng, image.shape, appearance)


def _write_scan(args: tuple[Path, int, int, int, tuple[int, int], str]) -> int:
    out_dir, seed, scan_id, size, n_range, appearance = args
    image, label, geom = synthesize_scan(seed, scan_id, size, n_range, appearance)  # type: ignore[arg-type]
    write_volume(image, image_path(out_dir, scan_id), geometry=geom)
    write_volume(label, label_path(out_dir, scan_id), geometry=geom)
    return scan_id


def description(out_dir: str | Path, n_scans: int, appearance: Appearance, size: int = 256) -> dict:
    """The ``dataset.json5`` content describing a generated folder (keys of ``dataloaders/datasets/PHANTOM.json5``)."""
    return {
        "name": "PHANTOM" if appearance == "mr" else "PHANTOM_CT",
        "description": f"synthetic abdominal phantom ({appearance.upper()} appearance, {n_scans} scans), "
                       "generated by python -m data_preprocessing.phantom",
        "modality": "MR" if appearance == "mr" else "CT",
        "data_dir": str(Path(out_dir).resolve()),
        "labels": {str(k): v for k, v in LABELS.items()},
        "eval_classes": [1, 2, 3, 4],
        "label_groups": [[1, 4], [2, 3]],
        # automatic folds need n_folds + 1 scans; two scans get the two explicit swaps
        "folds": ({"n_folds": min(5, n_scans - 1)} if n_scans >= 3 else
                  [{"queries": [0], "support": [1]}, {"queries": [1], "support": [0]}]),
        "body_threshold": BODY_THRESHOLD["MR" if appearance == "mr" else "CT"],
        # 3D supervoxels of ~60 cm3 (5000 voxels of the 256 x 256 grid) whatever the in-plane size (docs/supervoxels.md)
        "n_sv": max(1, round(5000 * (size / 256) ** 2)),
        # the in-plane spacing of every scan of the folder (scan_geometry)
        "spacing_mm": (MR_PIXEL_MM if appearance == "mr" else CT_PIXEL_MM) * 256.0 / size,
    }


def generate_phantom(out_dir: str | Path, n_scans: int = 10, seed: int = 0, size: int = 256,
                     appearance: Appearance = "mr", n_slices_min: int = 30, n_slices_max: int = 40,
                     workers: int = 1) -> list[int]:
    """Write a phantom dataset to ``out_dir`` (images, labels, ``dataset.json5``).

    Args:
        out_dir: output folder (created).
        n_scans: number of scans, ids ``0..n_scans-1`` (>= 2).
        seed: dataset seed; scan ``i`` depends only on ``(seed, i)``, sizes and appearance.
        size: in-plane size H = W (>= 48).
        appearance: ``"mr"`` or ``"ct"``.
        n_slices_min, n_slices_max: per-scan slice count range (inclusive, >= 12).
        workers: processes to use (1 = in this process).

    Returns:
        The scan ids written.
    """
    if n_scans < 2:
        raise ValueError(f"n_scans must be >= 2, got {n_scans}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out, seed, i, size, (n_slices_min, n_slices_max), appearance) for i in range(n_scans)]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            ids = list(tqdm(pool.map(_write_scan, jobs), total=n_scans, desc="phantom", unit="scan"))
    else:
        ids = [_write_scan(j) for j in tqdm(jobs, desc="phantom", unit="scan")]
    write_json(description(out, n_scans, appearance, size), out / "dataset.json5")
    return ids


# ----------------------------------------------------------------------------------------------- preview
def save_preview(data_dir: str | Path, png: str | Path, scan_ids: list[int] | None = None, n_slices: int = 4) -> Path:
    """Save a grid of slices (rows: scans, columns: evenly spaced slices) with the label contours overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dataloaders.niftiio import list_scan_ids, load_scan

    ids = scan_ids if scan_ids is not None else list_scan_ids(data_dir)[:3]
    colors = {1: "tab:red", 2: "tab:green", 3: "tab:cyan", 4: "tab:orange"}
    fig, axes = plt.subplots(len(ids), n_slices, figsize=(3 * n_slices, 3 * len(ids)), squeeze=False)
    for row, sid in enumerate(ids):
        scan = load_scan(data_dir, sid)
        nz = scan.image.shape[0]
        for col, z in enumerate(np.linspace(0.3 * nz, 0.85 * nz, n_slices).astype(int)):
            ax = axes[row, col]
            ax.imshow(scan.image[z], cmap="gray", vmin=0, vmax=np.percentile(scan.image, 99.5))
            for lab, color in colors.items():
                if (scan.label[z] == lab).any():
                    ax.contour(scan.label[z] == lab, levels=[0.5], colors=color, linewidths=0.7)
            ax.set_title(f"scan {sid} z={z}/{nz}", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    png = Path(png)
    with atomic_file(png) as tmp:  # a crash leaves no half-written figure
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return png


def build_parser() -> OptionParser:
    """The options of ``python -m data_preprocessing.phantom`` (docs/cli.md)."""
    ap = OptionParser(prog="python -m data_preprocessing.phantom", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--n-scans", type=int_at_least(2), default=10)
    ap.add_argument("--seed", type=int_at_least(0), default=0)
    ap.add_argument("--size", type=int_at_least(48), default=256, help="in-plane size H = W (>= 48)")
    ap.add_argument("--n-slices-min", type=int_at_least(12), default=30, help="fewest slices per scan (>= 12)")
    ap.add_argument("--n-slices-max", type=int_at_least(12), default=40, help="most slices per scan")
    ap.add_argument("--appearance", choices=("mr", "ct"), default="mr")
    ap.add_argument("--workers", type=int_at_least(1), default=min(2, os.cpu_count() or 1))
    ap.add_argument("--preview", default=None, help="also save a PNG grid of slices with label contours")
    return ap


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; a bad option exits with one ``error:`` line and code 2 before any work."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.n_slices_min > args.n_slices_max:
        ap.error(f"--n-slices-min {args.n_slices_min} is larger than --n-slices-max {args.n_slices_max}")
    t0 = time.perf_counter()
    ids = generate_phantom(args.out, args.n_scans, args.seed, args.size, args.appearance, args.n_slices_min,
                           args.n_slices_max, args.workers)
    print(f"wrote {len(ids)} scans (ids {ids[0]}..{ids[-1]}) and dataset.json5 to {args.out} "
          f"in {time.perf_counter() - t0:.1f} s")
    if args.preview:
        print(f"preview: {save_preview(args.out, args.preview)}")


if __name__ == "__main__":
    main()
