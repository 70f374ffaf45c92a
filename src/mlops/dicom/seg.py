"""A segmentation as a DICOM Segmentation (SEG) object that references the series it was made from.

One segment per foreground label of the model, with the dataset's names, the coded concepts the dataset config
gives (``dataset.segments``; otherwise SNOMED CT "Tissue"), the viewer's colours, and the model as the algorithm.
Frames follow the source slices (highdicom derives their positions from the source images and leaves empty frames
out), so a reader maps each frame back to a slice by its ReferencedSOPInstanceUID or its position.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from mlops import __version__
from mlops.dicom.series import Series
from mlops.errors import MlopsError
from mlops.palette import colour

DEFAULT_CONCEPT = {"category": ["85756007", "SCT", "Tissue"], "type": ["85756007", "SCT", "Tissue"]}
MAX_SEGMENT_LABEL = 64  # LO: 64 characters


class SegmentationError(MlopsError):
    """A segmentation that cannot be written as a DICOM SEG (labels that do not fit the source series)."""


def _code(value: Any, where: str) -> hd.sr.CodedConcept:
    try:
        code, scheme, meaning = (str(v) for v in value)
    except (TypeError, ValueError):
        raise SegmentationError(f"{where}: expected [code, scheme, meaning], got {value!r}") from None
    return hd.sr.CodedConcept(code, scheme, meaning)


def descriptions(
    labels: Mapping[int, str], concepts: Mapping[str, Any] | None, model: str
) -> tuple[list[hd.seg.SegmentDescription], dict[int, int]]:
    """Segment descriptions for the foreground labels (in id order) and label value -> segment number."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"mlops {model}"[:64], family=codes.cid7162.ArtificialIntelligence, version=__version__
    )
    result, numbers = [], {}
    for number, (value, name) in enumerate(((v, n) for v, n in sorted(labels.items()) if v != 0), start=1):
        concept = dict(DEFAULT_CONCEPT, **((concepts or {}).get(name) or {}))
        result.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=str(name)[:MAX_SEGMENT_LABEL],
                segmented_property_category=_code(concept["category"], f"dataset.segments.{name}.category"),
                segmented_property_type=_code(concept["type"], f"dataset.segments.{name}.type"),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=generate_uid(),
                tracking_id=f"{model} label {value}: {name}"[:64],
                display_color=hd.color.CIELabColor.from_rgb(*colour(value)),
            )
        )
        numbers[int(value)] = number
    return result, numbers


def segmentation(
    labels: np.ndarray,
    series: Series,
    names: Mapping[int, str],
    model: str,
    concepts: Mapping[str, Any] | None = None,
    series_number: int = 900,
) -> Dataset:
    """A binary SEG of ``labels`` (the volume's (columns, rows, slices) grid) for the series it was made from."""
    expected = tuple(series.image.shape[:3])
    if tuple(labels.shape) != expected:
        raise SegmentationError(f"{series.name}: labels of shape {labels.shape} for a series of {expected}")
    segments, numbers = descriptions(names, concepts, model)
    if not segments:
        raise SegmentationError(f"{series.name}: the model has no foreground label to write as a segment")
    lut = np.zeros(max(int(labels.max(initial=0)), max(numbers)) + 1, dtype=np.uint8)
    for value, number in numbers.items():
        lut[value] = number
    frames = lut[labels].transpose(2, 1, 0)  # (slices, rows, columns): frame k covers source slice k
    first = series.datasets[0]
    seg = hd.seg.Segmentation(
        source_images=series.datasets,
        pixel_array=np.ascontiguousarray(frames),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="mlops",
        manufacturer_model_name=model[:64],
        software_versions=__version__,
        device_serial_number="0",
        series_description=f"{model} segmentation"[:64],
        content_label="SEGMENTATION",
        content_description=f"nnU-Net segmentation of series {first.get('SeriesNumber', '')}".strip()[:64],
    )
    # Optional in DICOM, but PACS viewers list a study's series by these (Orthanc files a series without them under ?)
    seg.SeriesDate, seg.SeriesTime = seg.ContentDate, seg.ContentTime
    return seg


def read_labels(seg: Dataset, series: Series) -> np.ndarray:
    """A SEG's segments back on the series' grid as a label map (segment number -> its position in the model's
    foreground labels): frames are placed by the source slice each one references."""
    index = {str(ds.SOPInstanceUID): k for k, ds in enumerate(series.datasets)}
    shape = series.image.shape[:3]
    out = np.zeros(shape, dtype=np.uint8)
    pixels = seg.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[None]
    for f, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = index[str(source)]
        out[:, :, k][pixels[f].T > 0] = number
    return out
