"""Several processes (`accelerate launch`, gloo on the CPU): every process holds the same client part and trajectory,
the run equals one process hosting all the round's clients, traffic is summed over processes, and a non-finite
loss on one process stops all of them with the same error instead of leaving the others waiting."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, subprocess_env

WORKER = Path(__file__).parent / "distributed_worker.py"
ROUNDS = 3


def launch(out: Path, processes: int, clients_per_round: int, *extra: int) -> subprocess.CompletedProcess:
    if processes == 1:
        command = [sys.executable, str(WORKER)]
    else:  # without GPUs `--multi_gpu` starts CPU processes with gloo
        command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu"]
        command += ["--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no"]
        command += ["--dynamo_backend", "no", "--main_process_port", str(free_port()), str(WORKER)]
    command += [str(out), str(clients_per_round), str(ROUNDS), *map(str, extra)]
    return subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    results = {}
    for name, processes, clients in (("two", 2, 2), ("one", 1, 4)):
        out = tmp_path_factory.mktemp(name)
        result = launch(out, processes, clients)
        assert result.returncode == 0, result.stderr[-4000:]
        results[name] = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(processes)]
    return results


def test_every_process_holds_the_same_client_part_and_trajectory(runs):
    rank0, rank1 = runs["two"]
    assert rank0["world_size"] == 2
    assert rank0["trajectory"] == rank1["trajectory"] and len(rank0["trajectory"]["rounds"]) == ROUNDS
    for name, value in rank0["client"].items():
        assert torch.equal(value, rank1["client"][name]), name
    for name, value in rank0["server"].items():  # DDP keeps the server replicas equal
        assert torch.equal(value, rank1["server"][name]), name


def test_two_processes_equal_one_process_hosting_all_clients(runs):
    (two, _), (one,) = runs["two"], runs["one"]
    # Same sampled clients and batches; lambda_i is exact in both, so round 0's scalars are bit-identical; later
    # rounds see server weights that differ in the last bits (DDP sums gradients in another order).
    assert two["trajectory"]["rounds"][0] == one["trajectory"]["rounds"][0]
    assert [r["seeds"] for r in two["trajectory"]["rounds"]] == [r["seeds"] for r in one["trajectory"]["rounds"]]
    for name, value in one["client"].items():
        torch.testing.assert_close(two["client"][name], value, rtol=1e-4, atol=1e-6)
    for name, value in one["server"].items():
        torch.testing.assert_close(two["server"][name], value, rtol=1e-4, atol=1e-6)
    # Traffic is counted over all processes: the same totals as one process hosting the four clients.
    assert two["comm"] == one["comm"] and two["zo_forward_passes"] == one["zo_forward_passes"]


def test_a_non_finite_loss_on_one_process_stops_every_process(tmp_path):
    result = launch(tmp_path, 2, 2, 1, 3)  # process 1's third loss (round 1, first client batch) is NaN
    assert result.returncode != 0
    message = "The server loss is not finite (process [1]) in round 1"
    assert result.stderr.count(message) >= 2, result.stderr[-4000:]  # raised by both processes
    assert not list(tmp_path.glob("rank*.pt"))
