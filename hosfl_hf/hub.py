"""Hub artifacts of an HO-SFL run: merging adapters for inference and pushing a saved folder.

A folder written by `HOSFLTrainer.save_model(folder)` holds what `transformers` / `peft` write (for a LoRA run:
`adapter_model.safetensors` + `adapter_config.json`, loadable by `PeftModel.from_pretrained(base, folder)`), plus

* `hosfl_config.json`: [`HOSFLSplitConfig`] (`hosfl_hf.split_config`), how the model was split and trained (split
  layer, zeroth-order and federation settings, RNG specification);
* `hosfl_trajectory.json`: the client trajectory (seeds and averaged scalars of every round);
* `README.md`: a model card (`hosfl_hf.model_card`) with the base model, tags, citation, final metrics and
  communication/memory figures.

[`push_to_hub`] uploads such a folder; [`merge_for_inference`] turns it (or a `PeftModel`) into a plain model.
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
from .split_config import ADAPTER_CONFIG_NAME, HOSFL_CONFIG_NAME, HOSFLSplitConfig

__all__ = [
    "CITATION",
    "HOSFL_CONFIG_NAME",
    "HOSFL_TAGS",
    "HOSFLSplitConfig",
    "build_model_card",
    "final_metrics",
    "merge_for_inference",
    "parameter_memory",
    "push_to_hub",
]


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
