"""The round protocol: codec round trips and rejections, and the contract that the in-process protocol (every
message through the codec) trains the same model as `HOSFLTrainer`."""

import copy

import pytest
import torch
from conftest import counting_dataset, stack_collator, tiny_args, tiny_llama

from hosfl_hf import HOSFLTrainer
from hosfl_hf.protocol import (
    CatchUp,
    ClientForward,
    ClientUpdate,
    Cotangent,
    InProcessTransport,
    MessageError,
    ProbeReply,
    RoundPlan,
    RoundSettings,
    SplitClient,
    SplitServer,
    decode,
    encode,
    run_rounds,
)

pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------------------------------------- codec
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_codec_round_trips_exactly(dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=g).to(dtype)
    messages = [
        RoundPlan(round=3, clients=[4, 1], seeds=[2**62 - 1, 7]),
        ClientForward(
            round=3,
            client=4,
            hidden_states=hidden,
            labels=torch.arange(10).view(2, 5),
            attention_mask=torch.ones(2, 5, dtype=torch.int64),
        ),
        Cotangent(round=3, client=4, cotangent=hidden * 3),
        ProbeReply(round=3, client=4, scalars=[0.1 + 0.2, -1e-30]),
        ClientUpdate(round=3, seeds=[5, 6], scalars=[1 / 3, -2.5e-7], lr=1e-5 / 3),
        CatchUp([ClientUpdate(round=1, seeds=[1, 2], scalars=[0.5, 0.25], lr=0.1)]),
    ]
    for message in messages:
        back = decode(encode(message), type(message))
        for name, value in vars(message).items():
            got = getattr(back, name)
            if isinstance(value, torch.Tensor):
                assert got.dtype == value.dtype and torch.equal(got, value), name
            else:
                assert got == value, name


def cut(**overrides):
    values = dict(round=2, client=1, hidden_states=torch.zeros(2, 4, 8), labels=torch.zeros(2, 4, dtype=torch.int64))
    return ClientForward(**{**values, **overrides})


@pytest.mark.parametrize(
    "message, expected, expect, field",
    [
        (cut(), Cotangent, {}, "kind"),
        (cut(round=1), ClientForward, dict(round=2), "round"),
        (cut(client=9), ClientForward, dict(clients=[0, 1]), "client"),
        (cut(hidden_states=torch.zeros(2, 4)), ClientForward, {}, "hidden_states"),
        (cut(hidden_states=torch.zeros(2, 4, 6)), ClientForward, dict(hidden_size=8), "hidden_states"),
        (cut(hidden_states=torch.zeros(2, 4, 8, dtype=torch.float64)), ClientForward, {}, "hidden_states"),
        (cut(hidden_states=torch.full((2, 4, 8), float("nan"))), ClientForward, {}, "hidden_states"),
        (cut(labels=torch.zeros(3, 4, dtype=torch.int64)), ClientForward, {}, "labels"),
        (cut(labels=torch.zeros(2, 4)), ClientForward, {}, "labels"),
        (Cotangent(round=2, client=1, cotangent=torch.zeros(2, 4, 7)), Cotangent, dict(shape=(2, 4, 8)), "cotangent"),
        (ProbeReply(round=2, client=1, scalars=[1.0]), ProbeReply, dict(num_perturbations=2), "scalars"),
        (ProbeReply(round=2, client=1, scalars=[1.0, float("inf")]), ProbeReply, {}, "scalars"),
        (RoundPlan(round=2, clients=[1, 1], seeds=[3]), RoundPlan, {}, "clients"),
        (RoundPlan(round=2, clients=[1], seeds=[-3]), RoundPlan, {}, "seeds"),
        (ClientUpdate(round=2, seeds=[1], scalars=[1.0, 2.0], lr=0.1), ClientUpdate, {}, "seeds"),
        (ClientUpdate(round=2, seeds=[1], scalars=[1.0], lr=float("nan")), ClientUpdate, {}, "lr"),
        (CatchUp([ClientUpdate(3, [1], [1.0], 0.1), ClientUpdate(2, [1], [1.0], 0.1)]), CatchUp, {}, "rounds"),
    ],
)
def test_codec_rejects_malformed_messages_naming_the_field(message, expected, expect, field):
    with pytest.raises(MessageError, match=f"'{field}'"):
        decode(encode(message), expected, **expect)


def test_codec_rejects_foreign_bytes():
    with pytest.raises(MessageError, match="Not an hosfl_hf protocol message"):
        decode(b"\x80\x04K\x01.", RoundPlan)  # a pickle is never unpickled


