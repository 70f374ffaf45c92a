"""The batch pipeline on Ray Data: list -> read bytes -> segment in actors -> write -> one cohort table.

``batch.ray.address`` null starts a local Ray with this machine's cores (and stops it afterwards); ``auto`` or
``ray://head:10001`` joins an existing cluster (KubeRay on GKE, a Vertex AI Ray cluster), where the inputs, outputs
and model folder must be reachable from every node (``gs://`` URLs, and the model baked into the image).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger
from omegaconf import DictConfig, OmegaConf

from mlops.batch import sink
from mlops.batch.sources import list_cases
from mlops.batch.worker import SegmentActor, read_input
from mlops.errors import ConfigError, PipelineError
from mlops.models import best_choice, model_dir
from mlops.workspace import available_folds, config_folds


@dataclass
class BatchSummary:
    cases: int
    done: int
    failed: int
    skipped: int
    seconds: float  # the pipeline, from the first read to the last row (Ray's start-up excluded)
    ray_start_seconds: float
    table: str
    csv: str
    model_sha256: str
    run_id: str
    errors: list[str] = field(default_factory=list)

    @property
    def cases_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


def _resources(cfg: DictConfig, cluster_cpus: float) -> tuple[int, float, float]:
    b = cfg.batch
    actors = int(b.actors)
    gpus = float(b.gpus_per_actor or 0)
    cpus = float(b.cpus_per_actor) if b.cpus_per_actor else max(1.0, float(int(cluster_cpus) // actors))
    if cpus * actors > cluster_cpus and not b.ray.address:
        raise ConfigError(
            f"batch.actors={actors} x batch.cpus_per_actor={cpus:g} needs {cpus * actors:g} CPUs; this Ray has "
            f"{cluster_cpus:g} (batch.ray.num_cpus, else the machine's cores)"
        )
    return actors, cpus, gpus


def start_ray(cfg: DictConfig) -> tuple[bool, float]:
    """Start (or join) Ray; returns whether this call started it (so it stops it) and how long that took."""
    import ray

    if ray.is_initialized():  # an embedding program (or a test) already runs one: use it, leave it running
        return False, 0.0
    t0 = time.perf_counter()
    address = cfg.batch.ray.address
    if address:
        _check_reachable(str(address), float(cfg.batch.ray.get("connect_timeout_s", 10)))
    kwargs: dict = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": True}
    try:
        if address:
            ray.init(address=str(address), **kwargs)
        else:
            ray.init(num_cpus=int(cfg.batch.ray.num_cpus or os.cpu_count() or 1), **kwargs)
    except Exception as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise PipelineError(f"cannot start {where} ({type(exc).__name__}: {exc})") from exc
    return True, time.perf_counter() - t0


def _check_reachable(address: str, timeout_s: float) -> None:
    """A head that does not answer is an error in seconds: ``ray.init`` retries a silent address for minutes.

    ``HOST:PORT`` (the GCS, default port 6379) and ``ray://HOST[:PORT]`` (Ray Client, default 10001) are checked with
    one TCP connection; ``auto`` is Ray's own lookup, which fails at once when it finds no cluster.
    """
    if address == "auto":
        return
    scheme, _, rest = address.rpartition("://")
    host, colon, port = rest.rstrip("/").rpartition(":")
    if not colon:
        host, port = rest.rstrip("/"), "10001" if scheme == "ray" else "6379"
    if scheme not in ("", "ray") or not host or not port.isdigit():
        raise ConfigError(f"batch.ray.address={address!r}: expected auto, HOST:PORT or ray://HOST[:PORT]")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__).lower()
        raise PipelineError(
            f"cannot reach the Ray cluster at {address} ({reason} within {timeout_s:g} s; batch.ray.connect_timeout_s)"
        ) from exc


def _model_files(cfg: DictConfig, folder: Path) -> list[Path]:
    """What decides the answer of a prediction with this config (the actors load the same): each fold's checkpoint,
    and `mlops find-best`'s post-processing when its choice applies, as in `mlops predict`; or nnU-Net's error."""

    if not (folder / "plans.json").is_file():
        raise PipelineError(
            f"no trained model in {folder}; train one with `mlops train --fold 0` "
            "(or point to an nnU-Net results folder with --model)"
        )
    checkpoint = str(cfg.predict.checkpoint)
    found = available_folds(folder, checkpoint)
    chosen = config_folds(cfg)
    folds = found if chosen is None else chosen
    choice = best_choice(cfg)
    extra: list[Path] = []
    if choice is not None and Path(choice.model_dirs[0]).resolve() == folder:
        folds, extra = list(choice.folds), [Path(choice.postprocessing)]
    missing = [f for f in folds if f not in found]
    if not folds or missing:
        raise PipelineError(
            f"{folder}: no {checkpoint} for fold(s) {missing or folds} (available: {found or 'none'}); "
            "train them with `mlops train --fold N`"
        )
    return [folder / f"fold_{f}" / checkpoint for f in folds] + extra


def run_batch(cfg: DictConfig, source: str, dest: str, model: str | None = None) -> BatchSummary:
    """Segment every case of ``source`` into ``dest`` with Ray Data; write ``volumes.parquet`` and ``volumes.csv``.

    ``model`` is a model folder, or its URL (``gs://...``), which the driver and every node fetch once into
    ``batch.model_cache``; default: the folder `mlops train` writes for this dataset.
    """
    import ray
    import ray.data

    from mlops.inference.export import weights_sha256
    from mlops.inference.fetch import fetch_model

    b = cfg.batch
    cases = list_cases(source, dest, str(b.path_column), str(b.subject_column), str(b.case_column),
                       float(b.get("list_timeout_s", 20)))  # fmt: skip
    model_uri = model if model and "://" in model else None
    folder = fetch_model(model_uri, Path(b.model_cache)) if model_uri else model_dir(cfg, model and Path(model))
    folder = folder.resolve()
    model_sha = weights_sha256(_model_files(cfg, folder))
    run_id = uuid.uuid4().hex[:12]
    # The actors get the resolved config, its folders absolute (a Ray worker runs elsewhere than the driver's cwd).
    actor_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key, value in actor_cfg.paths.items():
        if value and "://" not in str(value):
            actor_cfg.paths[key] = str(Path(value).resolve())
    actor_cfg.batch.model_cache = str(Path(b.model_cache).resolve())
    started, ray_s = start_ray(cfg)
    try:
        actors, cpus, gpus = _resources(cfg, float(ray.cluster_resources().get("CPU", 1)))
        actor_cfg.predict.threads = max(1, int(cpus))
        logger.info(
            f"Batch {run_id}: {len(cases)} case(s) from {source} -> {dest}; {actors} actor(s) x {cpus:g} CPU"
            + (f" x {gpus:g} GPU" if gpus else "")
            + f"; model {folder.name} ({model_sha[:12]})"
        )
        t0 = time.perf_counter()
        ds = ray.data.from_items([c.to_row() for c in cases], override_num_blocks=min(len(cases), actors * 8))
        ds = ds.map(
            read_input,
            fn_kwargs={"model_sha256": model_sha, "tta": bool(cfg.predict.tta), "force": bool(b.force),
                       "run_id": run_id},
            num_cpus=0,  # I/O only: must never wait behind the actors for a CPU slot
            compute=ray.data.TaskPoolStrategy(size=int(b.read_tasks)),
        )  # fmt: skip
        ds = ds.map_batches(
            SegmentActor,
            fn_constructor_kwargs={"cfg": actor_cfg, "model_dir": str(folder), "model_uri": model_uri,
                                   "model_sha256": model_sha, "run_id": run_id},
            compute=ray.data.ActorPoolStrategy(size=actors),
            batch_size=int(b.batch_size),
            num_cpus=cpus,
            num_gpus=gpus,
        )  # fmt: skip
        try:
            rows = list(ds.iter_rows())
        except Exception as exc:  # an actor that cannot even load the model; Ray's own retries are exhausted
            raise PipelineError(f"batch run {run_id} failed: {type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()
    rows.sort(key=lambda r: r["case"])
    table, csv = sink.write_table(dest, rows)
    failed = [r for r in rows if r["status"] == "failed"]
    summary = BatchSummary(
        cases=len(cases),
        done=sum(r["status"] == "ok" for r in rows),
        failed=len(failed),
        skipped=sum(r["status"] == "skipped" for r in rows),
        seconds=seconds,
        ray_start_seconds=ray_s,
        table=table,
        csv=csv,
        model_sha256=model_sha,
        run_id=run_id,
        errors=[str(r["error"]) for r in failed],
    )
    logger.info(
        f"Batch {run_id}: {summary.done} segmented, {summary.skipped} skipped, {summary.failed} failed in "
        f"{seconds:.1f} s ({summary.cases_per_second:.2f} cases/s); table {table}"
    )
    return summary
