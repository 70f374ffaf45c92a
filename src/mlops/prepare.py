"""`mlops prepare`: Decathlon task -> nnU-Net raw dataset -> nnU-Net fingerprint, plans and preprocessed data.

Both stages are idempotent. The raw dataset carries a stamp of its source (file names, sizes and modification times,
plus the dataset identity), the preprocessed dataset a stamp of the raw stamp, planner and configurations; unchanged
inputs make a re-run a matter of ``stat`` calls. Conversion builds in a staging folder renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger
from omegaconf import DictConfig

from mlops import nnunet
from mlops.config import save_config
from mlops.decathlon import convert_task, open_source, read_task
from mlops.errors import DatasetError
from mlops.files import write_atomic
from mlops.workspace import PATH_VARS, PRE_STAMP, DatasetIdentity, dataset_identity, export_folders

# Bump when the conversion output changes, so existing datasets are rebuilt.
CONVERTER_VERSION = 1
RAW_STAMP = "mlops_source.json"


@dataclass
class PrepareResult:
    dataset: str
    raw_dir: Path
    preprocessed_dir: Path
    plans_file: Path
    num_training: int
    num_test: int
    converted: bool
    preprocessed: list[str] = field(default_factory=list)
    conversion_s: float = 0.0
    preprocessing_s: float = 0.0


def _check_id_unique(identity: DatasetIdentity, roots: list[Path]) -> None:
    """nnU-Net resolves datasets by id: another name under the same id would make every later step ambiguous."""
    for root in roots:
        for other in root.glob(f"Dataset{identity.id:03d}_*"):
            if other.name != identity.folder and not other.name.startswith("."):
                raise DatasetError(
                    f"{other}: dataset id {identity.id} is already used by {other.name}; "
                    f"choose another id (dataset.id=...) or remove that folder"
                )


def source_fingerprint(source: Path, identity: DatasetIdentity) -> str:
    """Cheap digest of the source: names, sizes and mtimes (no file contents read)."""
    h = hashlib.sha256(f"v{CONVERTER_VERSION}|{identity.folder}".encode())
    source = source.resolve()
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for p in files:
        st = p.stat()
        rel = p.name if p == source else str(p.relative_to(source))
        if Path(rel).name.startswith("."):
            continue
        h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_json(path: Path, payload: dict) -> None:
    write_atomic(path, json.dumps(payload, indent=2))


def _swap_into_place(staging: Path, final: Path) -> None:
    """Replace ``final`` by ``staging`` with renames only, so readers see the old or the new dataset, never half."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    staging.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def convert(cfg: DictConfig, source: Path, identity: DatasetIdentity, raw_root: Path) -> tuple[bool, int, int, str]:
    """Convert unless up to date. Returns (converted, num_training, num_test, source digest)."""
    raw_dir = raw_root / identity.folder
    digest = source_fingerprint(source, identity)
    stamp = _read_json(raw_dir / RAW_STAMP)
    if not cfg.prepare.force and stamp.get("digest") == digest and (raw_dir / "dataset.json").is_file():
        logger.info(f"{raw_dir} is up to date with {source}")
        return False, stamp["num_training"], stamp["num_test"], digest

    raw_root.mkdir(parents=True, exist_ok=True)
    for stale in raw_root.glob(f".{identity.folder}.staging-*"):  # left by a run killed without warning (SIGKILL)
        logger.info(f"Removing {stale}, left by an interrupted conversion")
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{identity.folder}.staging-", dir=raw_root))
    try:
        with open_source(source, scratch=raw_root) as root:
            task = read_task(root)
            logger.info(
                f"Converting {root.name}: {len(task.training)} training + {len(task.test)} test cases, "
                f"{task.num_channels} channel(s), labels {task.labels}"
            )
            summary = convert_task(task, staging, num_workers=int(cfg.prepare.num_workers))
        _write_json(
            staging / RAW_STAMP,
            {
                "digest": digest,
                "source": str(source.resolve()),
                "num_training": summary.num_training,
                "num_test": summary.num_test,
                "files_copied": summary.files_copied,
                "files_encoded": summary.files_encoded,
            },
        )
        _swap_into_place(staging, raw_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        f"Wrote {raw_dir}: {summary.num_training} training, {summary.num_test} test cases "
        f"({summary.files_copied} files copied, {summary.files_encoded} re-encoded)"
    )
    return True, summary.num_training, summary.num_test, digest


