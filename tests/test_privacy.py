"""The privacy audit and the client-side defense (issue #30): the attacks are strong on an undefended tiny model and
bounded in time, the noise lowers what they recover, the noise cancels from the probe scalars bit for bit, and the
defense runs on the client in the trainer and in the protocol alike (replay stays bit-exact)."""

import copy
import json
import time

import pytest
import torch
from conftest import counting_dataset, stack_collator, tiny_args, tiny_llama

from hosfl_hf import HOSFLConfig, HOSFLTrainer, Trajectory, replay_trajectory, split_model
from hosfl_hf.client_part import ClientPart
from hosfl_hf.privacy import CutDefense, LinearInversion, audit_privacy, cut_tokens, white_box_search
from hosfl_hf.protocol import CatchUp, Cotangent, RoundPlan, RoundSettings, SplitClient, SplitServer, run_rounds

VOCAB = 32


def sequences(n: int, seed: int, low: int = 4, high: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (n,), generator=g).tolist()
    return [torch.randint(3, VOCAB, (length,), generator=g).tolist() for length in lengths]


# -------------------------------------------------------------------------------------------------------- defense
def test_defense_noise_is_seeded_keyed_and_leaves_the_global_rng_alone():
    z = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(0))
    defense = CutDefense(noise=0.5, secret=11)
    state = torch.random.get_rng_state()
    first = defense.release(z, round_index=2, client=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first, defense.release(z, 2, 1))
    assert not torch.equal(first, defense.release(z, 3, 1)) and not torch.equal(first, defense.release(z, 2, 0))
    assert not torch.equal(first, CutDefense(noise=0.5, secret=12).release(z, 2, 1))
    # No secret: OS entropy, a new realisation every time (nothing the server could re-derive).
    fresh = CutDefense(noise=0.5)
    assert not torch.equal(fresh.release(z, 2, 1), fresh.release(z, 2, 1))


def test_defense_scale_is_the_documented_one():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(64, 32, 256, generator=g) * torch.linspace(0.1, 10, 32)[None, :, None]
    noise = CutDefense(noise=0.5, secret=0).release(z, 0, 0) - z
    # sigma times each token's RMS, i.e. a noise norm of about sigma * ||z_t||.
    ratio = noise.norm(dim=-1) / z.norm(dim=-1)
    assert abs(float(ratio.mean()) - 0.5) < 0.01
    clipped = CutDefense(clip_norm=2.0).release(z, 0, 0)
    assert float(clipped.norm(dim=-1).max()) <= 2.0 + 1e-5
    small = z[:, :1] * 0.01  # under the bound: unchanged
    assert torch.equal(CutDefense(clip_norm=1e3).release(small, 0, 0), small)
    noisy = CutDefense(noise=1.0, clip_norm=2.0, secret=0).release(z, 0, 0) - clipped
    assert abs(float(noisy.norm(dim=-1).mean()) - 2.0) < 0.05  # sigma * C with clipping


@pytest.mark.parametrize(
    "kwargs", [dict(noise=-1.0), dict(noise=float("nan")), dict(clip_norm=0.0), dict(secret=1.5), dict(noise=True)]
)
def test_defense_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="CutDefense"):
        CutDefense(**kwargs)
    with pytest.raises(ValueError, match="cut_noise|cut_clip|CutDefense"):
        HOSFLConfig(
            output_dir="x", **{f"cut_{k}" if k != "secret" else "cut_noise_seed": v for k, v in kwargs.items()}
        )


def probe_scalars(defense, reference_from_release: bool) -> list[float]:
    model = tiny_llama()
    split = split_model(model, 2)
    part = ClientPart(split, 1e-3, "one_sided", defense=defense)
    ids = torch.tensor(sequences(4, 3, 10, 10))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    clean = part.forward(inputs).hidden_states
    sent = part.release(clean, 5, 1) if reference_from_release else clean
    cotangent = torch.randn(clean.shape, generator=torch.Generator().manual_seed(9))
    return part.probe(inputs, sent, cotangent, [101, 202, 303])


def test_noise_cancels_from_the_probe_scalars_bit_for_bit():
    """The perturbed activations never leave the client: the same noise realisation would enter z~ and z~ + Delta
    and cancel in <lambda, z~(theta + mu u) - z~(theta)>; the client computes it on the clean cut, so the scalars
    with the defense on equal, bit for bit, the scalars from the same lambda without it (even when the caller
    passes the noisy cut it sent, as the trainer does)."""
    plain = probe_scalars(None, False)
    assert probe_scalars(CutDefense(noise=1.0, secret=4), True) == plain
    assert probe_scalars(CutDefense(noise=1.0), False) == plain
    # With clipping the clip is part of the client's function: noise still cancels exactly.
    clip = CutDefense(clip_norm=0.01)  # below the tiny model's token norms: it clips
    assert probe_scalars(CutDefense(noise=2.0, clip_norm=0.01, secret=4), True) == probe_scalars(clip, False)
    assert probe_scalars(clip, False) != plain


