"""Synthetic raw datasets in the layouts of the real downloads, for the preprocessing tests and notebooks.

- :func:`make_chaos_patient`: a CHAOS-like ``MR/<pid>/T2SPIR`` folder: a DICOM series written with pydicom
  (MR tags, pixel spacing, slice gap, ImageOrientationPatient/ImagePositionPatient, instance numbers shuffled
  against the spatial order, uint16 pixels) and PNG ground truth (grey 63/126/189/252). Image and labels are
  drawn from one physical model (ellipsoids in patient coordinates), so any geometry error shows up.
- :func:`make_synapse`: a Synapse-like ``img/``/``label/`` NIfTI folder, 512x512 in-plane, HU values, ~0.7 mm.
- :func:`make_cmr`: MS-CMRSeg-like ``patient<N>_C0.nii.gz`` / ``patient<N>_C0_manual.nii.gz`` (200/500/600).

Everything is deterministic (seeded), so a rebuilt fixture is byte-identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

# (grey value, intensity, centre (x, y) in mm relative to the image centre, z offset from the stack centre,
#  radii (x, y, z) in mm). Patient LPS coordinates: the liver and right kidney lie at negative x (patient right),
# the kidneys posterior (positive y): nothing is mirror-symmetric, so a flip or transpose is visible.
CHAOS_ORGANS: tuple[tuple[int, float, tuple[float, float], float, tuple[float, float, float]], ...] = (
    (63, 520.0, (-22.0, -8.0), 0.0, (20.0, 17.0, 22.0)),  # liver
    (126, 820.0, (-22.0, 22.0), -4.0, (7.0, 8.0, 12.0)),  # right kidney
    (189, 900.0, (20.0, 22.0), 4.0, (7.0, 8.0, 12.0)),  # left kidney
    (252, 680.0, (24.0, -6.0), 0.0, (9.0, 10.0, 14.0)),  # spleen
)
MARKER_VALUE = 4000  # DICOM intensity of the marker square (uint16, < 2**12)
MARKER_GREY = 252  # PNG grey value of the marker square (spleen; the spleen organ is left out then)


@dataclass
class ChaosPatient:
    """What :func:`make_chaos_patient` wrote.

    Attributes:
        mr_dir: the ``MR`` folder (pass it as ``--raw``).
        pid: patient id.
        instances: InstanceNumber (= file slice number) of spatial slice k, k = 0..n-1 along the normal.
        ipp: (n, 3) ImagePositionPatient of spatial slice k.
        row_dir, col_dir: ImageOrientationPatient halves (direction of increasing column / row index).
        pixel_spacing: DICOM PixelSpacing (row spacing, column spacing) in mm.
        gap: slice gap in mm.
        marker: (k, r, c) of the marker square's top-left pixel, or None.
        dicom_files: file path of spatial slice k; png_files: PNG path of spatial slice k.
    """

    mr_dir: Path
    pid: int
    instances: list[int]
    ipp: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    pixel_spacing: tuple[float, float]
    gap: float
    marker: tuple[int, int, int] | None
    stack_centre: float = 0.0
    dicom_files: list[Path] = field(default_factory=list)
    png_files: list[Path] = field(default_factory=list)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)

    def physical(self, k: float, r: float, c: float) -> np.ndarray:
        """Patient (LPS) position in mm of pixel row ``r``, column ``c`` of spatial slice ``k`` (may be fractional)."""
        dr, dc = self.pixel_spacing
        return (self.ipp[0] + k * self.gap * self.normal + r * dr * self.col_dir + c * dc * self.row_dir)

    def model_grey(self, points: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """Ground-truth grey value of the physical model at (N, 3) patient points (organ radii times ``scale``)."""
        x, y = points[:, 0], points[:, 1]
        s = points @ self.normal - self.stack_centre
        grey = np.zeros(len(points), dtype=np.uint8)
        for value, _, (cx, cy), cz, (ax, ay, az) in CHAOS_ORGANS:
            if self.marker is not None and value == MARKER_GREY:
                continue
            inside = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((s - cz) / az) ** 2 <= scale ** 2
            grey[inside] = value
        return grey


def _dicom_slice(path: Path, pixels: np.ndarray, pid: int, series_uid: str, study_uid: str, instance: int,
                 ipp: np.ndarray, iop: np.ndarray, pixel_spacing: tuple[float, float], gap: float,
                 series_number: int) -> None:
    sop_uid = generate_uid(entropy_srcs=[series_uid, str(instance)])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "frame"])
    ds.PatientID = f"CHAOS-{pid}"
    ds.PatientName = "Anonymized"
    ds.Modality = "MR"
    ds.Manufacturer = "Philips Medical Systems"
    ds.MagneticFieldStrength = 1.5
    ds.SeriesDescription = "T2SPIR"
    ds.ProtocolName = "T2 SPIR"
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "SK"
    ds.RepetitionTime = 1600.0
    ds.EchoTime = 80.0
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
    ds.SliceLocation = f"{float(ipp @ np.cross(iop[:3], iop[3:])):.6f}"
    ds.PixelSpacing = [f"{pixel_spacing[0]:.6f}", f"{pixel_spacing[1]:.6f}"]
    ds.SliceThickness = f"{gap:.6f}"
    ds.SpacingBetweenSlices = f"{gap:.6f}"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def make_chaos_patient(mr_dir: Path, pid: int, n_slices: int = 8, rows: int = 72, cols: int = 64,
                       pixel_spacing: tuple[float, float] = (1.7, 1.5), gap: float = 6.0, tilt_deg: float = 0.0,
                       marker: tuple[int, int, int] | None = None, png_style: str = "dicom",
                       instances: Sequence[int] | None = None, series_number: int = 4,
                       z0: float = -40.0) -> ChaosPatient:
    """Write one CHAOS-like patient under ``mr_dir/<pid>/T2SPIR``.

    Args:
        mr_dir: the ``MR`` folder.
        pid: patient id (also seeds the noise and the instance-number shuffle).
        n_slices, rows, cols: series size.
        pixel_spacing: (row spacing, column spacing) in mm.
        gap: slice gap in mm (SliceThickness = SpacingBetweenSlices = gap).
        tilt_deg: rotation of the slice plane about the x axis (0: axial).
        marker: (k, r, c): a 3x3 square of intensity 4000 at row r, column c of spatial slice k, labelled 252 in
            its PNG; the spleen is then left out, so grey 252 marks exactly that square.
        png_style: ``"dicom"`` (``IMG-0004-00007.png``, same number as the DICOM file) or ``"liver_gt"``
            (``liver_GT_006.png``, numbered from 0).
        instances: InstanceNumber of each spatial slice (default: a seeded shuffle of 1..n).
        series_number: the ``0004`` of ``IMG-0004-00007.dcm``.
        z0: position of the first spatial slice along the normal, mm.
    """
    rng = np.random.default_rng(pid)
    if instances is None:
        instances = (rng.permutation(n_slices) + 1).tolist()
    instances = [int(i) for i in instances]
    t = np.deg2rad(tilt_deg)
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, np.cos(t), np.sin(t)])
    normal = np.cross(row_dir, col_dir)
    dr, dc = pixel_spacing
    corner = -(cols - 1) / 2 * dc * row_dir - (rows - 1) / 2 * dr * col_dir  # image centre at the origin
    ipp = np.array([corner + (z0 + k * gap) * normal for k in range(n_slices)])
    seq = mr_dir / str(pid) / "T2SPIR"
    dicom_dir, ground_dir = seq / "DICOM_anon", seq / "Ground"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    ground_dir.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid(entropy_srcs=[f"study{pid}"])
    series_uid = generate_uid(entropy_srcs=[f"series{pid}-{series_number}"])
    iop = np.concatenate([row_dir, col_dir])
    stack_centre = z0 + (n_slices - 1) / 2 * gap
    info = ChaosPatient(mr_dir, pid, instances, ipp, row_dir, col_dir, (dr, dc), gap, marker, stack_centre)
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    for k in range(n_slices):
        pts = ipp[k] + rr[..., None] * dr * col_dir + cc[..., None] * dc * row_dir  # (rows, cols, 3)
        x, y = pts[..., 0], pts[..., 1]
        s = pts @ normal - stack_centre  # offset along the normal from the stack centre
        body = (x / 48.0) ** 2 + (y / 42.0) ** 2 <= 1.0
        img = np.where(body, 260.0, 8.0) + rng.normal(0.0, 6.0, (rows, cols))
        grey = np.zeros((rows, cols), dtype=np.uint8)
        for value, intensity, (cx, cy), cz, (ax, ay, az) in CHAOS_ORGANS:
            if marker is not None and value == MARKER_GREY:
                continue
            inside = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((s - cz) / az) ** 2 <= 1.0
            img[inside] = intensity + rng.normal(0.0, 10.0, int(inside.sum()))
            grey[inside] = value
        if marker is not None and marker[0] == k:
            _, r, c = marker
            img[r:r + 3, c:c + 3] = MARKER_VALUE
            grey[r:r + 3, c:c + 3] = MARKER_GREY
        inst = instances[k]
        dpath = dicom_dir / f"IMG-{series_number:04d}-{inst:05d}.dcm"
        _dicom_slice(dpath, np.clip(np.rint(img), 0, 4095), pid, series_uid, study_uid, inst, ipp[k], iop,
                     (dr, dc), gap, series_number)
        if png_style == "dicom":
            ppath = ground_dir / f"IMG-{series_number:04d}-{inst:05d}.png"
        elif png_style == "liver_gt":
            ppath = ground_dir / f"liver_GT_{inst - 1:03d}.png"
        else:
            raise ValueError(f"unknown png_style {png_style!r}")
        Image.fromarray(grey, mode="L").save(ppath)
        info.dicom_files.append(dpath)
        info.png_files.append(ppath)
    return info


def foreign_dicom(src: Path, dst: Path, instance: int) -> Path:
    """Copy a DICOM slice as if it came from another acquisition (new SeriesInstanceUID, shifted position)."""
    ds = pydicom.dcmread(src)
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(src), "other series"])
    ds.SeriesNumber = int(ds.SeriesNumber) + 100
    ds.InstanceNumber = instance
    ipp = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [f"{v:.6f}" for v in (ipp[0], ipp[1], ipp[2] + 1.5)]
    ds.save_as(dst, enforce_file_format=True)
    return dst


# -------------------------------------------------------------------- Synapse / SABS
@dataclass
class SynapseCase:
    """One written Synapse-like scan: file names, HU array (Z, H, W), labels (Z, H, W) and geometry."""

    image_file: Path
    label_file: Path
    hu: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]


def make_synapse(root: Path, names: Sequence[str] = ("img0021", "img0002", "img0010"),
                 n_slices: Sequence[int] = (3, 4, 5), spacing: tuple[float, float, float] = (0.7, 0.7, 3.0),
                 size: int = 512, hu_range: tuple[float, float] | None = None) -> dict[str, SynapseCase]:
    """Write ``root/img/<name>.nii.gz`` and ``root/label/label<number>.nii.gz`` CT scans in HU.

    Each scan: air (-1000), a body ellipse (soft tissue ~40 HU with fat), a spine (700 HU), the liver (label 6,
    60 HU), spleen (1, 50 HU), kidneys (2 right / 3 left, 160 HU), aorta (8, 200 HU); labels uint8.
    ``n_slices[i]`` slices for ``names[i]``, so each scan can be recognised after renumbering. ``hu_range``
    clips the HU values (e.g. inside the [-125, 275] window, where per-volume and fixed rescaling differ).
    """
    img_dir, lbl_dir = root / "img", root / "label"
    img_dir.mkdir(parents=True, exist_ok=True)
    lbl_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, (name, z) in enumerate(zip(names, n_slices)):
        rng = np.random.default_rng(100 + i)
        yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
        cy, cx = size / 2, size / 2
        hu = np.full((z, size, size), -1000.0)
        lab = np.zeros((z, size, size), dtype=np.uint8)
        body = ((xx - cx) / 210) ** 2 + ((yy - cy) / 160) ** 2 <= 1
        fat = body & (((xx - cx) / 190) ** 2 + ((yy - cy) / 140) ** 2 > 1)
        organs = (  # label, HU, centre (x, y), radii (x, y) in px; liver on the image left (patient right)
            (6, 60.0, (cx - 90, cy - 20), (70, 60)),
            (1, 50.0, (cx + 110, cy - 10), (35, 40)),
            (2, 160.0, (cx - 70, cy + 80), (25, 30)),
            (3, 160.0, (cx + 75, cy + 80), (25, 30)),
            (8, 200.0, (cx + 5, cy + 40), (12, 12)),
        )
        for k in range(z):
            sl = np.where(body, 40.0, -1000.0)
            sl[fat] = -100.0
            sl[((xx - cx) / 25) ** 2 + ((yy - cy - 110) / 25) ** 2 <= 1] = 700.0  # spine, unlabelled
            for lid, value, (ox, oy), (rx, ry) in organs:
                m = ((xx - ox) / rx) ** 2 + ((yy - oy) / ry) ** 2 <= 1 - 0.15 * k / max(z - 1, 1)
                sl[m] = value
                lab[k][m] = lid
            hu[k] = sl + rng.normal(0.0, 15.0, sl.shape)
        lo, hi = hu_range if hu_range is not None else (-1024, 3071)
        hu = np.clip(np.rint(hu), lo, hi).astype(np.int16)
        origin = (-170.0 - i, -180.0, -300.0 + 10 * i)
        number = name[len(name.rstrip("0123456789")):]
        case = SynapseCase(img_dir / f"{name}.nii.gz", lbl_dir / f"label{number}.nii.gz", hu, lab, spacing, origin)
        for arr, path in ((hu, case.image_file), (lab, case.label_file)):
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing(spacing)
            img.SetOrigin(origin)
            sitk.WriteImage(img, str(path), True)
        out[name] = case
    return out


# -------------------------------------------------------------------- MS-CMRSeg
@dataclass
class CmrCase:
    """One written MS-CMRSeg-like case."""

    image_file: Path
    label_file: Path | None
    image: np.ndarray
    label: np.ndarray


def make_cmr(root: Path, patients: Sequence[int] = (1, 2), unlabelled: Sequence[int] = (36,),
             size: tuple[int, int] = (88, 80), n_slices: int = 5,
             spacing: tuple[float, float, float] = (1.1875, 1.1875, 10.0)) -> dict[int, CmrCase]:
    """Write bSSFP volumes and manual labels in two sub-folders, as in the challenge download.

    ``root/C0LET2_nii45_for_challenge19/c0t2lge/patient<N>_C0.nii.gz`` and
    ``root/C0LET2_gt_for_challenge19/labels/patient<N>_C0_manual.nii.gz`` (200 LV myocardium, 500 LV blood pool,
    600 RV); the ``unlabelled`` patients get an image only. ``size`` is (H, W).
    """
    img_dir = root / "C0LET2_nii45_for_challenge19" / "c0t2lge"
    lbl_dir = root / "C0LET2_gt_for_challenge19" / "labels"
    img_dir.mkdir(parents=True, exist_ok=True)
    lbl_dir.mkdir(parents=True, exist_ok=True)
    h, w = size
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    out = {}
    for n in list(patients) + list(unlabelled):
        rng = np.random.default_rng(n)
        img = np.zeros((n_slices, h, w))
        lab = np.zeros((n_slices, h, w), dtype=np.int16)
        cy, cx = h / 2 + 4, w / 2 + 6  # LV centre, off the image centre
        for k in range(n_slices):
            shrink = 1.0 - 0.12 * k  # the heart narrows towards the apex
            d = np.hypot(yy - cy, xx - cx)
            body = ((xx - w / 2) / (0.45 * w)) ** 2 + ((yy - h / 2) / (0.42 * h)) ** 2 <= 1
            sl = np.where(body, 180.0, 4.0)
            rv = (np.hypot(yy - cy + 2, xx - cx + 17 * shrink) <= 9 * shrink) & (d > 13 * shrink)
            bp = d <= 8 * shrink
            myo = (d > 8 * shrink) & (d <= 13 * shrink)
            sl[myo], sl[bp], sl[rv] = 120.0, 620.0, 560.0
            lab[k][myo], lab[k][bp], lab[k][rv] = 200, 500, 600
            img[k] = sl + rng.normal(0.0, 8.0, sl.shape)
        img = np.clip(np.rint(img), 0, None).astype(np.int16)
        origin = (-50.0 - n, -40.0, 10.0 * n)
        direction = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # rows run towards -y: not the identity
        ipath = img_dir / f"patient{n}_C0.nii.gz"
        lpath = lbl_dir / f"patient{n}_C0_manual.nii.gz" if n in patients else None
        for arr, path in ((img, ipath), (lab, lpath)):
            if path is None:
                continue
            vol = sitk.GetImageFromArray(arr)
            vol.SetSpacing(spacing)
            vol.SetOrigin(origin)
            vol.SetDirection(direction)
            sitk.WriteImage(vol, str(path), True)
        out[n] = CmrCase(ipath, lpath, img, lab)
    return out
