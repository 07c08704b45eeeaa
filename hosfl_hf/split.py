"""Cut a `transformers` causal LM after decoder block `split_layer` into a client part and a server part.

The split reuses each model's own forward: the client runs the unmodified model until the first server block is
about to be called, and the server runs the unmodified model again with the client blocks skipped and the received
hidden states injected in front of its first block. Embeddings, masks (causal, sliding-window, padding), rotary or
learned positions are therefore produced by the model's own code on both sides. A new architecture only needs an
entry in [`SPLIT_REGISTRY`] naming its list of decoder blocks (and most are found without one).

This is exact only for models whose blocks form a chain: each block runs once per forward, in list order, and
passes nothing to the next one but the hidden states. [`split_model`] checks this on a tiny probe batch when it
splits (call counts and order, the inputs every server block receives, the outputs and losses) and refuses with a
`ValueError` naming the model type and the reason otherwise; `verify=True` adds a comparison of split and unsplit
logits on a padded batch.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ._backends import keep_4bit_layers_differentiable

__all__ = ["SPLIT_REGISTRY", "CutActivations", "SplitModel", "find_layers", "split_model", "unwrap_causal_lm"]


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

# Model types whose forward builds its masks from the token ids only (padding = token 0) and ignores
# `inputs_embeds`: the server calls them with placeholder ids that keep the padding pattern (1 = token, 0 = pad),
# which the client sends as the attention mask.
_TOKEN_PATTERN_INPUTS = {"cpmant"}

# Paths of block lists that belong to another modality's tower (then to an encoder) when a model has several lists
# of blocks: left aside, in this order, while more than one list remains.
_OTHER_TOWERS = (("vision", "visual", "image", "audio", "speech", "vqmodel", "vq_model"), ("encoder",))


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


class _CutReached(BaseException):
    """Raised by the hook on the first server block to stop the client forward there.

    A `BaseException`, so that model code catching `Exception` cannot swallow it."""

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


def _layer_counts(config: Any) -> set[int]:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    counts = set()
    for cfg in (text_config, config):
        for name in ("num_hidden_layers", "decoder_layers", "num_decoder_layers", "n_layer", "num_layers"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                counts.add(value)
    return counts


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted path and the `nn.ModuleList` of the decoder blocks of a `*ForCausalLM` model (by the registry, or
    found by shape)."""
    config = model.config
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
    counts = _layer_counts(config)
    candidates = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) in counts]
    for towers in _OTHER_TOWERS:  # a vision or audio tower next to the language model: keep the language model's
        if len(candidates) > 1:
            candidates = [(n, m) for n, m in candidates if not any(t in n.lower() for t in towers)] or candidates
    if len(candidates) == 1 and hasattr(model, "get_input_embeddings"):
        warnings.warn(
            f"model_type '{model_type}' is not in hosfl_hf.SPLIT_REGISTRY; using the decoder blocks found at "
            f"'{candidates[0][0]}'. Add SPLIT_REGISTRY['{model_type}'] = '{candidates[0][0]}' to silence this.",
            stacklevel=3,
        )
        return candidates[0]
    found = f" (found {len(candidates)}: {', '.join(n for n, _ in candidates)})" if candidates else ""
    raise ValueError(
        f"Unsupported architecture '{model_type}' ({type(model).__name__}): no single list of decoder blocks was "
        f"found{found}. Supported model types: {sorted(SPLIT_REGISTRY)}. For another decoder-only model, register "
        f"the path of its block list, e.g. hosfl_hf.SPLIT_REGISTRY['{model_type}'] = 'model.layers'."
    )


