"""One HO-SFL run on a tiny model, started by tests/test_distributed.py (through `accelerate launch` or directly).

    python tests/distributed_worker.py OUT_DIR CLIENTS_PER_ROUND ROUNDS [NAN_RANK NAN_CALL]

Each process writes OUT_DIR/rank<r>.pt: its client and server weights, trajectory and traffic totals. With NAN_RANK
and NAN_CALL, that process's loss is NaN at its NAN_CALL-th training loss (to check that every process stops).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import counting_dataset, stack_collator, tiny_args, tiny_llama  # noqa: E402

from hosfl_hf import HOSFLTrainer  # noqa: E402
from hosfl_hf.cli.train import end_processes  # noqa: E402


def main(out: str, clients_per_round: int, rounds: int, nan_rank: int = -1, nan_call: int = 0) -> None:
    torch.set_num_threads(1)
    args = tiny_args(
        Path(out),
        num_clients=8,
        clients_per_round=clients_per_round,
        max_steps=rounds,
        client_optimizer="sgd",
        client_learning_rate=1e-2,
    )
    calls = 0

    def loss_func(outputs, labels):
        nonlocal calls
        calls += 1
        loss = torch.nn.functional.cross_entropy(outputs.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        if args.process_index == nan_rank and calls == nan_call:
            return loss * float("nan")
        return loss

    trainer = HOSFLTrainer(
        tiny_llama(),
        args,
        split_layer=2,
        train_dataset=counting_dataset(),
        data_collator=stack_collator,
        compute_loss_func=loss_func,
    )
    trainer.train()
    torch.save(
        {
            "client": {n: p.detach().clone() for n, p in trainer.split.client_parameters()},
            "server": {n: p.detach().clone() for n, p in trainer.split.server_parameters()},
            "trajectory": trainer.trajectory.to_dict(),
            "comm": dict(trainer.comm),
            "zo_forward_passes": trainer.zo_forward_passes,
            "world_size": args.world_size,
        },
        Path(out) / f"rank{args.process_index}.pt",
    )
    end_processes(trainer)  # a rank leaving with the gloo group alive can abort (exit -6) after its work is done


if __name__ == "__main__":
    main(sys.argv[1], *(int(v) for v in sys.argv[2:]))
