"""Weights & Biases tracking that can never stop a training run.

Offline by default (no account, no network; ``wandb sync`` uploads later), ``online`` with ``WANDB_API_KEY``, or
``disabled``. Every W&B call is guarded: on the first failure the tracker logs one warning and turns itself off.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loguru import logger

RUN_ID_FILE = "wandb_run_id.txt"


class Tracker:
    """One W&B run per trained fold; resumed (same id) when training is continued."""

    def __init__(
        self,
        mode: str,
        project: str,
        entity: str | None,
        run_dir: Path,
        name: str,
        config: dict[str, Any],
        resume: bool,
    ) -> None:
        self.run: Any = None
        self.mode = mode
        if mode == "disabled":
            return
        if mode not in ("offline", "online"):
            logger.warning(f"W&B: unknown wandb.mode {mode!r} (offline, online, disabled); tracking is off")
            return
        with self._guard("start"):
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            run_dir.mkdir(parents=True, exist_ok=True)
            id_file = run_dir / RUN_ID_FILE
            run_id = id_file.read_text().strip() if resume and id_file.is_file() else uuid.uuid4().hex[:12]
            self.run = wandb.init(
                project=project,
                entity=entity,
                mode=mode,
                dir=str(run_dir),
                name=name,
                id=run_id,
                resume="allow",
                config=config,
                job_type="train",
            )
            id_file.write_text(run_id)
            logger.info(f"W&B run {run_id} ({mode}) in {run_dir / 'wandb'}")

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:  # W&B must never kill training
            logger.warning(f"W&B {what} failed ({type(exc).__name__}: {exc}); training continues without tracking")
            self.run = None

    @property
    def active(self) -> bool:
        return self.run is not None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run is None:
            return
        with self._guard("log"):
            self.run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is None:
            return
        with self._guard("summary"):
            for k, v in values.items():
                self.run.summary[k] = v

    def log_model(self, name: str, files: list[Path], metadata: dict[str, Any], aliases: list[str]) -> None:
        """Log the trained model as a W&B artifact of type ``model`` (the project's model registry)."""
        if self.run is None:
            return
        with self._guard("artifact upload"):
            import wandb

            artifact = wandb.Artifact(name, type="model", metadata=metadata)
            for f in files:
                if f.is_file():
                    artifact.add_file(str(f), name=f.name)
            self.run.log_artifact(artifact, aliases=aliases)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        with self._guard("finish"):
            self.run.finish(exit_code=exit_code)
        self.run = None
