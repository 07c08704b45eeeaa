"""The client-update studies (`benchmarks/client_update_study.py`'s files) as the summary's `client_contribution`."""

from __future__ import annotations

import glob
import json
import os


def client_contribution(out: str) -> dict:
    """`task -> depth -> configuration -> client_contribution` from `benchmarks/client_update_study.py`'s files (the
    studies run at the deep split), with each configuration's measured cosine. The SST-2 pilot of 60 rounds keeps its
    configuration names; a study of another length files them as `<configuration>/r<rounds>`."""
    filed: dict = {}
    for path in sorted(glob.glob(os.path.join(out, "client_update_study*.json"))):
        study = json.load(open(path))
        task, depth = study.get("task", "sst2"), study.get("depth", "deep")
        rounds = study.get("budget", {}).get("rounds", 60)
        suffix = "" if os.path.basename(path) == "client_update_study.json" else f"/r{rounds}"
        for name, entry in study.get("client_contribution", {}).items():
            cosine = study.get("cosine", {}).get(name)
            settings = study_settings(study.get("runs", {}), name, entry.get("seeds", []))
            filed.setdefault(task, {}).setdefault(depth, {})[name + suffix] = {
                **entry,
                "cosine": cosine,
                "settings": settings,
            }
    return filed


def study_settings(runs: dict, name: str, seeds: list[int]) -> dict | None:
    """What a study configuration set, read off its first run's record: the method, the client's directions per round
    (`num_perturbations`, zeroth-order clients only) and learning rate, step rule, mask density, direction scales and
    zeroth-order modules, and the client's own schedule type if it had one. Runs filed from grid cells carry the
    grid's budget only, so its defaults fill the rest."""
    run = next((runs[f"{name}/s{s}"] for s in seeds if f"{name}/s{s}" in runs), None)
    if run is None:
        return None
    budget, overrides, method = run.get("budget", {}), run.get("overrides") or {}, run["method"]
    zeroth_order = method == "hosfl"
    return {
        "method": method,
        "num_perturbations": overrides.get("num_perturbations", budget.get("hosfl_perturbations"))
        if zeroth_order
        else None,
        "client_learning_rate": overrides.get(
            "client_learning_rate", budget.get("zo_lr") if zeroth_order else budget.get("fo_lr")
        ),
        "client_optimizer": overrides.get("client_optimizer", "adamw"),
        "mask_density": run.get("mask_density"),
        "direction_scales": run.get("mask_direction_scales", "uniform"),
        "guide_share": run.get("mask_guide_share", 0.0),
        "client_zo_modules": overrides.get("client_zo_modules"),
        "client_lr_scheduler_type": overrides.get("client_lr_scheduler_type"),  # None: the server's schedule
    }
