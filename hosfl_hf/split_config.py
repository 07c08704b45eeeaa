"""[`HOSFLRunRecord`] (`hosfl_config.json`): how a model was split and trained with HO-SFL, saved next to the
weights and read back to resume, replay or merge."""

from __future__ import annotations

import importlib.metadata
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .rng import RNG_SPEC

__all__ = ["ADAPTER_CONFIG_NAME", "CLIENT_MASK_VALUES_NAME", "HOSFL_CONFIG_NAME", "HOSFLRunRecord"]

HOSFL_CONFIG_NAME = "hosfl_config.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
# The trained values of masked client base weights (a peft adapter's files do not hold base weights).
CLIENT_MASK_VALUES_NAME = "hosfl_client_mask_values.safetensors"


def _package_version() -> str:
    try:
        return importlib.metadata.version("hosfl-hf")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


@dataclass
class HOSFLRunRecord:
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
        client_lr_scheduler_type, client_warmup_steps, client_lr_scheduler_kwargs: the client's own schedule
            (`None`: the server's).
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
    client_lr_scheduler_kwargs: dict[str, Any] | None = None
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
        "client_lr_scheduler_kwargs",
        "client_zo_blocks",
        "client_zo_modules",
        "client_seeds",
    )

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-serializable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HOSFLRunRecord:
        """Builds the config from a dict; keys unknown to this version (written by a newer one) are ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"Ignoring unknown keys of {HOSFL_CONFIG_NAME}: {unknown}.", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_training_args(
        cls, args: Any, split: Any = None, base_model_name_or_path: str | None = None
    ) -> HOSFLRunRecord:
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
    ) -> HOSFLRunRecord:
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


def __getattr__(name: str):
    if name == "HOSFLSplitConfig":  # its former name, which did not say that it is the run's record
        import warnings

        warnings.warn("HOSFLSplitConfig is deprecated: use HOSFLRunRecord.", FutureWarning, stacklevel=2)
        return HOSFLRunRecord
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
