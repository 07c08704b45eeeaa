"""One round, written once: for every algorithm of the registry, `HOSFLTrainer` (the loop over its in-process
clients, the Trainer as the server's backend), the protocol in one process (a `SplitServer` and one `SplitClient` per
client, each with its own copy of the client part) and a Flower simulation end with bit-identical client weights,
server weights and trajectory (`torch.equal`, no tolerance)."""

import copy

import pytest
import torch
from conftest import (
    counting_dataset,
    run_flower_simulation,
    stack_collator,
    tiny_args,
    tiny_llama,
    write_flower_inputs,
)
from safetensors.torch import load_file

from hosfl_hf import HOSFLTrainer, Trajectory
from hosfl_hf.algorithms import ALGORITHMS
from hosfl_hf.integrations.flower.config import FLOWER_ALGORITHMS
from hosfl_hf.protocol import FederatedRun, InProcessTransport, RoundSettings, SplitClient, SplitServer

pytestmark = pytest.mark.usefixtures("single_thread")
ROUNDS, CLIENTS, PER_ROUND = 4, 3, 2
ON_LOOP = list(ALGORITHMS)


def trainer_run(tmp_path, algorithm):
    args = tiny_args(tmp_path, algorithm=algorithm, num_clients=CLIENTS, clients_per_round=PER_ROUND, max_steps=ROUNDS)
    trainer = HOSFLTrainer(
        tiny_llama(), args, split_layer=2, train_dataset=counting_dataset(), data_collator=stack_collator
    )
    trainer.train()
    return trainer


def protocol_run(args):
    settings = RoundSettings.from_args(args, split_layer=2)
    base = tiny_llama()
    server = SplitServer(copy.deepcopy(base), settings, args)
    clients = {
        c: SplitClient(copy.deepcopy(base), c, settings, counting_dataset(), stack_collator) for c in range(CLIENTS)
    }
    run = FederatedRun(server, InProcessTransport(clients), base_model=base)
    run.run(ROUNDS)
    digests = run.finish()  # the clients that missed rounds catch up (replay, or the record's state)
    return server, clients, run, digests


def assert_same(named, expected, what):
    named = dict(named)
    assert named.keys() == dict(expected).keys(), what
    for name, value in dict(expected).items():
        assert torch.equal(named[name], value), (what, name)


def test_flower_runs_every_algorithm():
    assert FLOWER_ALGORITHMS == tuple(ALGORITHMS) and len(ALGORITHMS) == 8


@pytest.mark.parametrize("algorithm", ON_LOOP)
def test_trainer_and_protocol_are_bit_identical(tmp_path, algorithm):
    trainer = trainer_run(tmp_path / "trainer", algorithm)
    server, clients, run, digests = protocol_run(trainer.args)
    assert server.trajectory.rounds == trainer.trajectory.rounds
    if ALGORITHMS[algorithm].client.zeroth_order:
        assert len(trainer.trajectory.rounds) == ROUNDS
    assert_same(server.parameters, trainer.server.parameters, "server")  # the whole model's without a split
    rule = ALGORITHMS[algorithm].client
    if ALGORITHMS[algorithm].split or rule.update_type is not None:
        # Every client holds the trained client part (FedAvg-LoRA: the whole model); centralized training and MeZO
        # pool the data at the server, whose clients hold no trained weights.
        expected = dict(trainer.holder.parameters)
        for client in clients.values():
            assert_same(client.parameters, expected, f"client {client.client_id}")
    assert len(set(digests.values())) == 1
    # The same messages: the trainer's traffic is the protocol's, counted by the same loop.
    assert [r["finishers"] for r in run.log] == [r["finishers"] for r in trainer.run.log]
    assert [r["loss"] for r in run.log] == [r["loss"] for r in trainer.run.log]


@pytest.mark.parametrize("algorithm", sorted(set(ON_LOOP) - {"hosfl"}))  # HO-SFL: tests/test_flower.py
def test_flower_simulation_is_bit_identical_to_the_trainer(tmp_path, algorithm):
    config = write_flower_inputs(
        tmp_path, **{"num-rounds": ROUNDS, "num-clients": CLIENTS, "clients-per-round": PER_ROUND}
    )
    config["algorithm"] = algorithm
    output = run_flower_simulation(tmp_path, config, CLIENTS)
    out = tmp_path / "out"
    assert (out / "flower_summary.json").is_file(), output[-6000:]
    trainer = trainer_run(tmp_path / "trainer", algorithm)
    assert Trajectory.load(out).rounds == trainer.trajectory.rounds
    saved = load_file(out / "model.safetensors")
    assert_same({n: saved[n] for n, _ in trainer.split.server_parameters()}, trainer.split.server_parameters(), "srv")
    client = dict(trainer.split.client_parameters())
    assert_same({n: saved[n] for n in client}, client, "client")
    states = sorted((tmp_path / "state").glob("*/client-*/client_parameters.safetensors"))
    assert len(states) == CLIENTS
    if ALGORITHMS[algorithm].split or ALGORITHMS[algorithm].client.update_type is not None:
        # Every node, those that missed rounds included, holds the trained client part (FedAvg-LoRA: whole model).
        for path in states:
            assert_same(load_file(path), dict(trainer.holder.parameters), str(path))
