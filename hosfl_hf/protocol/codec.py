"""Bytes for the round's messages, exact and safe: a safetensors buffer whose metadata holds the small fields.

Tensors keep their dtype bit for bit (fp32, fp16, bf16, integer masks and labels); floats in the metadata are
written with Python's shortest round-trip repr, so scalars and learning rates come back identical. Nothing received
is ever unpickled or evaluated: safetensors holds raw tensor bytes and a JSON header.

[`decode`] validates before anything is used, and raises [`MessageError`] naming the field: the message kind and
format version, the round id, the client id, tensor ranks, shapes and dtypes, finite values, and the number of
scalars per seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Collection
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .messages import (
    MESSAGE_TYPES,
    CatchUp,
    ClientBatch,
    ClientCheckpoint,
    ClientForward,
    ClientGradient,
    ClientUpdate,
    Cotangent,
    GradientUpdate,
    PerturbedCuts,
    ProbeReply,
    RoundPlan,
    WeightsUpdate,
)

__all__ = ["FORMAT_VERSION", "MessageError", "decode", "encode", "message_header"]

FORMAT_VERSION = 2  # 2: CatchUp carries `after` and an optional client checkpoint
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32, torch.bool)
IGNORE_INDEX = -100
_KINDS = {cls: kind for kind, cls in MESSAGE_TYPES.items()}


class MessageError(ValueError):
    """A received message is malformed or does not belong here; nothing of it was applied."""


def encode(message: Any) -> bytes:
    """The bytes of one message (any type of [`hosfl_hf.protocol.messages`])."""
    kind = _KINDS.get(type(message))
    if kind is None:
        raise TypeError(f"Not a protocol message: {type(message).__name__}.")
    tensors, fields = {}, {}
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        if isinstance(value, torch.Tensor):
            tensors[f.name] = value.detach().cpu().contiguous()
        elif isinstance(message, CatchUp) and f.name == "rounds":
            fields[f.name] = [dataclasses.asdict(r) for r in value]
        elif isinstance(message, CatchUp) and f.name == "checkpoint":
            if value is not None:  # its tensors in the safetensors body, the rest in the JSON header
                fields[f.name] = {"round": value.round, "optimizer": value.optimizer}
                for group in ("parameters", "optimizer_tensors"):
                    for name, tensor in getattr(value, group).items():
                        tensors[f"checkpoint.{group}/{name}"] = tensor.detach().cpu().contiguous()
        else:
            fields[f.name] = value
    header = {"kind": kind, "version": FORMAT_VERSION, "fields": fields}
    return save_tensors(tensors, metadata={"hosfl": json.dumps(header)})


def message_header(data: bytes) -> dict[str, Any]:
    """The JSON header of an encoded message (`kind`, `version`, `fields`), unvalidated."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8 : 8 + length])["__metadata__"]
        return json.loads(metadata["hosfl"])
    except Exception as error:  # any parse failure means the same thing to the receiver
        raise MessageError(f"Not an hosfl_hf protocol message ({type(error).__name__}: {error}).") from None


