"""The model card (`README.md`) of an HO-SFL model, rendered by `huggingface_hub.ModelCard.from_template` from
`templates/model_card.md`: base model, tags, the HO-SFL setup, final metrics, communication and memory figures,
usage, versions and citation."""

from __future__ import annotations

import importlib.metadata
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .split_config import HOSFLRunRecord

__all__ = ["CITATION", "HOSFL_TAGS", "TEMPLATE_PATH", "build_model_card", "final_metrics"]

HOSFL_TAGS = ["hosfl", "split-federated-learning", "zeroth-order", "hosfl_hf"]
TEMPLATE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates", "model_card.md")
# The paper's bibliographic record (authors, venue, arXiv id) is not recorded in this package; it is cited by title
# rather than with identifiers that could be wrong.
CITATION = """\
@misc{hosfl,
    title  = {{Hybrid-Order Split Federated Learning}},
    note   = {Cited by title: authors and identifier are not recorded in the hosfl_hf package}
}"""


# Row labels of the communication and memory figures (`trainer.comm`, `hosfl_hf.memory.parameter_memory`).
FIGURE_LABELS = {
    "activation_bytes": "activation traffic (cut activations and labels up, lambda down), all clients",
    "sync_bytes": "client model synchronisation (seeds down, scalars up and down), all clients",
    "zo_forward_passes": "client forward passes (reference and perturbed), all clients",
    "client_weight_bytes": "client part weights",
    "server_weight_bytes": "server part weights",
    "client_trainable_bytes": "client trainable weights",
    "client_trainable_parameters": "client trainable parameters",
    "server_trainable_parameters": "server trainable parameters",
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _hub_id(name: str | None) -> str | None:
    """`name` if it can be a Hub repo id (not a local path): the Hub rejects paths in `base_model` metadata."""
    if not name or not _HUB_ID.match(name) or os.path.exists(name):
        return None
    return name


def _size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.2f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.2f} TiB"  # pragma: no cover


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cells(rows: Sequence[tuple[Any, Any]]) -> list[tuple[str, str]]:
    """Table cells with `|` (in regexes) escaped."""
    return [(str(a).replace("|", "\\|"), str(b).replace("|", "\\|")) for a, b in rows]