def test_trainer_sends_the_noisy_cut_and_replays_bit_exactly(tmp_path):
    rounds = 4
    runs = {}
    for noise in (0.0, 1.0):
        model = tiny_llama()
        initial = copy.deepcopy(model)
        args = tiny_args(tmp_path / str(noise), max_steps=rounds, logging_steps=1, cut_noise=noise, cut_noise_seed=3)
        trainer = HOSFLTrainer(
            model, args, split_layer=2, train_dataset=counting_dataset(), data_collator=stack_collator
        )
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        replay_trajectory(initial, Trajectory.from_dict(trainer.trajectory.to_dict()))
        replayed = dict(initial.named_parameters())
        for name, value in trainer.split.client_parameters():
            assert torch.equal(replayed[name], value), name
        runs[noise] = losses
    assert runs[0.0][0] != runs[1.0][0]  # the server trained on the noisy cut


def test_protocol_client_applies_the_defense_like_the_trainer(tmp_path):
    """Same settings and noise secret: the protocol's clients (the path Flower runs) send the trainer's noisy cuts
    (identical trajectories); without the secret the cut differs from the clean one and probes stay clean."""
    rounds = 3
    args = tiny_args(tmp_path, max_steps=rounds, cut_noise=0.5, cut_noise_seed=21)
    trainer = HOSFLTrainer(
        tiny_llama(), args, split_layer=2, train_dataset=counting_dataset(), data_collator=stack_collator
    )
    trainer.train()
    settings = RoundSettings.from_args(args, split_layer=2)
    base = tiny_llama()
    server = SplitServer(copy.deepcopy(base), settings, args)
    clients = {c: SplitClient(copy.deepcopy(base), c, settings, counting_dataset(), stack_collator) for c in range(4)}
    run_rounds(server, clients, range(rounds), {})
    assert server.trajectory.rounds == trainer.trajectory.rounds
    history = CatchUp(server.history(-1))
    expected = dict(trainer.split.client_parameters())
    for client in clients.values():
        client.catch_up(history)
        for name, value in client.parameters:
            assert torch.equal(value, expected[name]), name


def test_split_client_sends_noise_but_probes_clean():
    plain_settings = RoundSettings(split_layer=2, num_clients=4, clients_per_round=2, batch_size=4)
    noisy_settings = RoundSettings(split_layer=2, num_clients=4, clients_per_round=2, batch_size=4, cut_noise=1.0)
    plan = RoundPlan(round=0, clients=[0, 1], seeds=[5, 6])
    replies = []
    for settings in (plain_settings, noisy_settings):
        client = SplitClient(tiny_llama(), 0, settings, counting_dataset(), stack_collator)
        sent = client.forward(plan)
        clean = client.part.forward({"input_ids": client.batch(0)["input_ids"]}).hidden_states
        assert torch.equal(sent.hidden_states, clean) == (settings.cut_noise == 0)
        cotangent = torch.randn(clean.shape, generator=torch.Generator().manual_seed(2))
        replies.append(client.probe(plan, Cotangent(round=0, client=0, cotangent=cotangent)).scalars)
    assert replies[0] == replies[1]


# ---------------------------------------------------------------------------------------------------------- audit
@pytest.fixture(scope="module")
def public():
    return sequences(200, 1, 12, 12)


@pytest.fixture(scope="module")
def private():
    return sequences(20, 2)


def test_audit_recovers_an_undefended_tiny_model_at_split_1(public, private, single_thread):
    start = time.perf_counter()
    audit = audit_privacy(tiny_llama(), 1, private, public, labels=[i % 2 for i in range(20)], top_k=0)
    seconds = time.perf_counter() - start
    assert audit.white_box_top1 >= 0.95 and audit.learned_top1 >= 0.95
    assert audit.white_box_sentences >= 0.9
    assert audit.num_tokens == sum(len(s) for s in private)
    assert audit.labels == {"in_clear": True, "num_labels": 20, "recovered": 1.0, "majority_share": 0.5}
    assert seconds < 30, seconds  # the whole audit, both attacks, whole vocabulary (~1-3 s measured)
    assert "| 1 | 0 |" in audit.markdown_row()


