"""PEFT and Hub artifacts: per-part LoRA, 4-bit and half-precision clients, save/load/merge, and pushing.

Models are tiny random ones built from configs; pushes go to a loopback stand-in for the Hub API
(`tests/hub_server.py`) that `huggingface_hub` is pointed at, so nothing here touches the network.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
import yaml
from conftest import (
    counting_dataset,
    require_bitsandbytes,
    skip_on_bnb_cpu_limitation,
    stack_collator,
    tiny_args,
    tiny_llama,
)
from hub_server import USER, LoopbackHub
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
from test_split import ARCHITECTURES as SPLIT_ARCHITECTURES  # the split suite's model zoo (24 architectures)
from test_split import build_model as build_split_model

from hosfl_hf import HOSFLConfig, HOSFLRunRecord, HOSFLTrainer, Trajectory, merge_for_inference, split_model, testing
from hosfl_hf.hub import HOSFL_CONFIG_NAME, build_model_card, final_metrics
from hosfl_hf.hub import push_to_hub as push_folder
from hosfl_hf.lora import (
    client_4bit_config,
    get_split_peft_model,
    keep_4bit_layers_differentiable,
    layers_pattern_of,
    split_lora_config,
)
from hosfl_hf.zeroth_order import RNG_SPEC

VOCAB = 32
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}  # the paper's r and alpha
ARTIFACTS = [
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    HOSFL_CONFIG_NAME,
    "hosfl_trajectory.json",
]


pytestmark = pytest.mark.usefixtures("single_thread")


def _llama_like(config_cls, **overrides):
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return config_cls(**{**kwargs, **overrides})


# name -> (config factory, attention targets of the client, extra target of the server, block-list path)
ARCHITECTURES = {
    "llama": (lambda: _llama_like(transformers.LlamaConfig), ["q_proj", "v_proj"], "o_proj", "model.layers"),
    "qwen2": (
        lambda: _llama_like(transformers.Qwen2Config, tie_word_embeddings=True),
        ["q_proj", "v_proj"],
        "o_proj",
        "model.layers",
    ),
    "opt": (
        lambda: transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
            pad_token_id=0,
        ),
        ["q_proj", "v_proj"],
        "out_proj",
        "model.decoder.layers",
    ),
    "gpt2": (
        lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64),
        ["c_attn"],
        "c_proj",
        "transformer.h",
    ),
}


def build(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(ARCHITECTURES[name][0]()).eval()


def block_of(name: str, path: str) -> int:
    return int(name.split(f"{path}.")[1].split(".")[0])


def make_args(tmp_path, **overrides) -> HOSFLConfig:
    return tiny_args(tmp_path, **{"max_steps": 3, "logging_steps": 1, **overrides})


def make_trainer(tmp_path, model, split_layer=2, **kwargs) -> HOSFLTrainer:
    args = make_args(tmp_path, **kwargs.pop("args", {}))
    return HOSFLTrainer(
        model,
        args,
        split_layer=split_layer,
        train_dataset=counting_dataset(64),
        data_collator=stack_collator,
        **kwargs,
    )


def snapshot(named) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in named}


def changed(before: dict[str, torch.Tensor], named) -> set[str]:
    return {n for n, p in named if not torch.equal(before[n], p)}


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=input_ids).logits


INPUT_IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4], [3, 3, 8, 1, 30, 12, 6, 0]])


# ------------------------------------------------------------------------------------------------- per-part LoRA
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_per_part_lora_puts_each_part_in_its_own_blocks(arch):
    _, targets, server_extra, path = ARCHITECTURES[arch]
    model = build(arch)
    shared = {"init_lora_weights": False, "fan_in_fan_out": arch == "gpt2"}  # GPT-2's Conv1D stores W transposed
    client = LoraConfig(target_modules=targets, **LORA, **shared)
    server = LoraConfig(r=4, lora_alpha=8, target_modules=targets + [server_extra], **shared)
    peft_model = get_split_peft_model(model, (client, server), split_layer=2)
    assert layers_pattern_of(model) == path.rsplit(".", 1)[-1]

    parts = split_model(peft_model, split_layer=2)
    client_names = [n for n, _ in parts.client_parameters()]
    server_names = [n for n, _ in parts.server_parameters()]
    adapters = [n for n, p in parts.model.named_parameters() if p.requires_grad]
    assert adapters and all("lora_" in n for n in adapters)
    assert set(client_names) | set(server_names) == set(adapters)
    assert client_names and all(block_of(n, path) < 2 for n in client_names)
    assert server_names and all(block_of(n, path) >= 2 for n in server_names)
    # Client adapters: the client's modules and rank; server adapters: the server's (an extra module, r=4).
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in client_names} == set(targets)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in server_names} == set(targets) | {server_extra}
    params = dict(parts.model.named_parameters())
    assert {params[n].shape[0] for n in client_names if ".lora_A." in n} == {8}
    assert {params[n].shape[0] for n in server_names if ".lora_A." in n} == {4}
    # The split is still exact with adapters in both parts.
    with torch.no_grad():
        split_logits = parts.server(parts.client(input_ids=INPUT_IDS)).logits
    torch.testing.assert_close(split_logits, logits(peft_model, INPUT_IDS), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(SPLIT_ARCHITECTURES))
def test_per_part_lora_on_every_split_architecture(arch):
    """Every architecture of the split suite: per-part "all-linear" LoRA with per-part ranks lands in the right
    blocks, and the split stays exact with it."""
    model = build_split_model(arch)
    shared = {"target_modules": "all-linear", "init_lora_weights": False, "lora_dropout": 0.0}
    shared["fan_in_fan_out"] = arch == "gpt2"  # GPT-2's Conv1D stores its weight transposed
    peft_model = get_split_peft_model(model, (LoraConfig(r=4, **shared), LoraConfig(r=2, **shared)), split_layer=2)
    parts = split_model(peft_model, split_layer=2)
    params = dict(parts.model.named_parameters())
    client = [n for n, _ in parts.client_parameters() if ".lora_A." in n]
    server = [n for n, _ in parts.server_parameters() if ".lora_A." in n]
    assert client and all(block_of(n, parts.layers_path) < 2 for n in client)
    assert server and all(block_of(n, parts.layers_path) >= 2 for n in server)
    # Every adapted module has its part's rank times peft's multiplicity for it: 1 for a linear layer, n for a
    # parameter that transformers 5 fused from n targets (an MoE's gate_up_proj experts: peft gives it n * r), the
    # same multiplicity in both parts.
    prefix = "base_model.model."
    multiplicity: dict[str, set[float]] = {}
    for name, module in peft_model.named_modules():
        if not isinstance(getattr(module, "r", None), dict) or "default" not in module.r:
            continue
        block = block_of(name.removeprefix(prefix) + ".x", parts.layers_path)
        role = name.split(f".{block}.", 1)[1]
        multiplicity.setdefault(role, set()).add(module.r["default"] / (4 if block < 2 else 2))
        if (
            isinstance(module, torch.nn.Module)
            and hasattr(module, "base_layer")
            and "ParamWrapper" not in type(module).__name__
        ):
            assert module.lora_A["default"].weight.shape[0] == module.r["default"], name
    assert multiplicity and all(len(m) == 1 and next(iter(m)) in (1, 2) for m in multiplicity.values()), multiplicity
    assert {n for n, p in params.items() if p.requires_grad} == {n for n, _ in parts.client_parameters()} | {
        n for n, _ in parts.server_parameters()
    }
    input_ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        split_logits = parts.server(parts.client(input_ids=input_ids)).logits
    torch.testing.assert_close(split_logits, logits(peft_model, input_ids), rtol=0, atol=1e-5)


def test_per_part_lora_with_the_same_targets_uses_layers_to_transform():
    client = LoraConfig(target_modules=["q_proj", "v_proj"], **LORA)
    server = LoraConfig(r=16, lora_alpha=32, target_modules=["v_proj", "q_proj"], lora_dropout=0.0)
    config = split_lora_config((client, server), num_layers=6, split_layer=2)
    assert config.layers_to_transform == [0, 1, 2, 3, 4, 5] and config.layers_pattern == "layers"
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    assert (config.r, config.lora_alpha) == (8, 16)
    assert config.rank_pattern == {r"layers\.(?:2|3|4|5)\..*": 16}
    assert config.alpha_pattern == {r"layers\.(?:2|3|4|5)\..*": 32}

    only_client = split_lora_config((client, None), num_layers=6, split_layer=2)
    assert only_client.layers_to_transform == [0, 1] and only_client.rank_pattern == {}
    only_server = split_lora_config((None, LoraConfig(target_modules=["q_proj"])), num_layers=6, split_layer=2)
    assert only_server.layers_to_transform == [2, 3, 4, 5]
    # A whole-model config is used as it is: the split decides which part each adapter belongs to.
    whole = LoraConfig(target_modules=["q_proj"], **LORA)
    assert split_lora_config(whole, num_layers=6, split_layer=2).to_dict() == whole.to_dict()


def test_per_part_lora_config_errors():
    client = LoraConfig(target_modules=["q_proj"], lora_dropout=0.0)
    with pytest.raises(ValueError, match="differ in \\['lora_dropout'\\]"):
        split_lora_config((client, LoraConfig(target_modules=["q_proj"], lora_dropout=0.1)), 4, 2)
    with pytest.raises(ValueError, match="'all-linear', which only the model can resolve"):
        split_lora_config((client, LoraConfig(target_modules="all-linear", lora_dropout=0.0)), 4, 2)
    with pytest.raises(ValueError, match="blocks \\[3\\] are not client blocks"):
        split_lora_config((LoraConfig(target_modules=["q_proj"], layers_to_transform=[1, 3]), None), 4, 2)
    with pytest.raises(ValueError, match="virtual tokens"):
        split_lora_config(PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), 4, 2)
    with pytest.raises(ValueError, match="at least one"):
        split_lora_config((None, None), 4, 2)
    with pytest.raises(ValueError, match="already a PeftModel"):
        get_split_peft_model(get_peft_model(tiny_llama(), client), client, split_layer=2)


# ------------------------------------------------------------------------------------------------------ training
def test_trainer_with_peft_config_trains_both_parts_adapters_only(tmp_path):
    client = LoraConfig(target_modules=["q_proj", "v_proj"], **LORA)
    server = LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], **LORA)
    trainer = make_trainer(tmp_path, tiny_llama(), peft_config=(client, server))
    assert isinstance(trainer.model, PeftModel)
    base = snapshot(trainer.split.model.named_parameters())
    client_before = snapshot(trainer.split.client_parameters())
    server_before = snapshot(trainer.split.server_parameters())
    trainer.train()
    assert changed(client_before, trainer.split.client_parameters()) == set(client_before)
    assert changed(server_before, trainer.split.server_parameters()) == set(server_before)
    trained = set(client_before) | set(server_before)
    frozen = {n: t for n, t in base.items() if n not in trained}
    assert frozen and not changed(frozen, ((n, p) for n, p in trainer.split.model.named_parameters() if n in frozen))
    assert len(trainer.trajectory.rounds) == 3


def test_trainer_with_an_existing_peft_model(tmp_path):
    peft_model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], **LORA))
    trainer = make_trainer(tmp_path, peft_model)
    assert trainer.model is peft_model
    before = snapshot(trainer.split.client_parameters())
    assert before and all(block_of(n, "model.layers") < 2 for n in before)
    trainer.train()
    assert changed(before, trainer.split.client_parameters()) == set(before)
    with pytest.raises(ValueError, match="already a PeftModel"):
        make_trainer(tmp_path, peft_model, peft_config=LoraConfig(target_modules=["q_proj"]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_client_adapters_are_trained_in_float32(tmp_path, dtype):
    # Why: an update of 1e-5 is below half precision's resolution at typical weights and rounds away.
    weight = torch.tensor(0.05, dtype=dtype)
    assert torch.equal(weight - 1e-5, weight)

    lora = LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False, **LORA)
    peft_model = get_peft_model(tiny_llama().to(dtype), lora, autocast_adapter_dtype=False)
    assert {p.dtype for p in peft_model.parameters() if p.requires_grad} == {dtype}
    trainer = make_trainer(tmp_path, peft_model, args={"client_learning_rate": 1e-5})
    assert {p.dtype for _, p in trainer.split.client_parameters()} == {torch.float32}
    assert {p.dtype for _, p in trainer.split.server_parameters()} == {torch.float32}
    before = snapshot(trainer.split.client_parameters())
    trainer.train()
    assert changed(before, trainer.split.client_parameters()) == set(before)


def test_half_precision_trainable_client_weights_raise(tmp_path):
    with pytest.raises(ValueError, match="round away in half precision.*float32"):
        make_trainer(tmp_path, tiny_llama().to(torch.bfloat16))


# ------------------------------------------------------------------------------------------- save, load, merge
@pytest.fixture
def trained(tmp_path):
    """A trainer after 3 rounds with per-part LoRA (different modules and ranks) and its saved folder."""
    client = LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False, **LORA)
    server = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    trainer = make_trainer(tmp_path, tiny_llama(), peft_config=(client, server), args={"hub_model_id": "tiny-hosfl"})
    trainer.train()
    folder = tmp_path / "saved"
    trainer.save_model(str(folder))
    return trainer, folder


def test_save_model_round_trips_through_peft(trained):
    trainer, folder = trained
    assert set(ARTIFACTS) <= set(os.listdir(folder))
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(folder))
    assert torch.equal(logits(reloaded, INPUT_IDS), logits(trainer.model, INPUT_IDS))

    config = HOSFLRunRecord.from_pretrained(str(folder))
    assert config == trainer.hosfl_split_config()
    assert (config.split_layer, config.num_layers, config.model_type, config.layers_path) == (
        2,
        4,
        "llama",
        "model.layers",
    )
    assert (config.zo_eps, config.num_perturbations, config.client_learning_rate, config.seed) == (1e-3, 2, 1e-3, 7)
    assert config.rng == RNG_SPEC
    trajectory = Trajectory.load(str(folder))
    assert [r.round for r in trajectory.rounds] == [0, 1, 2]
    assert trajectory.parameter_names == [n for n, _ in trainer.split.client_parameters()]


def test_merge_for_inference_gives_the_adapter_logits(trained):
    trainer, folder = trained
    reference = logits(trainer.model, INPUT_IDS)
    merged = merge_for_inference(str(folder), base_model=tiny_llama())
    assert isinstance(merged, transformers.LlamaForCausalLM)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, INPUT_IDS), reference, rtol=0, atol=1e-5)
    in_memory = merge_for_inference(PeftModel.from_pretrained(tiny_llama(), str(folder)))
    torch.testing.assert_close(logits(in_memory, INPUT_IDS), reference, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="names no base model"):
        merge_for_inference(str(folder))


def test_hosfl_split_config_round_trip(tmp_path):
    config = HOSFLRunRecord(split_layer=3, num_layers=8, model_type="llama", zo_eps=5e-4, algorithm="hosfl")
    assert HOSFLRunRecord.from_dict(config.to_dict()) == config
    path = config.save_pretrained(tmp_path)
    assert os.path.basename(path) == HOSFL_CONFIG_NAME
    assert HOSFLRunRecord.from_pretrained(tmp_path) == config
    with pytest.warns(UserWarning, match="unknown keys"):
        assert HOSFLRunRecord.from_dict({**config.to_dict(), "from_the_future": 1}) == config
    args = HOSFLConfig(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True, **config.training_kwargs())
    assert HOSFLRunRecord.from_training_args(args) == HOSFLRunRecord(split_layer=3, zo_eps=5e-4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no hosfl_config.json"):
        HOSFLRunRecord.from_pretrained(tmp_path / "empty")


def test_model_card_metadata_and_figures():
    config = HOSFLRunRecord(split_layer=2, num_layers=4, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M")
    log_history = [
        {"loss": 3.5, "step": 1},
        {"loss": 3.1, "step": 2, "comm/activation_bytes": 10},
        {"eval_loss": 3.0, "eval_accuracy": 0.75, "step": 2},
        {"train_runtime": 1.5, "train_loss": 3.3, "step": 2},
    ]
    metrics = final_metrics(log_history)
    assert metrics == {
        "round": 2,
        "loss": 3.1,
        "eval_loss": 3.0,
        "eval_accuracy": 0.75,
        "train_loss": 3.3,
        "train_runtime": 1.5,
    }
    card = build_model_card(
        config,
        adapter={"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": "(?:a|b)"},
        metrics=metrics,
        comm={"activation_bytes": 2048, "sync_bytes": 96},
        memory={"client_weight_bytes": 3 * 2**20},
        tags=["sst2"],
    )
    text = str(card)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M" and card.data.library_name == "peft"
    assert card.data.tags == ["hosfl", "split-federated-learning", "zeroth-order", "hosfl_hf", "lora", "sst2"]
    assert "Hybrid-Order Split Federated Learning" in text and "@misc{hosfl" in text
    assert "| split layer | 2 of 4 decoder blocks on the clients |" in text
    assert "| eval_accuracy | 0.75 |" in text
    assert "2.00 KiB (2,048 bytes)" in text and "3.00 MiB" in text
    assert "`(?:a\\|b)`" in text  # pipes in cells are escaped
    # A local path is no valid `base_model` for the Hub: it is left out of the metadata.
    local = build_model_card(HOSFLRunRecord(split_layer=1, base_model_name_or_path="/tmp"))
    assert local.data.base_model is None and local.data.library_name == "peft"


# ------------------------------------------------------------------------------------------------------- 4-bit
def _tiny_llama_for_4bit(seed: int = 0) -> transformers.LlamaForCausalLM:
    # bitsandbytes' CPU kernels pack weights in blocks of 64 inputs: the hidden size must be a multiple of 64.
    return testing.tiny_llama(seed, vocab_size=VOCAB, hidden_size=64, intermediate_size=128)


def test_client_4bit_config_quantizes_only_client_blocks():
    model = build("gpt2")
    config = client_4bit_config(model.config, split_layer=2)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == torch.float32
    skipped = set(config.llm_int8_skip_modules)
    assert "lm_head" in skipped
    assert {"transformer.h.2.attn.c_attn", "transformer.h.3.mlp.c_proj"} <= skipped
    assert not any(n.startswith(("transformer.h.0.", "transformer.h.1.")) for n in skipped)


def test_bnb_limitation_guard_skips_only_the_known_messages():
    """A 4-bit test skips on bitsandbytes' "no CPU kernels" errors only; every other error fails it."""
    limitation = "Could not run 'bitsandbytes::gemv_4bit' with arguments from the 'CPU' backend. This could be"
    with pytest.raises(pytest.skip.Exception, match="cannot run 4-bit layers on this CPU"):
        with skip_on_bnb_cpu_limitation():
            raise NotImplementedError(limitation)
    for error in (ValueError("bad llm_int8_skip_modules"), RuntimeError("mat1 and mat2 shapes cannot be multiplied")):
        with pytest.raises(type(error)):
            with skip_on_bnb_cpu_limitation():
                raise error


