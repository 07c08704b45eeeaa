"""Cut a `transformers` causal LM after decoder block `split_layer` into a client part and a server part.

The split reuses each model's own forward: the client runs the unmodified model until the first server block is
about to be called, and the server runs the unmodified model again with the client blocks skipped and the received
hidden states injected in front of its first block. Embeddings, masks (causal, sliding-window, padding), rotary or
learned positions are therefore produced by the model's own code on both sides. A new architecture only needs an
entry in [`SPLIT_REGISTRY`] naming its list of decoder blocks (and most are found without one).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

__all__ = ["SPLIT_REGISTRY", "CutActivations", "SplitModel", "split_model", "unwrap_causal_lm"]


# model_type -> dotted path of the `nn.ModuleList` of decoder blocks inside the `*ForCausalLM` model.
# Architectures not listed here are still split when exactly one ModuleList of `num_hidden_layers` blocks exists.
SPLIT_REGISTRY: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "mixtral": "model.layers",
    "qwen2": "model.layers",
    "qwen2_moe": "model.layers",
    "qwen3": "model.layers",
    "qwen3_moe": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "phi": "model.layers",
    "phi3": "model.layers",
    "olmo": "model.layers",
    "olmo2": "model.layers",
    "granite": "model.layers",
    "stablelm": "model.layers",
    "smollm3": "model.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
    "gpt_neo": "transformer.h",
    "gptj": "transformer.h",
    "bloom": "transformer.h",
    "falcon": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
}


@dataclass
class CutActivations:
    """What crosses the wire from a client to the server: the hidden states at the cut plus the inputs the server
    needs to rebuild masks and positions. It holds tensors only (no module references), so it can be serialized.

    Args:
        hidden_states (`torch.Tensor` of shape `(batch_size, seq_len, hidden_size)`):
            Input of the first server block.
        attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*):
            Padding mask of the batch (1 = token, 0 = padding).
        position_ids (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*):
            Explicit positions, when the client was given any.
    """

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The non-empty fields, by name (what a transport sends)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def num_bytes(self) -> int:
        """Bytes of all tensors that cross the wire."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


