"""The pieces of the zeroth-order frontier benchmark (`benchmarks/zo_frontier.py`): a trial step is undone exactly,
and the zeroth-order estimate it line-searches is the unbiased `sum_i <g, u_i> u_i` over the search space only."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))

import zo_frontier  # noqa: E402


def test_trial_steps_are_undone_exactly_and_move_along_the_direction():
    generator = torch.Generator().manual_seed(0)
    params = {"a": torch.nn.Parameter(torch.randn(4, 5, generator=generator)), "b": torch.nn.Parameter(torch.randn(7))}
    before = {k: v.detach().clone() for k, v in params.items()}
    index = torch.tensor([1, 4, 6])
    step = zo_frontier.Step(params, {"a": (None, torch.ones(20)), "b": (index, torch.tensor([3.0, 0.0, 4.0]))})
    assert step.norm == (20 + 9 + 16) ** 0.5
    seen = {}

    def loss_fn():
        seen.update({k: v.detach().clone() for k, v in params.items()})
        return 0.0

    step.loss_at(2.0, loss_fn)
    scale = 2.0 / step.norm
    assert torch.allclose(seen["a"], before["a"] - scale)
    moved = before["b"].clone()
    moved[index] -= scale * torch.tensor([3.0, 0.0, 4.0])
    assert torch.allclose(seen["b"], moved)
    for k in params:  # restored bit for bit
        assert torch.equal(params[k], before[k])


def test_zo_estimate_is_unbiased_and_stays_in_its_space():
    generator = torch.Generator().manual_seed(1)
    grads = {"a": torch.randn(3, 4, generator=generator), "b": torch.randn(10, generator=generator)}
    space = {"a": None, "b": torch.tensor([0, 2, 5])}
    draws = 4000
    total = {"a": torch.zeros(12), "b": torch.zeros(3)}
    for seed in range(draws):
        estimate = zo_frontier.zo_estimate(space, grads, n=2, seed=seed)
        assert torch.equal(estimate["b"][0], space["b"])  # the masked coordinates only
        for name in total:
            total[name] += estimate[name][1] / 2
    mean = torch.cat([total["a"], total["b"]]) / draws
    target = torch.cat([grads["a"].view(-1), grads["b"][space["b"]]])
    # Each coordinate of one draw has variance ~ ||g||^2 + g_j^2 (d = 15); over 4000 draws x 2 directions its SE is
    # ~ ||g|| / sqrt(8000): a 5-SE band.
    assert torch.all((mean - target).abs() < 5 * target.norm() / (2 * draws) ** 0.5)
