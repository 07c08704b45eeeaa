"""Hub artifacts of an HO-SFL run: merging adapters for inference and pushing a saved folder.

A folder written by `HOSFLTrainer.save_model(folder)` holds what `transformers` / `peft` write (for a LoRA run:
`adapter_model.safetensors` + `adapter_config.json`, loadable by `PeftModel.from_pretrained(base, folder)`), plus

* `hosfl_config.json`: [`HOSFLRunRecord`] (`hosfl_hf.split_config`), how the model was split and trained (split
  layer, zeroth-order and federation settings, RNG specification);
* `hosfl_trajectory.json`: the client trajectory (seeds and averaged scalars of every round);
* `hosfl_client_mask_values.safetensors` (a run with a static mask of client base weights, `client_mask`): the
  trained values of the masked base weights, which a peft adapter's files do not hold ([`load_client_mask_values`]);
* `README.md`: a model card (`hosfl_hf.model_card`) with the base model, tags, citation, final metrics and
  communication/memory figures.

[`push_to_hub`] uploads such a folder; [`merge_for_inference`] turns it (or a `PeftModel`) into a plain model, masked
base-weight values included.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .memory import parameter_memory
from .model_card import CITATION, HOSFL_TAGS, build_model_card, final_metrics
from .split_config import ADAPTER_CONFIG_NAME, CLIENT_MASK_VALUES_NAME, HOSFL_CONFIG_NAME, HOSFLRunRecord

__all__ = [
    "CITATION",
    "HOSFL_CONFIG_NAME",
    "HOSFL_TAGS",
    "HOSFLRunRecord",
    "build_model_card",
    "final_metrics",
    "load_client_mask_values",
    "merge_for_inference",
    "parameter_memory",
    "push_to_hub",
]


# --------------------------------------------------------------------------------------------------- merging
def _has_file(path: str, name: str, revision: str | None = None, token: str | bool | None = None) -> bool:
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, name))
    from huggingface_hub import file_exists

    return file_exists(path, name, revision=revision, token=token)


def _is_adapter_folder(path: str, revision: str | None = None, token: str | bool | None = None) -> bool:
    return _has_file(path, ADAPTER_CONFIG_NAME, revision, token)


def load_client_mask_values(
    model: nn.Module,
    model_id: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
) -> list[str]:
    """Writes the trained values of masked client base weights, saved by an HO-SFL run with a `client_mask`, into
    `model`.

    Such a run also trains a static sparse set of client base weights ([`~hosfl_hf.search_space.ClientMask`]). A peft
    adapter's files hold only the adapters, so `save_model` writes those values to
    `hosfl_client_mask_values.safetensors` and their indices to `hosfl_config.json`; loading the adapters alone
    (`PeftModel.from_pretrained`) would silently drop them. [`merge_for_inference`] calls this for you.

    Args:
        model (`nn.Module`):
            The model the run trained, loaded the same way: for a LoRA run, the `PeftModel` with the folder's adapters
            (the saved names are those of its parameters, e.g. `model.layers.0.mlp.down_proj.weight`).
        model_id (`str` or `os.PathLike`):
            A folder saved by `HOSFLTrainer.save_model`, or a Hub repo pushed from one.
        revision, token: of the Hub repository, when `model_id` is a repo id.

    Returns:
        `list[str]`: the names of the base weights written (empty when the run used no mask).

    Raises:
        `ValueError`: when the saved values do not fit `model` (a missing weight, or a shape that differs).
    """
    from safetensors.torch import load_file

    from .search_space import ClientMask
    from .split import unwrap_causal_lm

    path = str(model_id)
    hub = {"revision": revision, "token": token}
    if not _has_file(path, CLIENT_MASK_VALUES_NAME, **hub):
        return []
    if os.path.isdir(path):
        values_file = os.path.join(path, CLIENT_MASK_VALUES_NAME)
    else:
        from huggingface_hub import hf_hub_download

        values_file = hf_hub_download(path, CLIENT_MASK_VALUES_NAME, **hub)
    recorded = HOSFLRunRecord.from_pretrained(path, **hub).client_mask
    if recorded is None:
        raise ValueError(f"{path} has {CLIENT_MASK_VALUES_NAME} but its {HOSFL_CONFIG_NAME} records no client_mask.")
    indices = ClientMask.from_dict(recorded).indices
    values = load_file(values_file)
    params = dict(unwrap_causal_lm(model).named_parameters())
    missing = sorted(set(values) - set(params))
    if missing:
        raise ValueError(
            f"The model has no parameters {missing[:3]} (of {len(missing)}) that {path} holds masked values for. Load "
            "the model as the run trained it (for a LoRA run: PeftModel.from_pretrained(base, folder)) first."
        )
    writes = []
    for name, vector in values.items():  # check every tensor before writing any
        index = torch.as_tensor(indices.get(name, []), dtype=torch.long)
        param = params[name]
        if vector.shape != index.shape or (index.numel() and int(index.max()) >= param.numel()):
            raise ValueError(
                f"Masked values of {name} ({tuple(vector.shape)}) do not fit this model's weight "
                f"{tuple(param.shape)} and the {index.numel()} recorded indices: it is not the base model the run "
                "trained, or the folder's files come from different runs."
            )
        writes.append((param, index, vector))
    with torch.no_grad():
        for param, index, vector in writes:
            param.view(-1)[index.to(param.device)] = vector.to(device=param.device, dtype=param.dtype)
    return sorted(values)


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
    pass a copy (or the saved folder) to keep training the adapter model. An adapter folder of a run with a
    `client_mask` also gets its trained masked base-weight values ([`load_client_mask_values`]).

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
        load_client_mask_values(model, path, **hub)
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
            HOSFLRunRecord.from_pretrained(folder),
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


def __getattr__(name: str):
    if name == "HOSFLSplitConfig":  # its former name, which did not say that it is the run's record
        import warnings

        warnings.warn("HOSFLSplitConfig is deprecated: use HOSFLRunRecord.", FutureWarning, stacklevel=2)
        return HOSFLRunRecord
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
