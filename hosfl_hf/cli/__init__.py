"""The command line of hosfl_hf: the `hosfl-hf` console entry point over its modules: argument dataclasses
(`arguments`), a parser for flags and YAML files (`parser`), named recipes (`recipes`), the classification run
(`train`), the instruction-tuning run (`sft`) and the memory estimate (`hosfl_hf.memory`).

A run is described by three dataclasses, parsed by [`HOSFLParser`] from the command line and/or a YAML file
(`--config`): [`ScriptArguments`] (task and data), [`ModelArguments`] (checkpoint, dtype, 4-bit client, LoRA) and
[`HOSFLConfig`] (training and federation). [`main`] then trains, evaluates, saves and optionally pushes. The recipes
in `recipes/` and the console commands are thin entry points over it:

```bash
hosfl-hf sst2-smollm2                                 # the README's CPU job (= recipes/sst2_smollm2.yaml)
hosfl-hf rte-smollm2 --max_steps 40                   # RTE on the shipped model, fewer rounds
hosfl-hf opt13b-sst2 --load_in_4bit_client            # OPT-13B on SST-2, MeZO's protocol (a GPU)
hosfl-hf train --config my_run.yaml --seed 1          # any run: YAML file, flags override it
hosfl-hf train --dataset_name my_data/ --prompt_template "Review: {text}\nSentiment:" --verbalizers " bad" " good"
hosfl-hf sft --dataset_name chats/ --max_steps 40     # instruction tuning (TRL data handling: hosfl-hf[sft])
hosfl-hf memory --model facebook/opt-13b --split_layer 10 --batch_size 16
hosfl-hf privacy-audit --task sst2 --split_layer 1 10 --cut_noise 0 1   # what the server reads (docs/privacy.md)
hosfl-hf env                                          # versions, for bug reports
python -m hosfl_hf ...                                # the same without the console script
```
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

from ..memory import KNOWN_CONFIGS, MemoryEstimate, estimate_memory
from .arguments import ModelArguments, ScriptArguments
from .parser import HOSFLParser, load_yaml_config
from .recipes import RECIPES, Recipe, make_parser, parse_recipe_args
from .train import build_task, default_split_layer, end_processes, get_peft_config, load_model, load_splits, main

__all__ = [
    "KNOWN_CONFIGS",
    "RECIPES",
    "HOSFLParser",
    "MemoryEstimate",
    "ModelArguments",
    "Recipe",
    "ScriptArguments",
    "build_task",
    "cli",
    "default_split_layer",
    "end_processes",
    "estimate_memory",
    "get_peft_config",
    "load_model",
    "load_splits",
    "load_yaml_config",
    "main",
    "make_parser",
    "parse_recipe_args",
]


def _env() -> None:
    import torch

    from ..versions import version_report

    lines = [f"Python: {platform.python_version()} ({platform.platform()})", *version_report()]
    lines.append(f"CUDA available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}")
    print("\n".join(lines))


def _memory(argv: Sequence[str]) -> None:
    from ..memory import KNOWN_CONFIGS, estimate_memory

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


def _train(command: str, argv: Sequence[str]) -> None:
    from .train import main

    recipe = RECIPES.get(command)
    parser = make_parser(recipe)
    parser.prog = f"hosfl-hf {command}"
    main(*parser.parse_args_and_config(argv, defaults=recipe.defaults if recipe is not None else None))


def _sft(argv: Sequence[str]) -> None:
    from .sft import make_sft_parser, sft_main

    parser = make_sft_parser()
    parser.prog = "hosfl-hf sft"
    sft_main(*parser.parse_args_and_config(argv))


def _privacy_audit(argv: Sequence[str]) -> None:
    from .privacy import make_privacy_parser, privacy_main

    parser = make_privacy_parser()
    parser.prog = "hosfl-hf privacy-audit"
    privacy_main(*parser.parse_args_and_config(argv))


def _commands() -> dict[str, tuple[str, Any]]:
    """The console's commands: name -> (one-line help, function of the remaining arguments)."""
    commands: dict[str, tuple[str, Any]] = {
        "train": ("Classification on a preset or any dataset: flags and/or --config YAML.", partial(_train, "train"))
    }
    for name, recipe in RECIPES.items():
        commands[name] = (recipe.description, partial(_train, name))
    commands["sft"] = ("Instruction tuning (SFT) on chat / prompt-completion / text data (needs trl).", _sft)
    commands["memory"] = ("Estimate the GPU memory of a run (an estimate, not a measurement).", _memory)
    commands["privacy-audit"] = (
        "Play the server: token recovery from the cut on your data (docs/privacy.md).",
        _privacy_audit,
    )
    commands["env"] = ("Print versions, for bug reports.", lambda argv: _env())
    return commands


def cli(argv: Sequence[str] | None = None) -> int:
    """`hosfl-hf <command> [flags]`: `train`, one command per recipe, `sft`, `memory`, `privacy-audit` and `env`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    registry = _commands()
    commands = {name: text for name, (text, _) in registry.items()}
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
    registry[command][1](rest)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
