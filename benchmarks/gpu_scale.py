"""Client memory and time at the paper's scale: an OPT-13B-shaped model with random bf16 weights (issue #17, GPU).

    python benchmarks/gpu_scale.py --out docs/results                              # one CUDA GPU, OPT-13B shape
    python benchmarks/gpu_scale.py --shape tiny --device cpu --out /tmp/gpu_smoke   # the script's smoke test

Nothing is downloaded: the model is built from OPT-13B's configuration with random weights (memory and time do not
depend on their values), on the device, in bf16. In one process on one device, for each client kind (`full`: every
client weight trainable, ZO-SGD; `lora`: LoRA r8 on q,v of the client blocks, AdamW) it measures:

- client memory: the allocator's peak (`torch.cuda.max_memory_allocated`) during one HO-SFL client step (forward,
  P perturbed forwards, scalars, the ZO update) over its peak during one inference forward of the client part, the
  client part alone on the device (embeddings + the client blocks) as a client holds it;
- perturbation overhead: one perturbed forward minus one plain forward (generate + apply + restore: the library
  swaps each tensor for `theta + mu u` while its module runs), over one plain forward; and the time to generate one
  direction for every trainable client tensor on the CPU and copy it to the device (the library's RNG contract) vs.
  generating it on the device, i.e. what a device-side generator would save;
- round time: one HO-SFL round over one SplitLoRA round (K clients, the same batches, LoRA r8 on the server blocks
  for both), median over repeats, the full model on the device.

Writes `<out>/gpu.json` and `<out>/gpu.md`. On a CPU the allocator rows are `null` (the smoke test checks the rest).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from hosfl_hf import split_model
from hosfl_hf.rng import cpu_generator, direction, direction_seed
from hosfl_hf.zeroth_order import ZerothOrderEstimator, apply_zo_update, build_client_optimizer

# facebook/opt-13b's configuration (its config.json); `tiny` keeps the layout at a size a CPU runs in seconds.
SHAPES: dict[str, dict] = {
    "opt-13b": dict(
        hidden_size=5120, ffn_dim=20480, num_attention_heads=40, num_hidden_layers=40, word_embed_proj_dim=5120
    ),
    "tiny": dict(hidden_size=64, ffn_dim=128, num_attention_heads=4, num_hidden_layers=4, word_embed_proj_dim=64),
}
# The client's step rule per kind: AdamW state for a full-parameter client would be 4x its bf16 weights.
CLIENT_OPTIMIZER = {"full": "sgd", "lora": "adamw"}
LORA_MODULES = ["q_proj", "v_proj"]


def build(shape: str, layers: int, device: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """The OPT model of `shape` with `layers` decoder blocks, random weights initialised on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM, OPTConfig

    config = OPTConfig(**{**SHAPES[shape], "num_hidden_layers": layers}, dropout=0.0)
    devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=devices), torch.device(device):  # initialise without touching the global RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def make_trainable(model: torch.nn.Module, kind: str, client_layers: list[int], server_lora: bool) -> torch.nn.Module:
    """`full`: every client weight trainable; `lora`: LoRA r8 on the client blocks' q,v. `server_lora` also puts
    LoRA on the other blocks (the server trains its part first-order in both methods)."""
    from peft import LoraConfig, get_peft_model

    num_layers = model.config.num_hidden_layers
    lora_layers = [
        i
        for i in range(num_layers)
        if (i in client_layers and kind == "lora") or (server_lora and i not in client_layers)
    ]
    model.requires_grad_(False)
    if lora_layers:
        config = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_MODULES, layers_to_transform=lora_layers)
        model = get_peft_model(model, config)
    if kind == "full":
        for name, param in model.named_parameters():
            if (
                ".layers." in name
                and "lora_" not in name
                and int(name.split(".layers.")[1].split(".")[0]) in client_layers
            ):
                param.requires_grad_(True)
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(fn: Callable[[], object], device: str) -> int | None:
    """The allocator's peak during `fn()` (CUDA only)."""
    if not device.startswith("cuda"):
        fn()
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def inputs(vocab: int, batch: int, length: int, device: str, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(4, vocab, (batch, length), generator=cpu_generator(seed)).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def client_measurements(args: argparse.Namespace, kind: str) -> dict:
    """Memory and perturbation cost of one client holding the client part only."""
    dtype = getattr(torch, args.dtype)
    # The client holds embeddings + split_layer blocks; block split_layer only marks the cut (never run).
    model = build(args.shape, args.split_layer + 1, args.device, dtype, args.seed)
    model = make_trainable(model, kind, list(range(args.split_layer)), server_lora=False)
    parts = split_model(model, args.split_layer)
    params = parts.client_parameters()
    optimizer = build_client_optimizer([p for _, p in params], CLIENT_OPTIMIZER[kind], 1e-6, 0.0)
    estimator = ZerothOrderEstimator(params, args.zo_eps, module=parts.model)
    batch = inputs(model.config.vocab_size, args.batch, args.length, args.device, args.seed)
    seeds = list(range(args.perturbations))
    z = parts.client(**batch).hidden_states
    cotangent = torch.randn(z.shape, generator=cpu_generator(args.seed + 1)).to(args.device, z.dtype)

    def forward() -> torch.Tensor:
        return parts.client(**batch).hidden_states

    def step() -> None:
        reference = forward()
        scalars = estimator.projected_scalars(forward, reference, cotangent, seeds)
        apply_zo_update(params, optimizer, seeds, scalars, args.zo_eps, 1e-6)

    def perturbed_forward() -> None:
        with estimator.perturbed(seeds[0], args.zo_eps):
            forward()

    def directions_cpu() -> None:  # the RNG contract: a CPU draw, cast and moved to the parameter's device
        for index, (_, param) in enumerate(params):
            direction(param, seeds[0], index)

    def directions_device() -> None:  # what a device-side generator would do instead
        for index, (_, param) in enumerate(params):
            generator = torch.Generator(param.device).manual_seed(direction_seed(seeds[0], index))
            torch.randn(param.shape, generator=generator, device=param.device, dtype=torch.float32).to(param.dtype)

    weights = torch.cuda.memory_allocated(args.device) if args.device.startswith("cuda") else None
    inference_peak = peak_bytes(forward, args.device)
    step_peak = peak_bytes(step, args.device)
    plain = timed(forward, args.device, args.repeats)
    perturbed = timed(perturbed_forward, args.device, args.repeats)
    row = {
        "kind": kind,
        "client_optimizer": CLIENT_OPTIMIZER[kind],
        "trainable_parameters": sum(p.numel() for _, p in params),
        "client_weights_bytes": weights,
        "inference_peak_bytes": inference_peak,
        "hosfl_step_peak_bytes": step_peak,
        "memory_ratio": step_peak / inference_peak if step_peak and inference_peak else None,
        "forward_seconds": plain,
        "perturbed_forward_seconds": perturbed,
        "perturbation_overhead": (perturbed - plain) / plain,
        "direction_cpu_seconds": timed(directions_cpu, args.device, args.repeats),
        "direction_device_seconds": timed(directions_device, args.device, args.repeats),
    }
    row["direction_cpu_over_forward"] = row["direction_cpu_seconds"] / plain
    return row


def round_times(args: argparse.Namespace) -> dict:
    """Median seconds of one HO-SFL round and one SplitLoRA round (LoRA clients), the full model on the device."""
    dtype = getattr(torch, args.dtype)
    model = build(args.shape, SHAPES[args.shape]["num_hidden_layers"], args.device, dtype, args.seed)
    client_layers = list(range(args.split_layer))
    model = make_trainable(model, "lora", client_layers, server_lora=True)
    parts = split_model(model, args.split_layer)
    client_params = parts.client_parameters()
    server_params = parts.server_parameters()
    client_opt = build_client_optimizer([p for _, p in client_params], "adamw", 1e-6, 0.0)
    server_opt = torch.optim.AdamW([p for _, p in server_params], lr=1e-6)
    estimator = ZerothOrderEstimator(client_params, args.zo_eps, module=parts.model)
    vocab = model.config.vocab_size
    batches = [inputs(vocab, args.batch, args.length, args.device, args.seed + 10 + k) for k in range(args.clients)]
    targets = [torch.randint(4, vocab, (args.batch,), generator=cpu_generator(k)).to(args.device) for k in range(3)]
    seeds = list(range(args.perturbations))

    def server_loss(cut, k: int) -> torch.Tensor:
        logits = parts.server(cut, logits_to_keep=1).logits[:, -1].float()
        return torch.nn.functional.cross_entropy(logits, targets[k % len(targets)]) / args.clients

    def hosfl_round() -> None:
        replies = []
        for k, batch in enumerate(batches):
            cut = parts.client(**batch)
            z = cut.hidden_states.detach().requires_grad_(True)
            cut.hidden_states = z
            server_loss(cut, k).backward()
            forward = lambda batch=batch: parts.client(**batch).hidden_states  # noqa: E731
            replies.append(estimator.projected_scalars(forward, z.detach(), z.grad, seeds))
        server_opt.step()
        server_opt.zero_grad(set_to_none=True)
        scalars = [sum(r[p] for r in replies) / len(replies) for p in range(len(seeds))]
        apply_zo_update(client_params, client_opt, seeds, scalars, args.zo_eps, 1e-6)

    def splitlora_round() -> None:
        for k, batch in enumerate(batches):
            cut = parts.client(**batch, grad=True)
            z = cut.hidden_states
            received = z.detach().requires_grad_(True)
            cut.hidden_states = received
            server_loss(cut, k).backward()
            z.backward(received.grad)
        server_opt.step()
        client_opt.step()
        server_opt.zero_grad(set_to_none=True)
        client_opt.zero_grad(set_to_none=True)

    hosfl, splitlora = [], []
    for _ in range(args.repeats):  # interleaved, so that machine noise hits both alike
        hosfl.append(timed(hosfl_round, args.device, 1))
        splitlora.append(timed(splitlora_round, args.device, 1))
    result = {
        "hosfl_round_seconds": statistics.median(hosfl),
        "splitlora_round_seconds": statistics.median(splitlora),
        "model_peak_bytes": torch.cuda.max_memory_allocated(args.device) if args.device.startswith("cuda") else None,
    }
    result["round_time_ratio"] = result["hosfl_round_seconds"] / result["splitlora_round_seconds"]
    return result


def write_markdown(result: dict, path: str) -> None:
    def mib(value: int | None) -> str:
        return "n/a" if value is None else f"{value / 2**20:,.0f}"

    lines = [
        f"# Client memory and time at scale ({result['shape']}, random {result['dtype']} weights, "
        f"{result['device_name']})",
        "",
        f"Split after block {result['split_layer']}, batch {result['batch']} x {result['length']} tokens, "
        f"P = {result['perturbations']}, K = {result['clients_per_round']}. Command: `{result['command']}`.",
        "",
        "| client | trainable | weights MiB | inference peak MiB | HO-SFL step peak MiB | ratio "
        "| perturbation overhead | CPU directions / forward | CPU vs device directions (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["clients"]:
        ratio = "n/a" if row["memory_ratio"] is None else f"{row['memory_ratio']:.3f}"
        lines.append(
            f"| {row['kind']} ({row['client_optimizer']}) | {row['trainable_parameters']:,} | "
            f"{mib(row['client_weights_bytes'])} | {mib(row['inference_peak_bytes'])} | "
            f"{mib(row['hosfl_step_peak_bytes'])} | {ratio} | {100 * row['perturbation_overhead']:.0f} % | "
            f"{row['direction_cpu_over_forward']:.2f} | {row['direction_cpu_seconds']:.4f} vs "
            f"{row['direction_device_seconds']:.4f} |"
        )
    rounds = result.get("rounds")
    if rounds:
        lines += [
            "",
            f"Round time: HO-SFL {rounds['hosfl_round_seconds']:.3f} s, "
            f"SplitLoRA {rounds['splitlora_round_seconds']:.3f} s, ratio {rounds['round_time_ratio']:.2f}.",
        ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--shape", default="opt-13b", choices=list(SHAPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--split_layer", type=int, default=None, help="Client blocks (default: a fifth of them).")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--perturbations", type=int, default=2)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--zo_eps", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", nargs="+", default=["lora", "full"], choices=list(CLIENT_OPTIMIZER))
    parser.add_argument("--skip_rounds", action="store_true", help="Only the client measurements.")
    args = parser.parse_args(argv)
    if args.split_layer is None:
        args.split_layer = max(1, SHAPES[args.shape]["num_hidden_layers"] // 5)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    result = {
        "shape": args.shape,
        "dtype": args.dtype,
        "device": args.device,
        "device_name": device_name,
        "torch": torch.__version__,
        "split_layer": args.split_layer,
        "batch": args.batch,
        "length": args.length,
        "perturbations": args.perturbations,
        "clients_per_round": args.clients,
        "clients": [],
        "command": "python benchmarks/gpu_scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu.json")
    for kind in args.kinds:
        row = client_measurements(args, kind)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()  # the client part of this kind is gone; the next starts from an empty device
        result["clients"].append(row)
        print(json.dumps(row), flush=True)
        with open(path, "w") as f:  # partial results survive a run stopped at its time limit
            json.dump(result, f, indent=1)
    if not args.skip_rounds:
        result["rounds"] = round_times(args)
        print(json.dumps(result["rounds"]), flush=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    write_markdown(result, os.path.join(args.out, "gpu.md"))
    return result


if __name__ == "__main__":
    main()
