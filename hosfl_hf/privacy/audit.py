"""The privacy audit: the server's attacks on the cut activations it receives, and what they recover.

Threat model: an honest-but-curious server. It receives every sampled client's cut (the hidden states after
`split_layer` blocks, with the attention mask and positions) and labels, and it knows the client part exactly: the
base model is public, and the client update is a function of seeds and scalars that the server itself aggregates.
Knowing a defense's parameters (not its secret noise seed), it trains its attacks against that defense.

Two attacks, both built from what that server has:

- [`LinearInversion`] (learned): ridge regressions from a token's cut activation (divided by its RMS) to its input
  embedding (decoded by nearest neighbour, cosine) and to the token (least squares on one-hot targets), fitted on
  public text run through the known client part (through the defense too, with the attacker's own noise).
- [`white_box_search`] (exact): a causal client part makes position `t` depend on tokens `<= t` only, so the server
  recovers a sentence token by token: each candidate token (the whole vocabulary, or the learned inversion's top
  `k`) is appended to the recovered prefix, run through the known client part (one cached step), and the candidate
  whose activation at `t` is nearest to the received one wins. Without noise and with the right token among the
  candidates it is exact.

[`audit_privacy`] runs both on the user's own token sequences and returns a [`PrivacyAudit`].
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..split import split_model
from .defense import CutDefense

__all__ = ["LinearInversion", "PrivacyAudit", "audit_privacy", "cut_tokens", "white_box_search"]

# The attacker's own noise seed when it trains against a defense (any seed other than the client's secret).
ATTACKER_SECRET = 0x5EED


def _pad_left(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, length - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, length - len(seq) :] = 1
    return ids, mask


def _batches(sequences: Sequence[Sequence[int]], batch_size: int) -> list[list[Sequence[int]]]:
    return [list(sequences[i : i + batch_size]) for i in range(0, len(sequences), batch_size)]


@torch.no_grad()
def cut_tokens(
    split: Any,
    sequences: Sequence[Sequence[int]],
    defense: CutDefense | None = None,
    batch_size: int = 16,
    pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cut activation of every token of `sequences` (left-padded batches, as the classification collator sends
    them), after `defense` when given: `(features (N, hidden_size) float32, tokens (N,) long)`, pads left out."""
    feats, toks = [], []
    for index, batch in enumerate(_batches(sequences, batch_size)):
        ids, mask = _pad_left(batch, pad_id)
        hidden = split.client(input_ids=ids, attention_mask=mask).hidden_states.float()
        if defense is not None and defense.active:
            hidden = defense.release(hidden, round_index=index, client=0).float()
        valid = mask.bool()
        feats.append(hidden[valid])
        toks.append(ids[valid])
    return torch.cat(feats), torch.cat(toks)


def _features(hidden: torch.Tensor) -> torch.Tensor:
    """A token's activation divided by its RMS, plus a constant 1 (float64)."""
    hidden = hidden.double()
    rms = hidden.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)
    return torch.cat([hidden / rms, torch.ones_like(hidden[..., :1])], dim=-1)


