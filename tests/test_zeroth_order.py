"""Tests of `hosfl_hf.zeroth_order`: seeded directions, exact perturb/restore, the projected-scalar estimator against
true autograd gradients of a tiny split Llama, and the shared update."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import transformers
from conftest import tiny_llama
from torch import nn

from hosfl_hf.split import split_model
from hosfl_hf.testing import tiny_llama_config
from hosfl_hf.zeroth_order import (
    ZerothOrderEstimator,
    apply_zo_update,
    build_client_optimizer,
    direction,
    direction_seed,
    round_seeds,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _named_params(*shapes, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (f"p{i}", nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)))
        for i, shape in enumerate(shapes)
    ]


def _flat_direction(params, seed):
    return torch.cat([direction(p, seed, j, dtype=torch.float64).flatten() for j, (_, p) in enumerate(params)])


# ------------------------------------------------------------------------------------------------------ directions
def test_direction_is_deterministic_and_keyed_by_seed_and_index():
    param = torch.zeros(7, 5)
    a = direction(param, seed=123, index=0)
    assert a.shape == param.shape and a.dtype == torch.float32
    assert torch.equal(a, direction(param, seed=123, index=0))
    assert not torch.equal(a, direction(param, seed=123, index=1))
    assert not torch.equal(a, direction(param, seed=124, index=0))
    # The draw is fp32 on the CPU, then cast: other dtypes see the same numbers, rounded.
    assert torch.equal(direction(param.double(), 123, 0), a.double())
    assert torch.equal(direction(param.bfloat16(), 123, 0), a.bfloat16())
    assert torch.equal(direction(param, 123, 0, dtype=torch.float64), a.double())
    # It depends on the parameter's shape only, not on its values.
    assert torch.equal(direction(torch.randn(7, 5), 123, 0), a)
    # Large seeds (the round seeds go up to 2**62) and negative ones are accepted.
    assert torch.isfinite(direction(param, 2**62 - 1, 3)).all()
    assert torch.isfinite(direction(param, -5, 3)).all()


def test_direction_seed_mixing():
    seeds = {direction_seed(s, j) for s in range(20) for j in range(20)}
    assert len(seeds) == 400
    assert all(0 <= s < 2**64 for s in seeds)
    assert direction_seed(5, 2) == direction_seed(5, 2)


def test_direction_does_not_touch_global_rng():
    torch.manual_seed(42)
    state = torch.get_rng_state()
    direction(torch.zeros(100), seed=1, index=0)
    round_seeds(1, 2, 8)
    assert torch.equal(torch.get_rng_state(), state)


def test_direction_is_standard_normal():
    u = direction(torch.zeros(20000), seed=9, index=4)
    assert abs(u.mean().item()) < 0.03
    assert abs(u.std().item() - 1.0) < 0.03


def test_round_seeds():
    seeds = round_seeds(7, 0, 16)
    assert len(seeds) == 16 and all(isinstance(s, int) for s in seeds)
    assert all(0 <= s < 2**62 for s in seeds)
    assert len(set(seeds)) == 16
    assert seeds == round_seeds(7, 0, 16)
    assert seeds != round_seeds(7, 1, 16)
    assert set(seeds).isdisjoint(round_seeds(7, 1, 16))
    assert seeds != round_seeds(8, 0, 16)
    per_round = [tuple(round_seeds(0, r, 4)) for r in range(50)]
    assert len(set(per_round)) == 50


# ------------------------------------------------------------------------------------------------------- perturbed
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_perturbed_adds_scaled_direction_and_restores_exactly(dtype):
    params = _named_params((4, 6), (6,), (3, 2, 2), dtype=dtype)
    original = [p.detach().clone() for _, p in params]
    estimator = ZerothOrderEstimator(params, eps=1e-3)
    for scale in (1e-3, -1e-3, 0.37):
        with estimator.perturbed(seed=99, scale=scale):
            for j, ((_, p), p0) in enumerate(zip(params, original)):
                expected = torch.add(p0, direction(p0, 99, j), alpha=scale)
                torch.testing.assert_close(p.detach(), expected)
                assert not torch.equal(p.detach(), p0)
        for (_, p), p0 in zip(params, original):
            assert torch.equal(p.detach(), p0)


def test_perturbed_restores_after_exception():
    params = _named_params((5, 5), (5,))
    original = [p.detach().clone() for _, p in params]
    estimator = ZerothOrderEstimator(params, eps=1e-2)
    with pytest.raises(RuntimeError, match="boom"):
        with estimator.perturbed(seed=3, scale=0.5):
            assert not torch.equal(params[0][1].detach(), original[0])
            raise RuntimeError("boom")
    for (_, p), p0 in zip(params, original):
        assert torch.equal(p.detach(), p0)


def test_perturbed_nested_restores_exactly():
    params = _named_params((8, 3), dtype=torch.bfloat16)
    original = params[0][1].detach().clone()
    estimator = ZerothOrderEstimator(params, eps=1e-2)
    with estimator.perturbed(seed=1, scale=0.3):
        with estimator.perturbed(seed=2, scale=-0.7):
            pass
    assert torch.equal(params[0][1].detach(), original)


def test_estimator_validation():
    with pytest.raises(ValueError, match="one_sided"):
        ZerothOrderEstimator(_named_params((2,)), eps=1e-3, estimator="central")
    assert ZerothOrderEstimator(_named_params((2,)), 1e-3, "one_sided").forwards_per_direction == 1
    assert ZerothOrderEstimator(_named_params((2,)), 1e-3, "two_sided").forwards_per_direction == 2


def test_projected_scalars_on_linear_map():
    # z = W x is linear in W: both estimators are exact up to rounding, v = eps * <lambda, (U x)>.
    params = _named_params((3, 4), dtype=torch.float64)
    weight = params[0][1]
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cotangent = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    calls = []

    def forward():
        calls.append(1)
        with torch.no_grad():
            return weight @ x

    seeds = round_seeds(0, 0, 6)
    reference = forward()
    calls.clear()
    for estimator, per_seed in (("one_sided", 1), ("two_sided", 2)):
        zo = ZerothOrderEstimator(params, eps=1e-3, estimator=estimator)
        scalars = zo.projected_scalars(forward, reference, cotangent, seeds)
        assert len(calls) == per_seed * len(seeds)
        calls.clear()
        assert all(isinstance(v, float) for v in scalars)
        for seed, v in zip(seeds, scalars):
            u = direction(weight, seed, 0)
            expected = 1e-3 * torch.sum(cotangent * (u @ x)).item()
            assert v == pytest.approx(expected, rel=1e-4, abs=1e-9)
    assert torch.equal(weight.detach(), params[0][1].detach())


# ------------------------------------------------------------------------------------- estimator vs true gradient
def _tiny_llama(dtype=torch.float32):
    config = tiny_llama_config(
        vocab_size=64, hidden_size=16, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
    model = model.to(dtype).eval()
    # Train only two client matrices (d = 2 * 48 * 16 = 1536) so a few hundred directions give a clear signal.
    trainable = {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, 64, (3, 7), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, :2] = 0
    mask[2, 5:] = 0
    input_ids = input_ids.masked_fill(mask == 0, 0)
    labels = input_ids.masked_fill(mask == 0, -100)
    return model, input_ids, mask, labels


def _split_setup(dtype):
    model, input_ids, mask, labels = _tiny_llama(dtype)
    parts = split_model(model, split_layer=2)
    client = parts.client_parameters()
    assert [n for n, _ in client] == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    assert parts.server_parameters() == []

    # True client gradient through the full model.
    loss = model(input_ids, attention_mask=mask, labels=labels).loss
    grads = torch.autograd.grad(loss, [p for _, p in client])
    g = torch.cat([gr.flatten() for gr in grads]).double()

    # The server's cotangent dloss/dz at the cut.
    cut = parts.client(input_ids=input_ids, attention_mask=mask)
    h = cut.hidden_states.detach().requires_grad_()
    split_loss = parts.server(dataclasses.replace(cut, hidden_states=h), labels=labels).loss
    (cotangent,) = torch.autograd.grad(split_loss, h)

    def forward():
        return parts.client(input_ids=input_ids, attention_mask=mask).hidden_states

    return parts, client, g, cut.hidden_states, cotangent, forward, (input_ids, mask, labels)


@pytest.mark.parametrize("estimator", ["one_sided", "two_sided"])
def test_zo_estimate_aligns_with_true_gradient(estimator):
    parts, client, g, reference, cotangent, forward, _ = _split_setup(torch.float32)
    num_directions, eps = 300, 1e-3
    d = g.numel()
    assert d == 1536
    seeds = round_seeds(11, 0, num_directions)
    zo = ZerothOrderEstimator(client, eps=eps, estimator=estimator)
    before = [p.detach().clone() for _, p in client]
    scalars = zo.projected_scalars(forward, reference, cotangent, seeds)
    assert all(torch.equal(p.detach(), b) for (_, p), b in zip(client, before))

    ghat = torch.zeros(d, dtype=torch.float64)
    for seed, v in zip(seeds, scalars):
        ghat += v * _flat_direction(client, seed)
    ghat /= num_directions * eps

    cosine = torch.nn.functional.cosine_similarity(ghat, g, dim=0).item()
    expected = math.sqrt(num_directions / (num_directions + d))
    assert cosine > 0.5 * expected, (cosine, expected)
    assert cosine > 5 / math.sqrt(d), (cosine, 5 / math.sqrt(d))
    # Unbiased up to O(eps): the projection of ghat on g has the right scale.
    ratio = (ghat @ g / (g @ g)).item()
    assert 0.5 < ratio < 1.5, ratio


@pytest.mark.parametrize(
    ("dtype", "estimator", "tol"),
    [
        (torch.float64, "two_sided", 1e-3),
        (torch.float64, "one_sided", 1e-2),
        (torch.float32, "two_sided", 2e-3),
        (torch.float32, "one_sided", 1.5e-2),
    ],
)
def test_scalar_is_directional_derivative(dtype, estimator, tol):
    # v / eps = <g, u> + O(eps) (one-sided) or O(eps^2) (two-sided). <g, u> ~ N(0, |g|^2), so the error is measured
    # against |g|; the two-sided estimate in float64 must also match each derivative to 1% relative.
    parts, client, g, reference, cotangent, forward, _ = _split_setup(dtype)
    eps = 1e-3
    zo = ZerothOrderEstimator(client, eps=eps, estimator=estimator)
    seeds = round_seeds(2, 0, 6)
    scalars = zo.projected_scalars(forward, reference, cotangent, seeds)
    scale = g.norm().item()
    for seed, v in zip(seeds, scalars):
        exact = (g @ _flat_direction(client, seed)).item()
        assert abs(v / eps - exact) <= tol * scale, (seed, v / eps, exact)
        if dtype == torch.float64 and estimator == "two_sided":
            assert v / eps == pytest.approx(exact, rel=1e-2), (seed, v / eps, exact)


def test_zo_step_decreases_loss():
    parts, client, g, reference, cotangent, forward, (input_ids, mask, labels) = _split_setup(torch.float32)
    model = parts.model
    with torch.no_grad():
        loss_before = model(input_ids, attention_mask=mask, labels=labels).loss.item()
    seeds = round_seeds(4, 0, 64)
    eps, lr = 1e-3, 0.5
    zo = ZerothOrderEstimator(client, eps=eps, estimator="two_sided")
    scalars = zo.projected_scalars(forward, reference, cotangent, seeds)
    optimizer = build_client_optimizer([p for _, p in client], "sgd", lr=lr, weight_decay=0.0)
    apply_zo_update(client, optimizer, seeds, scalars, eps=eps, lr=lr)
    with torch.no_grad():
        loss_after = model(input_ids, attention_mask=mask, labels=labels).loss.item()
    assert loss_after < loss_before


# ----------------------------------------------------------------------------------------------------- the update
def _manual_ghat(params, seeds, scalars, eps):
    out = []
    for j, (_, p) in enumerate(params):
        grad = torch.zeros(p.shape, dtype=torch.float32)
        for seed, v in zip(seeds, scalars):
            grad += (v / (len(seeds) * eps)) * direction(p, seed, j, dtype=torch.float32)
        out.append(grad)
    return out


def test_apply_zo_update_sgd_matches_manual_step():
    params = _named_params((4, 5), (5,), (2, 3, 2))
    original = [p.detach().clone() for _, p in params]
    seeds = round_seeds(5, 3, 7)
    scalars = [0.3, -1.2, 0.0, 2.5, -0.01, 0.7, 1e-4]
    eps, lr = 1e-3, 0.05
    optimizer = build_client_optimizer([p for _, p in params], "sgd", lr=123.0, weight_decay=0.0)
    apply_zo_update(params, optimizer, seeds, scalars, eps=eps, lr=lr)
    for (_, p), p0, gh in zip(params, original, _manual_ghat(params, seeds, scalars, eps)):
        torch.testing.assert_close(p.detach(), p0 - lr * gh, rtol=1e-6, atol=1e-7)
        assert p.grad is None
    assert all(group["lr"] == lr for group in optimizer.param_groups)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_apply_zo_update_equals_one_optimizer_step_with_ghat(name):
    params = _named_params((6, 3), (3,))
    twins = [(n, nn.Parameter(p.detach().clone())) for n, p in params]
    seeds = round_seeds(1, 0, 5)
    scalars = [0.5, -0.25, 1.5, -2.0, 0.125]
    eps, lr, wd = 1e-2, 1e-2, 0.1
    optimizer = build_client_optimizer([p for _, p in params], name, lr=lr, weight_decay=wd)
    reference = build_client_optimizer([p for _, p in twins], name, lr=lr, weight_decay=wd)
    for step in range(2):  # the second step exercises optimizer state (AdamW moments)
        apply_zo_update(params, optimizer, seeds, scalars, eps=eps, lr=lr)
        for (_, twin), gh in zip(twins, _manual_ghat(twins, seeds, scalars, eps)):
            twin.grad = gh
        reference.step()
        reference.zero_grad(set_to_none=True)
        for (_, p), (_, twin) in zip(params, twins):
            torch.testing.assert_close(p.detach(), twin.detach(), rtol=1e-6, atol=1e-7)
        seeds = round_seeds(1, step + 1, 5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_apply_zo_update_rejects_non_finite_scalars(bad):
    params = _named_params((4, 4), (4,))
    original = [p.detach().clone() for _, p in params]
    optimizer = build_client_optimizer([p for _, p in params], "adamw", lr=1e-2, weight_decay=0.0)
    with pytest.raises(ValueError, match="not finite"):
        apply_zo_update(params, optimizer, round_seeds(0, 0, 3), [0.1, bad, 0.2], eps=1e-3, lr=1e-2)
    for (_, p), p0 in zip(params, original):
        assert torch.equal(p.detach(), p0)
        assert p.grad is None
    assert len(optimizer.state) == 0


@pytest.mark.parametrize(("num_seeds", "num_scalars"), [(3, 2), (2, 3), (0, 0)])
def test_apply_zo_update_rejects_length_mismatch(num_seeds, num_scalars):
    params = _named_params((3,))
    original = params[0][1].detach().clone()
    optimizer = build_client_optimizer([p for _, p in params], "sgd", lr=1e-2, weight_decay=0.0)
    with pytest.raises(ValueError, match="one scalar per seed"):
        apply_zo_update(params, optimizer, round_seeds(0, 0, num_seeds), [0.5] * num_scalars, eps=1e-3, lr=1e-2)
    assert torch.equal(params[0][1].detach(), original)


def test_build_client_optimizer():
    params = [p for _, p in _named_params((2, 2))]
    assert isinstance(build_client_optimizer(params, "sgd", 0.1, 0.0), torch.optim.SGD)
    assert isinstance(build_client_optimizer(params, "adamw", 0.1, 0.01), torch.optim.AdamW)
    with pytest.raises(ValueError, match="sgd"):
        build_client_optimizer(params, "adam", 0.1, 0.0)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_client_optimizer([], "sgd", 0.1, 0.0)


# ----------------------------------------------------------------------------------- swapped perturbations
def _probe_scalars(model, module):
    parts = split_model(model, 2)
    estimator = ZerothOrderEstimator(parts.client_parameters(), 1e-3, "two_sided", module=module)
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(1))
    reference = parts.client(input_ids=ids).hidden_states
    cotangent = torch.randn(reference.shape, generator=torch.Generator().manual_seed(2))
    before = {n: p.detach().clone() for n, p in parts.client_parameters()}
    scalars = estimator.projected_scalars(
        lambda: parts.client(input_ids=ids).hidden_states, reference, cotangent, [3, 4, 5]
    )
    assert all(torch.equal(p, before[n]) for n, p in parts.client_parameters())  # restored exactly
    return estimator, scalars


@pytest.mark.parametrize("adapter", [None, "lora", "dora"])
def test_swapped_perturbation_equals_in_place_copies(adapter):
    """Swapping each tensor in only while its module runs gives the same bits as perturbing every tensor in place."""
    from peft import LoraConfig, get_peft_model

    def build():
        model = tiny_llama()
        if adapter is not None:
            config = LoraConfig(
                r=2, target_modules=["q_proj", "v_proj"], use_dora=adapter == "dora", init_lora_weights="gaussian"
            )
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = get_peft_model(model, config)
        return model

    copy_model, swap_model = build(), build()
    _, expected = _probe_scalars(copy_model, module=None)
    estimator, got = _probe_scalars(swap_model, module=swap_model)
    assert estimator.swaps and got == expected


def test_a_tensor_read_outside_its_module_falls_back_to_copies():
    """A model that reads a trainable tensor outside the module that registers it would see it unperturbed in swap
    mode: the first forward detects it (NaN outside the owners) and the estimator uses copies, with the same bits."""

    class Reader(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, x):
            return x @ self.inner.weight.T  # never calls self.inner

    torch.manual_seed(0)
    model = Reader()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    cotangent = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    params = [("inner.weight", model.inner.weight)]
    with torch.no_grad():
        reference = model(x)
        expected = ZerothOrderEstimator(params, 1e-3).projected_scalars(lambda: model(x), reference, cotangent, [7, 8])
        estimator = ZerothOrderEstimator(params, 1e-3, module=model)
        with pytest.warns(UserWarning, match="outside the modules that own them"):
            got = estimator.projected_scalars(lambda: model(x), reference, cotangent, [7, 8])
    assert not estimator.swaps and got == expected
    assert torch.equal(model(x), reference)
