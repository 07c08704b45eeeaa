"""The statistics of the report: exact McNemar tests on paired predictions, and paired training-loss differences with
standard errors over seeds and from a moving-block bootstrap over rounds (never ones that treat rounds as
independent)."""

from __future__ import annotations

import math

import numpy as np
from grid import cell_depth

BLOCK_ROUNDS = 10  # block length of the moving-block bootstrap over rounds (1/6 of a 60-round run)


def mcnemar_p(a: list[int], b: list[int], labels: list[int]) -> tuple[int, int, float]:
    """Exact two-sided McNemar test on paired predictions: (a right & b wrong, a wrong & b right, p-value)."""
    a_right = np.array(a) == np.array(labels)
    b_right = np.array(b) == np.array(labels)
    n01, n10 = int(np.sum(a_right & ~b_right)), int(np.sum(~a_right & b_right))
    return n01, n10, mcnemar_exact_p(n01, n10)


def mcnemar_exact_p(n01: int, n10: int) -> float:
    """Two-sided exact McNemar p-value of the discordant counts (binomial test of n01 out of n01 + n10 at 1/2)."""
    n = n01 + n10
    if n == 0:
        return 1.0
    k = min(n01, n10)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def standard_error_over_seeds(per_seed_means: list[float]) -> float | None:
    """SE of the mean paired difference with the seed as the unit: std (ddof=1) of the per-seed means / sqrt(seeds).

    Each seed's mean over its rounds is one observation, so the correlation between rounds of one run (the weights
    carry over) cannot shrink it. None with fewer than two seeds.
    """
    if len(per_seed_means) < 2:
        return None
    return float(np.std(per_seed_means, ddof=1) / math.sqrt(len(per_seed_means)))


def block_bootstrap_se(series: list[np.ndarray], block: int = BLOCK_ROUNDS) -> float | None:
    """Moving-block bootstrap SE of the mean over seeds of each seed's mean per-round difference.

    Each seed's series of T rounds is resampled as ceil(T / b) blocks of b consecutive rounds drawn with replacement
    from its T - b + 1 overlapping blocks (seeds independently), so correlation within b rounds is kept. The value is
    the exact bootstrap SE, i.e. the limit of infinitely many resamples: a resampled seed's mean is the mean of k
    independent draws of a block mean, so its variance is the population variance of the T - b + 1 block means over
    k, and the mean over S seeds has variance sum_s var_s / S^2. None when a seed has fewer than two rounds.
    """
    variances = []
    for d in series:
        d = np.asarray(d, dtype=float)
        if d.size < 2:
            return None
        b = min(block, d.size)
        block_means = np.convolve(d, np.ones(b) / b, mode="valid")  # the T - b + 1 overlapping block means
        variances.append(float(np.var(block_means)) / math.ceil(d.size / b))
    if not variances:
        return None
    return float(math.sqrt(sum(variances)) / len(variances))


def paired_losses(cells: dict, method: str, other: str, task: str, depth: str) -> dict | None:
    """Per-round training-loss differences `method - other` on the same batches, paired by seed.

    `depth` is the panel's depth; methods without a split are read from their `nosplit` cell. The mean is the mean over
    seeds of each seed's mean difference over rounds; its standard errors treat the seed (SE over seeds) or blocks of
    rounds (moving-block bootstrap) as the unit, never single rounds.
    """
    key_depth, other_depth = cell_depth(method, depth), cell_depth(other, depth)
    diffs, seeds = [], []
    for (m, t, d, s), cell in sorted(cells.items()):
        if (m, t, d) == (method, task, key_depth) and (other, t, other_depth, s) in cells:
            a, b = np.array(cell["train_losses"]), np.array(cells[(other, t, other_depth, s)]["train_losses"])
            n = min(len(a), len(b))
            diffs.append(a[:n] - b[:n])
            seeds.append(s)
    if not diffs:
        return None
    per_seed = [float(d.mean()) for d in diffs]
    return {
        "seeds": seeds,
        "rounds": int(sum(d.size for d in diffs)),
        "mean_loss_difference": float(np.mean(per_seed)),
        "per_seed_mean": per_seed,
        "standard_error_seeds": standard_error_over_seeds(per_seed),
        "standard_error_block_bootstrap": block_bootstrap_se(diffs),
        "block_rounds": BLOCK_ROUNDS,
    }


def mcnemar_tests(cells: dict, method: str, other: str, task: str, depth: str, seeds: list[int]) -> list[dict]:
    tests = []
    for s in seeds:
        a = cells[(method, task, cell_depth(method, depth), s)]
        b = cells[(other, task, cell_depth(other, depth), s)]
        n01, n10, pv = mcnemar_p(a["predictions"], b["predictions"], a["labels"])
        tests.append({"seed": s, "method_only_right": n01, "other_only_right": n10, "p_value": pv})
    return tests
