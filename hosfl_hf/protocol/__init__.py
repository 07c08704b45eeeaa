"""The HO-SFL round as a protocol: a client object, a server object and the messages between them.

Transport-free: [`run_rounds`] drives it in one process (every message through the codec), and
`hosfl_hf.integrations.flower` drives it across processes with Flower.
"""

from .client import SplitClient
from .codec import MessageError, decode, encode
from .driver import run_rounds
from .messages import CatchUp, ClientForward, ClientUpdate, Cotangent, ProbeReply, RoundPlan
from .server import SplitServer
from .settings import RoundSettings

__all__ = [
    "CatchUp",
    "ClientForward",
    "ClientUpdate",
    "Cotangent",
    "MessageError",
    "ProbeReply",
    "RoundPlan",
    "RoundSettings",
    "SplitClient",
    "SplitServer",
    "decode",
    "encode",
    "run_rounds",
]