def decode(
    data: bytes,
    expected: type,
    *,
    round: int | None = None,
    clients: Collection[int] | None = None,
    num_perturbations: int | None = None,
    hidden_size: int | None = None,
    shape: tuple[int, ...] | None = None,
    num_labels: int | None = None,
) -> Any:
    """Decodes and validates one message.

    Args:
        data: the bytes from [`encode`].
        expected: the message type this leg carries.
        round: the round the receiver is in (checked where the message carries a round).
        clients: the client ids allowed to send or receive it (the round's sampled clients).
        num_perturbations: `P` (seeds in a plan, scalars in a reply or update).
        hidden_size: the model's hidden size (last dimension of the cut).
        shape: the exact shape of a cotangent (that of the client's cut).
        num_labels: labels of a cut must lie in `[0, num_labels)` or be `-100` (ignored): the vocabulary size of a
            causal-LM task, the number of classes of a classification loss.

    Raises:
        [`MessageError`]: naming the field that is wrong; the message must then be dropped.
    """
    header = message_header(data)
    kind = _KINDS.get(expected)
    if header.get("kind") != kind:
        raise MessageError(f"Field 'kind': expected a {kind!r} message, got {header.get('kind')!r}.")
    if header.get("version") != FORMAT_VERSION:
        raise MessageError(f"Field 'version': format {header.get('version')!r}, this hosfl_hf reads {FORMAT_VERSION}.")
    try:
        tensors = load_tensors(data)
    except Exception as error:
        raise MessageError(f"Tensor payload: {error}.") from None
    fields = dict(header.get("fields", {}))
    names = {f.name for f in dataclasses.fields(expected)}
    checkpoint_tensors = {k: v for k, v in tensors.items() if expected is CatchUp and k.startswith("checkpoint.")}
    unknown = (set(fields) | set(tensors) - set(checkpoint_tensors)) - names
    if unknown:
        raise MessageError(f"Unknown fields {sorted(unknown)} in a {kind!r} message.")
    if expected is CatchUp:
        return _decode_catchup(fields, checkpoint_tensors, num_perturbations)
    try:
        message = expected(**fields, **tensors)
    except TypeError as error:
        raise MessageError(f"Missing fields in a {kind!r} message: {error}.") from None
    where = f"{kind} message"
    if "round" in names:
        _check_int(message.round, "round", where)
        if round is not None and message.round != round:
            raise MessageError(f"Field 'round' of a {where}: {message.round}, but the current round is {round}.")
    if "client" in names:
        _check_int(message.client, "client", where)
        if clients is not None and message.client not in clients:
            raise MessageError(
                f"Field 'client' of a {where}: client {message.client} is not one of {sorted(clients)}."
            )
        where = f"{kind} message of client {message.client}, round {message.round}"
    VALIDATORS[expected](
        message,
        where,
        num_perturbations=num_perturbations,
        hidden_size=hidden_size,
        shape=shape,
        num_labels=num_labels,
    )
    return message


def _decode_catchup(fields: dict[str, Any], tensors: dict[str, torch.Tensor], num_perturbations: int | None):
    try:
        rounds = [_validate_update(ClientUpdate(**r), num_perturbations) for r in fields.get("rounds", [])]
    except TypeError as error:
        raise MessageError(f"Field 'rounds' of a catchup message: {error}.") from None
    after = fields.get("after", -1)
    if not isinstance(after, int) or isinstance(after, bool) or after < -1:
        raise MessageError(f"Field 'after' of a catchup message: {after!r} is not a round id (>= -1).")
    ids = [r.round for r in rounds]
    if ids != sorted(set(ids)) or (ids and ids[0] <= after):
        raise MessageError(f"Field 'rounds': round ids {ids} are not strictly increasing after round {after}.")
    checkpoint = None
    if fields.get("checkpoint") is not None:
        record = fields["checkpoint"]
        if (
            not isinstance(record, dict)
            or record.get("round") != after
            or not isinstance(record.get("optimizer"), dict)
        ):
            raise MessageError(f"Field 'checkpoint' of a catchup message: must be the client state at round {after}.")
        groups: dict[str, dict[str, torch.Tensor]] = {"parameters": {}, "optimizer_tensors": {}}
        for key, tensor in tensors.items():
            group, _, name = key.removeprefix("checkpoint.").partition("/")
            if group not in groups or not name:
                raise MessageError(f"Field 'checkpoint' of a catchup message: unknown tensor {key!r}.")
            if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
                raise MessageError(f"Field 'checkpoint' of a catchup message: non-finite values in {key!r}.")
            groups[group][name] = tensor
        if not groups["parameters"]:
            raise MessageError("Field 'checkpoint' of a catchup message: no parameters.")
        checkpoint = ClientCheckpoint(round=after, optimizer=record["optimizer"], **groups)
    elif tensors:
        raise MessageError("Field 'checkpoint' of a catchup message: tensors without a checkpoint record.")
    return CatchUp(rounds=rounds, after=after, checkpoint=checkpoint)


