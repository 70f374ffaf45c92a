"""Medical Segmentation Decathlon tasks: read, validate and convert to nnU-Net v2's raw dataset layout.

A Decathlon task is ``dataset.json`` (modality, labels, training pairs, test images) with ``imagesTr/``,
``labelsTr/`` and ``imagesTs/``; multi-modal tasks store 4D images with channels last. nnU-Net v2 wants one 3D file
per channel (``<case>_0000.nii.gz``) and a ``dataset.json`` with ``channel_names`` and ``labels`` name -> int.

Every case is read once: validation (readable, dimensionality, geometry, label values) and conversion happen in the
same pass, in worker processes, into a staging folder. The caller renames the staging folder into place only when no
case had a problem, so a failed run never leaves a partial dataset behind.
"""

from __future__ import annotations

import json
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from loguru import logger

from mlops.errors import DatasetError, ValidationError
from mlops.progress import parallel_map, workers_for
from mlops.volumes import NIFTI_SUFFIXES, like, strip_suffix

FILE_ENDING = ".nii.gz"
TASK_RE = re.compile(r"^Task(\d+)_(.+)$")
# Geometry tolerance between an image and its label (world-coordinate units, mm).
AFFINE_ATOL = 1e-4


@dataclass(frozen=True)
class Case:
    """One case of a task: its id (file name without suffix), image file and, for training cases, label file."""

    case_id: str
    image: Path
    label: Path | None = None


@dataclass
class DecathlonTask:
    """A parsed Decathlon task folder."""

    root: Path
    meta: dict
    modalities: dict[str, str]
    labels: dict[int, str]
    training: list[Case]
    test: list[Case]
    problems: list[str] = field(default_factory=list)

    @property
    def num_channels(self) -> int:
        return len(self.modalities)

    @property
    def task_number(self) -> int | None:
        m = TASK_RE.match(self.root.name)
        return int(m.group(1)) if m else None

    @property
    def task_name(self) -> str:
        m = TASK_RE.match(self.root.name)
        return m.group(2) if m else str(self.meta.get("name") or self.root.name)


def _is_volume_file(path: Path) -> bool:
    """NIfTI files only; macOS resource forks (``._*``) and other hidden files are ignored."""
    return path.is_file() and not path.name.startswith(".") and path.name.endswith(NIFTI_SUFFIXES)


def _listed_path(root: Path, entry: str, where: str) -> Path:
    rel = Path(entry)
    if rel.is_absolute() or ".." in rel.parts:
        raise DatasetError(f"{root / 'dataset.json'}: {where} entry {entry!r} must be a relative path inside the task")
    return root / rel


def read_task(root: Path) -> DecathlonTask:
    """Parse ``dataset.json`` and compare what it lists with what is on disk (every mismatch becomes a problem)."""
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise DatasetError(f"{root}: no dataset.json; is this a Decathlon task folder (imagesTr/, labelsTr/, ...)?")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{meta_path}: not valid JSON ({exc})") from exc
    missing = [k for k in ("modality", "labels", "training") if k not in meta]
    if missing:
        raise DatasetError(f"{meta_path}: missing key(s) {missing}; not a Decathlon dataset.json")
    try:
        labels = {int(k): str(v) for k, v in meta["labels"].items()}
        modalities = {str(int(k)): str(v) for k, v in sorted(meta["modality"].items(), key=lambda kv: int(kv[0]))}
        training_entries = [(e["image"], e["label"]) for e in meta["training"]]
        test_entries = list(meta.get("test", []))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"{meta_path}: malformed 'labels', 'modality', 'training' or 'test' ({exc})") from exc
    if 0 not in labels:
        raise DatasetError(f"{meta_path}: labels must declare 0 (background), got {sorted(labels)}")

    problems: list[str] = []
    training: list[Case] = []
    seen: set[str] = set()
    for image_entry, label_entry in training_entries:
        image = _listed_path(root, image_entry, "training")
        label = _listed_path(root, label_entry, "training")
        case_id = strip_suffix(image.name)
        if case_id in seen:
            problems.append(f"case {case_id}: listed twice in dataset.json 'training'")
            continue
        seen.add(case_id)
        absent = [
            f"{kind} {p.relative_to(root)}" for kind, p in (("image", image), ("label", label)) if not p.is_file()
        ]
        if absent:
            problems.append(f"case {case_id}: listed in dataset.json but missing on disk: {', '.join(absent)}")
            continue
        training.append(Case(case_id, image, label))
    test: list[Case] = []
    for entry in test_entries:
        image = _listed_path(root, entry, "test")
        case_id = strip_suffix(image.name)
        if not image.is_file():
            problems.append(
                f"test case {case_id}: listed in dataset.json but missing on disk: {image.relative_to(root)}"
            )
            continue
        test.append(Case(case_id, image))

    listed = {
        "imagesTr": {Path(img).name for img, _ in training_entries},
        "labelsTr": {Path(lbl).name for _, lbl in training_entries},
        "imagesTs": {Path(e).name for e in test_entries},
    }
    for folder, names in listed.items():
        if not (root / folder).is_dir():
            continue
        for path in sorted((root / folder).iterdir()):
            if _is_volume_file(path) and path.name not in names:
                problems.append(
                    f"case {strip_suffix(path.name)}: {folder}/{path.name} is on disk but not listed in dataset.json"
                )
    if not training and not problems:
        problems.append("dataset.json lists no training cases")
    return DecathlonTask(root, meta, modalities, labels, training, test, problems)