def test_white_box_search_is_exact_at_a_deeper_cut_with_padding(public, single_thread):
    model = tiny_llama().eval()
    split = split_model(model, 3)
    rows = sequences(6, 5)
    ids = torch.zeros(6, max(len(r) for r in rows), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):  # left padding, as the classification collator sends
        ids[i, ids.shape[1] - len(row) :] = torch.tensor(row)
        mask[i, ids.shape[1] - len(row) :] = 1
    with torch.no_grad():
        observed = split.client(input_ids=ids, attention_mask=mask).hidden_states
    start = time.perf_counter()
    found = white_box_search(split, observed, mask)
    assert time.perf_counter() - start < 20
    assert torch.equal(found[mask.bool()], ids[mask.bool()])


def test_noise_lowers_what_the_attacks_recover(public, private, single_thread):
    model = tiny_llama()
    clean = audit_privacy(model, 1, private, public, top_k=4)
    noisy = audit_privacy(model, 1, private, public, defense=CutDefense(noise=8.0), top_k=4)
    assert noisy.learned_top1 < clean.learned_top1 - 0.2
    assert noisy.white_box_top1 < clean.white_box_top1 - 0.2
    assert noisy.noise == 8.0


def test_learned_inversion_ranks_the_true_token(public, single_thread):
    split = split_model(tiny_llama().eval(), 2)
    hidden, tokens = cut_tokens(split, public)
    inversion = LinearInversion.fit(hidden, tokens, split.model.get_input_embeddings().weight.detach())
    ranked = inversion.candidates(hidden[:100], k=5)
    assert ranked.shape == (100, 5)
    assert float((ranked == tokens[:100, None]).any(-1).float().mean()) >= 0.95


def test_audit_rejects_bad_input(public):
    with pytest.raises(ValueError, match="non-empty"):
        audit_privacy(tiny_llama(), 1, [], public)
    with pytest.raises(ValueError, match="top_k"):
        audit_privacy(tiny_llama(), 1, public[:2], public, top_k=-1)


# ------------------------------------------------------------------------------------------------------------ CLI
def test_privacy_audit_command_on_the_users_dataset_flags(tmp_path, capsys, single_thread):
    from test_cli_datasets import tiny_checkpoint, toy_rows, write_jsonl

    from hosfl_hf.cli import cli

    model = tiny_checkpoint(tmp_path / "tiny")
    data = tmp_path / "toy"
    data.mkdir()
    write_jsonl(data / "train.jsonl", toy_rows(200, seed=0))
    out = tmp_path / "audit.json"
    argv = ["privacy-audit", "--model_name_or_path", model, "--dataset_name", str(data)]
    argv += ["--prompt_template", "Text: {text}\nLabel:", "--verbalizers", " no", " yes"]
    argv += ["--split_layer", "1", "--cut_noise", "0", "4", "--num_sentences", "12"]
    argv += ["--public_dataset", str(data), "--public_limit", "150", "--top_k", "0", "--output", str(out)]
    start = time.perf_counter()
    assert cli(argv) == 0
    assert time.perf_counter() - start < 60
    printed = capsys.readouterr().out
    assert "| split | noise |" in printed and "Labels travel in clear" in printed
    results = json.loads(out.read_text())
    assert [(r["split_layer"], r["noise"]) for r in results] == [(1, 0.0), (1, 4.0)]
    assert results[0]["white_box_top1"] >= 0.95 and results[0]["labels"]["num_labels"] == 12
    assert results[1]["learned_top1"] < results[0]["learned_top1"]


def test_flower_clients_apply_the_defense(tmp_path):
    """Over Flower (simulation) each ClientApp adds the noise on its node: the server's first-round loss is not the
    noise-free one, and every client still ends with the server's record of the client part (the noise never enters
    the scalars, the update or the replay)."""
    pytest.importorskip("flwr")
    from conftest import run_flower_simulation, write_flower_inputs

    from hosfl_hf.integrations.flower.config import build_args, load_dataset, load_model, make_collator, resolve
    from hosfl_hf.protocol import FederatedRun, InProcessTransport

    run_config = {"num-rounds": 2, "num-clients": 2, "clients-per-round": 2, "cut-noise": 1.0}
    config = write_flower_inputs(tmp_path, **run_config)
    output = run_flower_simulation(tmp_path, config, 2)
    summary_path = tmp_path / "out" / "flower_summary.json"
    assert summary_path.is_file(), output[-6000:]
    summary = json.loads(summary_path.read_text())
    assert summary["clients_identical"] and summary["rounds"] == 2

    # The same run without noise, in process: the first round's server loss differs only by the clients' noise.
    clean = resolve({**config, "cut-noise": 0.0})
    settings, args = build_args(clean)
    dataset, collator = load_dataset(clean), make_collator(clean)
    server = SplitServer(load_model(clean), settings, args)
    clients = {c: SplitClient(load_model(clean), c, settings, dataset, collator) for c in range(2)}
    run = FederatedRun(server, InProcessTransport(clients))
    run.run(1)
    assert abs(summary["history"][0]["loss"] - run.log[0]["loss"]) > 1e-3