def _check_int(value: Any, name: str, where: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MessageError(f"Field {name!r} of a {where}: {value!r} is not a non-negative integer.")


def _check_scalars(values: Any, name: str, where: str, count: int | None) -> None:
    if not isinstance(values, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    ):
        raise MessageError(f"Field {name!r} of a {where}: expected a list of numbers.")
    if count is not None and len(values) != count:
        raise MessageError(f"Field {name!r} of a {where}: {len(values)} values, expected {count} (one per seed).")
    if not values:
        raise MessageError(f"Field {name!r} of a {where}: empty.")
    if not all(math.isfinite(v) for v in values):
        raise MessageError(f"Field {name!r} of a {where}: non-finite values {values}.")


def _check_tensor(
    tensor: torch.Tensor | None, name: str, where: str, dtypes: tuple, ndim: int, finite: bool = False
) -> None:
    if tensor is None:
        return
    if tensor.dtype not in dtypes:
        raise MessageError(f"Field {name!r} of a {where}: dtype {tensor.dtype}, expected one of {list(dtypes)}.")
    if tensor.dim() != ndim:
        raise MessageError(
            f"Field {name!r} of a {where}: {tensor.dim()} dimensions {tuple(tensor.shape)}, expected {ndim}."
        )
    if finite and not bool(torch.isfinite(tensor).all()):
        raise MessageError(f"Field {name!r} of a {where}: non-finite values.")


def _validate_plan(message: RoundPlan, where: str, num_perturbations: int | None, **_: Any) -> None:
    if not message.clients or len(set(message.clients)) != len(message.clients):
        raise MessageError(f"Field 'clients' of a {where}: {message.clients} must be distinct client ids.")
    for client in message.clients:
        _check_int(client, "clients", where)
    if num_perturbations is not None and len(message.seeds) != num_perturbations:
        raise MessageError(f"Field 'seeds' of a {where}: {len(message.seeds)} seeds, expected {num_perturbations}.")
    if not message.seeds or not all(isinstance(s, int) and 0 <= s < 2**63 for s in message.seeds):
        raise MessageError(f"Field 'seeds' of a {where}: {message.seeds} must be integers in [0, 2**63).")


def _validate_cut(
    message: ClientForward, where: str, hidden_size: int | None, num_labels: int | None = None, **_: Any
) -> None:
    _check_tensor(message.hidden_states, "hidden_states", where, FLOAT_DTYPES, 3, finite=True)
    batch, length = message.hidden_states.shape[:2]
    if hidden_size is not None and message.hidden_states.shape[-1] != hidden_size:
        raise MessageError(
            f"Field 'hidden_states' of a {where}: hidden size {message.hidden_states.shape[-1]}, expected "
            f"{hidden_size}."
        )
    for name in ("attention_mask", "position_ids"):
        tensor = getattr(message, name)
        _check_tensor(tensor, name, where, INDEX_DTYPES, 2)
        if tensor is not None and tuple(tensor.shape) != (batch, length):
            raise MessageError(
                f"Field {name!r} of a {where}: shape {tuple(tensor.shape)}, expected {(batch, length)}."
            )
    labels = message.labels  # per token (causal LM) or per example (a class id, e.g. verbalizer tasks)
    if labels is not None:
        _check_tensor(labels, "labels", where, INDEX_DTYPES[:2], labels.dim())
        if tuple(labels.shape) not in ((batch, length), (batch,)):
            raise MessageError(
                f"Field 'labels' of a {where}: shape {tuple(labels.shape)}, expected {(batch, length)} or {(batch,)}."
            )
        if num_labels is not None:
            bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= num_labels))
            if bool(bad.any()):
                raise MessageError(
                    f"Field 'labels' of a {where}: values {sorted(set(labels[bad].tolist()))[:5]} outside the task's "
                    f"labels [0, {num_labels}) (and {IGNORE_INDEX}, ignored)."
                )


