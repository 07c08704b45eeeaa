"""The HO-SFL round as a protocol: a client object, a server object and the messages between them.

Transport-free: one loop, [`FederatedRun`], drives it over a transport: in one process ([`run_rounds`], every message
through the codec), inside `HOSFLTrainer` (its in-process clients share one client part, the Trainer is the server's
backend) and across processes with Flower (`hosfl_hf.integrations.flower`). Each algorithm is a strategy of
`hosfl_hf.algorithms.ALGORITHMS` that the loop calls.
"""

from .client import SplitClient, weights_digest
from .codec import MessageError, decode, encode
from .driver import run_rounds
from .messages import (
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
from .rounds import COUNTERS, FederatedRun, OpenRound, ReliabilitySettings
from .server import RejectedCut, SplitServer
from .settings import RoundSettings
from .transport import ClientFault, InProcessTransport, SharedPartTransport, Transport

__all__ = [
    "COUNTERS",
    "CatchUp",
    "ClientBatch",
    "ClientCheckpoint",
    "ClientFault",
    "ClientForward",
    "ClientGradient",
    "ClientUpdate",
    "Cotangent",
    "FederatedRun",
    "GradientUpdate",
    "InProcessTransport",
    "MessageError",
    "OpenRound",
    "PerturbedCuts",
    "ProbeReply",
    "RejectedCut",
    "ReliabilitySettings",
    "RoundPlan",
    "RoundSettings",
    "SharedPartTransport",
    "SplitClient",
    "SplitServer",
    "Transport",
    "WeightsUpdate",
    "decode",
    "encode",
    "run_rounds",
    "weights_digest",
]
