"""The client update's options (#17): search space (blocks, name patterns, a static mask of base weights chosen by
gradient sensitivity), per-client seeds, step rules and the client's own schedule. Each must train through the
trainer and the protocol alike, be recorded, and replay bit for bit."""

import copy
import json
import math
import os
import sys

import pytest
import torch
from conftest import counting_dataset, stack_collator, tiny_args, tiny_llama
from peft import LoraConfig

from hosfl_hf import HOSFLConfig, HOSFLRunRecord, HOSFLTrainer, Trajectory, replay_trajectory, split_model
from hosfl_hf.client_part import ClientPart
from hosfl_hf.diagnostics import client_update_cosine
from hosfl_hf.protocol import CatchUp, RoundSettings, SplitClient, SplitServer, run_rounds
from hosfl_hf.rng import client_round_seeds, direction, direction_seed, guide_coefficient
from hosfl_hf.search_space import ClientMask, ClientSearchSpace, client_update_targets, sensitivity_mask
from hosfl_hf.zeroth_order import NormalizedSGD, apply_zo_update, build_client_optimizer, zo_gradients

pytestmark = pytest.mark.usefixtures("single_thread")

LORA = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def calibration_batches(n=2, size=4):
    data = counting_dataset(n * size, seed=5)
    return [stack_collator([data[i] for i in range(b * size, (b + 1) * size)]) for b in range(n)]


def mask_for(model, split_layer=2, density=0.05, direction_scales="uniform", guide_share=0.0):
    split = split_model(model, split_layer)
    return sensitivity_mask(
        split, calibration_batches(), density, direction_scales=direction_scales, guide_share=guide_share
    )


def lora_model():
    from peft import get_peft_model

    torch.manual_seed(3)
    return get_peft_model(tiny_llama(), copy.deepcopy(LORA))


def trained(tmp_path, model, mask=None, **overrides):
    args = tiny_args(tmp_path, max_steps=5, **overrides)
    trainer = HOSFLTrainer(
        model, args, split_layer=2, train_dataset=counting_dataset(), data_collator=stack_collator, client_mask=mask
    )
    trainer.train()
    return trainer


def client_state(split):
    """Every client tensor (trainable or not) of a split model, by name."""
    names = set(split.client_parameter_names)
    return {n: p.detach().clone() for n, p in split.model.named_parameters() if n in names}


# ------------------------------------------------------------------------------------ trainer + replay, per option
OPTIONS = {
    "lora_b_blocks": dict(client_zo_blocks=[0], client_zo_modules=["lora_B"]),
    "per_client_seeds": dict(client_seeds="per_client"),
    "normalized_sgd": dict(client_optimizer="normalized_sgd", client_learning_rate=1e-2),
    "sgd_own_schedule": dict(client_optimizer="sgd", client_lr_scheduler_type="constant", client_warmup_steps=0),
    # A client that learns for the first rounds and then holds still (its schedule's extra arguments are saved too).
    "learn_then_hold": dict(
        client_lr_scheduler_type="warmup_stable_decay",
        client_warmup_steps=0,
        client_lr_scheduler_kwargs={"num_stable_steps": 1, "num_decay_steps": 2, "decay_type": "linear"},
    ),
    "combined": dict(
        client_zo_blocks=[0, 1], client_zo_modules=["lora_B"], client_seeds="per_client", client_optimizer="sgd"
    ),
}


