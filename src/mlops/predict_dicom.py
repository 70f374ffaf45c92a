"""`mlops predict` on a DICOM series: a folder, a ``.zip`` or a ``dicomweb://`` URL in; a DICOM Segmentation (and/or
the NIfTI segmentation) out, and with ``--store`` the SEG stored back to the PACS the series came from.

The series is segmented by the same engine and rules as a NIfTI scan (:mod:`mlops.pipeline`): it is decoded into a
NIfTI image in memory, so the labels are the ones `mlops predict` gives that scan as NIfTI. Every output is checked
before any work starts and written whole or not at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger
from omegaconf import DictConfig

from mlops.dicom import web
from mlops.dicom.series import (
    Instance,
    Limits,
    assemble,
    dataset_instances,
    folder_instances,
    holds_dicom,
    is_zip_name,
    part10,
    zip_instances,
    zip_stem,
)
from mlops.files import write_atomic
from mlops.models import model_dir
from mlops.outputs import check_dicom_outputs
from mlops.pipeline import budget, load_segmenter, open_case, seg_for, segment_case
from mlops.volumes import InputError, is_nifti_name, to_gzip_bytes

OUTPUT_TYPES = ("auto", "nifti", "dicom-seg", "both")


@dataclass
class SeriesPrediction:
    """What one series gave: where its outputs went, the SEG's identity, volumes, timing."""

    input: str
    series_uid: str
    outputs: list[Path]
    volumes_mm3: dict[str, float]
    shape: tuple[int, ...]
    seconds: dict[str, float]  # read, segment, write, store
    labels: dict[int, str] = field(default_factory=dict)
    model: str = ""
    folds: list[str] = field(default_factory=list)
    seg_series_uid: str | None = None
    seg_sop_uid: str | None = None
    stored: str | None = None  # the SEG's series URL on the PACS


def is_dicom_source(text: str, max_files: int = 4000) -> bool:
    """A dicomweb:// URL, a .zip, or a folder holding DICOM files and no NIfTI."""
    if web.is_dicomweb_url(text):
        return True
    path = Path(text)
    if path.is_file():
        return is_zip_name(path.name)
    if path.is_dir():
        if any(is_nifti_name(p.name) for p in path.iterdir()):
            return False
        return holds_dicom(path, max_files)
    return False


def find_instances(cfg: DictConfig, source: str, series_uid: str | None) -> tuple[list[Instance], str | None]:
    """The instances at ``source`` (headers; a PACS's series is retrieved whole) and the series asked for. Done before
    the model is loaded, so a wrong path, an unreachable PACS or a bad archive fails in a second."""
    limits = Limits.of(cfg.dicom)
    if web.is_dicomweb_url(source):
        ref = web.parse_url(source)
        if series_uid is not None and series_uid != ref.series:
            raise InputError(f"--series {series_uid} differs from the URL's series {ref.series}", 400)
        datasets = web.retrieve_series(ref, limits.max_files, float(cfg.dicom.timeout_s))
        return dataset_instances(datasets, source), ref.series
    path = Path(source)
    if path.is_file():
        return zip_instances(path.read_bytes(), str(path), limits.max_files, limits.max_unzipped_bytes), series_uid
    return folder_instances(path, limits.max_files), series_uid


def output_paths(source: str, output: Path | None, output_type: str, series_uid_hint: str | None) -> list[Path]:
    """The files to write: ``<stem>.dcm`` (SEG) and/or ``<stem>.nii.gz``; ``-o`` gives the stem or one of them."""
    if output is not None:
        name = output.name
        for suffix in (".dcm", ".nii.gz", ".nii"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        stem = output.with_name(name)
        nifti_suffix = ".nii" if output.name.lower().endswith(".nii") else ".nii.gz"
    elif web.is_dicomweb_url(source):
        stem, nifti_suffix = Path(f"{series_uid_hint or 'series'}_seg"), ".nii.gz"
    else:
        path = Path(source)
        stem, nifti_suffix = path.with_name(zip_stem(path.name) + "_seg"), ".nii.gz"
    kinds = {"dicom-seg": [".dcm"], "nifti": [nifti_suffix], "both": [".dcm", nifti_suffix]}[output_type]
    return [stem.with_name(stem.name + k) for k in kinds]


def predict_series(
    cfg: DictConfig,
    source: str,
    output: Path | None = None,
    model: Path | None = None,
    output_type: str = "auto",
    series_uid: str | None = None,
    store: bool = False,
    tta: bool | None = None,
) -> SeriesPrediction:
    """Segment one DICOM series; write the SEG (``.dcm``) and/or NIfTI, and store the SEG back with ``store``."""
    if output_type not in OUTPUT_TYPES:
        raise InputError(f"--output-type {output_type}: one of {', '.join(OUTPUT_TYPES)}", 400)
    kind = "dicom-seg" if output_type == "auto" else output_type
    from_pacs = web.is_dicomweb_url(source)
    if store and not from_pacs:
        raise InputError("--store sends the SEG back to the PACS the series came from: give a dicomweb:// URL", 400)
    if store and kind == "nifti":
        raise InputError("--store needs a DICOM SEG: --output-type dicom-seg or both", 400)
    ref = web.parse_url(source) if from_pacs else None
    targets = [] if (store and output is None) else output_paths(source, output, kind, ref.series if ref else None)
    check_dicom_outputs(targets, None if from_pacs else Path(source))
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    instances, series_uid = find_instances(cfg, source, series_uid)
    seconds["read"] = time.perf_counter() - t0
    segmenter = load_segmenter(cfg, model_dir(cfg, model))
    t0 = time.perf_counter()
    max_voxels = int(cfg.predict.max_voxels) if cfg.predict.get("max_voxels") else None
    limits = budget(segmenter, cfg.predict.get("max_request_mib"))
    series = assemble(instances, source, series_uid, max_voxels, limits)
    seconds["read"] += time.perf_counter() - t0
    logger.info(f"{series.name}: series {series.series_uid}, {series.image.shape} voxels of "
                f"{'x'.join(f'{z:.3g}' for z in series.image.header.get_zooms()[:3])} mm")  # fmt: skip
    t0 = time.perf_counter()
    case = open_case(segmenter, series.image, series.name, limits)
    result = segment_case(segmenter, case, tta, None, float(cfg.monitor.max_member_mib))
    seconds["segment"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    seg = None
    if kind in ("dicom-seg", "both"):
        seg = seg_for(segmenter, series, result.labels, cfg)
    for path in targets:
        if path.suffix == ".dcm":
            write_atomic(path, part10(seg))
        else:
            data = to_gzip_bytes(result.image) if path.name.endswith(".gz") else result.image.to_bytes()
            write_atomic(path, data)
    seconds["write"] = time.perf_counter() - t0
    stored = None
    if store and seg is not None and ref is not None:
        t0 = time.perf_counter()
        stored = web.store_seg(ref, seg, float(cfg.dicom.timeout_s))
        seconds["store"] = time.perf_counter() - t0
        logger.info(f"Stored the SEG in {ref.root} as series {seg.SeriesInstanceUID}")
    return SeriesPrediction(
        source, series.series_uid, targets, result.volumes, tuple(result.labels.shape), seconds,
        dict(segmenter.labels), segmenter.model_dir.name, [str(f) for f in segmenter.folds],
        str(seg.SeriesInstanceUID) if seg is not None else None, str(seg.SOPInstanceUID) if seg is not None else None,
        stored,
    )  # fmt: skip
