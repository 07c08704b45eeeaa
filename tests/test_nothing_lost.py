"""Nothing trained is silently lost: a whole-model 4-bit run trains both parts (and lambda is right), every copy of
named tensors is strict, each round's applied update is logged per part and a part that stands still warns, and
every artifact re-loads to the in-memory weights (the Flower app with LoRA included)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import transformers
from conftest import (
    counting_dataset,
    run_flower_simulation,
    stack_collator,
    tiny_args,
    tiny_llama,
    write_flower_inputs,
)
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file

from hosfl_hf import HOSFLTrainer, split_model, testing
from hosfl_hf.named_tensors import copy_named_tensors, require_same_names
from hosfl_hf.split import CutActivations
from hosfl_hf.update_norms import StandingStillGuard, UpdateSnapshot

pytestmark = pytest.mark.usefixtures("single_thread")
HERE = Path(__file__).parent
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
# The one known limitation of a bitsandbytes build: no CPU kernels for 4-bit layers (anything else must fail).
BNB_NO_CPU = ("not supported on cpu", "no kernel", "cpu backend")


def _bnb_or_skip():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
    try:
        layer.to("cpu")(torch.randn(2, 64))
    except (RuntimeError, NotImplementedError) as error:
        if any(text in str(error).lower() for text in BNB_NO_CPU):
            pytest.skip(f"bitsandbytes has no CPU 4-bit kernels here: {error}")
        raise
    return bnb


def _whole_model_4bit(tmp_path: Path) -> transformers.LlamaForCausalLM:
    """A 4-block Llama (hidden 64: bitsandbytes packs 64 inputs per block) re-loaded with every linear layer in
    4-bit NF4, as QLoRA users load models."""
    testing.tiny_llama(0, hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    return transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=quantization, dtype=torch.float32
    )


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------- 4-bit QLoRA
def test_whole_model_4bit_run_trains_both_parts_adapters(tmp_path):
    """The whole model in 4-bit (QLoRA as most people load it): every client and every server LoRA tensor moves,
    the server's gradient is not zero, and no part is reported as standing still."""
    _bnb_or_skip()
    model = _whole_model_4bit(tmp_path)
    args = tiny_args(tmp_path, max_steps=8, num_clients=2, clients_per_round=2, learning_rate=1e-2, logging_steps=1)
    trainer = HOSFLTrainer(
        model,
        args,
        split_layer=2,
        train_dataset=counting_dataset(),
        data_collator=stack_collator,
        peft_config=LoraConfig(**LORA),
    )
    before = _trainable(trainer.model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a standing-still warning fails the test
        trainer.train()
    after = _trainable(trainer.model)
    client = {n for n, _ in trainer.split.client_parameters()}
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    server = {n for n in before if ".layers.2." in n or ".layers.3." in n}
    assert len(server) == 8 and server <= moved
    assert any(n.endswith(k) for k in client for n in moved)  # the client's adapters moved too
    assert len(moved) == len(before) == 16
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["grad_norm"] > 0 and h["server_update_norm"] > 0 and h["client_update_norm"] > 0 for h in logs)


def test_4bit_lambda_is_the_dequantized_models(tmp_path):
    """lambda = dloss/dz at the cut of a 4-bit model, after the eval-mode forwards a run makes, equals lambda of the
    same model with its 4-bit weights dequantized into float32 layers (the 4-bit matmul dequantizes, then multiplies
    in float32): no path through a 4-bit layer is dropped from the backward."""
    bnb = _bnb_or_skip()
    model = _whole_model_4bit(tmp_path)
    ids = torch.randint(3, 32, (2, 7), generator=torch.Generator().manual_seed(0))
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    modules = dict(reference.named_modules())
    quantized = 0
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            modules[name].weight.data.copy_(weight.reshape(modules[name].weight.shape))
            quantized += 1
    assert quantized == 4 * 7  # q, k, v, o, gate, up, down of each block

    def cut_gradient(m):
        parts = split_model(m.eval(), 2)  # its check runs an eval-mode forward without grad first
        with torch.no_grad():
            m(ids)  # and one more, as a client's no-grad forward does
        z = parts.client(input_ids=ids).hidden_states.detach().requires_grad_(True)
        parts.server(CutActivations(hidden_states=z), labels=ids).loss.backward()
        return z.grad

    lam, expected = cut_gradient(model), cut_gradient(reference)
    torch.testing.assert_close(lam, expected, rtol=1e-4, atol=1e-7)


