"""The one module that imports ``nnunetv2`` and knows its quirks.

Quirks handled here:
- nnU-Net reads ``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results`` from the environment; :func:`export_paths`
  sets them (absolute) before any nnU-Net call.
- nnU-Net looks classes up by name by importing every module of a package (``recursive_find_python_class``). For
  trainers that walk reaches variants importing ``timm``, hence ``torchvision``, whose only wheel here is a CUDA build
  that fails to import beside CPU torch. We therefore import the default fingerprint extractor, planner and trainer
  classes directly and never trigger a by-name search on the CPU path.
- nnU-Net prints its progress chatter; it is routed into loguru at DEBUG level (``--verbose`` shows it).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

from loguru import logger

from mlops.errors import PipelineError

PATH_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def export_paths(raw: Path, preprocessed: Path, results: Path) -> None:
    """Create nnU-Net's three folders and export them as absolute paths for nnU-Net (and its worker processes)."""
    for var, path in zip(PATH_VARS, (raw, preprocessed, results), strict=True):
        path = Path(path).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(path)


class _LogWriter(io.TextIOBase):
    """A file-like object that turns nnU-Net's print() output into loguru DEBUG lines."""

    def __init__(self) -> None:
        self._buf = ""

    def write(self, s: str) -> int:
        self._buf += s
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            if line.strip():
                logger.debug(f"[nnU-Net] {line.rstrip()}")
        return len(s)

    def flush(self) -> None:
        if self._buf.strip():
            logger.debug(f"[nnU-Net] {self._buf.rstrip()}")
        self._buf = ""


@contextlib.contextmanager
def nnunet_output_to_log() -> Iterator[None]:
    """Capture nnU-Net's stdout into the log (its tqdm bars on stderr stay visible as progress)."""
    writer = _LogWriter()
    with contextlib.redirect_stdout(writer):
        try:
            yield
        finally:
            writer.flush()


def plan_and_preprocess(
    dataset_id: int,
    configurations: list[str],
    num_workers: int,
    planner: str = "ExperimentPlanner",
    plans_identifier: str = "nnUNetPlans",
    plan: bool = True,
) -> Path:
    """Run nnU-Net's fingerprint extraction and planning (if ``plan``), then preprocessing of ``configurations``.

    Returns the plans file. Uses nnU-Net's own classes through its Python API, not its command-line scripts.
    """
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    num_workers = max(1, int(num_workers))
    try:
        with nnunet_output_to_log():
            dataset_name = convert_id_to_dataset_name(dataset_id)
            if plan:
                logger.info(f"nnU-Net fingerprint extraction for {dataset_name} ({num_workers} workers)")
                extract_fingerprint_dataset(dataset_id, DatasetFingerprintExtractor, num_workers, clean=True)
                if planner == "ExperimentPlanner":
                    planner_class = ExperimentPlanner
                else:  # a non-default planner needs nnU-Net's by-name search (experiment_planning only, not trainers)
                    import nnunetv2
                    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

                    planner_class = recursive_find_python_class(
                        os.path.join(nnunetv2.__path__[0], "experiment_planning"),
                        planner,
                        current_module="nnunetv2.experiment_planning",
                    )
                    if planner_class is None:
                        raise PipelineError(f"unknown nnU-Net experiment planner {planner!r} (prepare.planner)")
                logger.info(f"nnU-Net experiment planning with {planner}")
                _, plans_identifier = plan_experiment_dataset(dataset_id, planner_class)
            for configuration in configurations:
                logger.info(f"nnU-Net preprocessing {dataset_name} / {configuration}")
                preprocess_dataset(dataset_id, plans_identifier, [configuration], [num_workers])
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineError(f"nnU-Net planning/preprocessing of dataset {dataset_id} failed: {exc}") from exc
    return Path(os.environ["nnUNet_preprocessed"]) / dataset_name / f"{plans_identifier}.json"
