"""Unit tests of the federation (shards, client sampling, the round sampler), the scalar aggregation, the RNG
derivations, and the zeroth-order pieces the ZO-everywhere baselines use (`loss_differences`, `zo_gradients`)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from hosfl_hf.aggregation import average_scalars
from hosfl_hf.federation import FederatedRoundSampler, partition_dataset, sample_clients
from hosfl_hf.rng import direction, mix, round_seeds, splitmix64
from hosfl_hf.zeroth_order import ZerothOrderEstimator, loss_differences, zo_gradients


# ------------------------------------------------------------------------------------------------------- shards
def test_iid_shards_partition_every_example_once_in_equal_sizes():
    shards = partition_dataset(None, 103, 10, "iid", seed=3)
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(103))
    assert {len(s) for s in shards} <= {10, 11}
    assert all(s == sorted(s) for s in shards)
    assert shards == partition_dataset(None, 103, 10, "iid", seed=3)  # a pure function of the seed
    assert shards != partition_dataset(None, 103, 10, "iid", seed=4)


def label_skew(shards, labels):
    """Mean over clients of the share of a client's most frequent label."""
    labels = np.asarray(labels)
    return float(np.mean([np.bincount(labels[s], minlength=2).max() / len(s) for s in shards]))


def test_dirichlet_shards_are_skewed_by_alpha():
    labels = [i % 2 for i in range(2000)]
    skewed = partition_dataset(labels, 2000, 10, "dirichlet", alpha=0.1, seed=0, min_size=4)
    balanced = partition_dataset(labels, 2000, 10, "dirichlet", alpha=100.0, seed=0, min_size=4)
    for shards in (skewed, balanced):
        assert sorted(i for s in shards for i in s) == list(range(2000))
        assert min(len(s) for s in shards) >= 4
    assert label_skew(skewed, labels) > 0.85
    assert label_skew(balanced, labels) < 0.6
    assert skewed == partition_dataset(labels, 2000, 10, "dirichlet", alpha=0.1, seed=0, min_size=4)


def test_dirichlet_retries_until_every_client_holds_a_batch_and_says_when_it_cannot():
    labels = [i % 2 for i in range(60)]
    shards = partition_dataset(labels, 60, 5, "dirichlet", alpha=0.5, seed=1, min_size=8)
    assert min(len(s) for s in shards) >= 8
    with pytest.raises(ValueError, match="raise dirichlet_alpha"):
        partition_dataset(labels, 60, 5, "dirichlet", alpha=0.01, seed=1, min_size=12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(labels=None, num_examples=10, num_clients=4, min_size=4), "too few"),
        (dict(labels=None, num_examples=40, num_clients=4, scheme="dirichlet"), "needs the per-example labels"),
        (dict(labels=None, num_examples=40, num_clients=4, scheme="random"), "'iid' or 'dirichlet'"),
    ],
)
def test_partition_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        partition_dataset(**kwargs)


# ----------------------------------------------------------------------------------------------------- sampling
def test_client_sampling_is_distinct_deterministic_and_varies_by_round():
    rounds = [sample_clients(7, r, 10, 3) for r in range(50)]
    assert all(len(set(c)) == 3 and set(c) <= set(range(10)) for c in rounds)
    assert rounds == [sample_clients(7, r, 10, 3) for r in range(50)]
    assert len({tuple(c) for c in rounds}) > 25
    counts = np.bincount([c for cs in rounds for c in cs], minlength=10)
    assert counts.min() > 0  # every client is sampled in 50 rounds


def test_round_sampler_yields_whole_client_batches_in_round_order():
    shards = partition_dataset(None, 200, 4, "iid", seed=0)
    sampler = FederatedRoundSampler(shards, clients_per_round=2, batch_size=4, seed=5)
    assert sampler.rounds_per_epoch == 25 and len(sampler) == 25 * 2 * 4
    order = list(sampler)
    expected = [i for r in range(25) for c in sampler.clients(r) for i in sampler.client_batch(r, c)]
    assert order == expected
    for r in range(25):  # each batch comes from the sampled client's own shard
        for k, c in enumerate(sampler.clients(r)):
            batch = order[(r * 2 + k) * 4 : (r * 2 + k + 1) * 4]
            assert set(batch) <= set(shards[c]) and len(set(batch)) == 4
    sampler.set_epoch(1)
    assert list(sampler)[:8] == [i for c in sampler.clients(25) for i in sampler.client_batch(25, c)]
    later = FederatedRoundSampler(shards, clients_per_round=2, batch_size=4, seed=5, start_round=25)
    assert list(later) == list(sampler)  # a second train() call continues the global round ids


# --------------------------------------------------------------------------------------------------- aggregation
def test_average_scalars_is_the_per_seed_mean():
    assert average_scalars({0: [1.0, 2.0], 5: [3.0, -2.0], 9: [2.0, 3.0]}, 2) == [2.0, 1.0]