class _CutReached(Exception):
    """Raised by the hook on the first server block to stop the client forward there."""

    def __init__(self, hidden_states: torch.Tensor):
        self.hidden_states = hidden_states


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """Returns the `transformers` `*ForCausalLM` inside a peft / accelerate wrapper (or the model itself)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP & co.
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft.PeftModel
            model = model.get_base_model()
        else:
            return model


def _find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"Unsupported architecture '{model_type}': encoder-decoder models cannot be split by hosfl_hf. "
            f"Use a decoder-only *ForCausalLM model; supported model types: {sorted(SPLIT_REGISTRY)}."
        )
    path = SPLIT_REGISTRY.get(model_type)
    if path is not None:
        module = model
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, nn.ModuleList):
            return path, module
    if type(model).__name__ not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        raise ValueError(
            f"Unsupported architecture '{model_type}' ({type(model).__name__}): hosfl_hf splits decoder-only "
            f"*ForCausalLM models. Supported model types: {sorted(SPLIT_REGISTRY)} (others are detected when they "
            "are causal LMs with one list of decoder blocks)."
        )
    num_layers = getattr(text_config, "num_hidden_layers", None)
    candidates = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and num_layers is not None and len(m) == num_layers
    ]
    if len(candidates) == 1 and hasattr(model, "get_input_embeddings"):
        warnings.warn(
            f"model_type '{model_type}' is not in hosfl_hf.SPLIT_REGISTRY; using the decoder blocks found at "
            f"'{candidates[0][0]}'. Add SPLIT_REGISTRY['{model_type}'] = '{candidates[0][0]}' to silence this.",
            stacklevel=3,
        )
        return candidates[0]
    raise ValueError(
        f"Unsupported architecture '{model_type}' ({type(model).__name__}): no list of decoder blocks was found. "
        f"Supported model types: {sorted(SPLIT_REGISTRY)}. For another decoder-only model, register the path of "
        f"its block list, e.g. hosfl_hf.SPLIT_REGISTRY['{model_type}'] = 'model.layers'."
    )


def skeleton_layers(config, split_layer: int) -> tuple[nn.Module, str, nn.ModuleList]:
    """A weightless (meta-device) copy of the architecture, its block-list path and blocks, with `split_layer`
    checked: exact module names without memory or a download."""
    import warnings as _warnings

    from transformers import AutoModelForCausalLM

    with torch.device("meta"), _warnings.catch_warnings():
        _warnings.simplefilter("ignore")
        skeleton = AutoModelForCausalLM.from_config(config)
    path, layers = _find_layers(skeleton)
    if not 1 <= split_layer <= len(layers) - 1:
        raise ValueError(f"split_layer={split_layer} must be in 1..{len(layers) - 1} for this model.")
    return skeleton, path, layers


def _hidden_states_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _skip_block(*args: Any, **kwargs: Any) -> torch.Tensor:
    # Client blocks are not run on the server; what they pass on is replaced at the first server block anyway.
    return _hidden_states_arg(args, kwargs)


@dataclass
class SplitModel:
    """A causal LM cut after block `split_layer`. Both parts share the model's own modules (no copies).

    Use [`split_model`] to build one. `client(input_ids=..., attention_mask=...)` returns the [`CutActivations`]
    and `server(cut, labels=...)` returns the model's usual `CausalLMOutput` (`logits`, and `loss` with labels).

    Attributes:
        model (`nn.Module`): the `*ForCausalLM` model (unwrapped from peft).
        split_layer (`int`): number of decoder blocks held by the client.
        layers_path (`str`): dotted path of the decoder block list.
        client_parameter_names (`list[str]`): parameters the client part uses, in `named_parameters` order,
            without the ones the server shares (tied embeddings belong to the server).
        server_parameter_names (`list[str]`): every other parameter of the model.
    """

    model: nn.Module
    split_layer: int
    layers_path: str
    client_parameter_names: list[str] = field(default_factory=list)
    server_parameter_names: list[str] = field(default_factory=list)
    _client_modules: list[nn.Module] = field(default_factory=list, repr=False)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_path)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # ----------------------------------------------------------------------------------------------- parameters
    def client_parameters(self, trainable_only: bool = True) -> list[tuple[str, nn.Parameter]]:
        """Client parameters as `(name, parameter)` in a pinned order (the model's `named_parameters` order)."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        return [(n, params[n]) for n in self.client_parameter_names if params[n].requires_grad or not trainable_only]

    def server_parameters(self, trainable_only: bool = True) -> list[tuple[str, nn.Parameter]]:
        """Server parameters as `(name, parameter)` in the model's `named_parameters` order."""
        params = dict(self.model.named_parameters())
        return [(n, params[n]) for n in self.server_parameter_names if params[n].requires_grad or not trainable_only]

    def client_modules(self) -> list[nn.Module]:
        """Modules that run on the client (used to switch dropout off there)."""
        return self._client_modules

    # ------------------------------------------------------------------------------------------------- forward
    def client(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        grad: bool = False,
        **kwargs: Any,
    ) -> CutActivations:
        """Runs embeddings and blocks `0..split_layer-1` without autograd and without dropout.

        `grad=True` keeps the autograd graph (first-order baselines, where the client backpropagates lambda).

        Returns:
            [`CutActivations`]: the hidden states entering block `split_layer` and the masks/positions to send.
        """
        first_server_block = self.layers[self.split_layer]

        def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
            raise _CutReached(_hidden_states_arg(args, kwargs))

        handle = first_server_block.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            with torch.set_grad_enabled(grad), self._client_eval_mode():
                self.model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    inputs_embeds=inputs_embeds,
                    use_cache=False,
                    **kwargs,
                )
        except _CutReached as cut:
            hidden_states = cut.hidden_states
        else:  # pragma: no cover - only reachable if a model never calls its blocks
            raise RuntimeError(f"The model never called decoder block {self.split_layer}; cannot split it.")
        finally:
            handle.remove()
        return CutActivations(hidden_states=hidden_states, attention_mask=attention_mask, position_ids=position_ids)

    def server(
        self,
        cut: CutActivations,
        labels: torch.Tensor | None = None,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        """Runs blocks `split_layer..` , the final norm and the LM head on received activations.

        Args:
            cut ([`CutActivations`]): what the client sent.
            labels (`torch.Tensor`, *optional*): causal-LM labels; the model computes its own loss with them.
            model (`nn.Module`, *optional*): a wrapper of the same model to call instead (e.g. the DDP-wrapped model
                of a `Trainer`, so that gradient synchronisation keeps working).
            kwargs: extra arguments of the model's forward (e.g. `logits_to_keep`).

        Returns:
            The model's `CausalLMOutputWithPast`.
        """
        if not isinstance(cut, CutActivations):
            raise TypeError(f"server() expects the CutActivations returned by client(), got {type(cut).__name__}.")
        hidden = cut.hidden_states
        embed_dim = self.model.get_input_embeddings().embedding_dim
        # The model is called with placeholder embeddings of the right shape and dtype: masks and positions are
        # built from them and from the attention mask exactly as in a full forward, and the placeholder is
        # replaced by the received hidden states in front of the first server block.
        placeholder = hidden.new_zeros(hidden.shape[:-1] + (embed_dim,)).detach()
        call = model if model is not None else self.model
        with self._inject(hidden):
            return call(
                inputs_embeds=placeholder,
                attention_mask=cut.attention_mask,
                position_ids=cut.position_ids,
                labels=labels,
                use_cache=False,
                **kwargs,
            )

    @contextlib.contextmanager
    def _inject(self, hidden_states: torch.Tensor) -> Iterator[None]:
        layers = self.layers
        saved = [layers[i].__dict__.get("forward") for i in range(self.split_layer)]

        def inject(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (hidden_states,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden_states}

        handle = layers[self.split_layer].register_forward_pre_hook(inject, with_kwargs=True)
        for i in range(self.split_layer):
            layers[i].forward = _skip_block
        try:
            yield
        finally:
            handle.remove()
            for i, forward in enumerate(saved):
                if forward is None:
                    del layers[i].forward
                else:
                    layers[i].forward = forward

    @contextlib.contextmanager
    def _client_eval_mode(self) -> Iterator[None]:
        modules = self._client_modules
        modes = [m.training for m in modules]
        for m in modules:
            m.training = False
        try:
            yield
        finally:
            for m, mode in zip(modules, modes):
                m.training = mode


def _trace_client_modules(split: SplitModel) -> list[nn.Module]:
    """Modules that execute during a client forward, found by running it once on a two-token input."""
    executed: list[nn.Module] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: executed.append(mod)) for m in split.model.modules()]
    split._client_modules = []
    try:
        embeddings = split.model.get_input_embeddings()
        device = embeddings.weight.device if hasattr(embeddings, "weight") else None
        ids = torch.zeros(1, 2, dtype=torch.long, device=device)
        split.client(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in hooks:
            h.remove()
    # The first server block is entered (its pre-hook stops the forward) but does not run on the client.
    first_server_block = split.layers[split.split_layer]
    unique: dict[int, nn.Module] = {}
    for m in executed:
        if m is not first_server_block:
            unique[id(m)] = m
    return list(unique.values())


def _partition(split: SplitModel) -> tuple[list[str], list[str]]:
    """Client parameter names (by owning module) and the subset of them the server uses too (tied weights)."""
    lm = split.model
    client_module_ids = {id(m) for m in split._client_modules}
    for i in range(split.split_layer):
        client_module_ids |= {id(m) for m in split.layers[i].modules()}
    modules = dict(lm.named_modules(remove_duplicate=False))
    params = dict(lm.named_parameters(remove_duplicate=False))
    client = [n for n in params if id(modules[n.rpartition(".")[0]]) in client_module_ids]
    server_param_ids = {id(p) for n, p in params.items() if n not in set(client)}
    shared = [n for n in client if id(params[n]) in server_param_ids]
    return client, shared


def _untie(lm: nn.Module, names: list[str]) -> None:
    # A trainable weight used by both parts (tied input/output embeddings) is owned by the server: the client gets
    # a frozen copy, so that server updates do not leak into the client in-process (they would not in a real
    # federation). Frozen tied weights stay tied (no extra memory) and are excluded from the client's ZO update.
    for name in names:
        module_name, _, attr = name.rpartition(".")
        owner = lm.get_submodule(module_name)
        setattr(owner, attr, nn.Parameter(getattr(owner, attr).detach().clone(), requires_grad=False))
    for config in {id(c): c for c in (lm.config, lm.config.get_text_config())}.values():
        if hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False


def split_model(model: nn.Module, split_layer: int) -> SplitModel:
    """Splits a causal LM after decoder block `split_layer`.

    Tied input/output embeddings belong to the server. If they are trainable they are untied: the server trains
    the output embedding and the client keeps a frozen copy of the input embedding.

    Args:
        model (`nn.Module`):
            A `transformers` `*ForCausalLM` model, or a peft `PeftModel` wrapping one.
        split_layer (`int`):
            Number of decoder blocks the client holds, in `1..num_layers-1`.

    Returns:
        [`SplitModel`]: `client` and `server` callables that share the model's modules.

    Raises:
        `ValueError`: if `split_layer` is out of range or the architecture has no detectable block list.

    Example:

    ```python
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hosfl_hf import split_model
    >>> config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
    ...                      num_attention_heads=2, num_key_value_heads=1)
    >>> model = LlamaForCausalLM(config).eval()
    >>> parts = split_model(model, split_layer=2)
    >>> ids = torch.randint(0, 64, (2, 5))
    >>> cut = parts.client(input_ids=ids)
    >>> cut.hidden_states.shape
    torch.Size([2, 5, 16])
    >>> torch.allclose(parts.server(cut).logits, model(ids).logits, atol=1e-5)
    True

    ```
    """
    lm = unwrap_causal_lm(model)
    if not hasattr(lm, "config") or not hasattr(lm, "get_input_embeddings"):
        raise ValueError(f"split_model expects a transformers *ForCausalLM model, got {type(model).__name__}.")
    layers_path, layers = _find_layers(lm)
    num_layers = len(layers)
    if isinstance(split_layer, bool) or not isinstance(split_layer, int) or not 1 <= split_layer <= num_layers - 1:
        raise ValueError(
            f"split_layer={split_layer!r} is invalid for this {num_layers}-layer model: it must be an integer in "
            f"1..{num_layers - 1} (the number of decoder blocks the client holds)."
        )
    split = SplitModel(model=lm, split_layer=split_layer, layers_path=layers_path)
    split._client_modules = _trace_client_modules(split)
    client, shared = _partition(split)
    params = dict(lm.named_parameters(remove_duplicate=False))
    trainable_shared = [n for n in shared if params[n].requires_grad]
    if trainable_shared:
        _untie(lm, trainable_shared)
        split._client_modules = _trace_client_modules(split)
        client, shared = _partition(split)
    split.client_parameter_names = [n for n in client if n not in set(shared)]
    client_set = set(client)
    split.server_parameter_names = [n for n, _ in lm.named_parameters() if n not in client_set or n in shared]
    return split