@pytest.mark.parametrize(
    "name", sorted(OPTIONS) + ["mask", "mask_combined", "mask_only", "mask_scaled", "mask_guided"]
)
def test_every_option_replays_bit_identically(tmp_path, name):
    """The saved trajectory + hosfl_config.json rebuild the trained client part exactly (trainable weights and
    masked base weights), from the initial model."""
    overrides = dict(OPTIONS.get(name, {}))
    mask = None
    if name.startswith("mask"):
        mask = mask_for(
            lora_model(),
            direction_scales="gradient_rms" if name == "mask_scaled" else "uniform",
            guide_share=0.5 if name == "mask_guided" else 0.0,
        )
        if name == "mask_combined":
            overrides.update(client_seeds="per_client", client_zo_modules=["lora_B"], client_optimizer="adamw")
        if name in (
            "mask_only",
            "mask_scaled",
            "mask_guided",
        ):  # no adapter in the search space: the mask is the whole update
            overrides.update(client_zo_modules=[], client_optimizer="sgd", client_learning_rate=1e-2)
    initial = lora_model()
    trainer = trained(tmp_path, lora_model(), mask=mask, **overrides)
    trainer.save_model(str(tmp_path / "saved"))
    after = client_state(trainer.split)
    before = client_state(split_model(initial, 2))
    changed = [n for n in after if not torch.equal(after[n], before[n])]
    assert changed, "the client update changed nothing"

    config = HOSFLRunRecord.from_pretrained(tmp_path / "saved")
    for key, value in overrides.items():
        assert getattr(config, key) == value, key
    trajectory = Trajectory.load(tmp_path / "saved")
    assert config.client_mask == (mask.to_dict() if mask is not None else None)
    assert trajectory.client_mask == config.client_mask
    # A guided mask records RNG spec version 3 (a hosfl_hf without guides refuses it), every other run version 2.
    assert trajectory.rng["version"] == (3 if name == "mask_guided" else 2) and config.rng == trajectory.rng
    replay_trajectory(initial, trajectory)
    replayed = client_state(split_model(initial, 2))
    for n in after:
        assert torch.equal(replayed[n], after[n]), n

    # Only the search space moved: names outside it (and base coordinates outside the mask) are untouched.
    targets = set(trajectory.parameter_names)
    assert set(changed) <= targets
    if mask is not None:
        for pname, idx in mask.indices.items():
            outside = torch.ones(after[pname].numel(), dtype=torch.bool)
            outside[idx] = False
            assert torch.equal(after[pname].flatten()[outside], before[pname].flatten()[outside])
            assert not torch.equal(after[pname].flatten()[idx], before[pname].flatten()[idx])


def test_lora_b_search_space_freezes_the_rest(tmp_path):
    trainer = trained(tmp_path, lora_model(), client_zo_blocks=[1], client_zo_modules=["lora_B"])
    names = trainer.trajectory.parameter_names
    assert names and all("layers.1." in n and "lora_B" in n for n in names)
    assert trainer.trajectory.search_space == {"blocks": [1], "modules": ["lora_B"]}
    assert [n for n, _ in trainer.client_parameters] == names


def test_search_space_selecting_nothing_is_refused(tmp_path):
    with pytest.raises(ValueError, match="selects none"):
        trained(tmp_path, lora_model(), client_zo_modules=["no_such_module"])


# ----------------------------------------------------------------------------------------- per-client seeds
def test_per_client_seeds_give_k_times_p_distinct_directions(tmp_path):
    trainer = trained(tmp_path, lora_model(), client_seeds="per_client", num_perturbations=3)
    k, p = trainer.args.clients_per_round, 3
    for record in trainer.trajectory.rounds:
        assert len(record.seeds) == len(set(record.seeds)) == k * p == len(record.scalars)
    shared = trained(tmp_path / "shared", lora_model(), num_perturbations=3)
    assert all(len(r.seeds) == p for r in shared.trajectory.rounds)
    # The same seed derivation on every holder: client c's seeds of round r.
    settings = trainer.round_settings
    assert settings.probe_seeds(4, 2) == client_round_seeds(settings.seed, 4, 2, p) != settings.probe_seeds(4, 1)


def test_per_client_update_is_the_documented_average():
    """theta' = theta - lr (1/(K P mu)) sum_m sum_p v_mp u_mp with ZO-SGD, in float64 against the library."""
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(5, 3))
    start = param.detach().clone().double()
    k, p, mu, lr = 3, 2, 1e-3, 0.1
    seeds = [s for client in range(k) for s in client_round_seeds(11, 0, client, p)]
    scalars = [float(v) for v in torch.randn(k * p).tolist()]
    optimizer = build_client_optimizer([param], "sgd", lr, 0.0)
    apply_zo_update([("w", param)], optimizer, seeds, scalars, mu, lr)
    grad = sum(v * direction(param, s, 0, dtype=torch.float64) for s, v in zip(seeds, scalars)) / (k * p * mu)
    torch.testing.assert_close(param.detach().double(), start - lr * grad, rtol=1e-5, atol=1e-6)


def test_per_client_seeds_need_the_mean(tmp_path):
    with pytest.raises(ValueError, match="aggregation='mean'"):
        tiny_args(tmp_path, client_seeds="per_client", aggregation="median")
    with pytest.raises(ValueError, match="per-client seeds apply"):
        tiny_args(tmp_path, client_seeds="per_client", algorithm="zo_sfl")