def skeleton_layers(config, split_layer: int) -> tuple[nn.Module, str, nn.ModuleList]:
    """A weightless (meta-device) copy of the architecture, its block-list path and blocks, with `split_layer`
    checked: exact module names without memory or a download."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skeleton = AutoModelForCausalLM.from_config(config)
    path, layers = find_layers(skeleton)
    if not 1 <= split_layer <= len(layers) - 1:
        raise ValueError(f"split_layer={split_layer} must be in 1..{len(layers) - 1} for this model.")
    return skeleton, path, layers


def _hidden_key(args: tuple, kwargs: dict) -> int | str:
    """Where a block receives its hidden states: first positional argument, `hidden_states=`, or the first tensor
    keyword argument."""
    if args:
        return 0
    if "hidden_states" in kwargs:
        return "hidden_states"
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return name
    raise ValueError("a decoder block was called without hidden states")


def _hidden_states_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    key = _hidden_key(args, kwargs)
    return args[key] if isinstance(key, int) else kwargs[key]


def _skip_block(*args: Any, _num_outputs: int = 0, **kwargs: Any) -> Any:
    # Client blocks are not run on the server; what they pass on is replaced at the first server block anyway.
    # A block that returns a tuple `(hidden_states, ...)` gets the same tuple length, with None after the hidden
    # states (split_model has checked that no later block needs those).
    hidden = _hidden_states_arg(args, kwargs)
    return (hidden,) + (None,) * (_num_outputs - 1) if _num_outputs else hidden


def _skip_forward(num_outputs: int) -> Any:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return _skip_block(*args, _num_outputs=num_outputs, **kwargs)

    return forward


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
    # Tuple length of each block's output (0: a tensor), for the stand-in forward of skipped client blocks.
    _block_outputs: dict[int, int] = field(default_factory=dict, repr=False)
    # Dimensions of (batch, sequence) in the hidden states at the cut, and how the server gets its inputs.
    _batch_seq_dims: tuple[int, int] = (0, 1)
    _token_pattern: bool = False

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
        if self._token_pattern and input_ids is not None:
            # The model pads with token 0 and ignores `attention_mask`: send where the tokens are.
            attention_mask = (input_ids != 0).long()

        def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
            raise _CutReached(_hidden_states_arg(args, kwargs))

        # The first server block that runs stops the forward (a model may skip blocks it does not need).
        handles = [self.layers[i].register_forward_pre_hook(stop, with_kwargs=True) for i in self._server_indices()]
        try:
            with torch.set_grad_enabled(grad), self._client_eval_mode():
                self.model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    inputs_embeds=inputs_embeds,
                    **{"use_cache": False, **kwargs},  # a caller may run it over a KV cache (the privacy audit)
                )
        except _CutReached as cut:
            hidden_states = cut.hidden_states
        else:
            raise RuntimeError(f"The model never called decoder blocks {self.split_layer}..; cannot split it.")
        finally:
            for handle in handles:
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
        call = model if model is not None else self.model
        if self._token_pattern and cut.attention_mask is not None:
            # Placeholder ids with the client's padding pattern: the model builds the same masks from them.
            inputs = {"input_ids": cut.attention_mask.long()}
        else:
            # The model is called with placeholder embeddings of the right shape and dtype: masks and positions are
            # built from them and from the attention mask exactly as in a full forward, and the placeholder is
            # replaced by the received hidden states in front of the first server block.
            embed_dim = self.model.get_input_embeddings().embedding_dim
            batch_dim, seq_dim = self._batch_seq_dims
            shape = (hidden.shape[batch_dim], hidden.shape[seq_dim], embed_dim)
            inputs = {"inputs_embeds": hidden.new_zeros(shape).detach()}
        with self._inject(hidden) as injected:
            output = call(
                **inputs,
                attention_mask=cut.attention_mask,
                position_ids=cut.position_ids,
                labels=labels,
                use_cache=False,
                **kwargs,
            )
        if not injected:
            raise RuntimeError(
                f"None of the server's decoder blocks ({self.split_layer}..{self.num_layers - 1}) ran: the received "
                "hidden states were not used."
            )
        return output

    def _server_indices(self) -> range:
        return range(self.split_layer, self.num_layers)

    @contextlib.contextmanager
    def _inject(self, hidden_states: torch.Tensor) -> Iterator[list[nn.Module]]:
        layers = self.layers
        saved = [layers[i].__dict__.get("forward") for i in range(self.split_layer)]
        injected = []

        def inject(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if injected:  # only in front of the first server block that runs
                return None
            injected.append(module)
            key = _hidden_key(args, kwargs)
            if isinstance(key, int):
                return (hidden_states,) + tuple(args[1:]), kwargs
            return args, {**kwargs, key: hidden_states}

        handles = [layers[i].register_forward_pre_hook(inject, with_kwargs=True) for i in self._server_indices()]
        for i in range(self.split_layer):
            layers[i].forward = _skip_forward(self._block_outputs.get(i, 0))
        try:
            yield injected
        finally:
            for handle in handles:
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


# ------------------------------------------------------------------------------------------------- split checks
def _flatten(value: Any, name: str, out: dict[str, Any]) -> None:
    """Tensors, None and plain values inside nested tuples, lists and dicts, by path (other objects are skipped)."""
    if isinstance(value, torch.Tensor):
        out[name] = value.detach().clone()
    elif value is None or isinstance(value, bool | int | float | str):
        out[name] = value
    elif isinstance(value, tuple | list):
        for i, item in enumerate(value):
            _flatten(item, f"{name}[{i}]", out)
    elif isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{name}[{key!r}]" if name else str(key), out)


def _positional_name(module: nn.Module, index: int) -> str:
    """The parameter name of a positional argument of `module.forward` (or `positional argument <index>`)."""
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        parameters = []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in parameters if p.kind in kinds]
    return names[index] if index < len(names) else f"positional argument {index}"


def _call_inputs(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, arg in enumerate(args):
        _flatten(arg, _positional_name(module, i), out)
    for key, value in kwargs.items():
        _flatten(value, key, out)
    return out


def _tolerance(reference: torch.Tensor) -> float:
    finite = reference[torch.isfinite(reference)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    low_precision = reference.dtype in (torch.float16, torch.bfloat16) or reference.element_size() < 2
    return (1e-2 if low_precision else 1e-5) * scale


def _difference(reference: Any, value: Any) -> float | None:
    """0 when equal (floating tensors within tolerance), the largest difference or inf when not, None when only
    one of them is None (an input the server does not receive)."""
    if reference is None or value is None:
        return 0.0 if reference is value else None
    if isinstance(reference, torch.Tensor) != isinstance(value, torch.Tensor):
        return math.inf
    if not isinstance(reference, torch.Tensor):
        return 0.0 if reference == value else math.inf
    if reference.shape != value.shape:
        return math.inf
    if not reference.is_floating_point():
        return 0.0 if torch.equal(reference, value.to(reference.device)) else math.inf
    ref, val = reference.double(), value.to(reference.device).double()
    both_nan = torch.isnan(ref) & torch.isnan(val)
    diff = (ref - val).abs().masked_fill(both_nan, 0.0).nan_to_num(nan=math.inf)
    worst = diff.max().item() if diff.numel() else 0.0
    return 0.0 if worst <= _tolerance(reference) else worst


def _probe_ids(lm: nn.Module) -> torch.Tensor:
    """Two rows of three tokens (deterministic ids, no padding), on the device of the input embeddings."""
    embeddings = lm.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    vocab = getattr(embeddings, "num_embeddings", None) or getattr(lm.config.get_text_config(), "vocab_size", 8)
    ids = (torch.arange(6).view(2, 3) * 7) % max(vocab - 3, 1) + min(3, vocab - 1)
    return ids.to(weight.device if weight is not None else None)


def _verify_batch(lm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Three random rows of 7 tokens from a seeded generator: unpadded, left-padded by 2, right-padded by 2."""
    ids = _probe_ids(lm)
    vocab = getattr(lm.get_input_embeddings(), "num_embeddings", None) or int(ids.max()) + 1
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(min(3, vocab - 1), vocab, (3, 7), generator=generator).to(ids.device)
    mask = torch.ones_like(input_ids)
    mask[1, :2] = 0
    mask[2, 5:] = 0
    pad = getattr(lm.config.get_text_config(), "pad_token_id", None)
    pad = pad if isinstance(pad, int) and 0 <= pad < vocab else 0
    return input_ids.masked_fill(mask == 0, pad), mask


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def _brief(error: BaseException) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= 240 else text[:237] + "..."


