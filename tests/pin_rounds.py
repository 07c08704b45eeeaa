"""Writes tests/data/pinned_rounds.json: what the trainer computes on a tiny run, per algorithm.

Run once at a reference commit (`python tests/pin_rounds.py`); tests/test_pinned_rounds.py compares later code with it,
so that a refactor of the round cannot change the numbers unnoticed.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import counting_dataset, stack_collator, tiny_args, tiny_llama  # noqa: E402

from hosfl_hf import HOSFLTrainer  # noqa: E402

PIN_PATH = Path(__file__).parent / "data" / "pinned_rounds.json"
CASES = {
    "hosfl-adamw": dict(algorithm="hosfl"),
    "hosfl-sgd": dict(algorithm="hosfl", client_optimizer="sgd", client_learning_rate=1e-2),
    "client_only": dict(algorithm="client_only"),
    "frozen_client": dict(algorithm="frozen_client"),
    "splitlora": dict(algorithm="splitlora"),
    "zo_sfl": dict(algorithm="zo_sfl"),
    "mezo": dict(algorithm="mezo"),
    "centralized": dict(algorithm="centralized"),
}


def digest(named) -> str:
    h = hashlib.sha256()
    for name, p in named:
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run_case(tmp: Path, overrides: dict) -> dict:
    torch.set_num_threads(1)
    args = tiny_args(tmp, max_steps=4, **overrides)
    trainer = HOSFLTrainer(
        tiny_llama(), args, split_layer=2, train_dataset=counting_dataset(), data_collator=stack_collator
    )
    trainer.train()
    client = trainer.split.client_parameters(trainable_only=False)
    server = trainer.split.server_parameters(trainable_only=False)
    return {
        "trajectory": [
            {"round": r.round, "seeds": r.seeds, "scalars": r.scalars, "lr": r.lr} for r in trainer.trajectory.rounds
        ],
        "client_sha256": digest(client),
        "server_sums": {n: float(p.detach().double().sum()) for n, p in server},
        "server_sha256": digest(server),
        "comm": dict(trainer.comm),
    }


if __name__ == "__main__":
    import tempfile

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"commit": commit, "torch": torch.__version__, "cases": {}}
    for name, overrides in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            out["cases"][name] = run_case(Path(tmp), overrides)
            print(name, out["cases"][name]["client_sha256"][:12])
    PIN_PATH.write_text(json.dumps(out, indent=1))