# ------------------------------------------------------------------------------------------------- the mask
def test_sensitivity_mask_keeps_the_largest_squared_gradients():
    model = tiny_llama()
    split = split_model(model, 2)
    mask = sensitivity_mask(split, calibration_batches(), density=0.02)
    # The scores, recomputed independently: the kept coordinates dominate every other candidate.
    for p in model.parameters():
        p.requires_grad_(False)
    candidates = {n: p for n, p in model.named_parameters() if ".layers.0." in n or ".layers.1." in n}
    for p in candidates.values():
        p.requires_grad_(True)
    scores = {n: torch.zeros_like(p) for n, p in candidates.items()}
    for batch in calibration_batches():
        model.zero_grad()
        model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
        for n, p in candidates.items():
            scores[n] += p.grad.pow(2)
    kept = torch.cat([scores[n].flatten()[idx] for n, idx in mask.indices.items()])
    total = sum(s.numel() for s in scores.values())
    assert kept.numel() == round(0.02 * total)
    rest = []
    for n, s in scores.items():
        flat = s.flatten().clone()
        if n in mask.indices:
            flat[mask.indices[n]] = -1
        rest.append(flat)
    assert kept.min() >= torch.cat(rest).max() * (1 - 1e-4)


@pytest.mark.parametrize("direction_scales", ["uniform", "gradient_rms"])
def test_mask_indices_round_trip(tmp_path, direction_scales):
    mask = mask_for(tiny_llama(), direction_scales=direction_scales)
    assert (mask.scales is None) == (direction_scales == "uniform")
    mask.save(tmp_path / "mask.json")
    assert ClientMask.load(tmp_path / "mask.json") == mask
    assert ClientMask.from_dict(json.loads(json.dumps(mask.to_dict()))) == mask
    settings = RoundSettings.from_args(tiny_args(tmp_path), split_layer=2, client_mask=mask)
    assert RoundSettings.from_dict(json.loads(json.dumps(settings.to_dict()))).mask == mask
    trainer = trained(tmp_path, tiny_llama(), mask=str(tmp_path / "mask.json"), client_zo_modules=["embed"])
    trainer.save_model(str(tmp_path / "saved"))
    assert ClientMask.from_dict(HOSFLRunRecord.from_pretrained(tmp_path / "saved").client_mask) == mask
    assert ClientMask.from_dict(Trajectory.load(tmp_path / "saved").client_mask) == mask


@pytest.mark.parametrize("direction_scales,guide_share", [("uniform", 0.0), ("gradient_rms", 0.0), ("uniform", 0.3)])
def test_masked_perturbation_touches_only_masked_coordinates(direction_scales, guide_share):
    model = tiny_llama()
    split = split_model(model, 2)
    mask = mask_for(model, direction_scales=direction_scales, guide_share=guide_share)
    for p in model.parameters():
        p.requires_grad_(False)
    part = ClientPart(split, 1e-3, "one_sided", mask=mask)
    position, (name, param) = next((i, t) for i, t in enumerate(part.parameters) if i in part.masks)
    seen = {}
    module = dict(model.named_modules())[name.rsplit(".", 1)[0]]
    before = param.detach().clone()
    with part.estimator.perturbed(seed=5, scale=0.5):
        # Registered after the estimator's hooks: runs while the perturbed tensor is swapped in.
        handle = module.register_forward_pre_hook(lambda m, a: seen.update(w=m.weight.detach().clone()))
        split.client(input_ids=calibration_batches(1)[0]["input_ids"])
    handle.remove()
    delta = (seen["w"] - before).flatten()
    idx = part.masks[position]
    assert torch.equal(param, before)  # restored exactly
    assert torch.count_nonzero(delta) == idx.numel() and torch.all(delta[idx] != 0)
    u = direction(torch.empty(idx.numel()), 5, position)
    if mask.guide is not None:  # sqrt(1 - gamma) u + eta(seed) sqrt(gamma d) ghat, ghat normalised over the mask
        column = torch.cat([torch.tensor(mask.guide[n], dtype=torch.float64) for n in mask.indices])
        ghat = torch.tensor(mask.guide[name], dtype=torch.float64) / column.norm()
        eta = torch.randn((), generator=torch.Generator().manual_seed(direction_seed(5, 2**64 - 1)))
        u = math.sqrt(1 - guide_share) * u + (eta * math.sqrt(guide_share * mask.size) * ghat).float()
    if mask.scales is not None:
        u = u * torch.tensor(mask.scales[name])
    torch.testing.assert_close(delta[idx], 0.5 * u)


def test_mask_over_trainable_weights_is_refused():
    model = tiny_llama()
    mask = mask_for(model)
    with pytest.raises(ValueError, match="both trainable and masked"):
        client_update_targets(split_model(model, 2), None, mask)  # tiny_llama's base weights are all trainable