def _outputs(output: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("loss", "logits", "aux_loss"):
        value = output.get(key) if isinstance(output, dict) else getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            out[key] = value.detach().clone()
    return out


class _Trace:
    """Hooks recording a forward: the order of block calls, the inputs and output arity of each block's first call,
    and every module entered before it."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList):
        self.model, self.layers = model, layers
        self.reset()

    def reset(self) -> None:
        self.calls: list[int] = []
        self.inputs: dict[int, dict[str, Any]] = {}
        self.hidden_keys: dict[int, int | str] = {}
        self.outputs: dict[int, int] = {}
        self.executed: list[nn.Module] = []
        self.first_call: dict[int, int] = {}

    def hidden_name(self, index: int) -> str:
        key = self.hidden_keys[index]
        return _positional_name(self.layers[index], key) if isinstance(key, int) else key

    @contextlib.contextmanager
    def recording(self) -> Iterator[_Trace]:
        def before(index: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                self.calls.append(index)
                if index not in self.inputs:
                    self.first_call[index] = len(self.executed)
                    self.hidden_keys[index] = _hidden_key(args, kwargs)
                    self.inputs[index] = _call_inputs(module, args, kwargs)

            return hook

        def after(index: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                self.outputs.setdefault(index, len(output) if isinstance(output, tuple | list) else 0)

            return hook

        layers = self.layers
        handles = [layer.register_forward_pre_hook(before(i), with_kwargs=True) for i, layer in enumerate(layers)]
        handles += [layer.register_forward_hook(after(i), with_kwargs=True) for i, layer in enumerate(layers)]
        handles += [m.register_forward_pre_hook(lambda m, args: self.executed.append(m)) for m in self.model.modules()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


def _trace_full_forward(lm: nn.Module, trace: _Trace, ids: torch.Tensor, prefix: str) -> tuple[dict, bool]:
    """Runs the unsplit model on the probe batch with `trace` recording; its outputs (with the loss when the model
    takes the ids as labels) and whether labels were used."""
    mask = torch.ones_like(ids)
    try:
        with trace.recording():
            try:
                return _outputs(lm(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)), True
            except Exception:  # noqa: BLE001 - retried without labels; a second failure is reported
                trace.reset()
                return _outputs(lm(input_ids=ids, attention_mask=mask, use_cache=False)), False
    except Exception as error:  # noqa: BLE001
        raise ValueError(
            f"{prefix} the model does not run on a batch of token ids and an attention mask ({_brief(error)})."
        ) from error


def _server_blocks(calls: list[int], k: int, num_layers: int, prefix: str) -> list[int]:
    """The server blocks that run, in order, after checking that every block runs at most once and in list order."""
    counts = Counter(calls)
    repeated = sorted(i for i, n in counts.items() if n > 1)
    if repeated:
        raise ValueError(
            f"{prefix} decoder block {repeated[0]} runs {counts[repeated[0]]} times in one forward (the model loops "
            "over its blocks or reuses them), so the forward cannot be cut in front of one block."
        )
    if calls != sorted(calls):
        raise ValueError(
            f"{prefix} the model calls its decoder blocks out of list order ({calls}), so the blocks before the cut "
            "are not the client's blocks."
        )
    server_calls = [i for i in calls if i >= k]
    if not server_calls:
        raise ValueError(f"{prefix} none of the server's decoder blocks ({k}..{num_layers - 1}) runs.")
    return server_calls


def _learn_blocks(split: SplitModel, trace: _Trace, first: int, ids: torch.Tensor) -> None:
    """What the split needs to know from the traced forward: the client's modules (those entered before the first
    server block), each block's output arity, and where batch and sequence sit in the hidden states."""
    layers = split.layers
    before_cut = trace.executed[: trace.first_call[first]]
    split._client_modules = list({id(m): m for m in before_cut if m is not layers[first]}.values())
    split._block_outputs = dict(trace.outputs)
    hidden = trace.inputs[first][trace.hidden_name(first)]
    if isinstance(hidden, torch.Tensor) and hidden.dim() >= 2:
        batch_dims = [d for d in range(hidden.dim() - 1) if hidden.shape[d] == ids.shape[0]]
        seq_dims = [d for d in range(hidden.dim() - 1) if hidden.shape[d] == ids.shape[1]]
        if batch_dims and seq_dims:
            split._batch_seq_dims = (batch_dims[0], seq_dims[0])


