"""Writes tests/data/pinned_rounds.json: what the trainer computes on a tiny run, per algorithm.

Regenerate (only after a change of the numbers that is intended, and say why in the commit message), from the
repository root:

    python tests/pin_rounds.py

tests/test_pinned_rounds.py compares later code with it, exactly: a refactor of the round cannot change the numbers
unnoticed. Each case pins the round records (seeds, averaged scalars, learning rate), the traffic counters, and every
tensor of the client part and of the server part after the run: a sha256 digest of the float32 bytes of the part's
tensors in name order, and the first values of the part's first and last trainable tensor (exact floats, so that a
failing digest says where the weights differ).
"""

import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch
from peft import LoraConfig

sys.path.insert(0, str(Path(__file__).parent))
from conftest import counting_dataset, stack_collator, tiny_args, tiny_llama  # noqa: E402

from hosfl_hf import HOSFLTrainer  # noqa: E402
from hosfl_hf.algorithms import ALGORITHMS  # noqa: E402

PIN_PATH = Path(__file__).parent / "data" / "pinned_rounds.json"
LORA = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
# name -> (HOSFLConfig overrides, LoRA adapters on both parts). Every algorithm of ALGORITHMS has a case.
CASES = {
    "hosfl-adamw": (dict(algorithm="hosfl"), False),
    "hosfl-sgd": (dict(algorithm="hosfl", client_optimizer="sgd", client_learning_rate=1e-2), False),
    "hosfl-lora": (dict(algorithm="hosfl"), True),
    "client_only": (dict(algorithm="client_only"), False),
    "frozen_client": (dict(algorithm="frozen_client"), False),
    "splitlora": (dict(algorithm="splitlora"), False),
    "splitlora-lora": (dict(algorithm="splitlora"), True),
    "zo_sfl": (dict(algorithm="zo_sfl"), False),
    "fedavg_lora": (dict(algorithm="fedavg_lora"), True),
    "mezo": (dict(algorithm="mezo"), False),
    "centralized": (dict(algorithm="centralized"), False),
}
assert {overrides["algorithm"] for overrides, _ in CASES.values()} == set(ALGORITHMS)
VALUES_PER_TENSOR = 4


def versions() -> dict[str, str]:
    """The releases whose code the pinned numbers depend on besides this package's."""
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def digest(named) -> str:
    """sha256 of the names and float32 bytes of `named` (`(name, tensor)` pairs), in name order."""
    h = hashlib.sha256()
    for name, p in sorted(named, key=lambda item: item[0]):
        h.update(name.encode())
        h.update(p.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def part_record(every, trainable) -> dict:
    """A part's pin: the digest of all its tensors (a frozen tensor must not move either), the names of its trainable
    tensors, and the first values of the first and last of them."""
    trainable = sorted(trainable, key=lambda item: item[0])
    picked = trainable[:1] + trainable[-1:] if len(trainable) > 1 else trainable
    return {
        "sha256": digest(every),
        "trainable": [n for n, _ in trainable],
        "values": {n: p.detach().float().flatten()[:VALUES_PER_TENSOR].tolist() for n, p in picked},
    }


def make_trainer(tmp: Path, case, **extra) -> HOSFLTrainer:
    overrides, lora = case
    args = tiny_args(tmp, max_steps=4, logging_steps=1, **{**overrides, **extra})
    return HOSFLTrainer(
        tiny_llama(),
        args,
        split_layer=2,
        train_dataset=counting_dataset(),
        data_collator=stack_collator,
        peft_config=copy.deepcopy(LORA) if lora else None,
    )


def run_case(tmp: Path, case, **extra) -> dict:
    torch.set_num_threads(1)
    trainer = make_trainer(tmp, case, **extra)
    trainer.train()
    split = trainer.split
    return {
        "trajectory": [
            {"round": r.round, "seeds": r.seeds, "scalars": r.scalars, "lr": r.lr} for r in trainer.trajectory.rounds
        ],
        "client": part_record(split.client_parameters(trainable_only=False), split.client_parameters()),
        "server": part_record(split.server_parameters(trainable_only=False), split.server_parameters()),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "comm": dict(trainer.comm),
    }


if __name__ == "__main__":
    import tempfile

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"commit": commit, "torch": torch.__version__, "versions": versions(), "cases": {}}
    for name, case in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            out["cases"][name] = run_case(Path(tmp), case)
            print(name, out["cases"][name]["client"]["sha256"][:12], out["cases"][name]["server"]["sha256"][:12])
    PIN_PATH.write_text(json.dumps(out, indent=1) + "\n")