def calibration_gradients_on(mask, power):
    """The calibration gradients of the mask's coordinates summed over the batches (`power=1`) or squared and summed
    (`power=2`), recomputed independently by backprop through the unsplit LoRA model."""
    model = lora_model()
    params = dict(split_model(model, 2).model.named_parameters())  # the mask's names are the split model's
    for name in mask.indices:
        params[name].requires_grad_(True)
    sums = {n: torch.zeros(params[n].numel()) for n in mask.indices}
    for batch in calibration_batches():
        model.zero_grad()
        model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
        for n in sums:
            sums[n] += params[n].grad.flatten().pow(power)
    return torch.cat([sums[n][idx] for n, idx in mask.indices.items()])


def test_gradient_rms_scales_follow_the_calibration_gradient():
    """Same indices as the isotropic mask; scale^2 proportional to each kept coordinate's summed squared
    calibration gradient, with a mean square of 1."""
    uniform, scaled = mask_for(lora_model()), mask_for(lora_model(), direction_scales="gradient_rms")
    assert scaled.indices == uniform.indices and uniform.scales is None
    kept = calibration_gradients_on(scaled, power=2).double()
    squares = torch.cat([torch.tensor(scaled.scales[n]) for n in scaled.indices]).double().pow(2)
    assert squares.mean().item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(squares, kept / kept.mean(), rtol=1e-3, atol=1e-6)
    assert squares.max() / squares.min() > 4  # the tiny model's gradient is far from uniform on the mask


def test_scaled_directions_estimate_the_preconditioned_gradient():
    """E[ghat] = diag(s^2) g for directions s * u: with many directions the estimate of the masked values points
    along s^2 * g (not g itself)."""
    model = lora_model()
    split = split_model(model, 2)
    mask = mask_for(model, direction_scales="gradient_rms")
    part = ClientPart(split, 1e-4, "two_sided", space=ClientSearchSpace(modules=[]), mask=mask)
    batch = calibration_batches(1)[0]
    inputs, labels = {"input_ids": batch["input_ids"]}, batch["labels"]
    seeds = list(range(3000))
    result = client_update_cosine(part, inputs, labels, seeds)
    # The true gradient of the masked values, and the estimate the clients would apply.
    params = dict(split.model.named_parameters())
    for name in mask.indices:
        params[name].requires_grad_(True)
    model(input_ids=inputs["input_ids"], labels=labels).loss.backward()
    g = torch.cat([params[n].grad.flatten()[idx] for n, idx in mask.indices.items()])
    s2 = torch.cat([torch.tensor(mask.scales[n]) for n in mask.indices]).pow(2)
    reference = part.forward(inputs).hidden_states
    cut = split.client(**inputs, grad=True)
    leaf = cut.hidden_states.detach().requires_grad_(True)
    from dataclasses import replace

    loss = split.server(replace(cut, hidden_states=leaf), labels=labels).loss
    cotangent = torch.autograd.grad(loss, leaf)[0]
    scalars = part.probe(inputs, reference, cotangent, seeds)
    estimate = torch.cat(
        [grad for _, grad in zo_gradients(part.update_parameters, seeds, scalars, 1e-4, scales=part.scales)]
    )
    cos = torch.nn.functional.cosine_similarity
    assert cos(estimate, s2 * g, dim=0) > 0.9
    assert cos(estimate, s2 * g, dim=0) > cos(estimate, g, dim=0) + 0.1
    assert result["rows"][-1]["cosine"] == pytest.approx(float(cos(estimate, g, dim=0)), abs=1e-4)


def test_guide_is_the_mean_calibration_gradient_on_the_mask():
    """Same indices as the unguided mask; the guide is the summed calibration gradient of the kept coordinates; the
    unguided mask's dict has no guide keys (checkpoints from before guides still resume)."""
    plain, guided = mask_for(lora_model()), mask_for(lora_model(), guide_share=0.5)
    assert guided.indices == plain.indices and plain.guide is None and guided.guide_share == 0.5
    assert "guide" not in plain.to_dict() and "guide_share" not in plain.to_dict()
    assert ClientMask.from_dict(json.loads(json.dumps(guided.to_dict()))) == guided
    expected = calibration_gradients_on(guided, power=1)
    got = torch.cat([torch.tensor(guided.guide[n]) for n in guided.indices])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


