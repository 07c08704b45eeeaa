"""Strict copies of named tensors between two representations of the same weights.

The same weights go by different names in different places: a peft-wrapped model (`base_model.model.` prefix) and
the causal LM it wraps, a client part and the whole model, a checkpoint file and the live model, a Flower record and
a model. A copy by name that silently matches nothing is how trained weights get lost, so every such copy goes
through [`copy_named_tensors`]: a name that does not match, a shape that differs, or an empty copy raises, naming
the names; the number of tensors written is returned.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

__all__ = ["copy_named_tensors", "require_same_names"]


def _preview(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return f"{names[:limit]}{more}"


def require_same_names(found: Iterable[str], expected: Iterable[str], what: str) -> None:
    """Raises `ValueError` unless `found` and `expected` hold the same names (both differences are named)."""
    found, expected = set(found), set(expected)
    if found == expected:
        return
    problems = []
    if expected - found:
        problems.append(f"missing {_preview(expected - found)}")
    if found - expected:
        problems.append(f"unexpected {_preview(found - expected)}")
    raise ValueError(f"{what}: the names do not match ({'; '.join(problems)}).")


def copy_named_tensors(
    source: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    target: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    what: str,
    partial_target: bool = False,
) -> int:
    """Copies every tensor of `source` into the tensor of the same name in `target` (in place, without autograd).

    Args:
        source: name -> tensor (a mapping, or `named_parameters()`-style pairs).
        target: name -> tensor to overwrite.
        what (`str`): what is copied where, for the error message (e.g. "the server's trained weights into the
            saved model").
        partial_target (`bool`, *optional*, defaults to `False`): `target` may hold names `source` has not (e.g. the
            whole model receiving one part's weights); every `source` name must still be in `target`.

    Returns:
        `int`: the number of tensors written (never 0).

    Raises:
        `ValueError`: on a `source` name missing from `target`, a `target` name missing from `source` (unless
            `partial_target`), a shape mismatch, or an empty `source`: every case names the tensors.
    """
    source, target = dict(source), dict(target)
    if not source:
        raise ValueError(f"{what}: nothing to copy (the source holds no tensors).")
    if partial_target:
        unknown = set(source) - set(target)
        if unknown:
            raise ValueError(
                f"{what}: {len(unknown)} of {len(source)} tensors have no counterpart of the same name "
                f"{_preview(unknown)}; the target has e.g. {_preview(target)}. The two sides name the weights "
                "differently (e.g. a peft-wrapped model and the model it wraps)."
            )
    else:
        require_same_names(source, target, what)
    shapes = [n for n, value in source.items() if tuple(value.shape) != tuple(target[n].shape)]
    if shapes:
        n = shapes[0]
        raise ValueError(
            f"{what}: {len(shapes)} tensors differ in shape, e.g. {n}: {tuple(source[n].shape)} into "
            f"{tuple(target[n].shape)}."
        )
    with torch.no_grad():
        for name, value in source.items():
            target[name].copy_(value.to(device=target[name].device, dtype=target[name].dtype))
    return len(source)