def _trace_split_forward(
    split: SplitModel, trace: _Trace, server_calls: list[int], ids: torch.Tensor, with_labels: bool, prefix: str
) -> tuple[dict[int, dict[str, Any]], dict]:
    """Runs client and server on the probe batch; what each server block received (before the injection) and the
    server's outputs."""
    received: dict[int, dict[str, Any]] = {}

    def record(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            received.setdefault(index, _call_inputs(module, args, kwargs))

        return hook

    try:
        cut = split.client(input_ids=ids, attention_mask=torch.ones_like(ids))
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"{prefix} the client part fails ({_brief(error)}).") from error
    # Registered before the server's injection hook: the first server block is recorded with the placeholder.
    handles = [split.layers[i].register_forward_pre_hook(record(i), with_kwargs=True) for i in server_calls]
    try:
        return received, _outputs(split.server(cut, labels=ids if with_labels else None))
    except Exception as error:  # noqa: BLE001
        lacking = [
            (i, name)
            for i in server_calls
            if i in received
            for name, value in trace.inputs[i].items()
            if _difference(value, received[i].get(name)) is None
        ]
        if lacking:
            raise ValueError(f"{_missing_reason(prefix, *lacking[0])} ({_brief(error)})") from error
        raise ValueError(
            f"{prefix} the server part cannot run from the cut activations alone ({_brief(error)}): the model's "
            "forward needs more than the hidden states at the cut, the attention mask and the positions."
        ) from error
    finally:
        for handle in handles:
            handle.remove()