def test_guided_directions_have_the_documented_covariance():
    """E[u u^T] = (1 - gamma) I + gamma d ghat ghat^T: squared norm d on average, gamma d + 1 - gamma along ghat,
    1 - gamma along a direction orthogonal to it; eta(seed) is the spec's draw."""
    gamma, seeds = 0.4, range(4000)
    mask = ClientMask(
        indices={"a": list(range(30)), "b": list(range(20))},
        guide={"a": [1.0] * 30, "b": [0.0] * 20},
        guide_share=gamma,
    )
    named = [("a", torch.zeros(30)), ("b", torch.zeros(20))]
    masks = {0: torch.arange(30), 1: torch.arange(20)}
    from hosfl_hf.search_space import mask_direction_guide
    from hosfl_hf.zeroth_order import masked_direction

    guide = mask_direction_guide(named, masks, mask)
    u = torch.stack([torch.cat([masked_direction(masks[i], s, i, None, guide) for i in (0, 1)]) for s in seeds])
    d = 50
    ghat = torch.cat([torch.ones(30), torch.zeros(20)]) / math.sqrt(30)
    other = torch.cat([torch.zeros(30), torch.ones(20)]) / math.sqrt(20)  # orthogonal to ghat
    se = lambda x: float(x.std() / math.sqrt(len(x)))  # noqa: E731
    for value, expected in [
        ((u * u).sum(1), d),
        ((u @ ghat) ** 2, gamma * d + 1 - gamma),
        ((u @ other) ** 2, 1 - gamma),
    ]:
        assert abs(float(value.mean()) - expected) < 4 * se(value), (float(value.mean()), expected)
    assert guide_coefficient(7) == float(
        torch.randn((), generator=torch.Generator().manual_seed(direction_seed(7, 2**64 - 1)))
    )
    # Unguided positions keep their isotropic draw, bit for bit.
    partial = ClientMask(indices={"a": [0, 1]}, guide={"a": [1.0, 2.0]}, guide_share=0.5)
    only_a = mask_direction_guide([("x", torch.zeros(3)), ("a", torch.zeros(2))], {1: torch.arange(2)}, partial)
    assert list(only_a.vectors) == [1]
    assert torch.equal(masked_direction(torch.zeros(3), 9, 0, None, only_a), direction(torch.zeros(3), 9, 0))


def test_guided_estimate_measures_the_guide_component_with_few_directions():
    """With the guide on the batch's own gradient, 4 directions give an estimate nearly parallel to the gradient: its
    cosine is about `1 / sqrt(1 + (1 - gamma) / (gamma N))` (0.89 at gamma = 0.5, N = 4: the noise left is `eta`
    times the isotropic part of each direction), where the isotropic estimate's is about `sqrt(N / (N + d))`."""
    model = lora_model()
    split = split_model(model, 2)
    plain = mask_for(model)
    batch = calibration_batches(1)[0]
    inputs, labels = {"input_ids": batch["input_ids"]}, batch["labels"]
    part = ClientPart(split, 1e-4, "two_sided", space=ClientSearchSpace(modules=[]), mask=plain)
    g = client_update_cosine(part, inputs, labels, [0])  # for d
    params = dict(split.model.named_parameters())
    for name in plain.indices:
        params[name].requires_grad_(True)
    model(input_ids=inputs["input_ids"], labels=labels).loss.backward()
    true = {n: params[n].grad.flatten()[idx].tolist() for n, idx in plain.indices.items()}
    for name in plain.indices:
        params[name].grad = None
        params[name].requires_grad_(False)
    guided = ClientMask(indices=plain.indices, guide=true, guide_share=0.5)
    part = ClientPart(split, 1e-4, "two_sided", space=ClientSearchSpace(modules=[]), mask=guided)
    cosines = [
        client_update_cosine(part, inputs, labels, list(range(4 * k, 4 * k + 4)))["rows"][-1]["cosine"]
        for k in range(5)
    ]
    assert sum(cosines) / len(cosines) > 0.8 and min(cosines) > 0.7, cosines
    assert math.sqrt(4 / (4 + g["d"])) < 0.15


def test_bad_mask_scales_are_refused():
    with pytest.raises(ValueError, match="one list of scales per masked tensor"):
        ClientMask(indices={"a": [0, 1]}, scales={"b": [1.0, 1.0]})
    with pytest.raises(ValueError, match="1 scales for the 2 indices"):
        ClientMask(indices={"a": [0, 1]}, scales={"a": [1.0]})
    with pytest.raises(ValueError, match="finite and positive"):
        ClientMask(indices={"a": [0, 1]}, scales={"a": [1.0, 0.0]})
    with pytest.raises(ValueError, match="direction_scales must be one of"):
        mask_for(lora_model(), direction_scales="adaptive")
    with pytest.raises(ValueError, match="guide and guide_share together"):
        ClientMask(indices={"a": [0, 1]}, guide={"a": [1.0, 1.0]})
    with pytest.raises(ValueError, match="guide_share=1.0 must be in"):
        ClientMask(indices={"a": [0, 1]}, guide={"a": [1.0, 1.0]}, guide_share=1.0)
    with pytest.raises(ValueError, match="guide is zero everywhere"):
        ClientMask(indices={"a": [0, 1]}, guide={"a": [0.0, 0.0]}, guide_share=0.5)
    with pytest.raises(ValueError, match="1 guide values for the 2 indices"):
        ClientMask(indices={"a": [0, 1]}, guide={"a": [1.0]}, guide_share=0.5)
    with pytest.raises(ValueError, match="one list of guide per masked tensor"):
        ClientMask(indices={"a": [0, 1]}, guide={"b": [1.0, 1.0]}, guide_share=0.5)
    with pytest.raises(ValueError, match="guide_share=1 must be in"):
        mask_for(lora_model(), guide_share=1)
    # Unsorted indices keep their guide values.
    assert ClientMask(indices={"a": [3, 1]}, guide={"a": [2.0, 0.5]}, guide_share=0.5).guide == {"a": [0.5, 2.0]}
    # Unsorted indices keep their scales.
    assert ClientMask(indices={"a": [3, 1]}, scales={"a": [2.0, 0.5]}).scales == {"a": [0.5, 2.0]}