def _validate_perturbed_cuts(message: PerturbedCuts, where: str, hidden_size: int | None, **kwargs: Any) -> None:
    _check_tensor(message.hidden_states, "hidden_states", where, FLOAT_DTYPES, 4, finite=True)
    if message.hidden_states.shape[0] % 2:
        raise MessageError(f"Field 'hidden_states' of a {where}: {message.hidden_states.shape[0]} cuts, not pairs.")
    _validate_cut(message.cut(0), where, hidden_size, **kwargs)  # each cut, masks and labels as a cut's


def _validate_batch(message: ClientBatch, where: str, num_labels: int | None = None, **_: Any) -> None:
    _check_tensor(message.input_ids, "input_ids", where, INDEX_DTYPES[:2], 2)
    shape = tuple(message.input_ids.shape)
    for name in ("attention_mask", "position_ids", "labels"):
        tensor = getattr(message, name)
        _check_tensor(tensor, name, where, INDEX_DTYPES, tensor.dim() if tensor is not None else 0)
        if tensor is not None and tuple(tensor.shape) not in (shape, shape[:1]):
            raise MessageError(f"Field {name!r} of a {where}: shape {tuple(tensor.shape)}, expected {shape}.")


def _validate_cotangent(message: Cotangent, where: str, shape: tuple[int, ...] | None, **_: Any) -> None:
    _check_tensor(message.cotangent, "cotangent", where, FLOAT_DTYPES, 3, finite=True)
    if shape is not None and tuple(message.cotangent.shape) != tuple(shape):
        raise MessageError(
            f"Field 'cotangent' of a {where}: shape {tuple(message.cotangent.shape)}, expected {shape}."
        )


def _validate_reply(message: ProbeReply, where: str, num_perturbations: int | None, **_: Any) -> None:
    _check_scalars(message.scalars, "scalars", where, num_perturbations)


def _validate_update(message: ClientUpdate, num_perturbations: int | None, where: str | None = None, **_: Any):
    where = where or f"update message of round {message.round}"
    _check_int(message.round, "round", where)
    _check_scalars(message.scalars, "scalars", where, num_perturbations)
    if len(message.seeds) != len(message.scalars):
        raise MessageError(
            f"Field 'seeds' of a {where}: {len(message.seeds)} seeds for {len(message.scalars)} scalars."
        )
    if not (isinstance(message.lr, (int, float)) and math.isfinite(message.lr) and message.lr >= 0):
        raise MessageError(f"Field 'lr' of a {where}: {message.lr!r} must be a finite number >= 0.")
    return message


def _validate_gradient(message: Any, where: str, shape: tuple[int, ...] | None, **_: Any) -> None:
    name = "weights" if isinstance(message, WeightsUpdate) else "gradient"
    _check_tensor(getattr(message, name), name, where, (torch.float32,), 1, finite=True)
    loss = getattr(message, "loss", None)
    if loss is not None and not (isinstance(loss, (int, float)) and math.isfinite(loss)):
        raise MessageError(f"Field 'loss' of a {where}: {loss!r} is not a finite number.")
    if shape is not None and tuple(getattr(message, name).shape) != tuple(shape):
        raise MessageError(
            f"Field {name!r} of a {where}: shape {tuple(getattr(message, name).shape)}, expected {shape}."
        )


def _validate_gradient_update(message: Any, where: str, shape: tuple[int, ...] | None, **_: Any) -> None:
    where = f"{type(message).__name__} message of round {message.round}"
    _check_int(message.round, "round", where)
    _validate_gradient(message, where, shape)
    if not (isinstance(message.lr, (int, float)) and math.isfinite(message.lr) and message.lr >= 0):
        raise MessageError(f"Field 'lr' of a {where}: {message.lr!r} must be a finite number >= 0.")


VALIDATORS = {
    RoundPlan: _validate_plan,
    ClientForward: _validate_cut,
    Cotangent: _validate_cotangent,
    ProbeReply: _validate_reply,
    ClientGradient: _validate_gradient,
    PerturbedCuts: _validate_perturbed_cuts,
    ClientBatch: _validate_batch,
    GradientUpdate: _validate_gradient_update,
    WeightsUpdate: _validate_gradient_update,
    ClientUpdate: lambda message, where, num_perturbations=None, **_: _validate_update(
        message, num_perturbations, where
    ),
}
