"""An estimate (not a measurement) of the GPU memory of HO-SFL training with LoRA (`hosfl-hf memory`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["KNOWN_CONFIGS", "MemoryEstimate", "estimate_memory", "parameter_memory"]

# Configs of models that the memory estimate knows without the Hub (from their config.json).
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "facebook/opt-13b": {
        "model_type": "opt",
        "hidden_size": 5120,
        "ffn_dim": 20480,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "vocab_size": 50272,
        "max_position_embeddings": 2048,
        "word_embed_proj_dim": 5120,
    },
    "facebook/opt-1.3b": {
        "model_type": "opt",
        "hidden_size": 2048,
        "ffn_dim": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "vocab_size": 50272,
        "max_position_embeddings": 2048,
        "word_embed_proj_dim": 2048,
    },
}

_GIB = 2**30
_NF4_BYTES = 0.5 + 4 / 64  # 4-bit weights + one fp32 absmax per block of 64 (no double quantization)


@dataclass
class MemoryEstimate:
    """Estimated GPU memory (GiB) of one HO-SFL training process that hosts the server and the clients of a round
    (the recipes' in-process simulation). An estimate from parameter counts and an activation formula, not a
    measurement; CUDA context and allocator slack (~1-2 GiB) are not included.

    Attributes:
        parameters: number of model parameters (billions).
        client_weights: the client blocks (4-bit or `dtype`).
        server_weights: server blocks, embeddings (tied with the LM head), final norm, in `dtype`.
        adapters: LoRA weights, gradients and AdamW states (fp32, 16 bytes per adapter parameter).
        server_activations: what the server's backward keeps for one client batch (clients are run one at a time).
        client_forward: the client's forward without autograd plus `z`, `lambda` and the perturbed `z` in fp32.
        total: the sum.
    """

    parameters: float
    client_weights: float
    server_weights: float
    adapters: float
    server_activations: float
    client_forward: float
    total: float

    def to_markdown(self) -> str:
        rows = [
            ("client weights", self.client_weights),
            ("server weights", self.server_weights),
            ("LoRA weights + grads + AdamW", self.adapters),
            ("server activations", self.server_activations),
            ("client forward", self.client_forward),
            ("total (estimate)", self.total),
        ]
        return "\n".join(["| part | GiB |", "| --- | ---: |"] + [f"| {name} | {value:.1f} |" for name, value in rows])


def _model_config(model: Any) -> Any:
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    if model in KNOWN_CONFIGS:
        values = dict(KNOWN_CONFIGS[model])
        return AutoConfig.for_model(values.pop("model_type"), **values)
    return AutoConfig.from_pretrained(model)


def estimate_memory(
    model: Any,
    split_layer: int,
    batch_size: int,
    seq_len: int = 128,
    dtype_bytes: int = 2,
    client_4bit: bool = False,
    lora_r: int = 8,
    lora_target_modules: Sequence[str] = ("q_proj", "v_proj"),
    gradient_checkpointing: bool = False,
) -> MemoryEstimate:
    """Estimates the GPU memory of HO-SFL training with LoRA (see [`MemoryEstimate`]).

    Parameter counts are exact (a weightless copy of the architecture is built on the `meta` device). The server's
    stored activations per block use the estimate `s*b*h*(34 + 5*a*s/h)` bytes for 16-bit activations with dropout
    (Korthikanti et al., 2022, "Reducing Activation Recomputation in Large Transformer Models"), scaled by
    `dtype_bytes / 2`; with gradient checkpointing, the block inputs plus one block's activations.

    Args:
        model: a config, a key of `KNOWN_CONFIGS` (e.g. `"facebook/opt-13b"`, offline) or a Hub id / local folder.
        split_layer: number of client blocks.
        batch_size: examples per client batch (`per_device_train_batch_size`).
        seq_len: tokens per example.
        dtype_bytes: bytes per weight / activation (2 for bf16, 4 for fp32).
        client_4bit: linear layers of the client blocks in 4-bit NF4.
        lora_r: LoRA rank (0: no adapters).
        lora_target_modules: module names with adapters (in every block).
        gradient_checkpointing: recompute server activations in the backward.

    Example:

    ```python
    >>> from hosfl_hf.memory import estimate_memory
    >>> estimate = estimate_memory("facebook/opt-13b", split_layer=10, batch_size=16)
    >>> round(estimate.parameters, 2), round(estimate.total, 1)
    (12.85, 35.7)

    ```
    """

    from .split import skeleton_layers

    config = _model_config(model)
    skeleton, layers_path, layers = skeleton_layers(config, split_layer)
    text_config = config.get_text_config()
    hidden = text_config.hidden_size
    heads = text_config.num_attention_heads
    num_layers = len(layers)

    def block_bytes(block: torch.nn.Module, quantized: bool) -> float:
        total = 0.0
        for module in block.modules():
            for param in module.parameters(recurse=False):
                is_linear_weight = isinstance(module, torch.nn.Linear) and param is module.weight
                total += param.numel() * (_NF4_BYTES if quantized and is_linear_weight else dtype_bytes)
        return total

    client = sum(block_bytes(layers[i], client_4bit) for i in range(split_layer))
    block_params = {id(p) for p in layers.parameters()}
    outside = sum(p.numel() for p in skeleton.parameters() if id(p) not in block_params)  # tied weights counted once
    server = sum(block_bytes(layers[i], False) for i in range(split_layer, num_layers)) + outside * dtype_bytes
    adapter_params = 0
    if lora_r > 0:
        for block in layers:
            for name, module in block.named_modules():
                if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in lora_target_modules:
                    adapter_params += lora_r * (module.in_features + module.out_features)
    adapters = 16.0 * adapter_params
    tokens = batch_size * seq_len
    per_block = tokens * hidden * (34 + 5 * heads * seq_len / hidden) * dtype_bytes / 2
    server_blocks = num_layers - split_layer
    if gradient_checkpointing:
        activations = server_blocks * tokens * hidden * dtype_bytes + per_block
    else:
        activations = server_blocks * per_block
    ffn = max(m.out_features for m in layers[0].modules() if isinstance(m, torch.nn.Linear))
    client_forward = 3 * tokens * hidden * 4 + tokens * (2 * hidden + ffn) * dtype_bytes
    client_forward += batch_size * heads * seq_len * seq_len * dtype_bytes
    parts = [client, server, adapters, activations, client_forward]
    num_parameters = sum(p.numel() for p in skeleton.parameters())
    return MemoryEstimate(num_parameters / 1e9, *(x / _GIB for x in parts), sum(parts) / _GIB)


def parameter_memory(split: Any) -> dict[str, int]:
    """Weight memory of the two parts, from the parameters themselves (4-bit weights count their packed bytes).

    Activations, optimizer states and quantization constants are not included.

    Args:
        split ([`SplitModel`]): the split model.

    Returns:
        `dict[str, int]`: `client_weight_bytes`, `server_weight_bytes`, `client_trainable_parameters`,
        `server_trainable_parameters` (element counts) and `client_trainable_bytes`.
    """
    params = dict(split.model.named_parameters(remove_duplicate=False))

    def nbytes(names: Sequence[str], trainable: bool = False) -> int:
        unique = {id(params[n]): params[n] for n in names if params[n].requires_grad or not trainable}
        return sum(p.numel() * p.element_size() for p in unique.values())

    def count(names: Sequence[str]) -> int:
        unique = {id(params[n]): params[n] for n in names if params[n].requires_grad}
        return sum(p.numel() for p in unique.values())

    return {
        "client_weight_bytes": nbytes(split.client_parameter_names),
        "server_weight_bytes": nbytes(split.server_parameter_names),
        "client_trainable_parameters": count(split.client_parameter_names),
        "server_trainable_parameters": count(split.server_parameter_names),
        "client_trainable_bytes": nbytes(split.client_parameter_names, trainable=True),
    }
