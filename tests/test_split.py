"""Tests of `hosfl_hf.split`: exact client/server composition, parameter partition and gradients on tiny random models.

Every model is built from a config (random weights, no download). `client(...)` followed by `server(...)` must give
the full model's logits for every valid cut, with right and left padding, and the server backward must give the
full model's gradients.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import transformers
from torch import nn

from hosfl_hf.split import SPLIT_REGISTRY, CutActivations, split_model, unwrap_causal_lm

VOCAB = 96
NUM_LAYERS = 4
TOKENS = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


pytestmark = pytest.mark.usefixtures("single_thread")


def _llama_like(config_cls, **overrides):
    kwargs = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        **TOKENS,
    }
    kwargs.update(overrides)
    return config_cls(**kwargs)


# name -> (model class name, config factory). Tied embeddings are set both ways across the list.
ARCHITECTURES = {
    "opt": (
        "OPTForCausalLM",
        lambda: transformers.OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
            tie_word_embeddings=True,
            **TOKENS,
        ),
    ),
    "gpt2": (
        "GPT2LMHeadModel",
        lambda: transformers.GPT2Config(
            n_embd=32, n_layer=NUM_LAYERS, n_head=4, n_positions=64, tie_word_embeddings=True, **TOKENS
        ),
    ),
    "llama": ("LlamaForCausalLM", lambda: _llama_like(transformers.LlamaConfig, tie_word_embeddings=False)),
    "mistral": (
        "MistralForCausalLM",
        lambda: _llama_like(transformers.MistralConfig, sliding_window=3, tie_word_embeddings=False),
    ),
    "qwen2": ("Qwen2ForCausalLM", lambda: _llama_like(transformers.Qwen2Config, tie_word_embeddings=True)),
    "qwen3": ("Qwen3ForCausalLM", lambda: _llama_like(transformers.Qwen3Config, head_dim=8, tie_word_embeddings=True)),
    "gemma3_text": (
        "Gemma3ForCausalLM",
        lambda: _llama_like(
            transformers.Gemma3TextConfig,
            head_dim=8,
            sliding_window=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            tie_word_embeddings=True,
        ),
    ),
    "gpt_neox": (
        "GPTNeoXForCausalLM",
        lambda: transformers.GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=4,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            **TOKENS,
        ),
    ),
    "phi3": ("Phi3ForCausalLM", lambda: _llama_like(transformers.Phi3Config, tie_word_embeddings=False)),
    "gemma": ("GemmaForCausalLM", lambda: _llama_like(transformers.GemmaConfig, head_dim=8, tie_word_embeddings=True)),
    "gemma2": (
        "Gemma2ForCausalLM",
        lambda: _llama_like(transformers.Gemma2Config, head_dim=8, sliding_window=3, tie_word_embeddings=True),
    ),
    "falcon": (
        "FalconForCausalLM",
        lambda: transformers.FalconConfig(
            hidden_size=32, num_hidden_layers=NUM_LAYERS, num_attention_heads=4, tie_word_embeddings=True, **TOKENS
        ),
    ),
    "gptj": (
        "GPTJForCausalLM",
        lambda: transformers.GPTJConfig(
            n_embd=32, n_layer=NUM_LAYERS, n_head=4, rotary_dim=4, n_positions=64, tie_word_embeddings=False, **TOKENS
        ),
    ),
    "bloom": (
        "BloomForCausalLM",
        lambda: transformers.BloomConfig(
            hidden_size=32, n_layer=NUM_LAYERS, n_head=4, tie_word_embeddings=True, **TOKENS
        ),
    ),
    "gpt_neo": (
        "GPTNeoForCausalLM",
        lambda: transformers.GPTNeoConfig(
            hidden_size=32,
            num_layers=NUM_LAYERS,
            num_heads=4,
            attention_types=[[["global", "local"], NUM_LAYERS // 2]],
            window_size=3,
            max_position_embeddings=64,
            tie_word_embeddings=True,
            **TOKENS,
        ),
    ),
    "phi": ("PhiForCausalLM", lambda: _llama_like(transformers.PhiConfig, tie_word_embeddings=False)),
    "stablelm": ("StableLmForCausalLM", lambda: _llama_like(transformers.StableLmConfig, tie_word_embeddings=False)),
    "qwen2_moe": (
        "Qwen2MoeForCausalLM",
        lambda: _llama_like(
            transformers.Qwen2MoeConfig,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeForCausalLM",
        lambda: _llama_like(
            transformers.Qwen3MoeConfig,
            head_dim=8,
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            tie_word_embeddings=False,
        ),
    ),
    "olmo": ("OlmoForCausalLM", lambda: _llama_like(transformers.OlmoConfig, tie_word_embeddings=False)),
    "olmo2": ("Olmo2ForCausalLM", lambda: _llama_like(transformers.Olmo2Config, tie_word_embeddings=False)),
    "mixtral": (
        "MixtralForCausalLM",
        lambda: _llama_like(
            transformers.MixtralConfig,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=3,
            tie_word_embeddings=False,
        ),
    ),
    "granite": ("GraniteForCausalLM", lambda: _llama_like(transformers.GraniteConfig, tie_word_embeddings=True)),
    "smollm3": ("SmolLM3ForCausalLM", lambda: _llama_like(transformers.SmolLM3Config, tie_word_embeddings=True)),
}


def build_model(name: str, seed: int = 0) -> nn.Module:
    """A tiny random model in eval mode, with matrices scaled up so that every block changes the logits visibly."""
    class_name, make_config = ARCHITECTURES[name]
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(make_config())
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.15)
    return model.eval()


def make_batch(padding: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(3, VOCAB, (3, 7), generator=generator)
    if padding == "none":
        return input_ids, None
    mask = torch.ones_like(input_ids)
    if padding == "right":
        mask[1, 5:] = 0
        mask[2, 3:] = 0
    else:
        mask[1, :2] = 0
        mask[2, :4] = 0
    input_ids = input_ids.masked_fill(mask == 0, TOKENS["pad_token_id"])
    return input_ids, mask


def _layer_index(name: str, layers_path: str) -> int | None:
    match = re.match(re.escape(layers_path) + r"\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def test_registry_names_match_fixture_models():
    # Every architecture of the fixture must be split through its registry entry (no fallback warning).
    assert set(ARCHITECTURES) <= set(SPLIT_REGISTRY)


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch(request):
    return request.param


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_composition_matches_full_model(arch, padding):
    model = build_model(arch)
    input_ids, mask = make_batch(padding)
    with torch.no_grad():
        reference = model(input_ids, attention_mask=mask).logits
    assert reference.abs().max() > 0.1, "degenerate random model: logits too small for a meaningful check"
    for k in range(1, NUM_LAYERS):
        parts = split_model(model, split_layer=k)
        cut = parts.client(input_ids=input_ids, attention_mask=mask)
        assert isinstance(cut, CutActivations)
        for f in dataclasses.fields(cut):
            value = getattr(cut, f.name)
            assert value is None or isinstance(value, torch.Tensor), f"{f.name} is a {type(value).__name__}"
        assert cut.hidden_states.shape[:2] == input_ids.shape
        assert not cut.hidden_states.requires_grad
        with torch.no_grad():
            logits = parts.server(cut).logits
        diff = (logits - reference).abs().max().item()
        assert diff <= 1e-5, f"{arch} split at {k} with {padding} padding: max abs diff {diff}"
        if padding == "left" and k == NUM_LAYERS // 2:
            # The server must really use the padding mask it receives (else this test could not catch a bug).
            with torch.no_grad():
                unmasked = parts.server(dataclasses.replace(cut, attention_mask=None)).logits
            assert (unmasked - reference)[mask.bool()].abs().max() > 1e-4


def test_partition_and_shared_modules(arch):
    model = build_model(arch)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == ARCHITECTURES[arch][1]().tie_word_embeddings
    for k in range(1, NUM_LAYERS):
        parts = split_model(model, split_layer=k)
        all_names = {n for n, _ in model.named_parameters()}
        client = set(parts.client_parameter_names)
        server = set(parts.server_parameter_names)
        assert client.isdisjoint(server)
        assert client | server == all_names
        assert len(parts.client_parameter_names) == len(client)
        assert len(parts.server_parameter_names) == len(server)
        # Blocks 0..k-1 are the client's, blocks k.. the server's.
        for name in all_names:
            index = _layer_index(name, parts.layers_path)
            if index is not None:
                assert (name in client) == (index < k), name
        # No copies: the parts hand out the model's own parameter objects.
        own = dict(model.named_parameters(remove_duplicate=False))
        for name, param in parts.client_parameters(trainable_only=False) + parts.server_parameters(
            trainable_only=False
        ):
            assert param is own[name]
        assert parts.model is model
        assert parts.layers is model.get_submodule(parts.layers_path)
        # All parameters were trainable: only the client's copy of a tied input embedding is frozen by the split.
        frozen = [n for n in parts.client_parameter_names if not own[n].requires_grad]
        embedding = model.get_input_embeddings().weight
        assert frozen == ([n for n in own if own[n] is embedding] if tied else [])
        trainable_client = [n for n in parts.client_parameter_names if n not in frozen]
        assert [n for n, _ in parts.client_parameters()] == trainable_client
        assert [n for n, _ in parts.server_parameters()] == parts.server_parameter_names
        assert model.get_output_embeddings().weight is not embedding
        assert parts.client_parameter_names, "the client must hold some parameters"


def test_gemma3_sliding_window_matters():
    # The Gemma3 fixture is only a meaningful test of sliding-window masks if the window changes the output.
    model = build_model("gemma3_text")
    input_ids, mask = make_batch("left")
    with torch.no_grad():
        reference = model(input_ids, attention_mask=mask).logits
        model.config.sliding_window = 64
        wide = model(input_ids, attention_mask=mask).logits
    assert (wide - reference).abs().max() > 1e-4


def test_client_runs_without_dropout_and_restores_training_mode():
    model = build_model("gpt2")  # GPT-2 has embedding, attention and residual dropout (0.1 each)
    input_ids, mask = make_batch("right")
    parts = split_model(model, split_layer=2)
    expected = parts.client(input_ids=input_ids, attention_mask=mask).hidden_states
    model.train()
    first = parts.client(input_ids=input_ids, attention_mask=mask).hidden_states
    second = parts.client(input_ids=input_ids, attention_mask=mask).hidden_states
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert all(m.training for m in model.modules()), "client() must restore the training flags it switched off"
    # The server keeps its dropout in training mode.
    cut = parts.client(input_ids=input_ids, attention_mask=mask)
    torch.manual_seed(0)
    a = parts.server(cut).logits
    torch.manual_seed(1)
    b = parts.server(cut).logits
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt", "gemma3_text", "bloom"])
def test_explicit_position_ids_and_inputs_embeds(name):
    model = build_model(name)
    input_ids, mask = make_batch("left")
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    parts = split_model(model, split_layer=2)
    with torch.no_grad():
        reference = model(input_ids, attention_mask=mask, position_ids=position_ids).logits
        cut = parts.client(input_ids=input_ids, attention_mask=mask, position_ids=position_ids)
        assert torch.equal(cut.position_ids, position_ids)
        assert (parts.server(cut).logits - reference).abs().max() <= 1e-5
        embeds = model.get_input_embeddings()(input_ids)
        reference = model(inputs_embeds=embeds, attention_mask=mask).logits
        cut = parts.client(inputs_embeds=embeds, attention_mask=mask)
        assert (parts.server(cut).logits - reference).abs().max() <= 1e-5


def test_server_restores_blocks_after_an_error():
    model = build_model("llama")
    input_ids, mask = make_batch("right")
    with torch.no_grad():
        reference = model(input_ids, attention_mask=mask).logits
    parts = split_model(model, split_layer=2)
    cut = parts.client(input_ids=input_ids, attention_mask=mask)
    with pytest.raises(Exception):  # noqa: B017 - any error raised inside the model
        parts.server(cut, labels=torch.zeros(5, 2, 9, dtype=torch.long))
    assert not any("forward" in vars(layer) for layer in parts.layers)
    assert not any(layer._forward_pre_hooks for layer in parts.layers)
    with torch.no_grad():
        assert torch.equal(model(input_ids, attention_mask=mask).logits, reference)


# ------------------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma3_text", "opt"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_gradients_match_full_backprop(name, padding):
    model = build_model(name)
    model.get_input_embeddings().weight.requires_grad_(False)
    input_ids, mask = make_batch(padding)
    labels = input_ids.masked_fill(mask == 0, -100)
    k = 2
    parts = split_model(model, split_layer=k)
    layers = parts.layers
    # The tied output embedding (GPT-2, OPT, Gemma3) is frozen with the input embedding, so nothing was untied.
    assert not any(p.requires_grad for p in model.get_input_embeddings().parameters())

    # Full model: gradients of all parameters and dloss/dz at the input of block k.
    captured = {}

    def capture(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden.retain_grad()
        captured["z"] = hidden

    handle = layers[k].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        full_loss = model(input_ids, attention_mask=mask, labels=labels).loss
    finally:
        handle.remove()
    full_loss.backward(retain_graph=True)
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    z_full = captured["z"]
    dz_full = z_full.grad.clone()
    model.zero_grad(set_to_none=True)

    # Split: server backward from detached cut activations.
    cut = parts.client(input_ids=input_ids, attention_mask=mask)
    torch.testing.assert_close(cut.hidden_states, z_full.detach(), rtol=0, atol=1e-6)
    h = cut.hidden_states.detach().requires_grad_()
    loss = parts.server(dataclasses.replace(cut, hidden_states=h), labels=labels).loss
    torch.testing.assert_close(loss, full_loss.detach(), rtol=0, atol=1e-6)
    loss.backward()
    server = parts.server_parameters()
    assert server, "the server must have trainable parameters"
    for n, p in server:
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, full_grads[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    # The server backward must not reach the client blocks.
    for n, p in parts.client_parameters():
        assert p.grad is None, n
    torch.testing.assert_close(h.grad, dz_full, rtol=1e-5, atol=1e-6)

    # Chain rule through the client with the server's cotangent reproduces the full client gradients.
    client = parts.client_parameters()
    assert client
    client_grads = torch.autograd.grad(z_full, [p for _, p in client], grad_outputs=h.grad, allow_unused=True)
    for (n, _), g in zip(client, client_grads, strict=True):
        expected = full_grads[n]
        if g is None:
            g = torch.zeros_like(expected)
        torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


# --------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("split_layer", [0, NUM_LAYERS, -1, NUM_LAYERS + 3, 2.5, True, False, "2", None])
def test_invalid_split_layer(split_layer):
    model = build_model("llama")
    with pytest.raises(ValueError, match=rf"1\.\.{NUM_LAYERS - 1}"):
        split_model(model, split_layer=split_layer)


def test_encoder_decoder_is_rejected():
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)
    model = transformers.T5ForConditionalGeneration(config)
    with pytest.raises(ValueError, match=r"(?i)supported model types") as info:
        split_model(model, split_layer=1)
    assert "llama" in str(info.value)


class _ToyConfig(transformers.PretrainedConfig):
    model_type = "toy_no_blocks"

    def __init__(self, num_hidden_layers=4, **kwargs):
        self.num_hidden_layers = num_hidden_layers
        super().__init__(**kwargs)


class _NoBlockList(nn.Module):
    """Has a config and input embeddings like a causal LM, but no list of decoder blocks."""

    def __init__(self):
        super().__init__()
        self.config = _ToyConfig()
        self.embed = nn.Embedding(8, 4)
        self.blocks = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])

    def get_input_embeddings(self):
        return self.embed


def test_model_without_block_list_is_rejected():
    with pytest.raises(ValueError, match=r"(?i)supported model types") as info:
        split_model(_NoBlockList(), split_layer=1)
    assert "toy_no_blocks" in str(info.value)


def test_non_model_is_rejected():
    with pytest.raises(ValueError, match="ForCausalLM"):
        split_model(nn.Linear(2, 2), split_layer=1)


def test_bert_encoder_is_rejected():
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32
    )
    model = transformers.BertModel(config)
    with pytest.raises(ValueError, match=r"(?i)supported model types"):
        split_model(model, split_layer=2)


def test_unregistered_model_type_falls_back_with_warning(monkeypatch):
    monkeypatch.delitem(SPLIT_REGISTRY, "llama")
    model = build_model("llama")
    input_ids, mask = make_batch("left")
    with torch.no_grad():
        reference = model(input_ids, attention_mask=mask).logits
    with pytest.warns(UserWarning, match="SPLIT_REGISTRY"):
        parts = split_model(model, split_layer=2)
    assert parts.layers_path == "model.layers"
    with torch.no_grad():
        logits = parts.server(parts.client(input_ids=input_ids, attention_mask=mask)).logits
    assert (logits - reference).abs().max() <= 1e-5


def test_server_rejects_non_cut_input():
    parts = split_model(build_model("llama"), split_layer=2)
    with pytest.raises(TypeError, match="CutActivations"):
        parts.server(torch.zeros(1, 3, 32))


# ----------------------------------------------------------------------------------------------------------- peft
def test_peft_lora_split():
    peft = pytest.importorskip("peft")
    model = build_model("llama")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(model, lora).eval()
    input_ids, mask = make_batch("left")
    with torch.no_grad():
        reference = peft_model(input_ids=input_ids, attention_mask=mask).logits
        base = unwrap_causal_lm(peft_model)
        with peft_model.disable_adapter():
            without_lora = peft_model(input_ids=input_ids, attention_mask=mask).logits
    assert (reference - without_lora).abs().max() > 1e-4, "LoRA weights must change the output for this test"

    parts = split_model(peft_model, split_layer=2)
    assert parts.model is base
    with torch.no_grad():
        logits = parts.server(parts.client(input_ids=input_ids, attention_mask=mask)).logits
    assert (logits - reference).abs().max() <= 1e-5

    lora_names = [n for n, p in base.named_parameters() if p.requires_grad]
    assert lora_names and all("lora_" in n for n in lora_names)
    expected_client = [n for n in lora_names if _layer_index(n, "model.layers") < 2]
    expected_server = [n for n in lora_names if _layer_index(n, "model.layers") >= 2]
    assert len(expected_client) == len(expected_server) == 2 * 2 * 2  # 2 layers x {q,v} x {A,B}
    assert [n for n, _ in parts.client_parameters()] == expected_client
    assert [n for n, _ in parts.server_parameters()] == expected_server
    # Frozen base weights are still partitioned, and nothing is untied or copied.
    assert set(parts.client_parameter_names) | set(parts.server_parameter_names) == {
        n for n, _ in base.named_parameters()
    }


# ------------------------------------------------------------------------------------------------- tied embeddings
def test_tied_trainable_embeddings_are_untied():
    model = build_model("qwen2")  # tie_word_embeddings=True
    assert model.lm_head.weight is model.model.embed_tokens.weight
    input_ids, mask = make_batch("right")
    with torch.no_grad():
        reference = model(input_ids, attention_mask=mask).logits
    original = model.lm_head.weight.detach().clone()

    parts = split_model(model, split_layer=2)
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert embed is not head
    assert not embed.requires_grad
    assert head.requires_grad
    assert torch.equal(embed, original) and torch.equal(head, original)
    client_trainable = [n for n, _ in parts.client_parameters()]
    server_trainable = [n for n, _ in parts.server_parameters()]
    assert "model.embed_tokens.weight" in parts.client_parameter_names
    assert "model.embed_tokens.weight" not in client_trainable
    assert "lm_head.weight" in server_trainable
    assert "lm_head.weight" not in parts.client_parameter_names
    assert set(parts.client_parameter_names).isdisjoint(parts.server_parameter_names)
    assert set(parts.client_parameter_names) | set(parts.server_parameter_names) == {
        n for n, _ in model.named_parameters()
    }
    # A later tie_weights() (e.g. from a Trainer or save/load round trip) must not re-tie them.
    model.tie_weights()
    assert model.lm_head.weight is not model.model.embed_tokens.weight

    with torch.no_grad():
        logits = parts.server(parts.client(input_ids=input_ids, attention_mask=mask)).logits
    assert (logits - reference).abs().max() <= 1e-5

    # Training the server's output embedding does not leak into the client's input embedding.
    with torch.no_grad():
        head.add_(1.0)
    assert torch.equal(model.model.embed_tokens.weight, original)


def test_tied_frozen_embeddings_stay_tied():
    model = build_model("gpt2")  # tie_word_embeddings=True
    model.get_input_embeddings().weight.requires_grad_(False)
    parts = split_model(model, split_layer=2)
    assert model.lm_head.weight is model.transformer.wte.weight
    # The shared weight is listed once, on the server side.
    assert "transformer.wte.weight" in parts.server_parameter_names
    assert "transformer.wte.weight" not in parts.client_parameter_names
    assert "transformer.wpe.weight" in parts.client_parameter_names


# ------------------------------------------------------------------------------------- what split_model refuses
def _tiny(model_type: str, **overrides):
    """A tiny random model of any causal-LM type, from the coverage sweep's shrinker (see docs/split_coverage.md)."""
    from hosfl_hf.coverage import padded_batch, tiny_causal_lm

    model = tiny_causal_lm(model_type)
    for name, value in overrides.items():
        setattr(model.config, name, value)
    return model, *padded_batch()


