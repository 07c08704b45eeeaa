"""HO-SFL over Flower (flwr >= 1.42, Message API): a `ServerApp` and a `ClientApp` that drive the round protocol of
[`hosfl_hf.protocol`]. The app folder with its run config is `examples/flower/`; see `docs/federated.md`."""

from .client_app import build_client_app
from .config import DEFAULT_RUN_CONFIG
from .server_app import build_server_app, serve

__all__ = ["DEFAULT_RUN_CONFIG", "build_client_app", "build_server_app", "serve"]