@dataclass
class LinearInversion:
    """The learned attack: two ridge regressions from a token's cut activation (over its RMS).

    Attributes:
        token_weight (`torch.Tensor` of shape `(hidden_size + 1, vocab_size)`): least squares onto one-hot tokens.
        embed_weight (`torch.Tensor` of shape `(hidden_size + 1, embed_dim)`): least squares onto the token's input
            embedding (reaches tokens never seen in the public text).
        embeddings (`torch.Tensor` of shape `(vocab_size, embed_dim)`): the unit-norm input embeddings.
    """

    token_weight: torch.Tensor
    embed_weight: torch.Tensor
    embeddings: torch.Tensor

    @classmethod
    def fit(
        cls, hidden: torch.Tensor, tokens: torch.Tensor, embeddings: torch.Tensor, ridge: float = 1e-3
    ) -> LinearInversion:
        """Fits both maps in closed form (one shared solve).

        Args:
            hidden (`torch.Tensor` of shape `(N, hidden_size)`): public tokens' cut activations (as the server
                receives them: through the defense).
            tokens (`torch.Tensor` of shape `(N,)`): their token ids.
            embeddings (`torch.Tensor` of shape `(vocab_size, embed_dim)`): the model's input embeddings.
            ridge (`float`): the ridge penalty, relative to the mean diagonal of `X^T X`.
        """
        x = _features(hidden)
        vocab = embeddings.shape[0]
        gram = x.T @ x
        gram += torch.eye(gram.shape[0], dtype=gram.dtype) * ridge * gram.diagonal().mean()
        # One-hot targets of tokens absent from the public text have zero weights: solve for the present ones only.
        present, index = tokens.unique(return_inverse=True)
        onehot_target = torch.zeros(x.shape[1], len(present), dtype=torch.float64).index_add_(1, index, x.T)
        embed_target = x.T @ embeddings.double()[tokens]
        solution = torch.linalg.solve(gram, torch.cat([onehot_target, embed_target], dim=1))
        token_weight = torch.zeros(x.shape[1], vocab)
        token_weight[:, present] = solution[:, : len(present)].float()
        unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)
        return cls(token_weight, solution[:, len(present) :].float(), unit)

    @torch.no_grad()
    def candidates(self, hidden: torch.Tensor, k: int = 1, chunk: int = 1024) -> torch.Tensor:
        """The `k` most likely tokens of each activation, best first: `(N, k)`. The embedding map's nearest
        neighbours come first (it generalises to tokens the public text lacks: 93 % top-1 against 50 % for the
        one-hot map on SmolLM2 at split 1), the last quarter of the list is the one-hot map's best tokens not yet
        listed."""
        out = []
        vocab = self.embeddings.shape[0]
        k = min(k, vocab)
        for start in range(0, hidden.shape[0], chunk):
            x = _features(hidden[start : start + chunk]).float()
            embed = torch.nn.functional.normalize(x @ self.embed_weight, dim=-1) @ self.embeddings.T
            embed_rank = embed.topk(k, dim=-1).indices
            if k == 1:
                out.append(embed_rank)
                continue
            token_rank = (x @ self.token_weight).topk(k, dim=-1).indices
            out.append(_merge(embed_rank, token_rank, k - k // 4, k))
        return torch.cat(out)


def _merge(first: torch.Tensor, second: torch.Tensor, keep: int, k: int) -> torch.Tensor:
    """Per row: the first `keep` of `first`, then `second`'s and `first`'s next entries not yet listed, up to `k`."""
    rows = []
    for a, b in zip(first.tolist(), second.tolist()):
        seen = dict.fromkeys(a[:keep])
        for token in b + a[keep:]:
            if len(seen) == k:
                break
            seen.setdefault(token)
        rows.append(list(seen))
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def _cached_step(
    split: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any, position_ids: torch.Tensor | None
) -> torch.Tensor:
    """Runs the client part on new tokens over a KV cache of the prefix; returns the cut at the new tokens."""
    cut = split.client(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True
    )
    return cut.hidden_states


@torch.no_grad()
def white_box_search(
    split: Any,
    observed: torch.Tensor,
    attention_mask: torch.Tensor,
    candidates: torch.Tensor | None = None,
    defense: CutDefense | None = None,
    position_ids: torch.Tensor | None = None,
    pad_id: int = 0,
) -> torch.Tensor:
    """The exact attack: recovers each row's tokens position by position through the known client part.

    Args:
        split ([`SplitModel`]): the client part the server knows (the model at the client's weights).
        observed (`torch.Tensor` of shape `(batch_size, seq_len, hidden_size)`): the received cut.
        attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`): the received mask (1 = token).
        candidates (`torch.Tensor` of shape `(batch_size, seq_len, k)`, *optional*): the tokens tried at each
            position, e.g. [`LinearInversion.candidates`]; `None` tries the whole vocabulary.
        defense ([`CutDefense`], *optional*): its clipping is applied to the candidates' activations.
        position_ids (`torch.Tensor`, *optional*): the received positions, if the client sent any.
        pad_id (`int`): the token put at padded positions (they are masked: any id works).

    Returns:
        `torch.Tensor` of shape `(batch_size, seq_len)`: the recovered ids (`pad_id` at padded positions).
    """
    from transformers import DynamicCache

    vocab = split.model.get_input_embeddings().num_embeddings
    recovered = torch.full(attention_mask.shape, pad_id, dtype=torch.long)
    for row in range(observed.shape[0]):
        mask = attention_mask[row].long()
        cache = DynamicCache()
        pending = 0  # padded positions not run yet (they go with the next token)
        done = 0  # positions in the cache
        for t in range(mask.shape[0]):
            if not mask[t]:
                pending += 1
                continue
            tried = torch.arange(vocab) if candidates is None else candidates[row, t]
            target = observed[row, t].float()
            positions = None if position_ids is None else position_ids[row, done : t + 1]
            best, cache = _search_position(
                split, cache, tried, pending, mask[: t + 1], positions, target, defense, pad_id
            )
            recovered[row, t] = best
            pending, done = 0, t + 1
    return recovered


# Candidates are tried in these stages: a stage whose best candidate matches the received activation to this relative
# distance ends the search (without noise the right token matches to rounding error; with noise no stage ends it).
STAGES = (1, 4, 16)
EXACT = 1e-4
CHUNK = 256  # candidates per forward after the stages (a whole vocabulary)


def _search_position(
    split: Any,
    cache: Any,
    tried: torch.Tensor,
    pending: int,
    mask: torch.Tensor,
    positions: torch.Tensor | None,
    target: torch.Tensor,
    defense: CutDefense | None,
    pad_id: int = 0,
) -> tuple[int, Any]:
    """The nearest candidate at one position, and the cache extended by it."""
    best_token, best_distance, best_cache = -1, math.inf, None
    exact = defense is None or defense.noise == 0  # with noise no candidate matches exactly: no stages
    stages = [b for b in STAGES if b < len(tried)] if exact else []
    bounds = stages + list(range((stages[-1] if stages else 0) + CHUNK, len(tried), CHUNK)) + [len(tried)]
    start = 0
    for stop in bounds:
        chunk = tried[start:stop]
        k = chunk.shape[0]
        new = torch.full((k, pending + 1), pad_id, dtype=torch.long)
        new[:, -1] = chunk
        step_cache = _repeat(cache, k)
        step_positions = None if positions is None else positions.expand(k, -1)
        hidden = _cached_step(split, new, mask.expand(k, -1), step_cache, step_positions)[:, -1].float()
        if defense is not None:
            hidden = defense.clip(hidden)
        distance = (hidden - target).pow(2).sum(-1).sqrt()
        index = int(distance.argmin())
        if float(distance[index]) < best_distance:
            best_token, best_distance = int(chunk[index]), float(distance[index])
            step_cache.batch_select_indices(torch.tensor([index]))
            best_cache = step_cache
        if best_distance <= EXACT * float(target.norm()):
            break
        start = stop
    return best_token, best_cache


def _repeat(cache: Any, k: int) -> Any:
    """A copy of a batch-1 cache repeated `k` times (the original is kept for the next step)."""
    import copy

    repeated = copy.deepcopy(cache)
    if repeated.get_seq_length() > 0:
        repeated.batch_repeat_interleave(k)
    return repeated


@dataclass
class PrivacyAudit:
    """What the server's attacks recovered from one client configuration (split layer and defense).

    Attributes:
        split_layer, noise, clip_norm: the configuration attacked.
        num_sentences, num_tokens: the private sample (non-padding tokens).
        learned_top1: share of tokens the learned inversion's first guess (embedding map) recovers.
        learned_topk: share of tokens among its `top_k` candidates (what the white-box search can reach).
        white_box_top1: share of tokens the white-box search recovers (`None` if not run).
        learned_sentences, white_box_sentences: share of sentences recovered whole.
        labels: what the labels expose (they travel in clear): `in_clear`, `num_labels`, `recovered` (the share the
            server reads: 1.0 in clear), `majority_share` (what guessing the most frequent label would give).
        seconds: wall time of each stage (`fit`, `learned`, `white_box`).
        top_k, public_tokens: the attack's budget: candidates per position, public tokens it was fitted on.
    """

    split_layer: int
    noise: float
    clip_norm: float | None
    num_sentences: int
    num_tokens: int
    learned_top1: float
    learned_topk: float
    white_box_top1: float | None
    learned_sentences: float
    white_box_sentences: float | None
    top_k: int
    public_tokens: int
    labels: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def markdown_header() -> str:
        return (
            "| split | noise | clip | tokens | learned top-1 | learned top-k | white-box | whole sentences (white-box)"
            " |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
        )

    def markdown_row(self) -> str:
        def pct(value: float | None) -> str:
            return "-" if value is None else f"{100 * value:.1f} %"

        clip = "-" if self.clip_norm is None else f"{self.clip_norm:g}"
        return (
            f"| {self.split_layer} | {self.noise:g} | {clip} | {self.num_tokens} | {pct(self.learned_top1)} | "
            f"{pct(self.learned_topk)} (k={self.top_k}) | {pct(self.white_box_top1)} | "
            f"{pct(self.white_box_sentences)} |"
        )


def _label_exposure(labels: Sequence[Any] | None) -> dict[str, Any]:
    if labels is None:
        return {"in_clear": True, "num_labels": 0}
    values = [tuple(v) if isinstance(v, (list, tuple)) else v for v in labels]
    counts: dict[Any, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    majority = max(counts.values()) / len(values) if values else 0.0
    return {"in_clear": True, "num_labels": len(values), "recovered": 1.0, "majority_share": majority}


def audit_privacy(
    model: nn.Module,
    split_layer: int,
    private: Sequence[Sequence[int]],
    public: Sequence[Sequence[int]],
    defense: CutDefense | None = None,
    labels: Sequence[Any] | None = None,
    top_k: int = 32,
    white_box: bool = True,
    ridge: float = 1e-3,
    batch_size: int = 16,
    pad_id: int = 0,
) -> PrivacyAudit:
    """Plays the honest-but-curious server against one client configuration and measures what it recovers.

    The client's cut of each private sequence (left-padded batches of `batch_size`) goes through `defense` with a
    secret the attacker does not know; the attacker fits [`LinearInversion`] on `public` run through the known client
    part and the same defense (its own noise), ranks `top_k` candidates per position, and runs
    [`white_box_search`] over them.

    Args:
        model (`nn.Module`): the causal LM at the client's weights (what the server knows). It is put in eval mode and
            split as [`split_model`] does (trainable tied embeddings are untied); its weights are not changed.
        split_layer (`int`): the blocks the client holds.
        private (`Sequence[Sequence[int]]`): the user's token sequences (what training would send).
        public (`Sequence[Sequence[int]]`): public token sequences the attacker trains on.
        defense ([`CutDefense`], *optional*): the client's defense.
        labels (`Sequence`, *optional*): the private labels (reported as exposed: they travel in clear).
        top_k (`int`): candidates per position for the white-box search (`0`: the whole vocabulary).
        white_box (`bool`): run the white-box search (it costs one cached client step per token and candidate).
        ridge (`float`): the inversion's ridge penalty.
        batch_size (`int`), pad_id (`int`): how the private and public sequences are batched.

    Returns:
        [`PrivacyAudit`]
    """
    if not private or not public:
        raise ValueError("audit_privacy needs private and public token sequences (both non-empty).")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} is invalid: use an integer >= 1, or 0 for the whole vocabulary.")
    defense = defense if defense is not None and defense.active else None
    model.eval()
    split = split_model(model, split_layer)
    embeddings = split.model.get_input_embeddings().weight.detach()
    vocab = embeddings.shape[0]
    k = vocab if top_k == 0 else min(top_k, vocab)
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    attacker = _with_secret(defense, ATTACKER_SECRET)
    public_hidden, public_tokens = cut_tokens(split, public, attacker, batch_size, pad_id)
    inversion = LinearInversion.fit(public_hidden, public_tokens, embeddings, ridge)
    seconds["fit"] = time.perf_counter() - start

    victim = _with_secret(defense, None)  # a fresh OS-entropy secret: unknown to the attacker
    learned_hits = topk_hits = white_hits = 0
    learned_whole = white_whole = 0
    seconds["learned"] = seconds["white_box"] = 0.0
    for index, batch in enumerate(_batches(private, batch_size)):
        ids, mask = _pad_left(batch, pad_id)
        with torch.no_grad():
            hidden = split.client(input_ids=ids, attention_mask=mask).hidden_states
            if victim is not None:
                hidden = victim.release(hidden, index, 0)
        valid = mask.bool()
        start = time.perf_counter()
        ranked = inversion.candidates(hidden[valid].float(), k=1 if top_k == 0 else k)
        seconds["learned"] += time.perf_counter() - start
        first = torch.full(ids.shape, -1, dtype=torch.long)
        first[valid] = ranked[:, 0]
        learned_hits += int((first == ids)[valid].sum())
        topk_hits += int((ranked == ids[valid][:, None]).any(-1).sum()) if top_k else int(valid.sum())
        learned_whole += int(((first == ids) | ~valid).all(-1).sum())
        if white_box:
            candidates = None
            if top_k:
                candidates = torch.zeros((*ids.shape, k), dtype=torch.long)
                candidates[valid] = ranked
            start = time.perf_counter()
            found = white_box_search(split, hidden, mask, candidates, defense, pad_id=pad_id)
            seconds["white_box"] += time.perf_counter() - start
            white_hits += int((found == ids)[valid].sum())
            white_whole += int(((found == ids) | ~valid).all(-1).sum())
    tokens = sum(len(s) for s in private)
    return PrivacyAudit(
        split_layer=split_layer,
        noise=defense.noise if defense is not None else 0.0,
        clip_norm=defense.clip_norm if defense is not None else None,
        num_sentences=len(private),
        num_tokens=tokens,
        learned_top1=learned_hits / tokens,
        learned_topk=topk_hits / tokens,
        white_box_top1=white_hits / tokens if white_box else None,
        learned_sentences=learned_whole / len(private),
        white_box_sentences=white_whole / len(private) if white_box else None,
        top_k=k,
        public_tokens=int(public_tokens.numel()),
        labels=_label_exposure(labels),
        seconds={name: round(value, 3) for name, value in seconds.items()},
    )


def _with_secret(defense: CutDefense | None, secret: int | None) -> CutDefense | None:
    """`defense` with another noise secret (`None` stays `None`)."""
    if defense is None:
        return None
    return replace(defense, secret=secret)