# ------------------------------------------------------------------------------------------------------ contract
def protocol_run(args, rounds):
    settings = RoundSettings.from_args(args, split_layer=2)
    base = tiny_llama()
    server = SplitServer(copy.deepcopy(base), settings, args)
    dataset = counting_dataset()
    clients = {c: SplitClient(copy.deepcopy(base), c, settings, dataset, stack_collator) for c in range(4)}
    traffic = {}
    run_rounds(server, clients, range(rounds), traffic)
    return server, clients, traffic


@pytest.mark.parametrize("client_optimizer", ["sgd", "adamw"])
def test_protocol_equals_the_trainer(tmp_path, client_optimizer):
    """Same seeds and config: the protocol's client weights and trajectory are bit-identical to HOSFLTrainer's, its
    server weights equal within float tolerance; a client that skipped rounds ends identical after catch-up."""
    rounds = 6
    args = tiny_args(tmp_path, max_steps=rounds, client_optimizer=client_optimizer)
    trainer = HOSFLTrainer(
        tiny_llama(), args, split_layer=2, train_dataset=counting_dataset(), data_collator=stack_collator
    )
    trainer.train()
    server, clients, traffic = protocol_run(args, rounds)

    assert server.trajectory.rounds == trainer.trajectory.rounds
    expected = dict(trainer.split.client_parameters())
    history = CatchUp(server.history(-1))
    for client in clients.values():
        client.catch_up(history)  # the clients not sampled in the last rounds replay what they missed
        assert client.last_round == rounds - 1
        for name, value in client.parameters:
            assert torch.equal(value, expected[name]), (client.client_id, name)
    trained_server = dict(trainer.split.server_parameters())
    for name, value in server.parameters:
        torch.testing.assert_close(value, trained_server[name], rtol=1e-5, atol=1e-6)
    # Bytes actually encoded: the cuts and lambdas dominate; sync is seeds + scalars (+ message headers).
    assert traffic["activation_bytes"] > trainer.comm["activation_bytes"] * 0.9
    assert traffic["sync_bytes"] < traffic["activation_bytes"] / 5


def test_client_holds_no_server_weights(tmp_path):
    settings = RoundSettings.from_args(tiny_args(tmp_path), split_layer=2)
    client = SplitClient(tiny_llama(), 0, settings, counting_dataset(), stack_collator)
    held = {n for n, p in client.split.model.named_parameters() if p.device.type != "meta"}
    assert held == set(client.split.client_parameter_names)  # embeddings and blocks 0-1 only
    assert len(client.split.layers) == 3


def test_client_state_round_trips_and_refuses_duplicates(tmp_path):
    args = tiny_args(tmp_path, max_steps=3)
    server, clients, _ = protocol_run(args, 3)
    sampled = server.plan(2).clients[0]
    client = clients[sampled]
    client.save(tmp_path / "state")
    fresh = SplitClient(tiny_llama(), sampled, server.settings, counting_dataset(), stack_collator)
    assert fresh.load(tmp_path / "state") and fresh.last_round == client.last_round
    for (name, a), (_, b) in zip(fresh.parameters, client.parameters):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="duplicate or out-of-order"):
        fresh.apply(server.history(1)[0])


class Counting(InProcessTransport):
    """The in-process transport, recording the kind of every exchange."""

    def __init__(self, clients):
        super().__init__(clients)
        self.kinds = []

    def exchange(self, kind, payloads, timeout, round_index):
        self.kinds.append(kind)
        return super().exchange(kind, payloads, timeout, round_index)


def test_deferred_updates_take_two_exchanges_and_end_identical(tmp_path):
    """With `deferred_updates` the update of round r reaches its finishers with their next catch-up: no `update`
    exchange, and every client ends with the same client part as with the update exchange."""
    from hosfl_hf.protocol import FederatedRun, ReliabilitySettings

    args = tiny_args(tmp_path, max_steps=5)
    settings = RoundSettings.from_args(args, split_layer=2)
    ends = {}
    for deferred in (False, True):
        base = tiny_llama()
        server = SplitServer(copy.deepcopy(base), settings, args)
        clients = {
            c: SplitClient(copy.deepcopy(base), c, settings, counting_dataset(), stack_collator) for c in range(4)
        }
        transport = Counting(clients)
        run = FederatedRun(server, transport, ReliabilitySettings(deferred_updates=deferred))
        run.run(5)
        kinds = transport.kinds
        assert ("update" in kinds) is not deferred and kinds.count("forward") == 5
        digests = run.finish()
        assert len(set(digests.values())) == 1
        ends[deferred] = (server.trajectory.rounds, next(iter(digests.values())))
    assert ends[True] == ends[False]