def test_stop_exception_cannot_be_swallowed_by_model_code():
    from hosfl_hf.split import _CutReached

    assert issubclass(_CutReached, BaseException) and not issubclass(_CutReached, Exception)


@pytest.mark.parametrize(
    "model_type, reason",
    [
        ("dory", r"decoder block 0 runs 2 times in one forward"),  # loops over a range of its blocks
        ("inkling2_text", r"receives `block_states`, which differs"),  # block states carried along
        ("zaya", r"needs `prev_router_hidden_states`, which the server does not get"),
        ("gemma4_text", r"cannot run from the cut activations alone"),  # per-layer inputs from the token ids
    ],
)
def test_models_that_break_the_cut_are_refused_with_the_reason(model_type, reason):
    model, input_ids, mask = _tiny(model_type)
    for k in (1, 2):
        with pytest.raises(ValueError, match=reason) as info:
            split_model(model, split_layer=k)
        assert f"'{model_type}'" in str(info.value) and f"split_layer={k}" in str(info.value)
    # Refusing leaves the model as it was: no hooks, no replaced forwards.
    assert not any(m._forward_pre_hooks or m._forward_hooks or "forward" in vars(m) for m in model.modules())


def test_skipped_blocks_move_the_cut_to_the_next_block_that_runs():
    # Mllama's text decoder skips its cross-attention block (2 here) without images.
    model, input_ids, mask = _tiny("mllama")
    assert model.config.get_text_config().cross_attention_layers == [2]
    with torch.no_grad():
        reference = model(input_ids, attention_mask=mask).logits
        for k in (1, 2, 3):
            parts = split_model(model, split_layer=k)
            cut = parts.client(input_ids=input_ids, attention_mask=mask)
            diff = (parts.server(cut).logits - reference)[mask.bool()].abs().max()
            assert diff <= 1e-5, (k, diff)
            if k == 2:  # the client ran blocks 0-1; block 2 is skipped, so the cut is the input of block 3
                assert parts.client_parameter_names and all(
                    _layer_index(n, parts.layers_path) in (0, 1)
                    for n in parts.client_parameter_names
                    if _layer_index(n, parts.layers_path) is not None
                )