def test_4bit_client_with_zeroth_order_lora(tmp_path):
    bnb = require_bitsandbytes()

    base_dir = tmp_path / "base"
    _tiny_llama_for_4bit().save_pretrained(base_dir)
    quantization = client_4bit_config(transformers.AutoConfig.from_pretrained(base_dir), 2)

    def load_quantized():
        return transformers.AutoModelForCausalLM.from_pretrained(
            base_dir, quantization_config=quantization, device_map="cpu", dtype=torch.float32
        )

    with skip_on_bnb_cpu_limitation():  # the 4-bit load and forward: the only steps that may meet the limitation
        model = load_quantized()
        model(input_ids=INPUT_IDS)
    assert isinstance(model.model.layers[1].mlp.down_proj, bnb.nn.Linear4bit)
    assert type(model.model.layers[2].mlp.down_proj) is torch.nn.Linear and type(model.lm_head) is torch.nn.Linear

    trainer = make_trainer(tmp_path, model, peft_config=LoraConfig(target_modules=["q_proj", "v_proj"], **LORA))
    client = trainer.split.client_parameters()
    assert client and {p.dtype for _, p in client} == {torch.float32}
    assert all(block_of(n, "model.layers") < 2 and "lora_" in n for n, _ in client)
    before = snapshot(client)
    server_before = snapshot(trainer.split.server_parameters())
    trainer.train()
    assert changed(before, trainer.split.client_parameters()) == set(before)
    assert changed(server_before, trainer.split.server_parameters()) == set(server_before)

    # The split runs the same quantized computation as the full forward.
    reference = logits(trainer.model, INPUT_IDS)
    parts = split_model(trainer.model, 2)
    with torch.no_grad():
        assert torch.equal(parts.server(parts.client(input_ids=INPUT_IDS)).logits, reference)

    folder = tmp_path / "saved"
    trainer.save_model(str(folder))
    assert HOSFLRunRecord.from_pretrained(folder).client_quantization["bnb_4bit_quant_type"] == "nf4"
    assert "4-bit" in (folder / "README.md").read_text()
    reloaded = PeftModel.from_pretrained(load_quantized(), str(folder))
    # As trained: without bitsandbytes' CPU repacking (its bf16 absmax changes the outputs; see peft_and_hub.md).
    assert keep_4bit_layers_differentiable(reloaded) == 14
    assert torch.equal(logits(reloaded, INPUT_IDS), reference)


