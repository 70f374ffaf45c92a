"""`mlops find-best`: nnU-Net's choice of configuration (or ensemble), folds and post-processing, and reading it back.

nnU-Net's ``find_best_configuration`` does the work (cross-validation merge, ensembles, post-processing); this module
picks its inputs from what `mlops train`/`mlops validate` wrote, checks them with messages a user can act on, and
records the choice in ``<nnUNet_results>/<dataset>/mlops_best.json`` so that `mlops predict`/`serve` use it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from loguru import logger
from omegaconf import DictConfig

from mlops import nnunet
from mlops.errors import DatasetError
from mlops.models import CHOICE_FILE, BestChoice
from mlops.workspace import TRAINER_NAME, export_paths, prepared_dataset


def _validated_folds(model: Path) -> list[int]:
    return sorted(
        int(p.name.removeprefix("fold_"))
        for p in model.glob("fold_[0-4]")
        if (p / "validation" / "summary.json").is_file()
    )


def find_best(
    cfg: DictConfig,
    configurations: list[str] | None = None,
    folds: list[int] | None = None,
    ensembles: bool = True,
) -> BestChoice:
    """Run nnU-Net's ``find_best_configuration`` over the trained configurations and validated folds."""
    export_paths(cfg)
    identity, _ = prepared_dataset(cfg)
    plans = str(cfg.prepare.plans_identifier)
    root = Path(cfg.paths.results).expanduser().resolve() / identity.folder
    prefix = f"{TRAINER_NAME}__{plans}__"
    trained = {p.name.removeprefix(prefix): p for p in sorted(root.glob(prefix + "*")) if p.is_dir()}
    if configurations:
        missing = [c for c in configurations if c not in trained]
        if missing:
            raise DatasetError(
                f"{root}: configuration(s) {missing} not trained (trained: {sorted(trained) or 'none'}); "
                "train them with `mlops train -c CONFIGURATION --fold 0-4`"
            )
        trained = {c: trained[c] for c in configurations}
    validated = {c: _validated_folds(p) for c, p in trained.items()}
    trained = {c: p for c, p in trained.items() if validated[c]}
    if not trained:
        raise DatasetError(
            f"{root}: no trained and validated fold of {identity.folder}; run `mlops train --dataset {identity.id} "
            "--fold 0-4` (and `mlops validate` for folds trained with train.validate=false)"
        )
    if folds is None:
        folds = sorted(set.intersection(*(set(validated[c]) for c in trained)))
    for c in trained:
        lacking = [f for f in folds if f not in validated[c]]
        if lacking:
            raise DatasetError(
                f"{trained[c]}: fold(s) {lacking} have no nnU-Net validation (validated: {validated[c] or 'none'}); "
                f"run `mlops validate --dataset {identity.id} -c {c} --fold {','.join(map(str, lacking))}`"
            )
    if ensembles and len(trained) > 1:
        no_npz = [
            f"{c} fold {f}" for c in trained for f in folds if not any(trained[c].glob(f"fold_{f}/validation/*.npz"))
        ]
        if no_npz:
            logger.warning(
                f"Ensembles need the validation probabilities, absent for {', '.join(no_npz)}; trying single "
                "configurations only (`mlops validate --npz` keeps them)"
            )
            ensembles = False
    logger.info(f"nnU-Net find_best_configuration on {identity.folder}: {sorted(trained)}, folds {folds}")
    info = nnunet.find_best_configuration(
        identity.id, list(trained), list(folds), plans, ensembles, int(cfg.prepare.num_workers)
    )
    best = info["best_model_or_ensemble"]
    dirs = [
        str(root / f"{m['trainer']}__{m['plans_identifier']}__{m['configuration']}")
        for m in best["selected_model_or_models"]
    ]
    _, steps = nnunet.load_postprocessing(Path(best["postprocessing_file"]))
    choice = BestChoice(
        dataset=identity.folder,
        model_dirs=dirs,
        folds=[int(f) for f in info["folds"]],
        postprocessing=str(best["postprocessing_file"]),
        postprocessing_steps=steps,
        dice_before_pp=float(best["result_on_crossval_pre_pp"]),
        dice_after_pp=float(best["result_on_crossval_post_pp"]),
        all_results={k: float(v) for k, v in info["all_results"].items()},
        instructions=str(root / "inference_instructions.txt"),
    )
    tmp = root / (CHOICE_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(choice), indent=2))
    tmp.replace(root / CHOICE_FILE)
    return choice