@pytest.mark.parametrize(
    "replies, message",
    [
        ({}, "No client reported"),
        ({0: [1.0]}, "sent 1 scalars"),
        ({0: [1.0, math.nan]}, "non-finite"),
        ({0: [1.0, math.inf]}, "non-finite"),
    ],
)
def test_average_scalars_rejects_bad_rounds(replies, message):
    with pytest.raises(ValueError, match=message):
        average_scalars(replies, 2, round_index=4)


# ------------------------------------------------------------------------------------------------------- rng
def test_seed_derivations_are_pinned():
    """The RNG specification's integer derivations (changing them would change every run's seeds)."""
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert mix(1, 2) == splitmix64(splitmix64(splitmix64(1)) ^ splitmix64(2))
    seeds = round_seeds(42, 3, 4)
    assert seeds == round_seeds(42, 3, 4) and len(set(seeds)) == 4 and all(0 <= s < 2**62 for s in seeds)
    assert round_seeds(42, 4, 4) != seeds


# ------------------------------------------------------------------------------------ ZO-everywhere estimates
def test_loss_differences_and_zo_gradients_index_client_then_server_parameters():
    """For a linear loss <a, theta> the two-point difference is exactly mu <a, u>: ZO-SFL's server gradient, built
    from the server's RNG indices (first_index = number of client tensors), must equal the server slice of the
    estimate over client + server parameters."""
    g = torch.Generator().manual_seed(0)
    client = nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))
    server = nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))
    a_client = torch.randn(3, 4, generator=g, dtype=torch.float64)
    a_server = torch.randn(5, generator=g, dtype=torch.float64)
    everything = ZerothOrderEstimator([("c", client), ("s", server)], eps=1e-3, estimator="two_sided")
    seeds = [11, 12, 13]

    @torch.no_grad()
    def loss():
        return (a_client * client).sum() + (a_server * server).sum()

    scalars, mean_loss = loss_differences(everything, loss, seeds)
    for seed, value in zip(seeds, scalars):
        u_c, u_s = direction(client, seed, 0), direction(server, seed, 1)
        expected = 1e-3 * float((a_client * u_c).sum() + (a_server * u_s).sum())
        assert value == pytest.approx(expected, rel=1e-9)
    assert mean_loss == pytest.approx(float(loss()), rel=1e-9)

    full = dict((id(p), g) for p, g in zo_gradients(everything.parameters, seeds, scalars, 1e-3))
    ((param, server_grad),) = list(zo_gradients([("s", server)], seeds, scalars, 1e-3, first_index=1))
    assert param is server and torch.equal(server_grad, full[id(server)])
    ((_, wrong),) = list(zo_gradients([("s", server)], seeds, scalars, 1e-3, first_index=0))
    assert not torch.allclose(wrong, server_grad)
    # In expectation the estimate is the true gradient a: with many seeds the cosine approaches 1.
    many = list(range(4000))
    scalars, _ = loss_differences(everything, loss, many)
    grads = [g.flatten() for _, g in zo_gradients(everything.parameters, many, scalars, 1e-3)]
    estimate, truth = torch.cat(grads).double(), torch.cat([a_client.flatten(), a_server])
    assert float(torch.nn.functional.cosine_similarity(estimate, truth, dim=0)) > 0.95


# ------------------------------------------------------------------------------------------- robust aggregation
@pytest.mark.parametrize(
    "rule, trim, bound, expected",
    [
        ("mean", 0.2, None, [199.8, 1.0]),
        ("median", 0.2, None, [1.0, 1.0]),
        ("trimmed_mean", 0.2, None, [1.0, 1.0]),  # drops 1 of 5 at each end: mean of {0.5, 1, 1.5}
        ("mean", 0.2, 2.0, [1.0, 1.0]),  # the attacker's 996 is clipped to 2: (0.5 + 1 + 1.5 + 0 + 2) / 5
    ],
)
def test_aggregation_rules(rule, trim, bound, expected):
    from hosfl_hf.aggregation import aggregate_scalars

    replies = {0: [0.5, 0.5], 1: [1.0, 1.0], 2: [1.5, 1.5], 3: [0.0, 1.0], 4: [996.0, 1.0]}
    assert aggregate_scalars(replies, 2, rule, trim, bound) == pytest.approx(expected)


@pytest.mark.parametrize("n, trimmed", [(2, 0), (3, 1), (4, 1), (5, 1), (6, 2), (10, 2)])
def test_trimmed_mean_trims_at_least_one_when_clients_drop(n, trimmed):
    """trim_fraction=0.2 with fewer finishers than 5 (dropout) still trims one value at each end where one remains."""
    from hosfl_hf.aggregation import aggregate_scalars

    values = [1.0] * (n - 1) + [1e6]  # one attacker
    got = aggregate_scalars({c: [v] for c, v in enumerate(values)}, 1, "trimmed_mean", 0.2)[0]
    kept = sorted(values)[trimmed : n - trimmed]
    assert got == pytest.approx(sum(kept) / len(kept))
    assert (got == 1.0) == (trimmed > 0)


def test_unknown_aggregation_is_refused():
    from hosfl_hf.aggregation import aggregate_scalars

    with pytest.raises(ValueError, match="Unknown aggregation 'mode'"):
        aggregate_scalars({0: [1.0]}, 1, "mode")
