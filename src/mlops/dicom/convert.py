"""A NIfTI scan written as a DICOM series (single-frame MR or CT images), to try the hospital workflow with the
Decathlon's scans and to test it: positions, orientation and spacing come from the NIfTI affine, intensities are
stored as 16-bit integers with a rescale slope/intercept when they are not integers already.

Patient and study attributes are placeholders (``--patient-id``); nothing is read from or about a real patient.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from mlops import __version__
from mlops.dicom.series import part10
from mlops.files import write_atomic
from mlops.volumes import InputError

INT16 = np.iinfo(np.int16)


def _rescale(data: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Stored int16 values and the slope/intercept that give the scan's values back (exactly for integer scans)."""
    finite = data[np.isfinite(data)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if np.array_equal(data, np.round(data)) and INT16.min <= lo and hi <= INT16.max:
        return data.astype(np.int16), 1.0, 0.0
    slope = (hi - lo) / (INT16.max - INT16.min - 2) or 1.0
    intercept = lo - (INT16.min + 1) * slope
    stored = np.clip(np.round((data - intercept) / slope), INT16.min + 1, INT16.max - 1)
    return stored.astype(np.int16), float(f"{slope:.10g}"), float(f"{intercept:.10g}")


def _ds_number(value: float) -> str:
    """A DS (decimal string) of at most 16 characters."""
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.6g}"


def series_from_nifti(
    img: nib.Nifti1Image,
    patient_id: str = "MLOPS-TEST",
    modality: str = "MR",
    description: str = "mlops test series",
    study_uid: str | None = None,
) -> list[Dataset]:
    """The slices of a 3D NIfTI image as DICOM datasets of one new series (slice k of the volume is instance k+1)."""
    if len(img.shape) != 3:
        raise InputError(f"a 3D scan is needed to write a DICOM series, not {img.shape}", 422)
    if modality not in ("MR", "CT"):
        raise InputError(f"modality {modality!r}: MR or CT", 422)
    data = np.asanyarray(img.dataobj).astype(np.float64)
    stored, slope, intercept = _rescale(data)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    dx, dy, dz = (float(np.linalg.norm(lps[:3, c])) for c in range(3))
    row_dir, col_dir = lps[:3, 0] / dx, lps[:3, 1] / dy
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    now = dt.datetime.now()
    sop_class = MRImageStorage if modality == "MR" else CTImageStorage
    out = []
    for k in range(img.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Mlops", patient_id, "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, k + 1
        ds.SeriesDescription = description[:64]
        ds.Manufacturer, ds.SoftwareVersions = "mlops", __version__
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
        ds.PatientPosition, ds.Laterality = "HFS", ""
        ds.ImagePositionPatient = [_ds_number(v) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [_ds_number(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [_ds_number(dy), _ds_number(dx)]  # between rows, between columns
        ds.SliceThickness = _ds_number(dz)
        ds.SliceLocation = _ds_number(float((lps @ [0, 0, k, 1])[2]))
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = img.shape[1], img.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = _ds_number(slope), _ds_number(intercept)
        if modality == "CT":
            ds.RescaleType = "HU"
            ds.KVP = ""
        else:
            ds.RescaleType = "US"
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "RM", "NONE", ""
            ds.MRAcquisitionType = "3D"
            ds.EchoTime = ds.RepetitionTime = ds.EchoTrainLength = ""
            ds.MagneticFieldStrength = ""
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        out.append(ds)
    return out


def write_series(datasets: list[Dataset], folder: Path) -> list[Path]:
    """Each dataset as ``IM_00001.dcm``, ... in ``folder`` (written whole or not at all)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"IM_{int(ds.InstanceNumber):05d}.dcm"
        paths.append(write_atomic(path, part10(ds)))
    return paths
