"""The strategy registry lives in `hosfl_hf.protocol.strategies` (the methods are strategies of the round); this
module keeps the import path `hosfl_hf.algorithms`."""

from .protocol import strategies as _strategies
from .protocol.strategies import *  # noqa: F403

__all__ = list(_strategies.__all__)