def final_metrics(log_history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The last training loss, the last evaluation metrics and the run summary from `trainer.state.log_history`."""
    metrics: dict[str, Any] = {}
    for entry in log_history:
        if "loss" in entry:  # the last logged training loss
            metrics["round"] = entry.get("step")
            metrics["loss"] = entry["loss"]
        if any(k.startswith("eval_") for k in entry):
            metrics.update({k: v for k, v in entry.items() if k.startswith("eval_")})
        if "train_runtime" in entry:
            # the run summary: `train_loss` is the mean over the whole run
            metrics.update({k: entry[k] for k in ("train_loss", "train_runtime") if k in entry})
            metrics.setdefault("round", entry.get("step"))
    return metrics


def build_model_card(
    config: HOSFLRunRecord,
    *,
    model_name: str | None = None,
    hub_model_id: str | None = None,
    library_name: str = "peft",
    adapter: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    comm: Mapping[str, int] | None = None,
    memory: Mapping[str, int] | None = None,
    tags: Sequence[str] | None = None,
    dataset: str | Sequence[str] | None = None,
    license: str | None = None,
    language: str | Sequence[str] | None = None,
) -> Any:
    """The model card (`README.md`) of an HO-SFL model.

    Args:
        config ([`HOSFLRunRecord`]): how the model was split and trained.
        model_name (`str`, *optional*): title of the card (defaults to the repo name or "HO-SFL model").
        hub_model_id (`str`, *optional*): the repo the card is for (used in the loading example).
        library_name (`str`, *optional*, defaults to `"peft"`): `"peft"` for adapters, `"transformers"` for a full
            model.
        adapter (`dict`, *optional*): the adapter config (`adapter_config.json` content) of a PEFT model.
        metrics (`dict`, *optional*): final metrics (see [`final_metrics`]).
        comm (`dict`, *optional*): cumulated bytes, e.g. `trainer.comm` (`activation_bytes`, `sync_bytes`).
        memory (`dict`, *optional*): memory figures, e.g. [`parameter_memory`]; keys ending in `_bytes` are shown
            as sizes (e.g. [`~hosfl_hf.memory.parameter_memory`]).
        tags (`list[str]`, *optional*): extra tags (the HO-SFL tags are always there).
        dataset, license, language: card metadata.

    Returns:
        `huggingface_hub.ModelCard`: call `.save(path)` or `str(card)`.
    """
    from huggingface_hub import ModelCard, ModelCardData

    base_model = _hub_id(config.base_model_name_or_path)
    all_tags = list(HOSFL_TAGS)
    peft_type = adapter.get("peft_type", "LORA") if adapter is not None else None
    peft_type = str(getattr(peft_type, "value", peft_type))  # a `PeftType` enum in a live config, a str in JSON
    if adapter is not None:
        all_tags.append(peft_type.lower())
    if config.client_quantization:
        all_tags += ["4-bit", "bitsandbytes"] if config.client_quantization.get("load_in_4bit") else ["bitsandbytes"]
    for tag in tags or []:
        if tag not in all_tags:
            all_tags.append(tag)
    title = model_name or (hub_model_id.split("/")[-1] if hub_model_id else "HO-SFL model")
    data = ModelCardData(
        base_model=base_model,
        library_name=library_name,
        model_name=title,
        tags=all_tags,
        license=license,
        language=language,
        datasets=[dataset] if isinstance(dataset, str) else (list(dataset) if dataset else None),
        pipeline_tag="text-generation",
    )

    base_text = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a causal language model"
    blocks = f" of {config.num_layers}" if config.num_layers else ""
    client_update = (
        f"zeroth-order, {config.num_perturbations} perturbations per round, mu = {config.zo_eps}, "
        f"{config.zo_estimator}; {config.client_optimizer}, lr {config.client_learning_rate}"
    )
    setup = [
        ("split layer", f"{config.split_layer}{blocks} decoder blocks on the clients"),
        ("algorithm", config.algorithm),
        ("clients", f"{config.num_clients} ({config.clients_per_round} per round, {config.partition} shards)"),
        ("client update", client_update if config.algorithm == "hosfl" else f"as in `{config.algorithm}`"),
        ("server update", f"first-order (Trainer optimizer), lr {config.server_learning_rate}"),
    ]
    if adapter is not None:
        targets = adapter.get("target_modules")
        targets = ", ".join(sorted(targets)) if isinstance(targets, (list, set, tuple)) else f"`{targets}`"
        text = f"{peft_type} r = {adapter.get('r')}, alpha = {adapter.get('lora_alpha')}"
        text += f" on {targets}"
        if adapter.get("layers_to_transform") is not None:
            text += f" in blocks {adapter['layers_to_transform']}"
        for key in ("rank_pattern", "alpha_pattern"):
            if adapter.get(key):
                text += f"; {key} `{adapter[key]}`"
        setup.append(("adapters", text))
    if config.client_quantization:
        q = config.client_quantization
        setup.append(
            (
                "client weights",
                f"4-bit {q.get('bnb_4bit_quant_type', '')} (bitsandbytes), compute dtype "
                f"{q.get('bnb_4bit_compute_dtype', '')}; adapters in float32",
            )
        )
    figures = [
        (FIGURE_LABELS.get(key, key), f"{_size(value)} ({value:,} bytes)" if key.endswith("_bytes") else f"{value:,}")
        for key, value in {**(comm or {}), **(memory or {})}.items()
    ]
    repo = hub_model_id or "path/to/this/model"
    if library_name == "peft":
        usage = [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base_model or "<base model>"}")',
            f'model = PeftModel.from_pretrained(base, "{repo}")',
            "",
            "# or one plain model with the adapters merged in:",
            "from hosfl_hf import merge_for_inference",
            "",
            f'model = merge_for_inference("{repo}")',
        ]
    else:
        usage = [
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
        ]
    versions = [("hosfl_hf", config.hosfl_hf_version)]
    for package in ("transformers", "peft", "torch", "bitsandbytes"):
        try:
            versions.append((package, importlib.metadata.version(package)))
        except importlib.metadata.PackageNotFoundError:
            pass
    return ModelCard.from_template(
        data,
        template_path=TEMPLATE_PATH,
        title=title,
        base_text=base_text,
        split_layer=config.split_layer,
        setup=_cells(setup),
        metrics=_cells([(k, _format(v)) for k, v in (metrics or {}).items()]),
        figures=_cells(figures),
        usage="\n".join(usage),
        versions=versions,
        citation=CITATION,
    )
