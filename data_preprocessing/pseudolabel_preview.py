"""A look at the pseudolabels before training: PNGs of a few slices of a few scans with their regions drawn over the
image, and the regions' size statistics (``python -m data_preprocessing.pseudolabel --preview DIR``).

Training learns from these regions alone (docs/method.md#pseudolabels), so their size and their fit to the organs
decide what the network can learn ("supervoxels look worse than superpixels", a question asked of ADNet's
repository). For each previewed scan
the preview writes ``scan_<id>_z<z>.png`` for ``n_slices`` slices spread over the slices holding pseudolabels: the
slice on the left, the same slice with each region in its own colour and the region borders in white on the right,
the statistics of the slice in a caption band above; and ``preview.json`` with the statistics of every previewed
scan and slice.

Statistics (a region is one pseudolabel id within one slice; 0 is the background outside the body):

- ``regions``: regions in the slice; ``mean_pixels``: their mean size in pixels; ``mean_mm2``: the same in mm²
  (pixels x the in-plane spacing);
- per scan, over every slice holding pseudolabels: ``slices``, ``regions_per_slice`` (mean), ``mean_pixels`` and
  ``mean_mm2`` (the labelled pixels over the regions of all those slices); for 3D supervoxels also
  ``supervoxels`` (distinct ids of the volume), ``mean_voxels`` and ``mean_mm3``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dataloaders.niftiio import (
    DataFormatError,
    image_path,
    list_scan_ids,
    read_label_volume,
    read_volume,
    superpix_path,
    supervox_path,
)
from util.atomic import atomic_file, write_text

MIN_SIDE = 256  # slices are enlarged by a whole factor until their larger side reaches this many pixels
CAPTION_HEIGHT = 28  # pixels of the caption band above the two panels


def region_stats(ids: np.ndarray, pixel_mm2: float) -> dict[str, float]:
    """Regions of one slice of pseudolabel ids (nonzero) and their mean size.

    Args:
        ids: (H, W) integer ids, 0 outside the body.
        pixel_mm2: the area of one pixel in mm².

    Returns:
        ``regions``, ``pixels`` (labelled pixels), ``mean_pixels`` and ``mean_mm2`` (NaN without regions).
    """
    values = ids[ids != 0]
    regions = int(np.unique(values).size)
    mean = values.size / regions if regions else math.nan
    return {"regions": regions, "pixels": int(values.size), "mean_pixels": mean, "mean_mm2": mean * pixel_mm2}


def scan_stats(ids: np.ndarray, spacing_xyz: tuple[float, ...], dim: Literal[2, 3]) -> dict[str, Any]:
    """Statistics of one scan's pseudolabels over the slices that hold any (module docstring).

    Args:
        ids: (Z, H, W) integer ids.
        spacing_xyz: the voxel spacing in mm, SimpleITK (x, y, z) order.
        dim: 2 for per-slice superpixels, 3 for supervoxels (adds the 3D statistics).
    """
    pixel_mm2 = float(spacing_xyz[0]) * float(spacing_xyz[1])
    per_slice = [region_stats(s, pixel_mm2) for s in ids]
    used = [s for s in per_slice if s["regions"] > 0]
    regions = sum(s["regions"] for s in used)
    pixels = sum(s["pixels"] for s in used)
    mean = pixels / regions if regions else math.nan
    out: dict[str, Any] = {"slices": len(used), "regions_per_slice": regions / len(used) if used else math.nan,
                           "mean_pixels": mean, "mean_mm2": mean * pixel_mm2}
    if dim == 3:
        n = int(np.unique(ids[ids != 0]).size)
        voxels = int(np.count_nonzero(ids))
        out.update(supervoxels=n, mean_voxels=voxels / n if n else math.nan,
                   mean_mm3=(voxels / n if n else math.nan) * pixel_mm2 * float(spacing_xyz[2]))
    return out


def preview_slices(ids: np.ndarray, n: int) -> list[int]:
    """``n`` slice indices spread evenly over the slices of ``ids`` (Z, H, W) that hold pseudolabels (fewer when
    fewer such slices exist): the k-th of n at (k + 1) / (n + 1) of that list."""
    used = np.flatnonzero((ids != 0).any(axis=(1, 2)))
    if used.size == 0:
        return []
    picks = [int(used[min(int((k + 1) * used.size / (n + 1)), used.size - 1)]) for k in range(n)]
    return sorted(set(picks))


def _grey(image: np.ndarray) -> np.ndarray:
    """A slice as uint8 grey levels, its 1st..99th percentile stretched to 0..255."""
    lo, hi = np.percentile(image, [1, 99])
    scaled = (image.astype(np.float64) - lo) / (hi - lo) if hi > lo else np.zeros(image.shape)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def enlargement(height: int, width: int) -> int:
    """The whole factor that brings the larger side of a slice to at least :data:`MIN_SIDE` pixels (1 if it is)."""
    return max(1, math.ceil(MIN_SIDE / max(height, width)))


def render_slice(image: np.ndarray, ids: np.ndarray, caption: str) -> Any:
    """The preview image of one slice (a ``PIL.Image``, RGB).

    Args:
        image: (H, W) intensities.
        ids: (H, W) pseudolabel ids, 0 outside the body.
        caption: one line of text drawn in the caption band.

    Returns:
        An image of ``2 W f`` x ``H f + CAPTION_HEIGHT`` pixels, f = :func:`enlargement`: the slice, then the slice
        with the regions coloured (random colour per id, half transparent) and their borders in white.
    """
    from PIL import Image, ImageDraw
    from skimage.segmentation import find_boundaries

    f = enlargement(*ids.shape)
    grey = np.repeat(np.repeat(_grey(image), f, axis=0), f, axis=1)
    big_ids = np.repeat(np.repeat(ids, f, axis=0), f, axis=1)
    left = np.stack([grey] * 3, axis=-1)
    palette = np.random.default_rng(0).integers(40, 256, size=(int(ids.max()) + 1, 3)).astype(np.float64)
    inside = big_ids != 0
    right = left.astype(np.float64)
    right[inside] = 0.5 * right[inside] + 0.5 * palette[big_ids[inside]]
    right[find_boundaries(big_ids, mode="inner") & inside] = 255.0
    canvas = Image.new("RGB", (2 * grey.shape[1], grey.shape[0] + CAPTION_HEIGHT), (0, 0, 0))
    canvas.paste(Image.fromarray(left), (0, CAPTION_HEIGHT))
    canvas.paste(Image.fromarray(right.astype(np.uint8)), (grey.shape[1], CAPTION_HEIGHT))
    ImageDraw.Draw(canvas).text((4, 8), caption, fill=(255, 255, 255))
    return canvas


def _fmt(x: float, digits: int) -> str:
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


def write_preview(data_dir: str | Path, out_dir: str | Path, dataset: str, dim: Literal[2, 3] = 2,
                  scale: str = "MIDDLE", scan_ids: list[int] | None = None, n_scans: int = 3,
                  n_slices: int = 3) -> dict[str, Any]:
    """Write the PNGs and ``preview.json`` of the pseudolabels of a processed folder (module docstring).

    Args:
        data_dir: the processed folder (``image_<id>.nii.gz`` and the pseudolabel files).
        out_dir: where the PNGs and ``preview.json`` go (created).
        dataset: the dataset's name or description file, named in the command of a missing-file error.
        dim: 2 previews ``superpix-<scale>_<id>.nii.gz``, 3 ``supervox-<scale>_<id>.nii.gz``.
        scale: the pseudolabel files' scale tag.
        scan_ids: the scans to preview (default: the first ``n_scans`` of the folder).
        n_scans: scans previewed when ``scan_ids`` is not given.
        n_slices: slices per scan.

    Returns:
        The content of ``preview.json``: ``{"dim", "scans": {id: {**scan statistics, "slices_previewed":
        [{"z", "png", **slice statistics}]}}}``.

    Raises:
        DataFormatError: the folder holds no images, a requested scan is missing, or a pseudolabel file is missing
            or not on its image's grid (the message names the command that writes it).
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    available = list_scan_ids(data_dir)
    ids_to_show = available[:n_scans] if scan_ids is None else list(scan_ids)
    missing = [i for i in ids_to_show if i not in available]
    if missing:
        raise DataFormatError(f"{image_path(data_dir, missing[0])}: file not found (requested scans {missing})")
    kind = "supervoxels" if dim == 3 else "superpixels"
    report: dict[str, Any] = {"dim": dim, "kind": kind, "data_dir": str(data_dir), "scans": {}}
    for sid in ids_to_show:
        path = supervox_path(data_dir, sid, scale) if dim == 3 else superpix_path(data_dir, sid, scale)
        if not path.is_file():
            raise DataFormatError(f"{path}: {kind} file not found; generate it with python -m "
                                  f"data_preprocessing.pseudolabel --dataset {dataset} --data-dir {data_dir} "
                                  f"--scans {sid}" + (" --dim 3" if dim == 3 else ""))
        image, geom = read_volume(image_path(data_dir, sid))
        ids, ids_geom = read_label_volume(path)
        why = geom.mismatch(ids_geom)
        if ids.shape != image.shape or why is not None:
            raise DataFormatError(f"{path}: not on the grid of {image_path(data_dir, sid).name} "
                                  f"({why or f'shape {ids.shape} != {image.shape}'}); regenerate it")
        stats = scan_stats(ids, geom.spacing, dim)
        pixel_mm2 = float(geom.spacing[0]) * float(geom.spacing[1])
        shown = []
        for z in preview_slices(ids, n_slices):
            s = region_stats(ids[z], pixel_mm2)
            png = out_dir / f"scan_{sid}_z{z}.png"
            caption = (f"scan {sid}, slice {z}: {s['regions']} {kind}, mean {_fmt(s['mean_pixels'], 0)} px = "
                       f"{_fmt(s['mean_mm2'], 1)} mm^2")
            with atomic_file(png) as tmp:
                render_slice(image[z], ids[z], caption).save(tmp, format="PNG")
            shown.append({"z": z, "png": png.name, **s})
        report["scans"][str(sid)] = {**stats, "slices_previewed": shown}
    write_text(out_dir / "preview.json", json.dumps(_nan_to_none(report), indent=1) + "\n")
    return report


def _nan_to_none(obj: Any) -> Any:
    """``obj`` with NaN floats replaced by ``None`` (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The printed summary of :func:`write_preview`'s report: one line per scan, one per previewed slice."""
    lines = []
    for sid, s in report["scans"].items():
        line = (f"scan {sid}: {s['slices']} slices with {report['kind']}, {_fmt(s['regions_per_slice'], 1)} per "
                f"slice, mean {_fmt(s['mean_pixels'], 0)} px = {_fmt(s['mean_mm2'], 1)} mm^2")
        if report["dim"] == 3:
            line += (f"; {s['supervoxels']} supervoxels of {_fmt(s['mean_voxels'], 0)} voxels = "
                     f"{_fmt(s['mean_mm3'] / 1000, 1)} cm^3 on average")
        lines.append(line)
        lines += [f"  {p['png']}: {p['regions']} region{'' if p['regions'] == 1 else 's'}, mean "
                  f"{_fmt(p['mean_pixels'], 0)} px = {_fmt(p['mean_mm2'], 1)} mm^2" for p in s["slices_previewed"]]
    return lines
