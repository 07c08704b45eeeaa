"""Tiny random models for tests, docs and benchmarks, built from configs (nothing is downloaded).

* [`tiny_llama`] / [`tiny_llama_config`]: the small Llama that the test suite, the docs' examples and the pinned rounds
  use (vocab 32, hidden 32, 4 blocks, 4 heads, 2 key/value heads unless overridden), drawn from a seeded RNG without
  touching the caller's global RNG state.
* [`tiny_config`] / [`tiny_causal_lm`]: any model type of the installed `transformers`, shrunk (hidden 64, 4 blocks,
  4 heads, vocab 256, eager attention) with a few per-type overrides ([`TINY_OVERRIDES`]); the split coverage sweep
  (`hosfl_hf.coverage`) builds every architecture this way.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "TINY_OVERRIDES",
    "padded_batch",
    "quiet",
    "tiny_causal_lm",
    "tiny_config",
    "tiny_llama",
    "tiny_llama_config",
]

TINY_LLAMA: dict[str, Any] = dict(
    vocab_size=32,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_llama_config(**overrides: Any) -> Any:
    """A `LlamaConfig` of the test suite's tiny Llama, with `overrides` (any `LlamaConfig` argument)."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY_LLAMA, **overrides})


def tiny_llama(seed: int = 0, **overrides: Any) -> Any:
    """A random tiny `LlamaForCausalLM` ([`tiny_llama_config`] with `overrides`). transformers draws the initial
    weights from the global RNG: the draw runs inside `fork_rng` with `seed`, so the caller's RNG state is kept."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(tiny_llama_config(**overrides))


HIDDEN = 64
LAYERS = 4
HEADS = 4
VOCAB = 256
PAD, BOS, EOS = 0, 1, 2

# Generic shrinking: attribute -> value, set on the config and on every sub-config that already has the attribute
# (its own name or an `attribute_map` alias such as `n_embd`).
GENERIC: dict[str, Any] = {
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": 2,
    "head_dim": HIDDEN // HEADS,
    "intermediate_size": 2 * HIDDEN,
    "ffn_dim": 2 * HIDDEN,
    "n_inner": 2 * HIDDEN,
    "vocab_size": VOCAB,
    "max_position_embeddings": 128,
    "pad_token_id": PAD,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "decoder_start_token_id": BOS,
    # mixture of experts
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_k": 2,
    "top_k": 2,
    "n_group": 1,
    "topk_group": 1,
    "n_shared_experts": 1,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "first_k_dense_replace": 1,
    # multi-head latent attention
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "qk_head_dim": 16,
    "v_head_dim": 16,
    # state-space / linear attention mixers
    "state_size": 8,
    "ssm_state_size": 8,
    "mamba_d_state": 8,
    "mamba_n_heads": 4,
    "mamba_d_head": 32,
    "mamba_n_groups": 1,
    "mamba_expand": 2,
    "time_step_rank": 8,
    "conv_kernel": 4,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_head_dim": 16,
    "vocab_size_per_layer_input": VOCAB,
    "hidden_size_per_layer_input": 16,
    "zero_expert_num": 2,
    "encoder_attention_heads": HEADS,
    "decoder_attention_heads": HEADS,
    "encoder_ffn_dim": 2 * HIDDEN,
    "decoder_ffn_dim": 2 * HIDDEN,
    "hidden_size_global": HIDDEN,
    "encoder_hash_byte_group_vocab": 64,
    "sliding_window": 8,
    "attention_dropout": 0.0,
}

# Per-type overrides applied after the generic shrinking: a dict of attributes, or a callable editing the config.
# A dict goes to the config's constructor with the generic values and is set on the result as well.
_ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
_QSA_INDEXER = {
    "indexer_n_heads": 2,
    "indexer_kv_heads": 1,
    "indexer_head_dim": 16,
    "indexer_budget": 8,
    "indexer_compress_ratio": 4,
}
TINY_OVERRIDES: dict[str, dict[str, Any] | Callable[[Any], None]] = {
    # state-space and hybrid mixers: heads x head size = expand x hidden
    "mamba2": {"num_heads": 8, "head_dim": 16, "n_groups": 1},
    "falcon_h1": {"mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_ssm": 128},
    "zamba": {"layers_block_type": ["linear_attention", "hybrid", "linear_attention", "hybrid"]},
    "zamba2": {
        "mamba_headdim": 16,
        "n_mamba_heads": 8,
        "hybrid_layer_ids": [1, 3],
        "layers_block_type": ["linear_attention", "hybrid", "linear_attention", "hybrid"],
    },
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"], "num_dense_layers": 1},
    # a cross-attention block in the middle: skipped without images, so the cut moves to the next block that runs
    "mllama": lambda config: setattr(config.get_text_config(), "cross_attention_layers", [2]),
    # blocks that reuse the key/value states of earlier blocks
    # the last 2 of 6 blocks reuse the key/value states of blocks 2 and 3 (a valid sharing pattern needs 6 blocks)
    "gemma3n_text": {
        "num_hidden_layers": 6,
        "layer_types": _ALTERNATING + _ALTERNATING[:2],
        "num_kv_shared_layers": 2,
        "intermediate_size": [2 * HIDDEN] * 6,
    },
    "gemma4_assistant": {"hidden_size_per_layer_input": 0},
    "qwen4_exp_text": _QSA_INDEXER,
    "qwen4_exp": lambda config: [setattr(config.get_text_config(), k, v) for k, v in _QSA_INDEXER.items()],
    "reformer": {"is_decoder": True, "axial_pos_shape": (4, 8), "axial_pos_embds_dim": (32, 32)},
    "dbrx": lambda config: [setattr(config.attn_config, k, v) for k, v in (("rope_theta", 1e4), ("clip_qkv", 8.0))],
    "cohere_compass_text": {
        "layer_types": _ALTERNATING,
        "rope_parameters": {t: {"rope_type": "default", "rope_theta": 10000.0} for t in set(_ALTERNATING)},
    },
    "xmod": {"default_language": "en_XX"},
    "longcat_flash": {"num_layers": LAYERS},  # its block count (num_hidden_layers counts the sub-layers)
}


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silences warnings and printed output while odd model types are built and run (the coverage sweep)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _has(config: Any, name: str) -> bool:
    return name in vars(config) or name in getattr(config, "attribute_map", {})


def _sub_configs(config: Any) -> Iterable[Any]:
    seen: set[int] = set()
    stack = [config]
    while stack:
        cfg = stack.pop()
        if id(cfg) in seen:
            continue
        seen.add(id(cfg))
        yield cfg
        for value in vars(cfg).values():
            if hasattr(value, "to_dict") and hasattr(value, "model_type"):
                stack.append(value)


def _shrink(config: Any, layers: int = LAYERS) -> None:
    old_layers = getattr(config, "num_hidden_layers", None) if _has(config, "num_hidden_layers") else None
    for name, value in {**GENERIC, "num_hidden_layers": layers}.items():
        if _has(config, name):
            with contextlib.suppress(AttributeError, TypeError, ValueError):
                setattr(config, name, value)
    for name in ("encoder_layers", "decoder_layers", "num_decoder_layers"):
        if _has(config, name) and isinstance(getattr(config, name, None), int):
            setattr(config, name, layers)
    if _has(config, "rotary_dim") and isinstance(getattr(config, "rotary_dim", None), int):
        config.rotary_dim = HIDDEN // HEADS // 2
    if _has(config, "qk_rope_head_dim") and _has(config, "head_dim"):
        # multi-head latent attention: rotary on the rope part only, one key/value head per query head
        config.head_dim = config.qk_rope_head_dim
        if _has(config, "num_key_value_heads"):
            config.num_key_value_heads = HEADS
    # Per-layer lists (layer types, MoE layer flags): keep their first LAYERS entries.
    if isinstance(old_layers, int) and old_layers > layers:
        for name, value in list(vars(config).items()):
            if isinstance(value, list | tuple) and len(value) == old_layers:
                with contextlib.suppress(AttributeError, TypeError, ValueError):
                    setattr(config, name, type(value)(value[:layers]))


def tiny_config(model_type: str) -> Any:
    """The default config of `model_type`, shrunk to a tiny model with eager attention (see [`TINY_OVERRIDES`])."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    # First through the constructor, so that values it derives (per-layer types, head counts) follow the new sizes;
    # then on the result and its sub-configs, for what the constructor does not take.
    kwargs = {name: value for name, value in GENERIC.items() if _has(config, name)}
    override = TINY_OVERRIDES.get(model_type)
    if isinstance(override, dict):
        kwargs.update(override)
    with contextlib.suppress(Exception), quiet():
        config = AutoConfig.for_model(model_type, **kwargs)
    layers = override.get("num_hidden_layers", LAYERS) if isinstance(override, dict) else LAYERS
    for cfg in _sub_configs(config):
        _shrink(cfg, layers)
    if callable(override):
        override(config)
    elif override:
        for name, value in override.items():
            setattr(config, name, value)
    for cfg in _sub_configs(config):
        with contextlib.suppress(AttributeError, TypeError, ValueError):
            cfg._attn_implementation = "eager"
    return config


def tiny_causal_lm(model_type: str, seed: int = 0, std: float = 0.15) -> nn.Module:
    """A tiny random `*ForCausalLM` of `model_type` in eval mode.

    The weights of linear and embedding layers and every 3-d weight (fused experts, convolutions) are redrawn from
    `N(0, std)` with a seeded generator: the default initializations are so small that a wrong split could stay under
    the tolerance. The model's own initialization runs under `torch.random.fork_rng`, so the global RNG is left as
    it was.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    with torch.random.fork_rng(devices=[]), quiet():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                matrix = isinstance(module, nn.Linear | nn.Embedding) and name == "weight"
                if param.is_floating_point() and (matrix or param.dim() == 3):
                    param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model.eval()


def padded_batch(vocab: int = VOCAB, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of 7 tokens: unpadded, left-padded by 2 and right-padded by 2."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (3, 7), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, :2] = 0
    mask[2, 5:] = 0
    return input_ids.masked_fill(mask == 0, PAD), mask
