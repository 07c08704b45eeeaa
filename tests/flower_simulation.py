"""Runs the HO-SFL Flower app in simulation (started by tests/test_flower.py in its own process group).

python tests/flower_simulation.py CONFIG_JSON NUM_SUPERNODES
"""

import json
import sys

from flwr.simulation import run_simulation

from hosfl_hf.integrations.flower import build_client_app, build_server_app

if __name__ == "__main__":
    config = json.loads(open(sys.argv[1]).read())
    run_simulation(
        server_app=build_server_app(config),
        client_app=build_client_app(config),
        num_supernodes=int(sys.argv[2]),
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