# ---------------------------------------------------------------------------------------------- loopback Hub
@pytest.fixture
def hub(monkeypatch, tmp_path):
    """`huggingface_hub` (and transformers' shared `HfApi`) pointed at a loopback Hub for this test only."""
    import huggingface_hub.constants as constants
    import huggingface_hub.hf_api as hf_api
    import transformers.utils.hub as transformers_hub

    with LoopbackHub() as server:
        # Endpoint-derived values are computed at import time in huggingface_hub: patch each of them.
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(hf_api.api, "endpoint", server.url)  # behind huggingface_hub.file_exists & co.
        monkeypatch.setattr(transformers_hub, "_hf_api", None)  # rebuilt lazily with the patched endpoint
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
        monkeypatch.setenv("HF_TOKEN", "hf_loopback_token")
        yield server
    assert not server.unexpected, f"requests the loopback Hub does not implement: {server.unexpected}"


def test_trainer_push_to_hub_uploads_adapters_config_trajectory_and_card(trained, hub):
    trainer, _ = trained
    trainer.push_to_hub()
    repo = f"{USER}/tiny-hosfl"
    files = hub.files(repo)
    assert set(ARTIFACTS) <= set(files)
    assert not any(name.startswith("checkpoint-") for name in files)
    output_dir = trainer.args.output_dir
    for name in ARTIFACTS:
        with open(os.path.join(output_dir, name), "rb") as f:
            assert files[name] == f.read(), name

    card = files["README.md"].decode()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "peft"
    assert {"hosfl", "split-federated-learning", "zeroth-order", "lora"} <= set(metadata["tags"])
    assert "| split layer | 2 of 4 decoder blocks on the clients |" in card
    assert f"| round | {trainer.state.global_step} |" in card
    assert f"({trainer.comm['activation_bytes']:,} bytes)" in card
    assert "client part weights" in card and "@misc{hosfl" in card
    adapter_config = json.loads(files["adapter_config.json"])
    assert adapter_config["rank_pattern"] and adapter_config["peft_type"] == "LORA"
    assert json.loads(files[HOSFL_CONFIG_NAME]) == trainer.hosfl_split_config().to_dict()
    assert hub.commits[repo][-1]["summary"] == "End of training"

    # What arrived loads back from the (loopback) Hub with peft and hosfl_hf.
    assert HOSFLRunRecord.from_pretrained(repo) == trainer.hosfl_split_config()
    from_hub = PeftModel.from_pretrained(tiny_llama(), repo)
    assert torch.equal(logits(from_hub, INPUT_IDS), logits(trainer.model, INPUT_IDS))