def _compare(
    trace: _Trace, received: dict[int, dict[str, Any]], full: dict, server: dict, server_calls: list[int], prefix: str
) -> None:
    """Every input of every server block, then the logits and losses, against the unsplit forward."""
    first, hidden_name = server_calls[0], trace.hidden_name(server_calls[0])
    missing = []
    for index in server_calls:
        got = received.get(index, {})
        for name, reference in trace.inputs[index].items():
            if index == first and (name == hidden_name or name.startswith(hidden_name + "[")):
                continue  # replaced by the cut
            diff = _difference(reference, got.get(name))
            if diff is None:
                missing.append((index, name))
            elif diff:
                if missing:  # an input the server lacks changed what this block receives
                    raise ValueError(_missing_reason(prefix, *missing[0]))
                raise ValueError(
                    f"{prefix} decoder block {index} receives `{name}`, which differs when the client's blocks are "
                    f"skipped (max |diff| {diff:.3g}): the model passes state from block to block outside the hidden "
                    "states, or feeds its input embeddings to later blocks, and only the hidden states cross the cut."
                )
    diffs = {key: _difference(value, server.get(key)) for key, value in full.items()}
    diffs = {key: math.inf if diff is None else diff for key, diff in diffs.items()}
    if diffs.get("logits"):
        if missing:
            raise ValueError(_missing_reason(prefix, *missing[0]))
        raise ValueError(
            f"{prefix} the split logits differ from the model's (max |diff| {diffs['logits']:.3g}) although every "
            "server block receives the same inputs: the model's output depends on more than its last blocks (for "
            "example on the input embeddings or on the client blocks' outputs)."
        )
    if any(diffs.values()):
        raise ValueError(
            f"{prefix} the split logits are exact but the loss is not ({', '.join(k for k, v in diffs.items() if v)} "
            "differ): the model adds an auxiliary loss over all blocks, such as the router load-balancing loss of a "
            "mixture of experts, and the server sees only its own blocks. Set `config.output_router_logits=False` "
            "(or the auxiliary loss coefficient to 0) to split it."
        )


def _check_split(split: SplitModel, verify: bool) -> None:
    """Traces a full forward and a split forward of a probe batch, raises `ValueError` with the reason if the split
    cannot be exact, and sets what the split needs to know about the model's blocks."""
    lm, k, layers = split.model, split.split_layer, split.layers
    model_type = getattr(lm.config, "model_type", type(lm).__name__)
    prefix = f"Cannot split '{model_type}' ({type(lm).__name__}) at split_layer={k}:"
    split._token_pattern = model_type in _TOKEN_PATTERN_INPUTS
    ids = _probe_ids(lm)
    trace = _Trace(lm, layers)
    with _eval_mode(lm):
        full, with_labels = _trace_full_forward(lm, trace, ids, prefix)
        server_calls = _server_blocks(trace.calls, k, len(layers), prefix)
        _learn_blocks(split, trace, server_calls[0], ids)
        received, server = _trace_split_forward(split, trace, server_calls, ids, with_labels, prefix)
    _compare(trace, received, full, server, server_calls, prefix)
    if verify:
        _verify(split, prefix)


