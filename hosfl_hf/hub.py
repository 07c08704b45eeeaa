"""Hub artifacts of an HO-SFL run: the split/zeroth-order config, the model card, merging, and pushing.

A folder written by `HOSFLTrainer.save_model(folder)` holds what `transformers` / `peft` write (for a LoRA run:
`adapter_model.safetensors` + `adapter_config.json`, loadable by `PeftModel.from_pretrained(base, folder)`), plus

* `hosfl_config.json`: [`HOSFLSplitConfig`], how the model was split and trained (split layer, zeroth-order and
  federation settings, RNG specification);
* `hosfl_trajectory.json`: the client trajectory (seeds and averaged scalars of every round);
* `README.md`: a model card with the base model, tags, citation, final metrics and communication/memory figures.

[`push_to_hub`] uploads such a folder; [`merge_for_inference`] turns it (or a `PeftModel`) into a plain model.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from .rng import RNG_SPEC

__all__ = [
    "HOSFL_CONFIG_NAME",
    "HOSFL_TAGS",
    "HOSFLSplitConfig",
    "build_model_card",
    "final_metrics",
    "merge_for_inference",
    "parameter_memory",
    "push_to_hub",
]

HOSFL_CONFIG_NAME = "hosfl_config.json"
HOSFL_TAGS = ["hosfl", "split-federated-learning", "zeroth-order", "hosfl_hf"]
ADAPTER_CONFIG_NAME = "adapter_config.json"

# The paper's bibliographic record (authors, venue, arXiv id) is not recorded in this package; it is cited by title
# rather than with identifiers that could be wrong.
CITATION = """\
@misc{hosfl,
    title  = {{Hybrid-Order Split Federated Learning}},
    note   = {Cited by title: authors and identifier are not recorded in the hosfl_hf package}
}"""


def _package_version() -> str:
    try:
        return importlib.metadata.version("hosfl-hf")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


@dataclass
class HOSFLSplitConfig:
    r"""How an HO-SFL model was split and trained: what a holder of the client part, or anyone reproducing the run,
    needs besides the weights. Saved as `hosfl_config.json` next to them.

    Like a peft config, `to_dict()` is the single source of truth: `save_pretrained(folder)` writes it,
    `from_pretrained(folder_or_repo_id)` reads it back, `push_to_hub(repo_id)` uploads it.

    Parameters of the split:

        split_layer (`int`): number of decoder blocks held by the clients.
        num_layers (`int`, *optional*): number of decoder blocks of the model.
        model_type (`str`, *optional*): `config.model_type` of the model.
        layers_path (`str`, *optional*): dotted path of the decoder block list (e.g. `"model.layers"`).
        base_model_name_or_path (`str`, *optional*): the base model (Hub id or path) the run started from.
        client_quantization (`dict`, *optional*): the quantization config of the model (4-bit client blocks), if any.

    Parameters of the training (the [`HOSFLConfig`] values of the run):

        algorithm (`str`): `"hosfl"` or the baseline that was run.
        num_clients, clients_per_round, partition, dirichlet_alpha: the federation.
        num_perturbations, zo_eps, zo_estimator: the zeroth-order estimate of the client.
        client_optimizer, client_learning_rate, client_weight_decay: the client update.
        server_learning_rate (`float`): peak learning rate of the server part (`learning_rate`).
        seed (`int`): seed of the perturbation seeds (`round_seeds(seed, round, P)`).
        data_seed (`int`, *optional*): seed of the shards, client sampling and batches (`seed` when `None`).
        aggregation, aggregation_trim_fraction, scalar_bound: how the server combined the clients' scalars.
        client_lr_scheduler_type, client_warmup_steps: the client's own schedule (`None`: the server's).
        client_zo_blocks, client_zo_modules, client_seeds: the client's zeroth-order search space and seeds.
        client_mask (`dict`, *optional*): the static sparse mask of client base weights
            ([`~hosfl_hf.search_space.ClientMask`] as a dict: parameter name -> flat indices), if one was used.
        rng (`dict`): the RNG specification of the perturbation directions.
        hosfl_hf_version (`str`): version of `hosfl_hf` that wrote the file.
    """

    split_layer: int
    num_layers: int | None = None
    model_type: str | None = None
    layers_path: str | None = None
    base_model_name_or_path: str | None = None
    client_quantization: dict[str, Any] | None = None
    algorithm: str = "hosfl"
    num_clients: int = 10
    clients_per_round: int = 3
    partition: str = "iid"
    dirichlet_alpha: float = 1.0
    num_perturbations: int = 2
    zo_eps: float = 1e-3
    zo_estimator: str = "one_sided"
    client_optimizer: str = "adamw"
    client_learning_rate: float = 1e-5
    client_weight_decay: float = 0.0
    server_learning_rate: float = 1e-5
    seed: int = 42
    data_seed: int | None = None
    aggregation: str = "mean"
    aggregation_trim_fraction: float = 0.2
    scalar_bound: float | None = None
    client_lr_scheduler_type: str | None = None
    client_warmup_steps: int | None = None
    client_zo_blocks: list[int] | None = None
    client_zo_modules: list[str] | None = None
    client_seeds: str = "shared"
    client_mask: dict[str, Any] | None = None
    rng: dict[str, Any] = field(default_factory=lambda: dict(RNG_SPEC))
    hosfl_hf_version: str = field(default_factory=_package_version)

    # Fields copied from an `HOSFLConfig` under the same name.
    _TRAINING_FIELDS = (
        "algorithm",
        "num_clients",
        "clients_per_round",
        "partition",
        "dirichlet_alpha",
        "num_perturbations",
        "zo_eps",
        "zo_estimator",
        "client_optimizer",
        "client_learning_rate",
        "client_weight_decay",
        "seed",
        "data_seed",
        "aggregation",
        "aggregation_trim_fraction",
        "scalar_bound",
        "client_lr_scheduler_type",
        "client_warmup_steps",
        "client_zo_blocks",
        "client_zo_modules",
        "client_seeds",
    )

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-serializable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HOSFLSplitConfig:
        """Builds the config from a dict; keys unknown to this version (written by a newer one) are ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"Ignoring unknown keys of {HOSFL_CONFIG_NAME}: {unknown}.", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_training_args(
        cls, args: Any, split: Any = None, base_model_name_or_path: str | None = None
    ) -> HOSFLSplitConfig:
        """The config of a run from its [`HOSFLConfig`] and its [`SplitModel`].

        Args:
            args ([`HOSFLConfig`]): the training arguments (`split_layer` must be set).
            split ([`SplitModel`], *optional*): the split model, for the architecture fields.
            base_model_name_or_path (`str`, *optional*): overrides the base model read from the model config.
        """
        values: dict[str, Any] = {name: getattr(args, name) for name in cls._TRAINING_FIELDS if hasattr(args, name)}
        values["server_learning_rate"] = args.learning_rate
        split_layer = split.split_layer if split is not None else args.split_layer
        if split is not None:
            config = split.model.config
            quantization = getattr(config, "quantization_config", None)
            if quantization is not None and not isinstance(quantization, dict):
                quantization = quantization.to_dict()
            values.update(
                num_layers=split.num_layers,
                model_type=getattr(config, "model_type", None),
                layers_path=split.layers_path,
                base_model_name_or_path=base_model_name_or_path or getattr(config, "_name_or_path", None) or None,
                client_quantization=_jsonable(quantization) if quantization else None,
            )
        elif base_model_name_or_path is not None:
            values["base_model_name_or_path"] = base_model_name_or_path
        return cls(split_layer=split_layer, **values)

    def training_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of [`HOSFLConfig`] that reproduce the run's split, federation and client update."""
        kwargs = {name: getattr(self, name) for name in self._TRAINING_FIELDS}
        kwargs.update(split_layer=self.split_layer, learning_rate=self.server_learning_rate)
        return kwargs

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Writes `hosfl_config.json` into `save_directory` (created if needed) and returns its path."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory} must be a folder, not a file.")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, HOSFL_CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return path

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> HOSFLSplitConfig:
        """Reads `hosfl_config.json` from a local folder or a Hub repository.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a folder, or a Hub repo id.
            subfolder (`str`, *optional*): folder inside it.
            revision, token, cache_dir, local_files_only: as in `huggingface_hub.hf_hub_download`.
        """
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if os.path.isdir(folder):
            path = os.path.join(folder, HOSFL_CONFIG_NAME)
            if not os.path.isfile(path):
                raise ValueError(f"{folder} has no {HOSFL_CONFIG_NAME}: it was not saved by hosfl_hf.")
        else:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(
                str(pretrained_model_name_or_path),
                HOSFL_CONFIG_NAME,
                subfolder=subfolder,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
            )
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | bool | None = None,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload HO-SFL config",
        create_pr: bool = False,
    ) -> Any:
        """Uploads `hosfl_config.json` (only that file) to `repo_id`, creating the repository if needed.

        Returns:
            `huggingface_hub.CommitInfo`: the commit.
        """
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        data = (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()
        return api.upload_file(
            path_or_fileobj=data,
            path_in_repo=HOSFL_CONFIG_NAME,
            repo_id=repo_id,
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
        )


def _jsonable(value: Any) -> Any:
    """`value` with dtypes and other non-JSON leaves turned into strings (quantization configs hold dtypes)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# ----------------------------------------------------------------------------------------------------- memory
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


# ------------------------------------------------------------------------------------------------ model card
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


def _table(header: tuple[str, str], rows: Sequence[tuple[str, str]]) -> list[str]:
    """Markdown table lines; `|` inside cells (regexes) is escaped."""

    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|")

    return [f"| {header[0]} | {header[1]} |", "| --- | --- |", *(f"| {cell(a)} | {cell(b)} |" for a, b in rows)]


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
    config: HOSFLSplitConfig,
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
        config ([`HOSFLSplitConfig`]): how the model was split and trained.
        model_name (`str`, *optional*): title of the card (defaults to the repo name or "HO-SFL model").
        hub_model_id (`str`, *optional*): the repo the card is for (used in the loading example).
        library_name (`str`, *optional*, defaults to `"peft"`): `"peft"` for adapters, `"transformers"` for a full
            model.
        adapter (`dict`, *optional*): the adapter config (`adapter_config.json` content) of a PEFT model.
        metrics (`dict`, *optional*): final metrics (see [`final_metrics`]).
        comm (`dict`, *optional*): cumulated bytes, e.g. `trainer.comm` (`activation_bytes`, `sync_bytes`).
        memory (`dict`, *optional*): memory figures, e.g. [`parameter_memory`]; keys ending in `_bytes` are shown
            as sizes.
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
    lines = [
        f"# {title}",
        "",
        f"This model is a fine-tuned version of {base_text}, trained with Hybrid-Order Split Federated Learning "
        "(HO-SFL) with the `hosfl_hf` package (a `transformers.Trainer` extension). "
        f"The model is cut after decoder block {config.split_layer}: clients hold blocks 0..{config.split_layer - 1} "
        "and update them with zeroth-order estimates (seeds and scalars only); the server holds the other blocks "
        "and the head and trains them with backpropagation.",
    ]
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
    lines += ["", "## HO-SFL setup", "", *_table(("setting", "value"), setup)]
    if metrics:
        lines += [
            "",
            "## Final metrics",
            "",
            *_table(("metric", "value"), [(k, _format(v)) for k, v in metrics.items()]),
        ]
    if comm or memory:
        labels = {
            "activation_bytes": "activation traffic (cut activations and labels up, lambda down), all clients",
            "sync_bytes": "client model synchronisation (seeds down, scalars up and down), all clients",
            "zo_forward_passes": "client forward passes (reference and perturbed), all clients",
            "client_weight_bytes": "client part weights",
            "server_weight_bytes": "server part weights",
            "client_trainable_bytes": "client trainable weights",
            "client_trainable_parameters": "client trainable parameters",
            "server_trainable_parameters": "server trainable parameters",
        }
        rows = [
            (labels.get(key, key), f"{_size(value)} ({value:,} bytes)" if key.endswith("_bytes") else f"{value:,}")
            for key, value in {**(comm or {}), **(memory or {})}.items()
        ]
        lines += [
            "",
            "## Communication and memory",
            "",
            *_table(("quantity", "value"), rows),
            "",
            "Weight memory counts parameters only (4-bit weights by their packed size), without activations, "
            "optimizer states or quantization constants.",
        ]
    repo = hub_model_id or "path/to/this/model"
    if library_name == "peft":
        load = [
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
        load = [
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
        ]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        *load,
        "```",
        "",
        "`hosfl_config.json` records the split and the training settings (`hosfl_hf.HOSFLSplitConfig`); "
        "`hosfl_trajectory.json` records the seeds and averaged scalars of every round, from which a holder of the "
        "initial client weights replays the client training bit for bit (`hosfl_hf.replay_trajectory`).",
        "",
        "## Framework versions",
        "",
        f"- hosfl_hf: {config.hosfl_hf_version}",
    ]
    for package in ("transformers", "peft", "torch", "bitsandbytes"):
        try:
            lines.append(f"- {package}: {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    lines += [
        "",
        "## Citation",
        "",
        "The HO-SFL method is cited by its title; the authors and identifier of the paper are not recorded here.",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


# --------------------------------------------------------------------------------------------------- merging
def _is_adapter_folder(path: str, revision: str | None = None, token: str | bool | None = None) -> bool:
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, ADAPTER_CONFIG_NAME))
    from huggingface_hub import file_exists

    return file_exists(path, ADAPTER_CONFIG_NAME, revision=revision, token=token)


def merge_for_inference(
    model_or_path: nn.Module | str | os.PathLike,
    base_model: nn.Module | str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    safe_merge: bool = True,
    revision: str | None = None,
    token: str | bool | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """A plain `transformers` model for inference: the adapters of an HO-SFL run merged into the base weights.

    A `PeftModel` given here is merged in place (peft's `merge_and_unload`): its base model becomes the result, so
    pass a copy (or the saved folder) to keep training the adapter model.

    Args:
        model_or_path (`PeftModel`, `PreTrainedModel`, `str` or `os.PathLike`):
            A trained (peft) model, or a folder / Hub repo saved by `HOSFLTrainer.save_model` or `push_to_hub`.
        base_model (`PreTrainedModel` or `str`, *optional*):
            For an adapter folder: the base model, or its name. Defaults to `base_model_name_or_path` of
            `adapter_config.json`. Load it un-quantized: merging into 4-bit weights re-quantizes them.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            Dtype of models loaded here.
        safe_merge (`bool`, *optional*, defaults to `True`):
            Check the merged weights for NaNs (peft's `merge_and_unload(safe_merge=...)`).
        revision, token: of the Hub repository, when `model_or_path` is a repo id.
        model_kwargs: passed to the model's `from_pretrained` (e.g. `device_map`).

    Returns:
        `PreTrainedModel`: the merged model, in eval mode.
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    model = model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        path = str(model_or_path)
        hub = {"revision": revision, "token": token}
        if not _is_adapter_folder(path, **hub):
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **hub, **model_kwargs).eval()
        if not isinstance(base_model, nn.Module):
            name = base_model or PeftConfig.from_pretrained(path, **hub).base_model_name_or_path
            if not name:
                raise ValueError(f"{path}/{ADAPTER_CONFIG_NAME} names no base model: pass base_model=<model or name>.")
            base_model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **model_kwargs)
        model = PeftModel.from_pretrained(base_model, path, **hub)
    if isinstance(model, PeftModel):
        if getattr(model.get_base_model(), "is_loaded_in_4bit", False) or getattr(
            model.get_base_model(), "is_loaded_in_8bit", False
        ):
            warnings.warn(
                "Merging adapters into quantized weights re-quantizes them (the merged model differs from the "
                "adapter model). For an exact merge, load the base model un-quantized and pass it as base_model.",
                stacklevel=2,
            )
        model = model.merge_and_unload(safe_merge=safe_merge)
    return model.eval()


# --------------------------------------------------------------------------------------------------- pushing
def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload HO-SFL model",
    create_pr: bool = False,
    ignore_patterns: Sequence[str] | None = None,
) -> Any:
    """Uploads a folder saved by `HOSFLTrainer.save_model` to the Hub (creating the repository if needed).

    The folder's model card, adapters (or weights), `hosfl_config.json` and `hosfl_trajectory.json` are uploaded;
    checkpoints (`checkpoint-*`) and private files (`_*`) are not, as in `Trainer.push_to_hub`. A folder without a
    `README.md` gets one built from its `hosfl_config.json` (without the run's metrics, which only the trainer has).

    Args:
        folder (`str` or `os.PathLike`): the saved folder.
        repo_id (`str`): the target repository (`"user/name"`).
        token, private, revision, create_pr: as in `huggingface_hub.HfApi.upload_folder` / `create_repo`.
        commit_message (`str`, *optional*): message of the commit.
        ignore_patterns (`list[str]`, *optional*): more files to leave out.

    Returns:
        `huggingface_hub.CommitInfo`: the commit.
    """
    from huggingface_hub import HfApi

    folder = str(folder)
    if not os.path.isfile(os.path.join(folder, HOSFL_CONFIG_NAME)):
        raise ValueError(
            f"{folder} has no {HOSFL_CONFIG_NAME}: save the model with HOSFLTrainer.save_model(folder) first."
        )
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    readme = os.path.join(folder, "README.md")
    if not os.path.isfile(readme):
        adapter_path = os.path.join(folder, ADAPTER_CONFIG_NAME)
        adapter = None
        if os.path.isfile(adapter_path):
            with open(adapter_path, encoding="utf-8") as f:
                adapter = json.load(f)
        card = build_model_card(
            HOSFLSplitConfig.from_pretrained(folder),
            hub_model_id=repo_id,
            library_name="peft" if adapter is not None else "transformers",
            adapter=adapter,
        )
        card.save(readme)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        revision=revision,
        commit_message=commit_message,
        create_pr=create_pr,
        ignore_patterns=["_*", "checkpoint-*", *(ignore_patterns or [])],
    )
