"""Which causal LMs of the installed `transformers` can be split, checked on tiny random models built from configs.

[`tiny_config`] shrinks a model type's default config (hidden 64, 4 blocks, 4 heads, vocab 256, eager attention)
with a few per-type overrides ([`TINY_OVERRIDES`]); [`check_model_type`] builds the model, checks that the unsplit
model runs on a padded batch and compares split and unsplit logits at every cut. `benchmarks/split_coverage.py`
writes the table of `docs/split_coverage.md` from it, and `tests/test_split_coverage.py` runs the same sweep.
Nothing is downloaded: every model is built from its config with random weights drawn from a seeded generator.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .testing import HEADS, HIDDEN, LAYERS, TINY_OVERRIDES, VOCAB, padded_batch, quiet, tiny_causal_lm, tiny_config

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

TOLERANCE = 1e-5

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
    from .split import find_layers

    try:
        with quiet():
            return len(find_layers(model)[1])
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
        with torch.no_grad(), quiet():
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
            with quiet():
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
            with torch.no_grad(), quiet():
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
        with torch.no_grad(), quiet():
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