def _missing_reason(prefix: str, index: int, name: str) -> str:
    return (
        f"{prefix} decoder block {index} needs `{name}`, which the server does not get: the model hands it to its "
        "blocks besides the hidden states, and only the hidden states, the attention mask and the positions cross "
        "the cut."
    )


def _verify(split: SplitModel, prefix: str) -> None:
    """Split and unsplit logits on a padded random batch, compared on the real tokens."""
    lm = split.model
    ids, mask = _verify_batch(lm)
    with _eval_mode(lm):
        reference = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logits = split.server(split.client(input_ids=ids, attention_mask=mask)).logits
    real = mask.bool()
    diff = (logits.double() - reference.double())[real].abs().max().item()
    if not diff <= _tolerance(reference[real]):
        raise ValueError(
            f"{prefix} verify=True: the split logits differ from the model's on a padded batch (max |diff| "
            f"{diff:.3g} on real tokens)."
        )


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


def split_model(model: nn.Module, split_layer: int, verify: bool = False) -> SplitModel:
    """Splits a causal LM after decoder block `split_layer`.

    Tied input/output embeddings belong to the server. If they are trainable they are untied: the server trains
    the output embedding and the client keeps a frozen copy of the input embedding.

    The split is checked on a tiny probe batch (two rows of three tokens) before it is returned: every decoder
    block must run once per forward and in list order (skipped blocks are fine), every server block must receive
    the same inputs as in the unsplit forward, and the split logits and loss must be the model's. Models that loop
    over their blocks, carry state between blocks outside the hidden states, need the input ids on the server, or
    add an auxiliary loss over all blocks are refused with the reason.

    Args:
        model (`nn.Module`):
            A `transformers` `*ForCausalLM` model, or a peft `PeftModel` wrapping one.
        split_layer (`int`):
            Number of decoder blocks the client holds, in `1..num_layers-1`.
        verify (`bool`, *optional*, defaults to `False`):
            Also compare split and unsplit logits on a padded random batch (3 rows of 7 tokens, left and right
            padding; the tokens come from a seeded generator) and raise if they differ. Costs two more forwards.

    Returns:
        [`SplitModel`]: `client` and `server` callables that share the model's modules.

    Raises:
        `ValueError`: if `split_layer` is out of range, the architecture has no detectable block list, or the split
            cannot be exact for this model (the message names the model type and the reason).

    Example:

    ```python
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hosfl_hf import split_model
    >>> config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
    ...                      num_attention_heads=2, num_key_value_heads=1)
    >>> model = LlamaForCausalLM(config).eval()
    >>> parts = split_model(model, split_layer=2, verify=True)
    >>> ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
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
    layers_path, layers = find_layers(lm)
    num_layers = len(layers)
    if isinstance(split_layer, bool) or not isinstance(split_layer, int) or not 1 <= split_layer <= num_layers - 1:
        raise ValueError(
            f"split_layer={split_layer!r} is invalid for this {num_layers}-layer model: it must be an integer in "
            f"1..{num_layers - 1} (the number of decoder blocks the client holds)."
        )
    split = SplitModel(model=lm, split_layer=split_layer, layers_path=layers_path)
    keep_4bit_layers_differentiable(lm)  # before the check's eval forward, which would repack them
    _check_split(split, verify)
    client, shared = _partition(split)
    params = dict(lm.named_parameters(remove_duplicate=False))
    trainable_shared = [n for n in shared if params[n].requires_grad]
    if trainable_shared:
        _untie(lm, trainable_shared)
        client, shared = _partition(split)
    split.client_parameter_names = [n for n in client if n not in set(shared)]
    client_set = set(client)
    split.server_parameter_names = [n for n, _ in lm.named_parameters() if n not in client_set or n in shared]
    return split