def test_mla_attention_and_token_pattern_models_split_exactly():
    for model_type in ("deepseek_v3", "cpmant"):  # latent attention; masks built from the token ids
        model, input_ids, mask = _tiny(model_type)
        with torch.no_grad():
            reference = model(input_ids, attention_mask=mask).logits
            for k in (1, 3):
                parts = split_model(model, split_layer=k, verify=True)
                logits = parts.server(parts.client(input_ids=input_ids, attention_mask=mask)).logits
                assert (logits - reference)[mask.bool()].abs().max() <= 1e-5, (model_type, k)


def test_router_aux_loss_over_all_blocks_is_refused():
    model = build_model("mixtral")
    input_ids, mask = make_batch("right")
    parts = split_model(model, split_layer=2)  # without router logits, logits and loss are exact
    labels = input_ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        full = model(input_ids, attention_mask=mask, labels=labels)
        split = parts.server(parts.client(input_ids=input_ids, attention_mask=mask), labels=labels)
    assert (split.loss - full.loss).abs() <= 1e-5
    model.config.output_router_logits = True
    model.config.router_aux_loss_coef = 0.5
    with pytest.raises(ValueError, match=r"'mixtral'.*auxiliary loss.*output_router_logits=False"):
        split_model(model, split_layer=2)


def test_verify_compares_logits_on_a_padded_batch():
    model = build_model("llama")
    split_model(model, split_layer=2, verify=True)

    # A model whose forward from embeddings goes wrong only with padding: the probe batch (no padding) cannot see
    # it, verify=True (left and right padding) does.
    def shift_positions(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if kwargs.get("inputs_embeds") is not None and mask is not None and not bool(mask.all()):
            batch, seq = mask.shape
            kwargs["position_ids"] = torch.arange(0, 2 * seq, 2).expand(batch, seq)  # twice the distances
        return args, kwargs

    model.model.register_forward_pre_hook(shift_positions, with_kwargs=True)
    split_model(model, split_layer=2)
    with pytest.raises(ValueError, match=r"'llama'.*verify=True.*padded batch"):
        split_model(model, split_layer=2, verify=True)


def test_split_check_keeps_modes_and_global_rng():
    model = build_model("gpt2").train()
    model.transformer.h[1].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    state = torch.get_rng_state()
    split_model(model, split_layer=2, verify=True)
    assert torch.equal(torch.get_rng_state(), state)
    assert {name: m.training for name, m in model.named_modules()} == modes


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_bfloat16_model_is_checked_and_split_exactly(name):
    model = build_model(name).to(torch.bfloat16)
    input_ids, mask = make_batch("left")
    with torch.no_grad():
        reference = model(input_ids, attention_mask=mask).logits
    parts = split_model(model, split_layer=2, verify=True)
    cut = parts.client(input_ids=input_ids, attention_mask=mask)
    assert cut.hidden_states.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(parts.server(cut).logits[mask.bool()], reference[mask.bool()])
