"""The configuration's schema, checked right after Hydra composes it (so ``train.epochs=abc`` is a usage error).

Hydra already refuses keys that do not exist; this adds types and the allowed values of the names that select
something (configurations, devices, modes). Keys not listed here are allowed through (``extra="allow"``), so a new
key in ``configs/`` needs no change here unless it deserves a type.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic import ValidationError as PydanticValidationError

from mlops.errors import ConfigError

Configuration = Literal["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"]
Device = Literal["auto", "cuda", "cpu", "mps"]
PositiveInt = Field(ge=1)


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow")


class SegmentConcept(_Section):
    """A label's coded concepts in a DICOM SEG: [code, scheme designator, meaning] each."""

    category: tuple[str, str, str]
    type: tuple[str, str, str]


class Dicom(_Section):
    max_files: int = PositiveInt
    max_unzipped_mib: float = Field(gt=0)
    timeout_s: float = Field(gt=0)
    series_number: int = Field(ge=1, le=99999)
    url: str | None = None


class Dataset(_Section):
    source: str | None = None
    id: int | None = None
    name: str | None = None
    url: str | None = None
    sha256: str | None = None
    segments: dict[str, SegmentConcept] = {}


class Prepare(_Section):
    configurations: list[Configuration]
    num_workers: int = Field(ge=0)
    planner: str
    plans_identifier: str
    force: bool


class Download(_Section):
    timeout_s: float = Field(gt=0)
    chunk_bytes: int = PositiveInt


class Synth(_Section):
    output: str
    num_train: int = PositiveInt
    num_test: int = Field(ge=0)
    channels: int = PositiveInt
    seed: int
    intensity_shift: float


class Train(_Section):
    configuration: Configuration
    fold: int | str  # 0-4 or all: checked where it is used, with nnU-Net's wording
    device: Device
    gpus: int = PositiveInt
    epochs: int
    iterations_per_epoch: int
    val_iterations_per_epoch: int
    initial_lr: float = Field(gt=0)
    batch_size: int | None = Field(default=None, ge=1)
    save_every: int = PositiveInt
    num_workers: int = Field(ge=0)
    validate_: bool = Field(alias="validate")
    save_probabilities: bool


class Wandb(_Section):
    mode: Literal["online", "offline", "disabled"]
    project: str
    entity: str | None = None
    log_model: bool


class Predict(_Section):
    model_dir: str | None = None
    folds: list[int | str] | None = None
    best: bool = True
    checkpoint: str
    tta: bool
    device: Device
    tile_step_size: float = Field(gt=0, le=1)
    max_voxels: int | None = Field(default=None, ge=1)
    max_request_mib: float | None = Field(default=None, gt=0)
    precision: Literal["fp32", "bf16", "fp16", "auto"] | None = None
    backend: Literal["torch", "openvino", "onnxruntime", "nnunet", "auto"] | None = None
    max_batch: int | None = Field(default=None, ge=1)
    threads: int | None = Field(default=None, ge=1)

    @field_validator("folds", mode="before")
    @classmethod
    def _folds(cls, value: Any) -> Any:
        items = value if isinstance(value, list | tuple) else [value] if value is not None else []
        for item in items:
            if str(item) not in ("0", "1", "2", "3", "4", "all"):
                raise ValueError(f"allowed values are 0-4 or 'all' (null: every trained fold), got {item!r}")
        return value


class Serve(_Section):
    host: str
    port: int = Field(ge=0, le=65535)
    max_upload_bytes: int = PositiveInt
    max_voxels: int = PositiveInt
    max_in_flight: int = PositiveInt
    max_request_mib: float = Field(gt=0)
    max_passes: int | None = Field(default=None, gt=0)
    timeout_s: float = Field(gt=0)
    upload_timeout_s: float = Field(gt=0)
    shutdown_grace_s: float = Field(ge=0)
    max_connections: int = PositiveInt
    model_uri: str | None = None
    model_cache: str
    model_fetch_timeout_s: float = Field(default=30, gt=0)
    record_stats: bool
    cors_origins: list[str] = []
    api_token: str | None = Field(default=None, repr=False)


class Drift(_Section):
    source: str | None = None
    current: Literal["test", "requests"]
    max_drift_share: float = Field(ge=0, le=1)
    num_workers: int = PositiveInt
    reference: Literal["auto", "profile", "source"] = "auto"
    html: str | None = None
    summary: str | None = None


class Monitor(_Section):
    store: str
    flush_s: float = Field(ge=0)
    alpha: float = Field(gt=0, lt=1)
    min_samples: int = PositiveInt
    min_shift_sd: float = Field(ge=0)
    range_margin: float = Field(ge=0)
    profile_on_train: bool
    profile_val_cases: int = Field(ge=0)
    max_member_mib: float = Field(ge=0)
    drift_refresh_s: float = Field(ge=0)


class BatchRay(_Section):
    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)
    connect_timeout_s: float = Field(default=10, gt=0)


class Batch(_Section):
    ray: BatchRay
    actors: int = PositiveInt
    cpus_per_actor: float | None = Field(default=None, gt=0)
    gpus_per_actor: float = Field(ge=0)
    batch_size: int = PositiveInt
    read_tasks: int = PositiveInt
    path_column: str
    subject_column: str
    case_column: str
    model_cache: str
    force: bool
    list_timeout_s: float = Field(default=20, gt=0)


class Config(_Section):
    seed: int | None = None
    dataset: Dataset
    prepare: Prepare
    download: Download
    synth: Synth
    train: Train
    wandb: Wandb
    predict: Predict
    serve: Serve
    dicom: Dicom
    drift: Drift
    batch: Batch
    monitor: Monitor


def validate(values: dict[str, Any]) -> None:
    """Raise ConfigError naming each wrong key, the value given and what is allowed."""
    try:
        Config.model_validate(values)
    except PydanticValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            given = err.get("input")
            shown = "" if isinstance(given, dict) or err["type"] == "value_error" else f" (got {given!r})"
            problems.append(f"{key}: {_allowed(err)}{shown}")
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems)) from None


def _allowed(err: Any) -> str:
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "literal_error":
        return message.replace("Input should be", "allowed values are")
    return message