# ------------------------------------------------------------------------------------------------ step rules
def test_normalized_step_has_length_lr():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(7))
    start = torch.cat([a.detach().flatten(), b.detach()]).clone()
    optimizer = build_client_optimizer([a, b], "normalized_sgd", 0.05, 0.0)
    assert isinstance(optimizer, NormalizedSGD)
    apply_zo_update([("a", a), ("b", b)], optimizer, [1, 2, 3], [0.3, -2.0, 5.0], 1e-3, 0.05)
    step = torch.cat([a.detach().flatten(), b.detach()]) - start
    assert float(step.norm()) == pytest.approx(0.05, rel=1e-5)
    # First-order use (e.g. SplitLoRA's client): the norm over every gradient present.
    a.grad, b.grad = torch.ones_like(a), torch.zeros_like(b)
    before = a.detach().clone()
    optimizer.step()
    assert float((a.detach() - before).norm()) == pytest.approx(0.05, rel=1e-5)


def test_client_schedule_is_its_own(tmp_path):
    args = tiny_args(tmp_path, lr_scheduler_type="linear", warmup_steps=2, client_lr_scheduler_type="constant")
    trainer = trained(tmp_path, lora_model(), **{k: getattr(args, k) for k in ("client_lr_scheduler_type",)})
    assert {r.lr for r in trainer.trajectory.rounds} == {trainer.args.client_learning_rate}
    default = trained(tmp_path / "d", lora_model())
    assert len({r.lr for r in default.trajectory.rounds}) > 1  # the server's linear decay


def test_client_schedule_kwargs_learn_then_hold(tmp_path):
    """`client_lr_scheduler_kwargs` (a JSON string, as from the command line) shape the client's schedule alone:
    one warmup round, one stable round, a linear decay over two rounds, then zero while the server keeps its own."""
    kwargs = '{"num_stable_steps": 1, "num_decay_steps": 2, "decay_type": "linear"}'
    trainer = trained(
        tmp_path,
        lora_model(),
        lr_scheduler_type="constant",
        client_lr_scheduler_type="warmup_stable_decay",
        client_warmup_steps=1,
        client_lr_scheduler_kwargs=kwargs,
    )
    peak = trainer.args.client_learning_rate
    assert trainer.args.client_lr_scheduler_kwargs == json.loads(kwargs)
    assert [r.lr for r in trainer.trajectory.rounds] == pytest.approx([0.0, peak, peak, peak / 2, 0.0], abs=1e-15)
    assert trainer.lr_scheduler.get_last_lr()[0] == trainer.args.learning_rate  # the server's stays constant


@pytest.mark.parametrize("value", ["{not json", "[1, 2]", 3])
def test_client_schedule_kwargs_are_checked(tmp_path, value):
    with pytest.raises(ValueError, match="client_lr_scheduler_kwargs"):
        tiny_args(tmp_path, client_lr_scheduler_kwargs=value)


