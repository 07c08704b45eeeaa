"""Which causal LMs of the installed `transformers` can be split, checked on tiny random models built from configs.

[`tiny_config`] shrinks a model type's default config (hidden 64, 4 blocks, 4 heads, vocab 256, eager attention)
with a few per-type overrides ([`TINY_OVERRIDES`]); [`check_model_type`] builds the model, checks that the unsplit
model runs on a padded batch and compares split and unsplit logits at every cut. `benchmarks/split_coverage.py`
writes the table of `docs/split_coverage.md` from it, and `tests/test_split_coverage.py` runs the same sweep.
Nothing is downloaded: every model is built from its config with random weights drawn from a seeded generator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "TINY_OVERRIDES",
    "UNBUILDABLE_NOTES",
    "CoverageResult",
    "causal_lm_model_types",
    "check_model_type",
    "render_markdown",
    "sweep",
    "tiny_causal_lm",
    "tiny_config",
]

HIDDEN = 64
LAYERS = 4
HEADS = 4
VOCAB = 256
TOLERANCE = 1e-5
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
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


# Why a type stays unbuildable, where the error alone does not say it.
UNBUILDABLE_NOTES: dict[str, str] = {
    "gemma3n": "its vision tower needs the `timm` library, which hosfl_hf does not depend on",
    "gemma4_assistant": "a speculative-decoding drafter: it runs on the key/value states of a Gemma 4 target model",
    "gemma4_unified_assistant": "a speculative-decoding drafter: it runs on the key/value states of its target model",
    "musicgen": "a decoder over audio codebooks (input ids of shape batch x codebooks), not a text causal LM",
    "musicgen_melody": "a decoder over audio codebooks (input ids of shape batch x codebooks), not a text causal LM",
    "blt": "byte-level patches with separate encoder, global and decoder sizes, which the generic shrinker breaks",
}


def causal_lm_model_types() -> list[str]:
    """Every model type of transformers' `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


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
    with contextlib.suppress(Exception), _quiet():
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
    with torch.random.fork_rng(devices=[]), _quiet():
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


