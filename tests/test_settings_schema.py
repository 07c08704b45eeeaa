"""The settings both sides of a run agree on are declared once (HOSFLConfig): the Flower run config is derived from
it, so every shared setting is reachable over Flower, and each key reaches the run with its HOSFLConfig meaning."""

from dataclasses import fields

import pytest

pytest.importorskip("flwr")

from hosfl_hf import HOSFLConfig  # noqa: E402
from hosfl_hf.integrations.flower.config import (  # noqa: E402
    APP_CONFIG,
    DEFAULT_RUN_CONFIG,
    SETTINGS_FIELDS,
    build_args,
    resolve,
)
from hosfl_hf.protocol import RoundSettings  # noqa: E402

# A valid value other than the app's default for every shared setting, as a user would type it in --run-config.
CHANGED = {
    "split-layer": 1,
    "num-clients": 4,
    "clients-per-round": 3,
    "partition": "dirichlet",
    "dirichlet-alpha": 0.5,
    "partition-column": "label2",
    "num-perturbations": 3,
    "zo-eps": 0.01,
    "zo-estimator": "two_sided",
    "client-optimizer": "sgd",
    "client-learning-rate": 0.02,
    "client-weight-decay": 0.1,
    "seed": 11,
    "data-seed": 5,
    "aggregation": "trimmed_mean",
    "aggregation-trim-fraction": 0.25,
    "scalar-bound": 0.5,
    "client-zo-blocks": "0",
    "client-zo-modules": "lora_B,q_proj",
    "client-seeds": "shared",
    "algorithm": "hosfl",
    "learning-rate": 0.004,
    "weight-decay": 0.01,
    "lr-scheduler-type": "cosine",
    "warmup-steps": 2,
    "max-grad-norm": 0.5,
    "client-lr-scheduler-type": "constant",
    "client-warmup-steps": 1,
    "client-lr-scheduler-kwargs": '{"num_cycles": 0.5}',
    "cut-noise": 0.5,
    "cut-clip-norm": 2.0,
}
EXPECTED = {
    "client_zo_blocks": [0],
    "client_zo_modules": ["lora_B", "q_proj"],
    "client_lr_scheduler_kwargs": {"num_cycles": 0.5},
}


def test_every_shared_setting_is_a_run_config_key():
    shared = {f.name for f in fields(RoundSettings)} - {"batch_size", "mixed_precision", "client_mask"}
    assert shared - set(SETTINGS_FIELDS) == {"cut_noise_seed"}  # a client secret: never in the server's run config
    assert {name.replace("_", "-") for name in SETTINGS_FIELDS} == set(CHANGED)
    assert set(DEFAULT_RUN_CONFIG) == set(APP_CONFIG) | set(CHANGED)
    assert all(isinstance(v, (str, int, float, bool)) for v in DEFAULT_RUN_CONFIG.values())  # TOML scalars


def test_each_key_reaches_the_run_with_its_hosflconfig_meaning():
    settings, args = build_args(resolve({"model": "m", "dataset": "d", **CHANGED}))
    for name in SETTINGS_FIELDS:
        key = name.replace("_", "-")
        value = getattr(args, name)
        value = getattr(value, "value", value)  # enums (lr_scheduler_type)
        assert value == EXPECTED.get(name, CHANGED[key]), name
        assert CHANGED[key] != DEFAULT_RUN_CONFIG[key] or key in ("client-seeds", "algorithm"), key  # a real change
    assert settings.aggregation == "trimmed_mean" and settings.scalar_bound == 0.5
    assert settings.zo_estimator == "two_sided" and settings.client_weight_decay == 0.1
    assert settings.partition == "dirichlet" and settings.data_seed == 5


def test_defaults_are_hosflconfigs_where_the_app_sets_none():
    from transformers import HfArgumentParser

    HfArgumentParser(HOSFLConfig)  # it rewrites the dataclass fields' types in place (the CLI does this first)
    _, args = build_args(resolve({"model": "m", "dataset": "d"}))
    reference = HOSFLConfig(output_dir="x")
    for name in ("zo_estimator", "aggregation", "client_weight_decay", "scalar_bound", "partition", "warmup_steps"):
        assert getattr(args, name) == getattr(reference, name), name


def test_bad_values_are_refused_by_name():
    with pytest.raises(ValueError, match="algorithm"):
        build_args(resolve({"model": "m", "dataset": "d", "algorithm": "fedprox"}))
    with pytest.raises(ValueError, match="'num-clients' must be a int"):
        build_args(resolve({"model": "m", "dataset": "d", "num-clients": "many"}))
    with pytest.raises(ValueError, match="Unknown hosfl_hf run-config keys \\['zo-epsilon'\\]"):
        resolve({"model": "m", "dataset": "d", "zo-epsilon": 0.1})


def test_renamed_records_keep_deprecated_aliases():
    import hosfl_hf
    from hosfl_hf import ClientUpdate, HOSFLRunRecord, Trajectory

    with pytest.warns(FutureWarning, match="use HOSFLRunRecord"):
        assert hosfl_hf.HOSFLSplitConfig is HOSFLRunRecord
    with pytest.warns(FutureWarning, match="use ClientUpdate"):
        assert hosfl_hf.TrajectoryRound is ClientUpdate
    # One record: what the server sends the holders is what the trajectory keeps, and it round-trips.
    trajectory = Trajectory(split_layer=1, parameter_names=["w"], zo_eps=1e-3, client_optimizer="sgd")
    trajectory.rounds.append(ClientUpdate(round=0, seeds=[1, 2], scalars=[0.5, -0.25], lr=1e-3))
    assert Trajectory.from_dict(trajectory.to_dict()).rounds == trajectory.rounds
