"""Named recipes: sets of defaults for a run (`hosfl-hf <recipe>`, `recipes/*.yaml`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config import HOSFLConfig
from .arguments import ModelArguments, ScriptArguments
from .parser import HOSFLParser

__all__ = ["RECIPES", "Recipe", "make_parser", "parse_recipe_args"]


@dataclass(frozen=True)
class Recipe:
    """A named set of defaults for [`main`] (flags and `--config` override them)."""

    name: str
    description: str
    defaults: dict[str, Any]


SST2_SMOLLM2 = Recipe(
    "sst2-smollm2",
    "SmolLM2-135M-Instruct (shipped on PyPI) on SST-2, 80 HO-SFL rounds on CPU (the README's main job).",
    {
        # Paper federation (M=10, K=3, P=2, mu=1e-3, LoRA r8/a16 on q,v in both parts); CPU-sized batch and budget,
        # learning rates raised from the paper's 1e-5 for 80 rounds (docs/faq.md).
        "task": "sst2",
        "model_name_or_path": "smollm2",
        "eval_limit": 512,
        "max_length": 128,
        "output_dir": "outputs/sst2_smollm2",
        "split_layer": 10,
        "num_clients": 10,
        "clients_per_round": 3,
        "num_perturbations": 2,
        "zo_eps": 0.001,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 32,
        "max_steps": 80,
        "learning_rate": 0.001,
        "client_learning_rate": 0.0001,
        "lr_scheduler_type": "linear",
        "warmup_steps": 5,
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "seed": 42,
    },
)

RTE_SMOLLM2 = Recipe(
    "rte-smollm2",
    "SmolLM2-135M-Instruct on RTE (all 277 validation pairs), 80 HO-SFL rounds on CPU.",
    {**SST2_SMOLLM2.defaults, "task": "rte", "eval_limit": None, "output_dir": "outputs/rte_smollm2"},
)

OPT13B_SST2 = Recipe(
    "opt13b-sst2",
    "OPT-13B on SST-2 with MeZO's protocol (1,000 train / 500 dev / 872 test), bf16 server; needs a GPU.",
    {
        "task": "sst2",
        "protocol": "mezo",
        "prompt": "mezo",
        "train_limit": 1000,
        "eval_limit": 500,
        "model_name_or_path": "facebook/opt-13b",
        "dtype": "bfloat16",
        "bf16": True,
        "split_layer": 10,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 32,
        "max_steps": 1000,
        "eval_strategy": "steps",
        "eval_steps": 100,
        "logging_steps": 10,
        "save_strategy": "steps",
        "save_steps": 250,
        "save_total_limit": 1,
        "output_dir": "outputs/opt13b_sst2",
        "report_to": "none",
    },
)

RECIPES: dict[str, Recipe] = {r.name: r for r in (SST2_SMOLLM2, RTE_SMOLLM2, OPT13B_SST2)}


def make_parser(recipe: str | Recipe | None = None) -> HOSFLParser:
    """The parser of a recipe: `ScriptArguments`, `ModelArguments` and `HOSFLConfig`, with the recipe's defaults
    shown by `--help` (call `parse_args_and_config(defaults=recipe.defaults)` to apply them)."""
    if isinstance(recipe, str):
        recipe = RECIPES[recipe]
    parser = HOSFLParser(
        (ScriptArguments, ModelArguments, HOSFLConfig),
        description=recipe.description if recipe is not None else "HO-SFL fine-tuning of a causal LM.",
    )
    if recipe is not None:
        parser.set_defaults(**recipe.defaults)
    return parser


def parse_recipe_args(recipe: str | Recipe | None, args: Sequence[str] | None = None) -> tuple[Any, ...]:
    """`(script_args, model_args, training_args)` of a recipe, from `args` (default `sys.argv[1:]`)."""
    if isinstance(recipe, str):
        recipe = RECIPES[recipe]
    parser = make_parser(recipe)
    return parser.parse_args_and_config(args, defaults=recipe.defaults if recipe is not None else None)