def test_the_4bit_bug_is_caught_by_the_guard_when_the_fix_is_off(tmp_path, monkeypatch):
    """With the 4-bit fix disabled the server's LoRA stands still, and the run says so (it used to be silent)."""
    _bnb_or_skip()
    monkeypatch.setattr("hosfl_hf.split.keep_4bit_layers_differentiable", lambda model: 0)
    model = _whole_model_4bit(tmp_path)
    args = tiny_args(tmp_path, max_steps=4, num_clients=2, clients_per_round=2, learning_rate=1e-2)
    trainer = HOSFLTrainer(
        model, args, split_layer=2, train_dataset=counting_dataset(), data_collator=stack_collator,
        peft_config=LoraConfig(**LORA),
    )  # fmt: skip
    bnb = pytest.importorskip("bitsandbytes")
    repacked = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in repacked):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack, so the bug cannot occur here")
    with pytest.warns(RuntimeWarning, match="The server part is configured to train but its applied update"):
        trainer.train()


# ----------------------------------------------------------------------------------------------- the guards
def _run(tmp_path, **overrides):
    args = tiny_args(tmp_path, max_steps=4, logging_steps=1, **overrides)
    trainer = HOSFLTrainer(
        tiny_llama(), args, split_layer=2, train_dataset=counting_dataset(), data_collator=stack_collator
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    return trainer, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_update_norms_are_logged_per_part_and_a_standing_part_warns_once(tmp_path):
    trainer, caught = _run(tmp_path / "a")
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4 and all(h["server_update_norm"] > 0 and h["client_update_norm"] > 0 for h in logs)
    assert not [m for m in caught if "configured to train" in m]

    # A zero learning rate on one part: that part stands still, and only it is named, once.
    _, caught = _run(tmp_path / "b", client_learning_rate=0.0)
    named = [m for m in caught if "configured to train" in m]
    assert len(named) == 1 and named[0].startswith("The client part") and "client_learning_rate is 0" in named[0]
    _, caught = _run(tmp_path / "c", learning_rate=0.0)
    named = [m for m in caught if "configured to train" in m]
    assert len(named) == 1 and named[0].startswith("The server part")


@pytest.mark.parametrize("algorithm", ["frozen_client", "client_only"])
def test_controls_that_freeze_a_part_do_not_warn(tmp_path, algorithm):
    trainer, caught = _run(tmp_path, algorithm=algorithm)
    assert not [m for m in caught if "configured to train" in m]
    frozen = "client" if algorithm == "frozen_client" else "server"
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h.get(f"{frozen}_update_norm", 0.0) == 0.0 for h in logs)