def find_task_root(folder: Path) -> Path:
    """The folder holding ``dataset.json``: ``folder`` itself, or its single task sub-folder (an extracted tar)."""
    if (folder / "dataset.json").is_file():
        return folder
    candidates = [p for p in folder.iterdir() if p.is_dir() and (p / "dataset.json").is_file()]
    if len(candidates) == 1:
        return candidates[0]
    raise DatasetError(f"{folder}: no dataset.json found (looked in the folder and its sub-folders)")


@contextmanager
def open_source(source: Path, scratch: Path) -> Iterator[Path]:
    """Yield the task root of a Decathlon folder or ``.tar``; a tar is extracted under ``scratch``, removed after."""
    if source.is_dir():
        yield find_task_root(source)
        return
    if not source.is_file():
        raise DatasetError(f"{source}: no such file or folder (expected a Decathlon task folder or .tar)")
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=scratch))
    try:
        try:
            with tarfile.open(source, mode="r:*") as tar:
                members = [m for m in tar.getmembers() if not Path(m.name).name.startswith("._")]
                logger.info(f"Extracting {len(members)} entries from {source.name}")
                tar.extractall(tmp, members=members, filter="data")
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise DatasetError(f"{source}: not a readable Decathlon .tar archive ({exc})") from exc
        yield find_task_root(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- per-case work
@dataclass(frozen=True)
class CaseJob:
    """Everything a worker needs to validate and convert one case (picklable)."""

    case: Case
    split: str  # "Tr" or "Ts"
    num_channels: int
    allowed_labels: frozenset[int]
    out_dir: Path


@dataclass
class CaseResult:
    case_id: str
    problems: list[str]
    copied: int = 0
    encoded: int = 0


def _load(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    img = nib.load(path)
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise ValueError(f"not a NIfTI file ({type(img).__name__})")
    data = np.asanyarray(img.dataobj)  # decompresses everything: a truncated file fails here
    return img, data


def _is_scaled(img: nib.Nifti1Image) -> bool:
    slope, inter = img.header.get_slope_inter()
    return slope not in (None, 1.0) or inter not in (None, 0.0)


def _write(data: np.ndarray, src: nib.Nifti1Image, path: Path) -> None:
    """Write ``data`` with ``src``'s header geometry preserved."""
    nib.save(like(data, src), path)


def process_case(job: CaseJob) -> CaseResult:
    """Validate one case and, only if it is valid, write its nnU-Net files under ``job.out_dir``."""
    case, problems = job.case, []
    res = CaseResult(case.case_id, problems)
    name = f"case {case.case_id}" if job.split == "Tr" else f"test case {case.case_id}"
    try:
        image, data = _load(case.image)
    except Exception as exc:  # nibabel raises many types for corrupt files
        problems.append(f"{name}: image {case.image.name} is unreadable or truncated ({type(exc).__name__}: {exc})")
        return res
    spatial = data.shape[:3]
    if job.num_channels == 1:
        if data.ndim != 3:
            problems.append(f"{name}: image {case.image.name} is {data.ndim}D {data.shape}, expected a 3D volume")
    elif data.ndim != 4 or data.shape[3] != job.num_channels:
        problems.append(
            f"{name}: image {case.image.name} has shape {data.shape}, expected 4D with {job.num_channels} channels last"
        )
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        problems.append(f"{name}: image {case.image.name} contains NaN or infinite voxels")

    label = None
    if case.label is not None:
        try:
            label, ldata = _load(case.label)
        except Exception as exc:
            problems.append(f"{name}: label {case.label.name} is unreadable or truncated ({type(exc).__name__}: {exc})")
            return res
        if ldata.ndim != 3:
            problems.append(f"{name}: label {case.label.name} is {ldata.ndim}D {ldata.shape}, expected 3D")
        elif ldata.shape != spatial:
            problems.append(f"{name}: label shape {ldata.shape} does not match image shape {spatial}")
        elif not np.allclose(label.affine, image.affine, atol=AFFINE_ATOL, rtol=0):
            problems.append(
                f"{name}: label affine differs from image affine "
                f"(max difference {np.abs(label.affine - image.affine).max():.3g})"
            )
        values = np.unique(ldata)
        if values.dtype.kind == "f" and not np.all(np.isfinite(values) & (values == np.round(values))):
            problems.append(f"{name}: label {case.label.name} holds non-integer values")
        else:
            extra = sorted(set(values.astype(np.int64).tolist()) - job.allowed_labels)
            if extra:
                problems.append(
                    f"{name}: label values {extra} are not declared in dataset.json labels {sorted(job.allowed_labels)}"
                )
    if problems:
        return res

    images_dir = job.out_dir / f"images{job.split}"
    if data.ndim == 3 and case.image.name.endswith(FILE_ENDING):
        shutil.copyfile(case.image, images_dir / f"{case.case_id}_0000{FILE_ENDING}")
        res.copied += 1
    else:
        channels = [data] if data.ndim == 3 else [data[..., c] for c in range(data.shape[3])]
        for c, chan in enumerate(channels):
            chan = np.ascontiguousarray(chan if not _is_scaled(image) else chan.astype(np.float32))
            _write(chan, image, images_dir / f"{case.case_id}_{c:04d}{FILE_ENDING}")
            res.encoded += 1
    if case.label is not None:
        target = job.out_dir / "labelsTr" / f"{case.case_id}{FILE_ENDING}"
        if case.label.name.endswith(FILE_ENDING):
            shutil.copyfile(case.label, target)
            res.copied += 1
        else:
            _write(np.asanyarray(label.dataobj), label, target)
            res.encoded += 1
    return res


def nnunet_dataset_json(task: DecathlonTask) -> dict:
    """nnU-Net v2's dataset.json for a converted task."""
    return {
        "name": task.meta.get("name", task.task_name),
        "description": task.meta.get("description", ""),
        "reference": task.meta.get("reference", ""),
        "licence": task.meta.get("licence", ""),
        "release": task.meta.get("release", ""),
        "channel_names": task.modalities,
        "labels": {name: value for value, name in sorted(task.labels.items())},
        "numTraining": len(task.training),
        "file_ending": FILE_ENDING,
        "converted_by": "mlops prepare",
    }


@dataclass
class ConversionSummary:
    num_training: int
    num_test: int
    files_copied: int
    files_encoded: int


def convert_task(task: DecathlonTask, out_dir: Path, num_workers: int = 1) -> ConversionSummary:
    """Validate every case and write nnU-Net's raw layout into ``out_dir`` (a staging folder the caller owns).

    Raises :class:`ValidationError` listing every problem (listing mismatches and per-case ones) if any case is bad.
    """
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    allowed = frozenset(task.labels)
    jobs = [CaseJob(c, "Tr", task.num_channels, allowed, out_dir) for c in task.training]
    jobs += [CaseJob(c, "Ts", task.num_channels, allowed, out_dir) for c in task.test]
    files = [p for c in (*task.training, *task.test) for p in (c.image, c.label) if p is not None]
    workers = workers_for(files, num_workers)
    results = parallel_map(process_case, jobs, workers, f"Validating + converting {task.root.name}")
    problems = list(task.problems) + [p for r in results for p in r.problems]
    if problems:
        raise ValidationError(str(task.root), problems)
    (out_dir / "dataset.json").write_text(json.dumps(nnunet_dataset_json(task), indent=4))
    return ConversionSummary(
        num_training=len(task.training),
        num_test=len(task.test),
        files_copied=sum(r.copied for r in results),
        files_encoded=sum(r.encoded for r in results),
    )


def task_folder_name(source: Path) -> str:
    """A task's folder name from its folder or archive (``Task04_Hippocampus.tar`` -> ``Task04_Hippocampus``)."""
    name = source.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
