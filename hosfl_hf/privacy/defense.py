"""[`CutDefense`]: what a client does to its cut activations before they leave it: per-token norm clipping, then
Gaussian noise from a seeded generator that only the client knows.

The noisy cut `z~ = clip(z) + n` is what the server receives and differentiates (`lambda = dloss/dz~`). The client
keeps the clean `z`: its probe scalars are `<lambda, clip(z(theta + mu u_p)) - clip(z(theta))>`, which is exactly
`<lambda, z~(theta + mu u_p) - z~(theta)>` with the same noise realisation `n` in both terms (it cancels), computed
without ever adding `n`, so the scalars carry no noise and the update stays a pure function of seeds and scalars
(replay is bit-exact).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

from ..rng import cpu_generator, mix

__all__ = ["CutDefense"]


@dataclass(frozen=True)
class CutDefense:
    """Client-side clipping and noise on the cut activations (what leaves the client).

    For every token `t` of the cut `z` (hidden size `d`):

    - clipping (`clip_norm=C`): `z_t <- z_t * min(1, C / ||z_t||_2)`;
    - noise (`noise=sigma`): `z_t <- z_t + s_t * n_t`, `n_t ~ N(0, I_d)`, with `s_t = sigma * C / sqrt(d)` when
      clipping is on (noise norm about `sigma * C`: the Gaussian mechanism's scale for a token of norm `C`), else
      `s_t = sigma * ||z_t|| / sqrt(d)` (`sigma` times the token's RMS: noise norm about `sigma * ||z_t||`, a
      signal-to-noise ratio of `1 / sigma` on every token).

    The noise is drawn from a CPU `torch.Generator` seeded with `mix(secret, round, client)`, never from the global
    RNG. The secret must stay on the client: a server that knows it subtracts the noise. `secret=None` (the default,
    and the right choice outside simulations) draws a fresh seed from the OS for every release.

    This is a heuristic defense: no differential-privacy guarantee is claimed (the hidden states of a sentence are
    not a bounded-sensitivity query of one record). Its effect is measured by [`~hosfl_hf.privacy.audit_privacy`].

    Args:
        noise (`float`, defaults to `0.0`): `sigma`, the noise multiplier (`0`: no noise).
        clip_norm (`float`, *optional*): `C`, the per-token L2 bound (`None`: no clipping, noise relative to each
            token's RMS).
        secret (`int`, *optional*): the client's noise seed (reproducible simulations); `None`: OS entropy.

    Example:

    ```python
    >>> import torch
    >>> from hosfl_hf.privacy import CutDefense
    >>> z = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    >>> defense = CutDefense(noise=0.5, secret=1)
    >>> torch.equal(defense.release(z, round_index=3, client=0), defense.release(z, round_index=3, client=0))
    True
    >>> bool(CutDefense(clip_norm=1.0).release(z, 0, 0).norm(dim=-1).max() <= 1.0 + 1e-6)
    True

    ```
    """

    noise: float = 0.0
    clip_norm: float | None = None
    secret: int | None = None

    def __post_init__(self):
        if isinstance(self.noise, bool) or not isinstance(self.noise, (int, float)) or not math.isfinite(self.noise):
            raise ValueError(f"CutDefense.noise={self.noise!r} is invalid: it must be a finite number >= 0.")
        if self.noise < 0:
            raise ValueError(f"CutDefense.noise={self.noise!r} is invalid: it must be a finite number >= 0.")
        if self.clip_norm is not None and not (
            isinstance(self.clip_norm, (int, float)) and math.isfinite(self.clip_norm) and self.clip_norm > 0
        ):
            raise ValueError(f"CutDefense.clip_norm={self.clip_norm!r} is invalid: it must be a number > 0, or None.")
        if self.secret is not None and (isinstance(self.secret, bool) or not isinstance(self.secret, int)):
            raise ValueError(f"CutDefense.secret={self.secret!r} is invalid: it must be an integer, or None.")

    @property
    def active(self) -> bool:
        """Whether the defense changes anything (noise or clipping)."""
        return self.noise > 0 or self.clip_norm is not None

    def clip(self, hidden: torch.Tensor) -> torch.Tensor:
        """Per-token clipping to `clip_norm` (the tensor itself without clipping)."""
        if self.clip_norm is None:
            return hidden
        norms = hidden.float().norm(dim=-1, keepdim=True)
        factor = (self.clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
        return (hidden.float() * factor).to(hidden.dtype)

    def noise_scale(self, clipped: torch.Tensor) -> torch.Tensor:
        """The per-token standard deviation `s_t` of the noise, shape `(..., 1)` (float32)."""
        dim = clipped.shape[-1]
        if self.clip_norm is not None:
            return torch.full((*clipped.shape[:-1], 1), self.noise * self.clip_norm / math.sqrt(dim))
        return self.noise * clipped.detach().float().norm(dim=-1, keepdim=True) / math.sqrt(dim)

    def generator(self, round_index: int, client: int) -> torch.Generator:
        """The generator of one release: seeded with `mix(secret, round, client)`, or from OS entropy."""
        secret = self.secret if self.secret is not None else secrets.randbits(64)
        return cpu_generator(mix(secret, round_index, client))

    def release(self, hidden: torch.Tensor, round_index: int, client: int) -> torch.Tensor:
        """The cut that leaves the client: clipped, plus noise (the input itself when the defense is off).

        Args:
            hidden (`torch.Tensor` of shape `(batch_size, seq_len, hidden_size)`): the clean cut activations.
            round_index (`int`), client (`int`): key the noise generator (with `secret`).
        """
        clipped = self.clip(hidden)
        if self.noise == 0:
            return clipped
        noise = torch.randn(clipped.shape, generator=self.generator(round_index, client), dtype=torch.float32)
        scale = self.noise_scale(clipped).to(noise.device)
        noisy = clipped.float() + (scale * noise).to(clipped.device)
        return noisy.to(hidden.dtype)
