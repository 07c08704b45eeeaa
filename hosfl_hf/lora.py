"""PEFT adapters on the two parts of a split model: per-part LoRA, 4-bit client blocks, and the precision rule.

A whole-model `LoraConfig` needs nothing special: [`split_model`] assigns every adapter to the part that runs it, so
adapters in blocks `0..k-1` are client adapters and the others are server adapters. Separate client and server
settings (`(client_config, server_config)`) are merged by [`split_lora_config`] into **one** `LoraConfig` whose
`layers_to_transform` (or, when the two parts target different modules, a `target_modules` regex) keeps client
adapters in client blocks and server adapters in server blocks, and whose `rank_pattern` / `alpha_pattern` carry
per-part ranks. One config means one adapter named `"default"`: `save_pretrained` writes a single
`adapter_config.json` that `PeftModel.from_pretrained(base, folder)` loads as it is.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._backends import keep_4bit_layers_differentiable
from .split import SplitModel, find_layers, skeleton_layers, unwrap_causal_lm

__all__ = [
    "client_4bit_config",
    "keep_4bit_layers_differentiable",
    "get_split_peft_model",
    "layers_pattern_of",
    "split_lora_config",
    "upcast_trainable_adapters",
]

# Fields of the two part configs that may differ; every other LoraConfig field must agree (one adapter, one config).
_PER_PART_FIELDS = frozenset(
    {"r", "lora_alpha", "target_modules", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern"}
)
# Fields that are bookkeeping rather than adapter settings.
_IGNORED_FIELDS = frozenset({"base_model_name_or_path", "revision", "peft_version", "modules_to_save"})
_ALL_LINEAR = "all-linear"

PeftConfigLike = Any  # a peft `PeftConfig`, or a `(client_config, server_config)` pair of `LoraConfig`s


def layers_pattern_of(model: nn.Module) -> str:
    """The `layers_pattern` of peft for the decoder blocks of `model`: the last name of their path (e.g. `"layers"`
    for `model.layers` or `model.decoder.layers`, `"h"` for GPT-2's `transformer.h`)."""
    path, _ = find_layers(unwrap_causal_lm(model))
    return path.rsplit(".", 1)[-1]


def _indices(layers: Sequence[int]) -> str:
    return "|".join(str(i) for i in layers)


def _scoped_target(targets: str | Sequence[str], pattern: str, layers: Sequence[int]) -> str:
    """A `target_modules` regex (peft full-matches it against module names) restricted to blocks `layers`."""
    block = rf"(?:.*\.)?{re.escape(pattern)}\.(?:{_indices(layers)})\."
    if isinstance(targets, str):  # a user regex: keep it, and require the block in a lookahead
        return rf"(?={block})(?:{targets})"
    return rf"{block}(?:.*\.)?(?:{'|'.join(re.escape(t) for t in targets)})"


def _scoped_pattern_key(pattern: str, layers: Sequence[int], key: str | None = None) -> str:
    r"""A `rank_pattern` / `alpha_pattern` key (peft matches it as `(.*\.)?(key)$`) restricted to blocks `layers`:
    every module of those blocks, or the modules matching `key` in them."""
    block = rf"{re.escape(pattern)}\.(?:{_indices(layers)})\."
    return rf"{block}.*" if key is None else rf"{block}(?:.*\.)?(?:{key})"


def _part_layers(config: Any, default: list[int], part: str) -> list[int]:
    if config.layers_to_transform is None:
        return default
    chosen = (
        [config.layers_to_transform] if isinstance(config.layers_to_transform, int) else config.layers_to_transform
    )
    outside = sorted(set(chosen) - set(default))
    if outside:
        raise ValueError(
            f"The {part} LoraConfig has layers_to_transform={config.layers_to_transform}, but blocks {outside} are "
            f"not {part} blocks (the {part} holds blocks {default[0]}..{default[-1]})."
        )
    return sorted(chosen)


def _is_all_linear(targets: Any) -> bool:
    return isinstance(targets, str) and targets.lower() == _ALL_LINEAR


def _resolve_all_linear(config: Any, model: nn.Module) -> Any:
    """`config` with `target_modules="all-linear"` replaced by the names of the model's linear layers (what peft
    would target), since a per-part config cannot scope the shorthand to blocks."""
    if not _is_all_linear(getattr(config, "target_modules", None)):
        return config
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    config = copy.deepcopy(config)
    full_names = _maybe_include_all_linear_layers(copy.deepcopy(config), model).target_modules
    config.target_modules = sorted({name.rsplit(".", 1)[-1] for name in full_names})
    return config


def _targets_key(targets: Any) -> Any:
    return frozenset(targets) if isinstance(targets, (list, set, tuple, frozenset)) else targets


def split_lora_config(
    peft_config: PeftConfigLike,
    num_layers: int,
    split_layer: int,
    layers_pattern: str = "layers",
) -> Any:
    r"""Builds the LoRA config of a split model.

    A single `LoraConfig` (or any other non-prompt-learning `PeftConfig`) is returned unchanged (as a copy): the
    split already makes adapters in client blocks client adapters and the others server adapters. A pair
    `(client_config, server_config)` (either may be `None`: no adapters in that part) is merged into one
    `LoraConfig`:

    * the client adapters go into blocks `0..split_layer-1` and the server adapters into `split_layer..num_layers-1`
      (or the subset a part config names in its own `layers_to_transform`); modules outside the decoder blocks
      (`lm_head`, embeddings) get no adapter, except through `modules_to_save`;
    * when both parts target the same modules this is `target_modules` + `layers_to_transform` + `layers_pattern`;
      otherwise `target_modules` becomes a regex with one alternative per part (`"all-linear"` needs the model:
      [`get_split_peft_model`] resolves it to module names first);
    * the client's `r` / `lora_alpha` are the defaults and the server's (and any per-part `rank_pattern` /
      `alpha_pattern`) are written as `rank_pattern` / `alpha_pattern` entries scoped to the part's blocks;
    * all other fields (dropout, bias, init, DoRA, rsLoRA, ...) must be equal in both configs; `modules_to_save` is
      the union.

    Args:
        peft_config (`PeftConfig` or `tuple[LoraConfig | None, LoraConfig | None]`):
            One config for the whole model, or the client and server configs.
        num_layers (`int`):
            Number of decoder blocks of the model.
        split_layer (`int`):
            Number of client blocks.
        layers_pattern (`str`, *optional*, defaults to `"layers"`):
            Name of the block list in module names ([`layers_pattern_of`] finds it: `"layers"`, `"h"`, ...).

    Returns:
        `PeftConfig`: the config to give to `peft.get_peft_model`.

    Example:

    ```python
    >>> from peft import LoraConfig
    >>> from hosfl_hf.lora import split_lora_config
    >>> client = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    >>> server = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    >>> config = split_lora_config((client, server), num_layers=4, split_layer=2)
    >>> config.layers_to_transform, config.r, config.rank_pattern
    ([0, 1, 2, 3], 8, {'layers\\.(?:2|3)\\..*': 16})

    ```
    """
    from peft import LoraConfig, PeftConfig

    if not 1 <= split_layer <= num_layers - 1:
        raise ValueError(f"split_layer={split_layer} must be in 1..{num_layers - 1} for a {num_layers}-layer model.")
    if isinstance(peft_config, PeftConfig):
        if peft_config.is_prompt_learning:
            raise ValueError(
                f"{type(peft_config).__name__} adds virtual tokens, which a split model cannot carry across the cut; "
                "use an adapter method such as LoraConfig."
            )
        return copy.deepcopy(peft_config)
    if not isinstance(peft_config, (tuple, list)) or len(peft_config) != 2:
        raise TypeError(
            "peft_config must be a PeftConfig for the whole model or a (client_config, server_config) pair of "
            f"LoraConfig, got {type(peft_config).__name__}."
        )
    client, server = peft_config
    for part, config in (("client", client), ("server", server)):
        if config is not None and not isinstance(config, LoraConfig):
            raise TypeError(f"The {part} config must be a LoraConfig or None, got {type(config).__name__}.")
    if client is None and server is None:
        raise ValueError("Both the client and the server LoraConfig are None: give at least one.")

    parts = []  # (name, config, blocks)
    if client is not None:
        parts.append(("client", client, _part_layers(client, list(range(split_layer)), "client")))
    if server is not None:
        parts.append(("server", server, _part_layers(server, list(range(split_layer, num_layers)), "server")))
    for name, config, _ in parts:
        if config.layers_pattern not in (None, layers_pattern, [layers_pattern]):
            raise ValueError(
                f"The {name} LoraConfig has layers_pattern={config.layers_pattern!r}, but the decoder blocks of this "
                f"model are found with {layers_pattern!r}."
            )
        if config.target_modules is None:
            raise ValueError(f"The {name} LoraConfig needs target_modules (e.g. ['q_proj', 'v_proj']).")
        if _is_all_linear(config.target_modules):
            raise ValueError(
                f"The {name} LoraConfig has target_modules='all-linear', which only the model can resolve: use "
                "get_split_peft_model(model, ...) or HOSFLTrainer(peft_config=...), or list the module names."
            )

    base = parts[0][1]
    if len(parts) == 2:
        a, b = client.to_dict(), server.to_dict()
        differing = sorted(
            k for k in a.keys() | b.keys() if k not in _PER_PART_FIELDS | _IGNORED_FIELDS and a.get(k) != b.get(k)
        )
        if differing:
            raise ValueError(
                f"The client and server LoraConfig differ in {differing}; only {sorted(_PER_PART_FIELDS)} may differ "
                "between the parts (both are stored as one adapter). Make these fields equal, or train one part "
                "with a single LoraConfig and layers_to_transform."
            )

    same_targets = len({_targets_key(c.target_modules) for _, c, _ in parts}) == 1
    kwargs = base.to_dict()
    for key in ("peft_type", "peft_version", "auto_mapping", "revision"):
        kwargs.pop(key, None)
    blocks = sorted(i for _, _, layers in parts for i in layers)
    if same_targets and not isinstance(base.target_modules, str):
        kwargs.update(
            target_modules=sorted(base.target_modules), layers_to_transform=blocks, layers_pattern=layers_pattern
        )
    else:
        kwargs.update(
            target_modules="|".join(
                f"(?:{_scoped_target(c.target_modules, layers_pattern, layers)})" for _, c, layers in parts
            ),
            layers_to_transform=None,
            layers_pattern=None,
        )

    # Ranks and alphas: the first part's values are the defaults, the rest become patterns scoped to blocks.
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for _, config, layers in parts:
        # Explicit per-module patterns of a part come first (peft takes the first key that matches).
        for key, value in (config.rank_pattern or {}).items():
            rank_pattern[_scoped_pattern_key(layers_pattern, layers, key)] = value
        for key, value in (config.alpha_pattern or {}).items():
            alpha_pattern[_scoped_pattern_key(layers_pattern, layers, key)] = value
    for index, (_, config, layers) in enumerate(parts):
        if index and config.r != base.r:
            rank_pattern[_scoped_pattern_key(layers_pattern, layers)] = config.r
        if index and config.lora_alpha != base.lora_alpha:
            alpha_pattern[_scoped_pattern_key(layers_pattern, layers)] = config.lora_alpha
    modules_to_save = sorted({m for _, c, _ in parts for m in (c.modules_to_save or [])}) or None
    kwargs.update(
        r=base.r,
        lora_alpha=base.lora_alpha,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        modules_to_save=modules_to_save,
    )
    return LoraConfig(**kwargs)


def get_split_peft_model(
    model: nn.Module,
    peft_config: PeftConfigLike,
    split_layer: int,
    adapter_name: str = "default",
    autocast_adapter_dtype: bool = True,
) -> Any:
    """Adds the adapters of [`split_lora_config`] to `model` with `peft.get_peft_model`.

    Adapter weights are created in float32 (`autocast_adapter_dtype=True`, peft's default), also on top of a 4-bit
    or bf16 base: zeroth-order updates are far below the resolution of half-precision weights.

    Args:
        model (`PreTrainedModel`):
            A `*ForCausalLM` model (possibly with 4-bit client blocks, see [`client_4bit_config`]).
        peft_config (`PeftConfig` or `tuple[LoraConfig | None, LoraConfig | None]`):
            One config for the whole model, or the client and server configs.
        split_layer (`int`):
            Number of client blocks.
        adapter_name (`str`, *optional*, defaults to `"default"`):
            Name of the adapter.
        autocast_adapter_dtype (`bool`, *optional*, defaults to `True`):
            Passed to `get_peft_model`.

    Returns:
        `peft.PeftModel`: the model with its adapters (base weights frozen).
    """
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise ValueError(
            "The model is already a PeftModel and a peft_config was given too: pass either the PeftModel (its "
            "adapters are used as they are) or the plain model with peft_config."
        )
    _, layers = find_layers(unwrap_causal_lm(model))
    if isinstance(peft_config, (tuple, list)):
        peft_config = tuple(None if c is None else _resolve_all_linear(c, model) for c in peft_config)
    config = split_lora_config(peft_config, len(layers), split_layer, layers_pattern_of(model))
    _compose_fused_patterns(config, model)
    return get_peft_model(model, config, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)


def _compose_fused_patterns(config: Any, model: nn.Module) -> None:
    """Keeps peft's rank rule for fused parameters under per-part patterns.

    peft (>= 0.22, transformers 5) converts targets that transformers 5 fused into one parameter (e.g. an MoE's
    `gate_proj` + `up_proj` experts into `experts.gate_up_proj`) into `target_parameters`, with `n` times the rank
    and alpha for the fused parameter (`.*\\.gate_up_proj: n * r`), so that each fused branch keeps rank `r`. It adds
    that pattern after the existing ones, and peft takes the first pattern that matches: the server's block-scoped
    rank (`layers\\.(?:2|3)\\..*: r_server`) would win over it, and the server's fused experts would get `r_server`
    for both branches while the client's get `n * r_client`. The conversion is run here first (it is idempotent, and
    peft runs it again in `get_peft_model`), and each block-scoped pattern gets a fused companion with `n` times its
    value, placed first.
    """
    try:
        from peft.utils.transformers_weight_conversion import (
            convert_peft_config_for_transformers,
            get_model_conversion_mapping,
        )
    except ImportError:  # a peft without the conversion: nothing is fused
        return
    if config.peft_type != "LORA" or not (config.rank_pattern or config.alpha_pattern):
        return
    before = {"rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern)}
    base = {"rank_pattern": config.r, "alpha_pattern": config.lora_alpha}
    convert_peft_config_for_transformers(config, model=model, conversions=get_model_conversion_mapping(model))
    for field, scoped in before.items():
        patterns = getattr(config, field)
        fused = {key: value for key, value in patterns.items() if key not in scoped and key.startswith(".*")}
        composed = {
            f"{key}{fused_key[2:]}": value * fused_value // base[field]
            for fused_key, fused_value in fused.items()
            for key, value in scoped.items()
            if key.endswith(".*")
        }
        setattr(config, field, {**composed, **patterns})


def client_4bit_config(
    model_config: Any,
    split_layer: int,
    compute_dtype: torch.dtype = torch.float32,
    quant_type: str = "nf4",
    double_quant: bool = False,
    quant_storage: torch.dtype = torch.uint8,
) -> Any:
    """A `BitsAndBytesConfig` that quantizes the linear layers of the client blocks to 4 bits and nothing else.

    The server part (its blocks, final norm and `lm_head`) stays in the model's dtype: it is trained first-order on
    the server, where memory is not the constraint. Use it in `from_pretrained(..., quantization_config=...)` and add
    LoRA adapters on top (QLoRA): the 4-bit base weights are frozen and the float32 adapters are trained.

    Args:
        model_config (`PretrainedConfig`):
            Config of the model to load (e.g. `AutoConfig.from_pretrained(name)`).
        split_layer (`int`):
            Number of client blocks.
        compute_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            Dtype of the 4-bit matmuls (`bnb_4bit_compute_dtype`); `torch.bfloat16` on GPUs that support it.
        quant_type (`str`, *optional*, defaults to `"nf4"`):
            `"nf4"` or `"fp4"`.
        double_quant (`bool`, *optional*, defaults to `False`):
            Quantize the quantization constants too (`bnb_4bit_use_double_quant`).
        quant_storage (`torch.dtype`, *optional*, defaults to `torch.uint8`):
            Storage dtype of the packed weights.

    Returns:
        `BitsAndBytesConfig`: with `llm_int8_skip_modules` listing every linear layer outside the client blocks.
    """
    from transformers import BitsAndBytesConfig
    from transformers.pytorch_utils import Conv1D

    # A weightless copy of the architecture gives the exact module names (no memory, no download).
    skeleton, path, layers = skeleton_layers(model_config, split_layer)
    client_prefixes = tuple(f"{path}.{i}." for i in range(split_layer))
    # Exact names (not prefixes): transformers matches skip entries by prefix or suffix, and `layers.1` must not
    # also skip `layers.10`.
    skip = [
        name
        for name, module in skeleton.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and not name.startswith(client_prefixes)
    ]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_quant_storage=quant_storage,
        llm_int8_skip_modules=skip,
    )


def _is_half(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and torch.finfo(dtype).bits < 32


def _adapter_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that belong to a peft adapter (LoRA A/B, DoRA magnitudes, ...), not to base layers."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return set()
    names = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        prefix = f"{module_name}." if module_name else ""
        for layer_name in module.adapter_layer_names:
            sub = getattr(module, layer_name, None)
            if isinstance(sub, (nn.Module, nn.ParameterDict)):
                names.update(f"{prefix}{layer_name}.{n}" for n, _ in sub.named_parameters())
    return names


def upcast_trainable_adapters(split: SplitModel) -> list[str]:
    """Enforces the precision rule of HO-SFL: trainable client parameters are float32.

    A zeroth-order step moves a weight by about `client_learning_rate` (1e-5 in the paper), far below the spacing of
    bf16 / fp16 numbers near typical weights (~1e-4): applied to a half-precision weight it rounds away and training
    silently does nothing. Adapter weights (LoRA, DoRA, ...) in half precision are therefore cast to float32, in
    place (peft's `autocast_adapter_dtype` does the same; peft layers cast their inputs, so the half-precision base
    keeps working). Trainable half-precision base weights of the client cannot be cast without breaking the
    forward, so they raise. Server adapters are cast too (zeroth-order baselines perturb them).

    Args:
        split ([`SplitModel`]): the split model.

    Returns:
        `list[str]`: names of the parameters that were cast.

    Raises:
        `ValueError`: if a trainable client parameter that is not an adapter weight is in half precision.
    """
    model = split.model
    adapters = _adapter_parameter_names(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    client_names = set(split.client_parameter_names)
    bad = [n for n in client_names if params[n].requires_grad and _is_half(params[n].dtype) and n not in adapters]
    if bad:
        raise ValueError(
            f"{len(bad)} trainable client parameters are in {params[bad[0]].dtype} (e.g. {sorted(bad)[:3]}): "
            "zeroth-order updates of about client_learning_rate would round away in half precision. Load the "
            "model in float32 (and set bf16=True / fp16=True in HOSFLConfig for mixed-precision compute), or "
            "freeze the client blocks and train LoRA adapters on them (peft_config=...), which are kept in float32."
        )
    cast = []
    with torch.no_grad():
        for name in sorted(adapters):
            param = params.get(name)
            if param is not None and param.requires_grad and _is_half(param.dtype):
                param.data = param.data.to(torch.float32)
                cast.append(name)
    return cast