def test_push_saved_folder_and_config(trained, hub):
    trainer, folder = trained
    os.remove(folder / "README.md")  # a card is generated from hosfl_config.json when the folder has none
    push_folder(folder, "saved-run")
    files = hub.files(f"{USER}/saved-run")
    assert set(ARTIFACTS) <= set(files)
    assert files["adapter_model.safetensors"] == (folder / "adapter_model.safetensors").read_bytes()
    assert files["hosfl_trajectory.json"] == (folder / "hosfl_trajectory.json").read_bytes()
    assert "| split layer | 2 of 4" in files["README.md"].decode()

    trainer.hosfl_split_config().push_to_hub("config-only")
    assert set(hub.files(f"{USER}/config-only")) == {HOSFL_CONFIG_NAME}
    with pytest.raises(ValueError, match="save the model with HOSFLTrainer.save_model"):
        push_folder(trainer.args.output_dir + "-missing", "nothing")


def test_checkpoint_pushes_carry_the_hosfl_files(tmp_path, hub):
    # hub_strategy="every_save": the stock Trainer copies only weight/config files of each checkpoint into output_dir
    # before uploading it; the split config, trajectory and card must follow.
    lora = LoraConfig(target_modules=["q_proj", "v_proj"], **LORA)
    args = {"save_strategy": "steps", "save_steps": 1, "push_to_hub": True, "hub_model_id": "ckpt", "max_steps": 2}
    trainer = make_trainer(tmp_path, tiny_llama(), peft_config=lora, args={**args, "hub_strategy": "every_save"})
    trainer.train()
    trainer._finish_current_push()
    files = hub.files(f"{USER}/ckpt")
    assert set(ARTIFACTS) <= set(files)
    assert not any(name.startswith("checkpoint-") for name in files)
    pushed = Trajectory.from_dict(json.loads(files["hosfl_trajectory.json"]))
    assert pushed.rounds and pushed.rounds == trainer.trajectory.rounds[: len(pushed.rounds)]
    assert json.loads(files[HOSFL_CONFIG_NAME]) == trainer.hosfl_split_config().to_dict()