def test_client_schedule_kwargs_from_the_command_line(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(HOSFLConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--client_lr_scheduler_kwargs", '{"num_decay_steps": 5}']
    )
    assert args.client_lr_scheduler_kwargs == {"num_decay_steps": 5}


# -------------------------------------------------------------------------------------------------- protocol
def test_protocol_equals_the_trainer_with_every_lever(tmp_path):
    """Search space + guided mask with direction scales + per-client seeds + normalised step: the protocol's clients
    and trajectory are bit-identical to the trainer's."""
    rounds = 4
    mask = mask_for(lora_model(), direction_scales="gradient_rms", guide_share=0.5)
    levers = dict(
        client_zo_modules=["lora_B"], client_seeds="per_client", client_optimizer="normalized_sgd", max_steps=rounds
    )
    args = tiny_args(tmp_path, **levers)
    trainer = HOSFLTrainer(
        lora_model(),
        args,
        split_layer=2,
        train_dataset=counting_dataset(),
        data_collator=stack_collator,
        client_mask=mask,
    )
    trainer.train()
    settings = RoundSettings.from_args(args, split_layer=2, client_mask=mask)
    server = SplitServer(lora_model(), settings, args)
    clients = {c: SplitClient(lora_model(), c, settings, counting_dataset(), stack_collator) for c in range(4)}
    run_rounds(server, clients, range(rounds))
    assert server.trajectory.rounds == trainer.trajectory.rounds
    assert server.trajectory.parameter_names == trainer.trajectory.parameter_names
    expected = client_state(trainer.split)
    history = CatchUp(server.history(-1))
    for client in clients.values():
        client.catch_up(history)
        got = {n: p for n, p in client.split.model.named_parameters() if n in expected}
        for n, value in expected.items():
            assert torch.equal(got[n], value), (client.client_id, n)
    # A client's saved state carries its masked values: a fresh client loads back to the same weights.
    client = clients[0]
    client.save(tmp_path / "state")
    fresh = SplitClient(lora_model(), 0, settings, counting_dataset(), stack_collator)
    assert fresh.load(tmp_path / "state")
    for n, value in expected.items():
        assert torch.equal(dict(fresh.split.model.named_parameters())[n], value), n


# ------------------------------------------------------------------------------------------------ diagnostic
def test_cosine_diagnostic_follows_sqrt_n_over_n_plus_d():
    model = lora_model()
    split = split_model(model, 2)
    part = ClientPart(split, 1e-4, "two_sided", space=ClientSearchSpace(blocks=[1], modules=["v_proj.lora_B"]))
    batch = calibration_batches(1)[0]
    inputs, labels = {"input_ids": batch["input_ids"]}, batch["labels"]
    result = client_update_cosine(part, inputs, labels, list(range(400)), checkpoints=[10, 400])
    d = result["d"]
    assert d == 16 * 2  # v_proj's LoRA-B of one block: out 16 (2 KV heads x 8) x r 2
    assert result["phi"] == pytest.approx(1.0)
    for row in result["rows"]:
        assert row["expected"] == pytest.approx(math.sqrt(row["directions"] / (row["directions"] + d)))
    final = result["rows"][-1]
    assert final["cosine"] > 0.9 and abs(final["cosine"] - final["expected"]) < 0.05
    # Against a larger reference space the cosine scales by sqrt(phi).
    everything = [(n, p) for n, p in model.named_parameters() if "lora_" in n and (".0." in n or ".1." in n)]
    wide = client_update_cosine(part, inputs, labels, list(range(10)), reference=everything)
    assert 0 < wide["phi"] < 1
    assert wide["rows"][0]["cosine_reference"] == pytest.approx(wide["rows"][0]["cosine"] * math.sqrt(wide["phi"]))


def test_resume_with_every_lever_is_bit_identical_and_refuses_a_changed_mask(tmp_path):
    mask = mask_for(lora_model(), direction_scales="gradient_rms", guide_share=0.5)
    levers = dict(client_zo_modules=["lora_B"], client_seeds="per_client", max_steps=6)

    def make(folder, **extra):
        args = tiny_args(folder, **levers, **extra)
        return HOSFLTrainer(
            lora_model(),
            args,
            split_layer=2,
            train_dataset=counting_dataset(),
            data_collator=stack_collator,
            client_mask=mask,
        )

    full = make(tmp_path / "full")
    full.train()
    first = make(tmp_path / "resumed", save_strategy="steps", save_steps=3)
    first.train()
    checkpoint = tmp_path / "resumed" / "out" / "checkpoint-3"
    second = make(tmp_path / "resumed", save_strategy="steps", save_steps=3)
    second.train(resume_from_checkpoint=str(checkpoint))
    expected, got = client_state(full.split), client_state(second.split)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert second.trajectory.rounds == full.trajectory.rounds

    other = ClientMask({name: idx[:-1] for name, idx in mask.indices.items()})
    args = tiny_args(tmp_path / "resumed", **levers)
    changed = HOSFLTrainer(
        lora_model(),
        args,
        split_layer=2,
        train_dataset=counting_dataset(),
        data_collator=stack_collator,
        client_mask=other,
    )
    with pytest.raises(ValueError, match="client_mask"):
        changed.train(resume_from_checkpoint=str(checkpoint))


def test_flower_run_config_carries_the_levers(tmp_path):
    """The Flower apps build SplitClient/SplitServer from the run config: the levers reach their RoundSettings."""
    from hosfl_hf.integrations.flower.config import build_args, resolve

    mask = mask_for(lora_model())
    mask.save(tmp_path / "mask.json")
    config = resolve(
        {
            "model": "m",
            "dataset": "d",
            "client-seeds": "per_client",
            "client-zo-blocks": "0, 1",
            "client-zo-modules": "lora_B,v_proj",
            "client-mask": str(tmp_path / "mask.json"),
            "client-optimizer": "normalized_sgd",
            "client-lr-scheduler-type": "warmup_stable_decay",
            "client-warmup-steps": 1,
            "client-lr-scheduler-kwargs": '{"num_stable_steps": 0, "num_decay_steps": 2, "decay_type": "linear"}',
        }
    )
    settings, args = build_args(config)
    assert args.client_lr_scheduler_type == "warmup_stable_decay" and args.client_warmup_steps == 1
    assert args.client_lr_scheduler_kwargs == {"num_stable_steps": 0, "num_decay_steps": 2, "decay_type": "linear"}
    assert settings.client_seeds == "per_client" and settings.scalars_per_update is None
    assert settings.search_space == ClientSearchSpace(blocks=[0, 1], modules=["lora_B", "v_proj"])
    assert settings.mask == mask and settings.client_optimizer == "normalized_sgd"
    default, default_args = build_args(resolve({"model": "m", "dataset": "d"}))
    assert default.search_space is None and default.mask is None and default.scalars_per_update == 2
    own = (
        default_args.client_lr_scheduler_type,
        default_args.client_warmup_steps,
        default_args.client_lr_scheduler_kwargs,
    )
    assert own == (None, None, None)  # the client follows the server's schedule


def test_merge_for_inference_keeps_the_trained_masked_base_weights(tmp_path):
    """A LoRA run with a mask trains base weights the adapter files do not hold: loading the folder must bring them
    back (merge_for_inference / load_client_mask_values), exactly; the adapters alone give another model."""
    from peft import PeftModel

    from hosfl_hf import load_client_mask_values, merge_for_inference

    mask = mask_for(lora_model())
    trainer = trained(tmp_path, lora_model(), mask=mask)
    trainer.save_model(str(tmp_path / "saved"))
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        reference = copy.deepcopy(trainer.model).merge_and_unload()(ids).logits
        merged = merge_for_inference(tmp_path / "saved", base_model=tiny_llama())(ids).logits
        adapters_only = PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved").merge_and_unload()(ids).logits
    assert torch.equal(merged, reference)
    assert not torch.equal(adapters_only, reference)

    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved")
    assert load_client_mask_values(loaded, tmp_path / "saved") == sorted(mask.indices)
    assert load_client_mask_values(lora_model(), tmp_path) == []  # a folder without masked values
    # Values that do not fit the model are refused, naming the weight, never written.
    from safetensors.torch import load_file, save_file

    values_file = tmp_path / "saved" / "hosfl_client_mask_values.safetensors"
    values = load_file(values_file)
    name = sorted(values)[0]
    save_file({**values, name: values[name][:-1].contiguous()}, values_file)
    with pytest.raises(ValueError, match=f"Masked values of {name}.*not the base model"):
        load_client_mask_values(loaded, tmp_path / "saved")
    save_file({"model.no_such.weight": values[name]}, values_file)
    with pytest.raises(ValueError, match=r"no parameters \['model.no_such.weight'\]"):
        load_client_mask_values(loaded, tmp_path / "saved")


def test_first_order_ceiling_trains_exactly_the_masked_weights(tmp_path):
    """The study's first-order ceiling of a masked search space (`fo_mask`): SplitLoRA's client moves the masked base
    coordinates and nothing else of the client (its adapters stay at their init), while the server trains."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from client_update_study import first_order_on_mask

    model = lora_model()
    name = "model.layers.1.self_attn.v_proj.base_layer.weight"  # the split model's name, as sensitivity_mask gives
    mask = ClientMask({name: [0, 5, 17]})
    first_order_on_mask(lambda *args: mask)(model, 2, None, None, 0)
    split = split_model(model, 2)
    before = client_state(split)
    server = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and n not in before}
    trained(tmp_path, model, algorithm="splitlora", client_learning_rate=1e-2)
    after = client_state(split)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {name}
    moved = (before[name] != after[name]).flatten().nonzero().flatten().tolist()
    assert moved == [0, 5, 17]
    assert any(not torch.equal(p, dict(model.named_parameters())[n]) for n, p in server.items())
