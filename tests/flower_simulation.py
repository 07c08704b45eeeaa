"""Runs the HO-SFL Flower app in simulation (started by tests/test_flower.py in its own process group).

python tests/flower_simulation.py CONFIG_JSON NUM_SUPERNODES [FAULT_JSON]

FAULT_JSON, e.g. `{"leg": "probe", "partition": 1, "round": 2}`: that node's ClientApp fails that exchange (a Flower
client mod raises), as `Fault("error", leg, round, client)` does on the in-process transport.
"""

import json
import sys

from flwr.simulation import run_simulation

from hosfl_hf.integrations.flower import build_client_app, build_server_app
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


if __name__ == "__main__":
    config = json.loads(open(sys.argv[1]).read())
    mods = [failing(json.loads(sys.argv[3]))] if len(sys.argv) > 3 else None
    run_simulation(
        server_app=build_server_app(config),
        client_app=build_client_app(config, mods=mods),
        num_supernodes=int(sys.argv[2]),
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