def _preprocessed_cases(pre_dir: Path, plans: dict, configuration: str) -> int:
    ident = plans.get("configurations", {}).get(configuration, {}).get("data_identifier")
    folder = pre_dir / ident if ident else None
    return len(list(folder.glob("*.pkl"))) if folder and folder.is_dir() else 0


def preprocess(
    cfg: DictConfig, identity: DatasetIdentity, pre_root: Path, digest: str, num_training: int, reconverted: bool
) -> tuple[Path, list[str]]:
    """Plan and preprocess unless the same plans already cover the requested configurations."""
    pre_dir = pre_root / identity.folder
    plans_id = str(cfg.prepare.plans_identifier)
    plans_file = pre_dir / f"{plans_id}.json"
    wanted = [str(c) for c in cfg.prepare.configurations]
    stamp = _read_json(pre_dir / PRE_STAMP)
    plans = _read_json(plans_file)
    plans_current = (
        not cfg.prepare.force
        and not reconverted
        and stamp.get("digest") == digest
        and stamp.get("planner") == cfg.prepare.planner
        and bool(plans)
        and stamp.get("plans_sha256") == hashlib.sha256(plans_file.read_bytes()).hexdigest()
    )
    done = set(stamp.get("configurations", [])) if plans_current else set()
    todo = [c for c in wanted if c not in done or _preprocessed_cases(pre_dir, plans, c) < num_training]
    if plans_current and not todo:
        logger.info(f"{pre_dir} is up to date ({', '.join(wanted)} preprocessed with {plans_id})")
        return plans_file, []

    (pre_dir / PRE_STAMP).unlink(missing_ok=True)  # a run that dies midway must not look finished
    plans_file = nnunet.plan_and_preprocess(
        identity.id,
        todo if plans_current else wanted,
        num_workers=int(cfg.prepare.num_workers),
        planner=str(cfg.prepare.planner),
        plans_identifier=plans_id,
        plan=not plans_current,
    )
    plans = _read_json(plans_file)
    available = set(plans.get("configurations", {}))
    missing = [c for c in wanted if c not in available]
    if missing:
        logger.warning(
            f"nnU-Net's plans for {identity.folder} have no {missing} configuration(s) "
            f"(available: {sorted(available)}); they were skipped"
        )
    finished = sorted((done | set(wanted)) & available)
    _write_json(
        pre_dir / PRE_STAMP,
        {
            "digest": digest,
            "planner": str(cfg.prepare.planner),
            "plans_sha256": hashlib.sha256(plans_file.read_bytes()).hexdigest(),
            "configurations": finished,
        },
    )
    return plans_file, [c for c in (todo if plans_current else wanted) if c in available]


def prepare(cfg: DictConfig, source: Path | None = None) -> PrepareResult:
    """Convert a Decathlon task and run nnU-Net's planning and preprocessing; skip what is already up to date."""
    source = Path(cfg.dataset.source if source is None else source).expanduser()
    if not source.exists():
        hint = " (run `mlops download` first)" if cfg.dataset.get("url") else ""
        raise DatasetError(f"{source}: no such Decathlon task folder or .tar{hint}")
    raw_root, pre_root, res_root = (Path(cfg.paths[k]) for k in ("raw", "preprocessed", "results"))
    export_folders(raw_root, pre_root, res_root)
    raw_root, pre_root, res_root = (Path(os.environ[v]) for v in PATH_VARS)
    identity = dataset_identity(cfg, source)
    _check_id_unique(identity, [raw_root, pre_root, res_root])

    t0 = time.perf_counter()
    converted, n_train, n_test, digest = convert(cfg, source, identity, raw_root)
    t1 = time.perf_counter()
    plans_file, done = preprocess(cfg, identity, pre_root, digest, n_train, reconverted=converted)
    t2 = time.perf_counter()
    save_config(cfg, pre_root / identity.folder / "mlops_prepare_config.yaml")
    return PrepareResult(
        dataset=identity.folder,
        raw_dir=raw_root / identity.folder,
        preprocessed_dir=pre_root / identity.folder,
        plans_file=plans_file,
        num_training=n_train,
        num_test=n_test,
        converted=converted,
        preprocessed=done,
        conversion_s=t1 - t0,
        preprocessing_s=t2 - t1,
    )
