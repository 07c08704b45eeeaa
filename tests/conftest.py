import os

# Before anything imports huggingface_hub: tests never reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import contextlib  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from hosfl_hf import testing  # noqa: E402

VOCAB = 32
SEQ = 12


def tiny_llama(seed: int = 0, layers: int = 4, tie: bool = False) -> LlamaForCausalLM:
    """The suite's random tiny Llama of `layers` blocks (`hosfl_hf.testing.tiny_llama`; the caller's global RNG
    state is kept)."""
    return testing.tiny_llama(seed, num_hidden_layers=layers, tie_word_embeddings=tie)


def counting_dataset(n: int = 200, seed: int = 0) -> Dataset:
    """A learnable causal-LM task: each row counts up (mod VOCAB) from a random start."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, VOCAB, (1,), generator=g))
        seq = [(start + j) % VOCAB for j in range(SEQ)]
        rows.append({"input_ids": seq, "labels": seq, "label": start % 2})
    return Dataset.from_list(rows)


def tiny_args(tmp_path, config_class=None, **overrides):
    """An HOSFLConfig (or `config_class`, e.g. HOSFLSFTConfig) for tiny-model runs: 4 clients, 2 per round, batch 4,
    CPU, no saving or reporting."""
    from hosfl_hf import HOSFLConfig

    values = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        client_learning_rate=1e-3,
        num_clients=4,
        clients_per_round=2,
        logging_steps=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=7,
        disable_tqdm=True,
    )
    return (config_class or HOSFLConfig)(**{**values, **overrides})


def stack_collator(features):
    """Fixed-length rows: stack them (no padding, no attention mask)."""
    return {
        "input_ids": torch.tensor([f["input_ids"] for f in features]),
        "labels": torch.tensor([f["labels"] for f in features]),
    }


# The errors by which a bitsandbytes build says it has no 4-bit kernels for this machine's CPU. Any other error of a
# 4-bit test (this package's `client_4bit_config`, transformers' loading, a wrong result) fails the test.
BNB_CPU_LIMITATIONS = (
    # transformers, before it loads a quantized model: the installed bitsandbytes has no backend for any device here.
    r"None of the available devices .* are supported by the bitsandbytes version you have installed",
    # bitsandbytes >= 0.46 dispatches through torch.library: an op that this build has no CPU kernel for.
    r"Could not run 'bitsandbytes::\w+' with arguments from the 'CPU' backend",
)


def require_bitsandbytes():
    """Skips when bitsandbytes is missing or older than the release transformers needs for 4-bit loading."""
    from transformers.utils.import_utils import BITSANDBYTES_MIN_VERSION

    return pytest.importorskip("bitsandbytes", minversion=BITSANDBYTES_MIN_VERSION)


@contextlib.contextmanager
def skip_on_bnb_cpu_limitation():
    """Runs a 4-bit step; skips the test only on a known "no CPU 4-bit kernels" error of bitsandbytes
    (`BNB_CPU_LIMITATIONS`), and re-raises every other error."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as error:
        if any(re.search(pattern, str(error)) for pattern in BNB_CPU_LIMITATIONS):
            pytest.skip(f"bitsandbytes cannot run 4-bit layers on this CPU: {error}")
        raise


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: intra-op threads only add synchronisation cost (a lot of it on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def dataset():
    return counting_dataset()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes, also on a machine with GPUs
    return env


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    # A CI timeout stops the run with SIGTERM, which by default kills pytest before any teardown: the SuperLink,
    # SuperNodes and workers that tests started would be left running. As a KeyboardInterrupt it unwinds like Ctrl-C:
    # `finally` blocks and fixture teardowns stop what they started, by pid.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def write_flower_inputs(folder, **run_config) -> dict:
    """The Flower app's inputs in `folder` (the tiny Llama saved as `model/`, the counting rows as `train.jsonl`) and
    a run config over them, with `run_config` on top."""
    import json

    tiny_llama().save_pretrained(folder / "model")
    with open(folder / "train.jsonl", "w") as f:
        for row in counting_dataset():
            f.write(json.dumps({"input_ids": row["input_ids"], "labels": row["labels"]}) + "\n")
    return {
        "model": str(folder / "model"),
        "dataset": str(folder / "train.jsonl"),
        "output-dir": str(folder / "out"),
        "state-dir": str(folder / "state"),
        **run_config,
    }


def run_flower_simulation(folder, config: dict, num_nodes: int, *extra: str, timeout: float = 420) -> str:
    """Runs tests/flower_simulation.py on `config` with `num_nodes` SuperNodes in its own process group (the wait is
    bounded and the group is stopped by pid whatever happens); returns its output."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from hosfl_hf.integrations.flower.local import stop_process

    (folder / "config.json").write_text(json.dumps(config))
    env = dict(subprocess_env(), RAY_DEDUP_LOGS="0", FLWR_HOME=str(folder / "flwr"))
    script = Path(__file__).parent / "flower_simulation.py"
    command = [sys.executable, str(script), str(folder / "config.json"), str(num_nodes), *extra]
    process = subprocess.Popen(
        command,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=folder,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        stop_process(process)
    return output
