"""What ``--dataset`` names, and which prepared datasets and trained models exist (for errors a user can act on).

nnU-Net accepts a dataset as its id (``4``) or its folder name (``Dataset004_Hippocampus``); we also accept the bare
name (``Hippocampus``, case-insensitive) and the name of a config group in ``configs/dataset/`` (``synthetic``).
Everything here reads folder names only: no nnU-Net import, so it is cheap enough for every command's start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger
from omegaconf import DictConfig, OmegaConf

from mlops.decathlon import TASK_RE, task_folder_name
from mlops.errors import ConfigError

FOLDER_RE = re.compile(r"^Dataset(\d{3})_([A-Za-z0-9][A-Za-z0-9_-]*)$")
DEVICES = ("auto", "cuda", "cpu", "mps")


@dataclass
class KnownDataset:
    """One dataset as found on disk: raw, preprocessed (planned), and its trained models with their folds."""

    folder: str
    id: int
    name: str
    raw: bool = False
    prepared: bool = False
    models: dict[str, list[str]] = field(default_factory=dict)  # Trainer__Plans__configuration -> trained folds


def scan(raw: Path, preprocessed: Path, results: Path, checkpoint: str = "checkpoint_final.pth") -> list[KnownDataset]:
    """Every ``DatasetNNN_Name`` under nnU-Net's three folders, sorted by id."""
    found: dict[str, KnownDataset] = {}

    def entry(path: Path) -> KnownDataset | None:
        m = FOLDER_RE.match(path.name)
        if m is None or not path.is_dir():
            return None
        return found.setdefault(path.name, KnownDataset(path.name, int(m.group(1)), m.group(2)))

    for path in sorted(raw.glob("Dataset*")) if raw.is_dir() else []:
        if (known := entry(path)) is not None:
            known.raw = (path / "dataset.json").is_file()
    for path in sorted(preprocessed.glob("Dataset*")) if preprocessed.is_dir() else []:
        if (known := entry(path)) is not None:
            known.prepared = any(path.glob("*.json")) and (path / "dataset.json").is_file()
    for path in sorted(results.glob("Dataset*")) if results.is_dir() else []:
        if (known := entry(path)) is None:
            continue
        for model in sorted(p for p in path.iterdir() if p.is_dir() and p.name.count("__") == 2):
            folds = [f.name.removeprefix("fold_") for f in sorted(model.glob("fold_*")) if (f / checkpoint).is_file()]
            if folds:
                known.models[model.name] = folds
    return sorted((k for k in found.values() if k.raw or k.prepared or k.models), key=lambda k: k.id)


def scan_config(cfg: DictConfig) -> list[KnownDataset]:
    """:func:`scan` of the folders the composed config points to (nnU-Net's own variables win, as in config.yaml)."""
    return scan(Path(cfg.paths.raw), Path(cfg.paths.preprocessed), Path(cfg.paths.results))


def inventory(cfg: DictConfig) -> str:
    """A sentence or two naming the prepared datasets and trained models, and the flag that selects each."""
    known = scan_config(cfg)
    prepared = [k for k in known if k.prepared]
    trained = [k for k in known if k.models]
    parts = []
    if prepared:
        parts.append("prepared datasets: " + ", ".join(f"{k.folder} (--dataset {k.id})" for k in prepared))
    else:
        parts.append(f"no dataset is prepared under {Path(cfg.paths.preprocessed)} (run `mlops prepare`)")
    if trained:
        models = [
            f"{k.folder} {model.split('__')[-1]} folds {','.join(folds)} (--dataset {k.id})"
            for k in trained
            for model, folds in k.models.items()
        ]
        parts.append("trained models: " + "; ".join(models))
    else:
        parts.append("no trained model yet")
    return "; ".join(parts)


def _group_names(config_dir: Path) -> list[str]:
    return sorted(p.stem for p in (config_dir / "dataset").glob("*.yaml"))


def dataset_overrides(value: str, base: DictConfig, user_overrides: list[str], config_dir: Path) -> list[str]:
    """The Hydra overrides that select dataset ``value`` (an id, ``DatasetNNN_Name``, a name or a config group).

    ``base`` is the config composed from the user's own overrides (for the data folders). A config group whose
    Decathlon source derives the same id or name is selected too (so `mlops prepare -d 500` finds its source), unless
    the user already chose a group.
    """
    text = str(value).strip()
    if text.lower() in DEVICES:
        raise ConfigError(
            f"--dataset {text!r} looks like a device; -d is the dataset (as in nnU-Net), the device is -D/--device"
        )
    groups = _group_names(config_dir)
    group_chosen = any(o.split("=", 1)[0].lstrip("+~") == "dataset" for o in user_overrides)
    if text.lower() in groups:
        return [] if group_chosen else [f"dataset={text.lower()}"]

    def group_for(ds_id: int | None, name: str | None) -> str | None:
        if group_chosen:
            return None
        import yaml

        for g in groups:
            try:
                raw = yaml.safe_load((config_dir / "dataset" / f"{g}.yaml").read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                logger.warning(f"{config_dir / 'dataset' / (g + '.yaml')}: unreadable dataset group ({exc})")
                continue
            gid, gname = raw.get("id"), raw.get("name")
            source = str(raw.get("source") or "")
            whole = re.fullmatch(r"\$\{([\w.]+)\}", source)
            if whole:  # `${synth.output}`: resolve through the composed config (only the last component matters)
                source = str(OmegaConf.select(base, whole.group(1)) or "")
            m = TASK_RE.match(task_folder_name(Path(source))) if source else None
            gid = gid if gid is not None else (int(m.group(1)) if m else None)
            gname = gname if gname is not None else (m.group(2) if m else None)
            if (ds_id is not None and gid == ds_id) or (name is not None and str(gname).lower() == name.lower()):
                return g
        return None

    known = scan_config(base)
    if text.isdigit():
        ds_id = int(text)
        match = [k for k in known if k.id == ds_id]
        name = match[0].name if len(match) == 1 else None
    elif (m := FOLDER_RE.match(text)) is not None:
        ds_id, name = int(m.group(1)), m.group(2)
    else:
        match = [k for k in known if k.name.lower() == text.lower()]
        if len(match) == 1:
            ds_id, name = match[0].id, match[0].name
        elif (g := group_for(None, text)) is not None:
            return [f"dataset={g}"]
        else:
            hint = "; ".join(f"{k.folder} (id {k.id})" for k in known) or "none found"
            raise ConfigError(
                f"--dataset {text!r}: no such dataset (give an id, DatasetNNN_Name, a name, or one of the config "
                f"groups {groups}); datasets here: {hint}"
            )
    if not 1 <= ds_id <= 999:
        raise ConfigError(f"--dataset {text!r}: nnU-Net dataset ids are 1-999")
    out = []
    if (g := group_for(ds_id, name)) is not None:
        out.append(f"dataset={g}")
    out.append(f"dataset.id={ds_id}")
    if name is not None:
        out.append(f"dataset.name={name}")
    return out
