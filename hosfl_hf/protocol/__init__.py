"""The HO-SFL round as a protocol: a client object, a server object and the messages between them.

Transport-free: [`run_rounds`] drives it in one process (every message through the codec), and
`hosfl_hf.integrations.flower` drives it across processes with Flower.
"""

from .client import SplitClient, weights_digest
from .codec import MessageError, decode, encode
from .driver import run_rounds
from .messages import CatchUp, ClientCheckpoint, ClientForward, ClientUpdate, Cotangent, ProbeReply, RoundPlan
from .rounds import COUNTERS, FederatedRun, ReliabilitySettings
from .server import SplitServer
from .settings import RoundSettings
from .transport import ClientFault, InProcessTransport, Transport

__all__ = [
    "COUNTERS",
    "CatchUp",
    "ClientCheckpoint",
    "ClientFault",
    "ClientForward",
    "ClientUpdate",
    "Cotangent",
    "FederatedRun",
    "InProcessTransport",
    "MessageError",
    "ProbeReply",
    "ReliabilitySettings",
    "RoundPlan",
    "RoundSettings",
    "SplitClient",
    "SplitServer",
    "Transport",
    "decode",
    "encode",
    "run_rounds",
    "weights_digest",
]
