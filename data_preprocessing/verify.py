"""Integrity check and verification table of a processed dataset folder, and the steps every pipeline ends with.

``python -m data_preprocessing.verify --data-dir D --dataset NAME`` checks, for every ``image_<id>.nii.gz``:

- the label (and, unless ``--no-superpixels``, superpixel and body-mask) files exist and lie on the image's
  grid (shape, spacing, origin, direction);
- label values are ids of the dataset's label map; images hold finite values (checked by the reader);
- superpixel and body-mask files were made from the current image (source fingerprint in their header);
- labelled voxels lie inside the body (image above the dataset's body threshold; a warning below 90 %, which
  catches flipped or shifted labels);
- optional expected in-plane size and spacing (the pipelines pass theirs);
- ``classmap_1.json`` exists, lists every scan and agrees with the label files;
- scans of the dataset's fixed scan list that are missing (a warning: a partial download is allowed).

It prints one row per scan (shape, spacing, label ids present, slices per class, share of labelled voxels in
the body) and a total row, and exits with 1 when an error was found. The dataset pipelines
(``data_preprocessing.chaos``/``sabs``/``cmr``) end with :func:`run_final_steps` (class map, superpixels, this
check) and share the command-line plumbing below.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dataloaders.dataset_info import DatasetDescriptionError, DatasetInfo, get_dataset_info
from dataloaders.derived import (
    check_made_from,
    classmap_command,
    classmap_disagreement,
    describe_disagreement,
    image_fingerprint,
    pseudolabel_command,
)
from dataloaders.niftiio import (
    DataFormatError,
    Geometry,
    fgmask_path,
    image_path,
    label_path,
    list_scan_ids,
    load_classmap,
    read_label_volume,
    read_volume,
    superpix_path,
    write_json,
)
from util.options import OptionParser, existing_dir

FG_IN_BODY_WARN = 0.9  # warn when fewer labelled voxels than this lie inside the body mask threshold


# -------------------------------------------------------------------- the check
@dataclass
class ScanReport:
    """Verification result of one scan.

    Attributes:
        scan_id: scan id.
        shape: image array shape (Z, H, W).
        spacing: voxel spacing (x, y, z) in mm.
        label_ids: label ids present.
        slices_per_class: class id -> number of slices holding it (>= 1 pixel); background left out.
        fg_in_body: share of labelled voxels where the image exceeds the body threshold (None: no labels).
    """

    scan_id: int
    shape: tuple[int, ...] = ()
    spacing: tuple[float, ...] = ()
    label_ids: list[int] = field(default_factory=list)
    slices_per_class: dict[int, int] = field(default_factory=dict)
    fg_in_body: float | None = None


@dataclass
class VerifyReport:
    """Verification of a processed folder: per-scan rows, errors and warnings (each names its file)."""

    dataset: str
    data_dir: str
    class_names: dict[int, str]
    scans: list[ScanReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        """JSON-ready form."""
        out = asdict(self)
        out["ok"] = self.ok
        return out

    def table(self) -> str:
        """The verification table: one row per scan, then totals, errors and warnings."""
        names = {c: n for c, n in self.class_names.items() if c != 0}
        head = ["scan", "shape (Z,H,W)", "spacing (x,y,z) mm", "label ids"] + list(names.values()) + ["fg in body"]
        rows = []
        for s in self.scans:
            rows.append([
                str(s.scan_id),
                "x".join(str(v) for v in s.shape) if s.shape else "-",
                ", ".join(f"{v:.3f}" for v in s.spacing) if s.spacing else "-",
                ",".join(str(v) for v in s.label_ids) if s.shape else "-",
                *[str(s.slices_per_class.get(c, 0)) for c in names],
                "-" if s.fg_in_body is None else f"{100 * s.fg_in_body:.1f}%",
            ])
        totals = [f"{len(self.scans)} scans", "", "", ""]
        for c in names:
            n_scans = sum(1 for s in self.scans if s.slices_per_class.get(c, 0))
            totals.append(f"{sum(s.slices_per_class.get(c, 0) for s in self.scans)} ({n_scans} scans)")
        totals.append("")
        widths = [max(len(r[i]) for r in [head, *rows, totals]) for i in range(len(head))]

        def fmt(r: list[str]) -> str:
            return "  ".join(v.rjust(w) for v, w in zip(r, widths)).rstrip()

        lines = [f"{self.dataset}: {self.data_dir}  (class columns: slices holding the class)", fmt(head),
                 fmt(["-" * w for w in widths]), *map(fmt, rows), fmt(["-" * w for w in widths]), fmt(totals)]
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"error: {e}" for e in self.errors]
        lines.append("verification passed" if self.ok else f"verification FAILED ({len(self.errors)} errors)")
        return "\n".join(lines)


def _check_grid(ref_name: str, shape: tuple[int, ...], geom: Geometry, path: Path, arr: np.ndarray,
                other: Geometry) -> str | None:
    if arr.shape != shape:
        return f"{path}: shape {arr.shape} differs from {ref_name} {shape}"
    why = geom.mismatch(other)
    return None if why is None else f"{path}: geometry differs from {ref_name}: {why}"


def verify_dataset(data_dir: str | Path, info: DatasetInfo, expect_hw: Sequence[int] | None = None,
                   expect_spacing: Sequence[float | None] | None = None, superpixels: bool = True,
                   classmap: bool = True, min_fg: int = 1, scale: str = "MIDDLE",
                   progress: bool = True) -> VerifyReport:
    """Check a processed folder and collect the verification table.

    Args:
        data_dir: processed folder.
        info: dataset description (label map, body threshold, fixed scan list).
        expect_hw: required in-plane array size (H, W), e.g. (256, 256).
        expect_spacing: required spacing (x, y, z) in mm; ``None`` entries are not checked.
        superpixels: require ``superpix-<scale>_<id>`` and ``fgmask_<id>`` files on the image grid.
        classmap: require ``classmap_<min_fg>.json``, complete and consistent with the labels.
        min_fg: the class map's minimum pixel count.
        scale: superpixel file scale name.
        progress: tqdm bar over scans.

    Returns:
        The report; ``report.ok`` is False when an error was found.
    """
    data_dir = Path(data_dir)
    report = VerifyReport(info.name, str(data_dir), dict(info.labels))
    try:
        ids = list_scan_ids(data_dir)
    except DataFormatError as err:
        report.errors.append(str(err))
        return report
    if info.scan_ids is not None:
        missing = sorted(set(info.scan_ids) - set(ids))
        extra = sorted(set(ids) - set(info.scan_ids))
        if missing:
            report.warnings.append(f"{len(missing)} scans of the {info.name} scan list are not in the folder: "
                                   f"{missing} (the fixed folds need all of them)")
        if extra:
            report.errors.append(f"scans {extra} are not in the {info.name} scan list {list(info.scan_ids)}")
    known = set(info.labels)
    fg_classes = [c for c in info.labels if c != 0]
    slice_lists: dict[int, dict[int, list[int]]] = {}
    for sid in tqdm(ids, disable=not progress, unit="scan", desc=f"verify {info.name}"):
        row = ScanReport(sid)
        report.scans.append(row)
        ipath, lpath = image_path(data_dir, sid), label_path(data_dir, sid)
        try:
            image, geom = read_volume(ipath)
            label, lgeom = read_label_volume(lpath)
        except DataFormatError as err:
            report.errors.append(str(err))
            continue
        row.shape, row.spacing = tuple(int(v) for v in image.shape), tuple(float(v) for v in geom.spacing)
        if expect_hw is not None and tuple(image.shape[1:]) != tuple(expect_hw):
            report.errors.append(f"{ipath}: in-plane size {image.shape[1:]} != expected {tuple(expect_hw)}")
        if expect_spacing is not None:
            for axis, (have, want) in enumerate(zip(geom.spacing, expect_spacing)):
                if want is not None and abs(have - want) > 1e-3 * want:
                    report.errors.append(f"{ipath}: spacing {'xyz'[axis]} = {have:.4f} mm != expected {want} mm")
        problem = _check_grid(ipath.name, image.shape, geom, lpath, label, lgeom)
        if problem:
            report.errors.append(problem)
            continue
        present = [int(v) for v in np.unique(label)]
        row.label_ids = present
        unknown = sorted(set(present) - known)
        if unknown:
            report.errors.append(f"{lpath}: label ids {unknown} are not in the {info.name} label map {sorted(known)}")
        per_slice = label.reshape(label.shape[0], -1)
        slice_lists[sid] = {c: np.flatnonzero((per_slice == c).sum(axis=1) >= min_fg).tolist()
                            for c in info.labels}
        row.slices_per_class = {c: int((per_slice == c).any(axis=1).sum()) for c in fg_classes}
        fg = label > 0
        if fg.any():
            row.fg_in_body = float(np.mean(image[fg] > info.body_threshold))
            if row.fg_in_body < FG_IN_BODY_WARN:
                report.warnings.append(
                    f"{lpath}: only {100 * row.fg_in_body:.1f}% of labelled voxels lie inside the body "
                    f"(image > {info.body_threshold}); check the label orientation")
        else:
            report.warnings.append(f"{lpath}: no foreground label")
        if superpixels:
            for path in (superpix_path(data_dir, sid, scale), fgmask_path(data_dir, sid)):
                try:
                    arr, sgeom = read_label_volume(path)
                except DataFormatError as err:
                    report.errors.append(str(err))
                    continue
                problem = _check_grid(ipath.name, image.shape, geom, path, arr, sgeom)
                if problem is None:
                    try:  # made from this version of the image? (fingerprint in the header, dataloaders.derived)
                        check_made_from(path, ipath, image_fingerprint(image, geom),
                                        pseudolabel_command(data_dir, info, [sid], scale))
                    except DataFormatError as err:
                        problem = str(err)
                if problem:
                    report.errors.append(problem)
                elif arr.min() < 0:
                    report.errors.append(f"{path}: negative values")
                elif not arr.any():
                    report.warnings.append(f"{path}: empty (no body found)")
    if classmap:
        _check_classmap(report, data_dir, info, ids, slice_lists, min_fg)
    return report


def _check_classmap(report: VerifyReport, data_dir: Path, info: DatasetInfo, ids: list[int],
                    slice_lists: dict[int, dict[int, list[int]]], min_fg: int) -> None:
    try:
        cmap = load_classmap(data_dir, list(info.labels.values()), scan_ids=ids, min_fg=min_fg,
                             rebuild=classmap_command(data_dir, info, min_fg))
    except DataFormatError as err:
        report.errors.append(str(err))
        return
    found = classmap_disagreement(cmap, slice_lists, info)  # the same comparison training and validation make
    if found is not None:
        report.errors.append(describe_disagreement(data_dir, info, min_fg, found))


# -------------------------------------------------------------------- a picture of one scan
def show_scan(data_dir: str | Path, scan_id: int, z: int | None = None, scale: str = "MIDDLE") -> Any:
    """Plot one slice: the image, the image with its label overlay, and its superpixels when present.

    Args:
        data_dir: a folder of ``image_<id>``/``label_<id>.nii.gz`` (processed or intermediate).
        scan_id: scan id.
        z: slice index (SimpleITK axis 0); default the slice with the most labelled pixels.
        scale: superpixel file scale name.

    Returns:
        The matplotlib Figure (displayed inline in a notebook).
    """
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    data_dir = Path(data_dir)
    image, _ = read_volume(image_path(data_dir, scan_id))
    label, _ = read_label_volume(label_path(data_dir, scan_id))
    spath = superpix_path(data_dir, scan_id, scale)
    superpix = read_label_volume(spath)[0] if spath.is_file() else None
    if z is None:
        z = int(np.argmax((label > 0).reshape(label.shape[0], -1).sum(axis=1)))
    panels = 3 if superpix is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 4.2), squeeze=False)
    axes = axes[0]
    for ax in axes:
        ax.imshow(image[z], cmap="gray")
        ax.set_axis_off()
    axes[0].set_title(f"scan {scan_id}, slice {z}: image")
    masked = np.ma.masked_equal(label[z], 0)
    axes[1].imshow(masked, cmap="tab10", vmin=0, vmax=max(int(label.max()), 9), alpha=0.5, interpolation="nearest")
    axes[1].set_title(f"labels {sorted(int(v) for v in np.unique(label[z]) if v)}")
    if superpix is not None:
        edges = find_boundaries(superpix[z], mode="inner")
        axes[2].imshow(np.ma.masked_equal(edges.astype(np.uint8), 0), cmap="autumn", interpolation="nearest")
        axes[2].set_title(f"{len(np.unique(superpix[z])) - 1} superpixels")
    fig.tight_layout()
    return fig


# -------------------------------------------------------------------- CLI
def build_parser() -> OptionParser:
    """The options of ``python -m data_preprocessing.verify`` (docs/cli.md)."""
    parser = OptionParser(prog="python -m data_preprocessing.verify", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=existing_dir, default=None, help="processed folder (default: the dataset's)")
    parser.add_argument("--dataset", required=True, help="registry name (e.g. SABS) or description file path")
    parser.add_argument("--no-superpixels", action="store_true", help="do not require the superpixel files")
    parser.add_argument("--no-classmap", action="store_true", help="do not require classmap_1.json")
    parser.add_argument("--report", type=Path, default=None, help="also write the report as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: 0 when the folder passes, 1 when it has errors, 2 on a usage error."""
    args = build_parser().parse_args(argv)
    try:
        info = get_dataset_info(args.dataset)
    except DatasetDescriptionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    data_dir = args.data_dir if args.data_dir is not None else info.data_dir
    report = verify_dataset(data_dir, info, superpixels=not args.no_superpixels, classmap=not args.no_classmap)
    print(report.table())
    if args.report is not None:
        write_json(report.to_dict(), args.report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