@dataclass
class CoverageResult:
    """How one model type fares.

    `status` is `exact` (split and unsplit logits agree at every checked cut), `refused` (`split_model` raises a
    `ValueError` at every checked cut), `partial` (exact at some cuts, refused at the others), `unbuildable` (the
    tiny model cannot be built or does not run unsplit on a padded batch), `inexact` (a split returns other logits
    than the model: a bug) or `error` (the split fails with another exception: a bug). `reason` explains a refusal,
    why the model could not be built or run, or what went wrong; `cuts` maps each checked cut to `exact`, `refused`,
    `inexact` or `error`; `max_diff` is the largest logit difference (real tokens) over the exact cuts, and
    `sensitivity` how much the logits move when `N(0, 0.1^2)` noise is added to the cut at the first cut checked (the
    comparison is only meaningful if the server really uses what it receives). For a mixture of experts,
    `router_loss` tells what happens with `output_router_logits=True` and labels at the first exact cut: `refused`
    (the router loss covers the client's blocks too, and `split_model` says so), `exact` (the split loss equals the
    model's), or `inexact`/`error` (a bug).
    """

    model_type: str
    status: str
    reason: str = ""
    model_class: str = ""
    layers_path: str = ""
    num_layers: int | None = None
    cuts: dict[int, str] = field(default_factory=dict)
    max_diff: float | None = None
    sensitivity: float | None = None
    router_loss: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _short(error: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _num_layers(model: nn.Module) -> int | None:
    from .split import _find_layers

    try:
        with _quiet():
            return len(_find_layers(model)[1])
    except ValueError:
        return None


def check_model_type(model_type: str, cuts: Iterable[int] | None = None, seed: int = 0) -> CoverageResult:
    """Builds a tiny `model_type`, runs it unsplit on a padded batch, then splits it at each cut in `cuts`
    (default: every valid cut) and compares the logits on the real tokens with the unsplit ones."""
    from .split import split_model

    try:
        model = tiny_causal_lm(model_type, seed=seed)
    except Exception as error:  # noqa: BLE001 - any failure to build is reported, not raised
        return CoverageResult(model_type, "unbuildable", f"build: {_short(error)}")
    result = CoverageResult(model_type, "exact", model_class=type(model).__name__)
    vocab = getattr(model.get_input_embeddings(), "num_embeddings", VOCAB)
    input_ids, mask = padded_batch(min(vocab, VOCAB), seed=seed)
    real = mask.bool()
    try:
        with torch.no_grad(), _quiet():
            reference = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        if not torch.isfinite(reference[real]).all():
            raise RuntimeError("non-finite logits on real tokens")
    except Exception as error:  # noqa: BLE001
        result.status, result.reason = "unbuildable", f"unsplit forward: {_short(error)}"
        return result
    result.num_layers = _num_layers(model)
    if cuts is None:
        cuts = range(1, result.num_layers or 2)
    reasons: dict[str, str] = {}
    diffs = []
    for k in cuts:
        try:
            with _quiet():
                parts = split_model(model, split_layer=k)
        except ValueError as error:
            result.cuts[k] = "refused"
            reasons.setdefault("refused", _short(error, 500))
            continue
        except Exception as error:  # noqa: BLE001
            result.cuts[k] = "error"
            reasons.setdefault("error", f"split_model at {k}: {_short(error)}")
            continue
        result.layers_path = parts.layers_path
        try:
            with torch.no_grad(), _quiet():
                cut = parts.client(input_ids=input_ids, attention_mask=mask)
                logits = parts.server(cut).logits
                diff = (logits - reference)[real].abs().max().item()
                if result.sensitivity is None:
                    # The server must really use the cut: a small change of it must show in the logits.
                    noise = torch.randn(cut.hidden_states.shape, generator=torch.Generator().manual_seed(seed))
                    moved = dataclasses.replace(cut, hidden_states=cut.hidden_states + 0.1 * noise.to(logits.dtype))
                    result.sensitivity = (parts.server(moved).logits - logits)[real].abs().max().item()
        except Exception as error:  # noqa: BLE001
            result.cuts[k] = "error"
            reasons.setdefault("error", f"split at {k}: {_short(error)}")
            continue
        if diff <= TOLERANCE:
            result.cuts[k] = "exact"
            diffs.append(diff)
        else:
            result.cuts[k] = "inexact"
            reasons.setdefault("inexact", f"split at {k}: max |diff| {diff:.3g} on real tokens")
    outcomes = set(result.cuts.values())
    result.max_diff = max(diffs) if diffs else None
    exact_cuts = [k for k, v in result.cuts.items() if v == "exact"]
    if exact_cuts and hasattr(model.config.get_text_config(), "output_router_logits"):
        result.router_loss = _check_router_loss(model, exact_cuts[0], input_ids, mask)
        if result.router_loss in ("inexact", "error"):
            result.status, result.reason = result.router_loss, f"with output_router_logits=True: {result.router_loss}"
            return result
    for status in ("error", "inexact"):
        if status in outcomes:
            result.status, result.reason = status, reasons[status]
            return result
    if outcomes == {"exact"}:
        result.status = "exact"
    elif outcomes == {"refused"}:
        result.status, result.reason = "refused", reasons["refused"]
    else:
        refused = [k for k, v in result.cuts.items() if v == "refused"]
        result.status = "partial"
        result.reason = f"refused at split_layer={','.join(map(str, refused))}: {reasons['refused']}"
    return result


def _check_router_loss(model: nn.Module, k: int, input_ids: torch.Tensor, mask: torch.Tensor) -> str:
    """`refused`, `exact`, `inexact` or `error`: the split of a mixture of experts that adds its router loss."""
    from .split import split_model

    configs = list({id(c): c for c in (model.config, model.config.get_text_config())}.values())
    saved = [c.output_router_logits for c in configs]
    labels = input_ids.masked_fill(mask == 0, -100)
    try:
        for c in configs:
            c.output_router_logits = True
        with torch.no_grad(), _quiet():
            full = model(input_ids=input_ids, attention_mask=mask, labels=labels, use_cache=False).loss
            try:
                parts = split_model(model, split_layer=k)
            except ValueError as error:
                return "refused" if "auxiliary loss" in str(error) else "error"
            loss = parts.server(parts.client(input_ids=input_ids, attention_mask=mask), labels=labels).loss
        return "exact" if (loss - full).abs().item() <= TOLERANCE else "inexact"
    except Exception:  # noqa: BLE001
        return "error"
    finally:
        for c, value in zip(configs, saved):
            c.output_router_logits = value


def sweep(model_types: Iterable[str] | None = None, cuts: Iterable[int] | None = None) -> list[CoverageResult]:
    """[`check_model_type`] for each model type (default: all of [`causal_lm_model_types`])."""
    cuts = list(cuts) if cuts is not None else None
    return [check_model_type(t, cuts) for t in (model_types or causal_lm_model_types())]


STATUS_ORDER = ("exact", "partial", "refused", "unbuildable", "inexact", "error")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(results: list[CoverageResult], versions: dict[str, str]) -> str:
    """The coverage page: counts, then one table per status."""
    counts = Counter(r.status for r in results)
    by_status = {s: [r for r in results if r.status == s] for s in STATUS_ORDER}
    lines = [
        "# Split coverage",
        "",
        f"Generated by `python benchmarks/split_coverage.py` with {', '.join(f'{k} {v}' for k, v in versions.items())}"
        " (do not edit by hand; `tests/test_split_coverage.py` checks it).",
        "",
        f"Every model type of `transformers`' `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` ({len(results)} types) is built as "
        f"a tiny random model from its default config by `hosfl_hf.coverage.tiny_config` (hidden size {HIDDEN}, "
        f"{LAYERS} blocks, {HEADS} heads, vocabulary {VOCAB}, eager attention, plus the per-type overrides of "
        "`hosfl_hf.coverage.TINY_OVERRIDES`), run unsplit on a padded batch (3 rows of 7 tokens, left and right "
        f"padding), then split at every cut `k` with `split_model(model, k)`, and `server(client(...))` is compared "
        f"with the unsplit logits on the real tokens (exact: max |diff| <= {TOLERANCE:g}).",
        "",
        "| status | model types | meaning |",
        "| --- | ---: | --- |",
    ]
    meaning = {
        "exact": "split and unsplit logits agree at every cut",
        "partial": "exact at some cuts; `split_model` refuses the others with the reason",
        "refused": "`split_model` raises a `ValueError` with the reason at every cut",
        "unbuildable": "the tiny model could not be built or did not run unsplit on a padded batch (status unknown)",
        "inexact": "the split returns other logits than the model, without an error (a bug)",
        "error": "the split fails with another exception than a clear `ValueError` (a bug)",
    }
    for status in STATUS_ORDER:
        lines.append(f"| {status} | {counts.get(status, 0)} | {meaning[status]} |")
    lines += [
        "",
        "## Exact",
        "",
        "`max |diff|`: largest split-unsplit logit difference over all cuts; `noise effect`: how much the logits move "
        "when noise of standard deviation 0.1 is added to the cut (the check is only meaningful if this is large).",
        "",
        "| model type | class | block list | max \\|diff\\| | noise effect |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    for r in by_status["exact"]:
        lines.append(
            f"| `{r.model_type}` | `{r.model_class}` | `{r.layers_path}` | {r.max_diff:.1e} | {r.sensitivity:.2g} |"
        )
    lines += [
        "",
        "## Partially supported",
        "",
        "| model type | exact at k | refused at k | reason |",
        "| --- | --- | --- | --- |",
    ]
    for r in by_status["partial"]:
        exact = ", ".join(str(k) for k, v in r.cuts.items() if v == "exact")
        refused = ", ".join(str(k) for k, v in r.cuts.items() if v == "refused")
        lines.append(f"| `{r.model_type}` | {exact} | {refused} | {_cell(r.reason.partition(': ')[2])} |")
    for status, title in (("refused", "Refused"), ("unbuildable", "Not buildable"), ("inexact", "Inexact (bugs)")):
        lines += ["", f"## {title}", "", "| model type | reason |", "| --- | --- |"]
        for r in by_status[status]:
            note = UNBUILDABLE_NOTES.get(r.model_type) if status == "unbuildable" else None
            lines.append(f"| `{r.model_type}` | {_cell(r.reason)}{f' ({note})' if note else ''} |")
    moe = [r for r in results if r.router_loss]
    lines += [
        "",
        "## Mixture of experts with the router loss",
        "",
        "With `output_router_logits=True` and labels, a mixture of experts adds a load-balancing loss over the "
        "routers of all blocks. The server sees only its own blocks, so `split_model` refuses such a model with the "
        "reason (the logits are still exact; set `output_router_logits=False` to split it) unless the loss is the "
        "same anyway. Checked at the first exact cut of each type whose config has `output_router_logits`:",
        "",
        "| with `output_router_logits=True` | model types |",
        "| --- | --- |",
    ]
    for outcome in ("refused", "exact", "inexact", "error"):
        names = ", ".join(f"`{r.model_type}`" for r in moe if r.router_loss == outcome)
        lines.append(f"| {outcome} | {names or '-'} |")
    if by_status["error"]:
        lines += ["", "## Errors (bugs)", "", "| model type | reason |", "| --- | --- |"]
        lines += [f"| `{r.model_type}` | {_cell(r.reason)} |" for r in by_status["error"]]
    return "\n".join(lines) + "\n"


def versions() -> dict[str, str]:
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]}