def test_guard_and_snapshot_units():
    guard = StandingStillGuard("server", patience=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard.observe(0.0, 0)
        guard.observe(1.0, 1)  # a real update resets the count
        guard.observe(0.0, 2)
    with pytest.warns(RuntimeWarning, match="2 consecutive rounds \\(up to round 3\\)"):
        guard.observe(0.0, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard.observe(0.0, 4)  # once per guard
    w = torch.zeros(3, 4)
    snapshot = UpdateSnapshot([w])
    w[1, 2] = 3.0
    w[0, 0] = -4.0
    assert snapshot.norm() == 5.0


# ------------------------------------------------------------------------------------------ strict copies
def test_copy_named_tensors_is_strict():
    target = {"a": torch.zeros(2), "b": torch.zeros(3)}
    assert copy_named_tensors({"a": torch.ones(2), "b": torch.ones(3)}, target, "test") == 2
    assert torch.equal(target["b"], torch.ones(3))
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        copy_named_tensors({"a": torch.ones(2)}, target, "test")
    assert copy_named_tensors({"a": torch.full((2,), 2.0)}, target, "test", partial_target=True) == 1
    with pytest.raises(ValueError, match=r"no counterpart of the same name \['model.a'\]"):
        copy_named_tensors({"model.a": torch.ones(2)}, target, "the server's weights", partial_target=True)
    with pytest.raises(ValueError, match=r"differ in shape, e.g. a: \(3,\) into \(2,\)"):
        copy_named_tensors({"a": torch.ones(3), "b": torch.ones(3)}, target, "test")
    with pytest.raises(ValueError, match="nothing to copy"):
        copy_named_tensors({}, target, "test", partial_target=True)
    with pytest.raises(ValueError, match=r"missing \['c'\]; unexpected \['a'\]"):
        require_same_names(["a", "b"], ["b", "c"], "test")


# -------------------------------------------------------------------------------------------- artifacts
def test_trainer_artifacts_reload_to_the_trained_weights(tmp_path):
    """save_model and the last checkpoint, re-loaded with peft on a fresh base model, hold exactly the trained
    adapters of both parts (and they differ from the initial ones)."""
    args = tiny_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=4)
    trainer = HOSFLTrainer(
        tiny_llama(),
        args,
        split_layer=2,
        train_dataset=counting_dataset(),
        data_collator=stack_collator,
        peft_config=(LoraConfig(**LORA), LoraConfig(**LORA)),
    )
    initial = _trainable(trainer.model)
    trainer.train()
    trainer.save_model(tmp_path / "saved")
    trained = _trainable(trainer.model)
    for folder in (tmp_path / "saved", Path(args.output_dir) / "checkpoint-4"):
        loaded = _trainable(PeftModel.from_pretrained(tiny_llama(), folder, is_trainable=True))
        assert loaded.keys() == trained.keys(), folder
        for name, value in trained.items():
            assert torch.equal(loaded[name], value), (folder, name)
    server = [n for n in trained if ".layers.2." in n or ".layers.3." in n]
    assert server and all(not torch.equal(trained[n], initial[n]) for n in server if "lora_B" in n)


def test_flower_output_with_lora_holds_the_trained_server_adapters(tmp_path):
    """The Flower app with `lora-r > 0`: its output folder's adapters equal the in-process trainer's `save_model`
    tensor by tensor (client bit for bit, server within float tolerance: the protocol's server clips and steps
    one parameter group), and the server adapters are not the initial ones."""
    pytest.importorskip("flwr")
    from hosfl_hf.integrations.flower.config import build_args, load_dataset, load_model, make_collator, resolve

    config = write_flower_inputs(tmp_path, **{"num-rounds": 3, "num-clients": 2, "clients-per-round": 2, "lora-r": 2})
    output = run_flower_simulation(tmp_path, config, 2)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file(), output[-6000:]
    # A watchable run: a line per round and a closing summary that names the output folder.
    assert all(f"HO-SFL round {r}/3 | clients 2/2 | loss " in output for r in (1, 2, 3)), output[-6000:]
    assert f"HO-SFL output: {tmp_path / 'out'}" in output and "HO-SFL finished: 3 rounds" in output

    resolved = resolve(config)
    initial = {k: v.detach().clone() for k, v in load_model(resolved).named_parameters() if v.requires_grad}
    _, args = build_args(resolved)
    args.output_dir = str(tmp_path / "trainer")
    trainer = HOSFLTrainer(
        load_model(resolved), args, train_dataset=load_dataset(resolved), data_collator=make_collator(resolved)
    )
    trainer.train()
    trainer.save_model(tmp_path / "trainer")
    flower = load_file(tmp_path / "out" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "trainer" / "adapter_model.safetensors")
    assert flower.keys() == reference.keys() and len(flower) > 0
    server = [n for n in flower if ".layers.2." in n or ".layers.3." in n]
    assert server and len(server) < len(flower)
    for name in flower:
        if name in server:
            torch.testing.assert_close(flower[name], reference[name], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(flower[name], reference[name]), name
    live = {n.replace(".default.", "."): v for n, v in initial.items()}
    assert all(not torch.equal(flower[n], live[n]) for n in server if "lora_B" in n)


def test_protocol_logs_both_parts_update_norms_and_warns_on_a_standing_part(tmp_path):
    """The protocol's round (in-process transport; the Flower app runs the same FederatedRun): each round's record
    holds the server's and the clients' applied-update norms (every client applied the same update), and a zero
    client learning rate warns once, naming the client part."""
    import copy

    from hosfl_hf.protocol import FederatedRun, InProcessTransport, RoundSettings, SplitClient, SplitServer

    def federated_run(**overrides):
        args = tiny_args(tmp_path, max_steps=4, **overrides)
        settings = RoundSettings.from_args(args, split_layer=2)
        base = tiny_llama()
        server = SplitServer(copy.deepcopy(base), settings, args)
        clients = {
            c: SplitClient(copy.deepcopy(base), c, settings, counting_dataset(), stack_collator) for c in range(4)
        }
        return FederatedRun(server, InProcessTransport(clients))

    run = federated_run()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        run.run(4)
    assert all(r["server_update_norm"] > 0 and r["client_update_norm"] > 0 for r in run.log)
    run = federated_run(client_learning_rate=0.0)
    with pytest.warns(RuntimeWarning, match="The client part is configured to train"):
        run.run(4)
    assert all(r["client_update_norm"] == 0.0 for r in run.log)


def test_env_reports_the_tested_versions(monkeypatch):
    import importlib.metadata

    from hosfl_hf.versions import TESTED_VERSIONS, version_report

    monkeypatch.setattr(importlib.metadata, "version", lambda p: "9.9" if p == "peft" else TESTED_VERSIONS.get(p, "0"))
    report = version_report()
    assert f"peft: 9.9 (tested with {TESTED_VERSIONS['peft']})" in report
    assert f"transformers: {TESTED_VERSIONS['transformers']}" in report
