"""Runs the HO-SFL Flower app in simulation (started by tests/test_flower.py in its own process group).

python tests/flower_simulation.py CONFIG_JSON NUM_SUPERNODES [FAULT_JSON]

FAULT_JSON, e.g. `{"leg": "probe", "partition": 1, "round": 2}`: that node's ClientApp fails that exchange (a Flower
client mod raises), as `Fault("error", leg, round, client)` does on the in-process transport. Or
`{"server_crash_after_round": 1}`: the ServerApp dies right after it sent round 1's update.
"""

import json
import sys

from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from hosfl_hf.integrations.flower import build_client_app, build_server_app, serve
from hosfl_hf.integrations.flower.messages import RECORD
from hosfl_hf.protocol import RoundPlan, decode


def failing(fault):
    def mod(message, context, call_next):
        if message.metadata.message_type == f"query.{fault['leg']}" and (
            int(context.node_config["partition-id"]) == fault["partition"]
        ):
            plan = decode(message.content.config_records[RECORD]["plan"], RoundPlan)
            if plan.round == fault["round"]:
                raise RuntimeError(f"injected failure: {fault}")
        return call_next(message, context)

    return mod


class CrashingGrid:
    """A Grid that lets the ServerApp die once it has sent the update of round `last`."""

    def __init__(self, grid, last):
        self.grid, self.last, self.updates = grid, last, 0

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, timeout=None):
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        if messages and messages[0].metadata.message_type == "query.update":
            self.updates += 1
            if self.updates > self.last:
                raise SystemExit(f"injected ServerApp crash after round {self.last}'s update")
        return replies


def crashing_server_app(config, last):
    app = ServerApp()

    @app.main()
    def main(grid, context):
        serve(CrashingGrid(grid, last), {**config, **dict(context.run_config)})

    return app


if __name__ == "__main__":
    config = json.loads(open(sys.argv[1]).read())
    fault = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    mods = [failing(fault)] if "leg" in fault else None
    server_app = build_server_app(config)
    if "server_crash_after_round" in fault:
        server_app = crashing_server_app(config, fault["server_crash_after_round"])
    run_simulation(
        server_app=server_app,
        client_app=build_client_app(config, mods=mods),
        num_supernodes=int(sys.argv[2]),
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
