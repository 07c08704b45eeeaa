"""HOSFLSFTTrainer: TRL's SFT data handling under the HO-SFL round, on a tiny random Llama and a word-level tokenizer
with a ChatML chat template: only completion tokens carry loss, the round is intact (client update from seeds and
scalars, bit-identical replay), evaluation reports perplexity and the accuracy of the highest-scoring answer."""

import copy
import math

import pytest
import torch
from conftest import require_bitsandbytes, skip_on_bnb_cpu_limitation, tiny_args
from datasets import Dataset

pytest.importorskip("trl")

from hosfl_hf import (  # noqa: E402
    HOSFLSFTConfig,
    HOSFLSFTTrainer,
    Trajectory,
    replay_trajectory,
    testing,  # noqa: E402
)

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models (conftest.py)

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = ["system", "user", "assistant", "Review", "Sentiment", "positive", "negative", ":", "good", "bad", "film"]
WORDS += [f"w{i}" for i in range(12)]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = CHATML
    return tok


def tiny_model(tokenizer, seed: int = 0):

    return testing.tiny_llama(
        seed,
        vocab_size=len(tokenizer),
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def review(i: int) -> tuple[str, str]:
    g = torch.Generator().manual_seed(i)
    label = int(torch.randint(0, 2, (1,), generator=g))
    filler = [f"w{int(j)}" for j in torch.randint(0, 12, (3,), generator=g)]
    return " ".join([*filler, "good" if label else "bad", "film"]), ["negative", "positive"][label]


def conversations(n: int, offset: int = 0) -> Dataset:
    rows = []
    for i in range(offset, offset + n):
        text, answer = review(i)
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "Sentiment"},
                    {"role": "user", "content": f"Review : {text}"},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return Dataset.from_list(rows)


def prompt_completions(n: int, offset: int = 0) -> Dataset:
    rows = []
    for i in range(offset, offset + n):
        text, answer = review(i)
        rows.append({"prompt": f"Review : {text} Sentiment :", "completion": f" {answer}"})
    return Dataset.from_list(rows)


def sft_args(tmp_path, **overrides):
    values = dict(max_steps=6, per_device_eval_batch_size=16, logging_steps=3, max_length=64)
    return tiny_args(tmp_path, HOSFLSFTConfig, **{**values, **overrides})


def test_conversations_carry_loss_on_the_last_assistant_turn_only(tokenizer, tmp_path):
    data = conversations(16)
    trainer = HOSFLSFTTrainer(
        tiny_model(tokenizer), sft_args(tmp_path), split_layer=2, train_dataset=data, processing_class=tokenizer
    )
    prepared = trainer.train_dataset
    assert len(prepared) == len(data)
    for raw, row in zip(data, prepared):
        messages = raw["messages"]
        prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
        assert row["input_ids"] == full["input_ids"]
        p = len(prompt)
        assert row["input_ids"][:p] == prompt
        assert row["labels"][:p] == [-100] * p  # system and user turns, and the assistant header: no loss
        answer = tokenizer.convert_tokens_to_ids(messages[-1]["content"])
        assert row["labels"][p:] == row["input_ids"][p:] and row["labels"][p] == answer  # the answer and <|im_end|>


def test_prompt_completion_carries_loss_on_the_completion_only(tokenizer, tmp_path):
    data = prompt_completions(16)
    trainer = HOSFLSFTTrainer(
        tiny_model(tokenizer), sft_args(tmp_path), split_layer=2, train_dataset=data, processing_class=tokenizer
    )
    for raw, row in zip(data, trainer.train_dataset):
        prompt = tokenizer(raw["prompt"])["input_ids"]
        answer = tokenizer.convert_tokens_to_ids(raw["completion"].strip())
        assert row["labels"] == [-100] * len(prompt) + [answer, tokenizer.eos_token_id]
        assert row["input_ids"] == prompt + [answer, tokenizer.eos_token_id]
    # The collated batch keeps the masks (pads are -100 too) and names its client.
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) >= {"input_ids", "attention_mask", "labels", "hosfl_client"}
    assert ((batch["labels"] != -100).sum(-1) == 2).all()


@pytest.mark.parametrize("make_data", [conversations, prompt_completions], ids=["conversational", "prompt-completion"])
def test_sft_round_is_hosfl_and_replays_bit_identically(make_data, tokenizer, tmp_path):
    from peft import LoraConfig

    model = tiny_model(tokenizer)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = sft_args(tmp_path, max_steps=5)
    trainer = HOSFLSFTTrainer(
        model, args, split_layer=2, train_dataset=make_data(40), processing_class=tokenizer, peft_config=lora
    )
    initial = copy.deepcopy(trainer.split.model)
    client_names = [n for n, _ in trainer.split.client_parameters()]
    assert client_names and all("lora_" in n for n in client_names)
    trainer.train()
    # One round per optimizer step; each client update is P seeds and P averaged scalars, nothing else.
    assert len(trainer.trajectory.rounds) == 5
    assert all(len(r.seeds) == len(r.scalars) == args.num_perturbations for r in trainer.trajectory.rounds)
    trained = {n: p.detach().clone() for n, p in trainer.split.client_parameters()}
    assert any(not torch.equal(trained[n], p) for n, p in initial.named_parameters() if n in trained)
    path = tmp_path / "trajectory.json"
    trainer.trajectory.save(path)
    replay_trajectory(initial, Trajectory.load(path))
    replayed = dict(initial.named_parameters())
    for name, value in trained.items():
        assert torch.equal(replayed[name], value), name
    # The server part trained by backprop.
    server = [n for n, _ in trainer.split.server_parameters()]
    before = dict(initial.named_parameters())
    assert any(not torch.equal(before[n], dict(trainer.split.model.named_parameters())[n]) for n in server)


def test_evaluation_reports_perplexity_and_choice_accuracy(tokenizer, tmp_path):
    args = sft_args(tmp_path, answer_choices=["negative", "positive"])
    evaluation = conversations(12, offset=100)
    trainer = HOSFLSFTTrainer(
        tiny_model(tokenizer),
        args,
        split_layer=2,
        train_dataset=conversations(24),
        eval_dataset=evaluation,
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    # The choice accuracy equals the one computed from the whole (unsplit) model's next-token scores.
    model = trainer.split.model.eval()
    correct = 0
    for row in evaluation:
        messages = row["messages"]
        scores = []
        for choice in args.answer_choices:
            text = tokenizer.apply_chat_template(
                [*messages[:-1], {"role": "assistant", "content": choice}], tokenize=False
            )
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            p = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            targets = ids[0, 1:]
            scores.append(log_probs[p - 1 :].gather(-1, targets[p - 1 :, None]).sum().item())
        correct += args.answer_choices[max(range(2), key=scores.__getitem__)] == messages[-1]["content"]
    assert metrics["eval_choice_accuracy"] == correct / len(evaluation)
    assert any("eval_choice_accuracy" in entry for entry in trainer.state.log_history)


def test_packing_and_bad_conversations_are_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="packing=True is not supported"):
        sft_args(tmp_path, packing=True)
    bad = Dataset.from_list([{"messages": [{"role": "user", "content": "good film"}]}] * 8)
    with pytest.raises(ValueError, match="ends with a 'user' turn"):
        HOSFLSFTTrainer(
            tiny_model(tokenizer), sft_args(tmp_path), split_layer=2, train_dataset=bad, processing_class=tokenizer
        )


def test_sft_command_learns_a_chat_task_from_a_local_folder(tokenizer, tmp_path, capsys):
    import json

    from hosfl_hf.cli import cli

    checkpoint = tmp_path / "tiny"
    tiny_model(tokenizer).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    data = tmp_path / "chats"
    data.mkdir()
    for split, rows in (("train", conversations(400)), ("test", conversations(48, offset=1000))):
        rows.to_json(data / f"{split}.jsonl")
    out = tmp_path / "out"
    argv = ["sft", "--model_name_or_path", str(checkpoint), "--dataset_name", str(data), "--use_peft", "false"]
    argv += ["--split_layer", "2", "--num_clients", "4", "--clients_per_round", "2", "--max_steps", "40"]
    argv += ["--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--client_learning_rate", "1e-3"]
    argv += ["--answer_choices", "negative", "positive", "--output_dir", str(out), "--use_cpu", "true"]
    argv += ["--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "40"]
    assert cli(argv) == 0
    printed = capsys.readouterr().out
    assert "[sft] test before training: loss" in printed and "[sft] test choice_accuracy before:" in printed
    metrics = json.loads((out / "all_results.json").read_text())
    assert metrics["after_loss"] < 0.5 * metrics["before_loss"]
    # 48 test conversations, half of each answer: the random model is at chance (0.5 here), the trained one near 1.
    before, after = metrics["before_choice_accuracy"], metrics["after_choice_accuracy"]
    assert all(48 * value == round(48 * value) for value in (before, after)), metrics
    assert before <= 0.7 and after >= 0.9 and after - before >= 0.3, metrics
    assert len(json.loads((out / "hosfl_trajectory.json").read_text())["rounds"]) == 40


def test_sft_resume_from_checkpoint_is_bit_identical_and_saves_hosfl_artifacts(tokenizer, tmp_path):
    def run(folder, **overrides):
        args = sft_args(folder, max_steps=6, **overrides)
        return HOSFLSFTTrainer(
            tiny_model(tokenizer),
            args,
            split_layer=2,
            train_dataset=prompt_completions(40),
            processing_class=tokenizer,
        )

    full = run(tmp_path / "full")
    full.train()
    resumed_dir = tmp_path / "resumed"
    run(resumed_dir, save_strategy="steps", save_steps=3).train()
    checkpoint = resumed_dir / "out" / "checkpoint-3"
    for name in ("hosfl_client_state.pt", "hosfl_trajectory.json", "hosfl_config.json", "README.md"):
        assert (checkpoint / name).is_file(), name
    assert "sft" in (checkpoint / "README.md").read_text()  # the trainer's tags reach the model card
    second = run(resumed_dir, save_strategy="steps", save_steps=3)
    second.train(resume_from_checkpoint=str(checkpoint))
    expected = dict(full.model.named_parameters())
    for name, value in second.model.named_parameters():
        assert torch.equal(value, expected[name]), name
    assert [r.scalars for r in second.trajectory.rounds] == [r.scalars for r in full.trajectory.rounds]


def test_sft_with_4bit_client_keeps_float32_adapters(tokenizer, tmp_path):
    """TRL casts the adapters of a quantized model to bf16; the zeroth-order client update needs them in float32."""
    bnb = require_bitsandbytes()
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModelForCausalLM

    from hosfl_hf import client_4bit_config

    # bitsandbytes' CPU kernels pack 64 inputs per block
    base = testing.tiny_llama(
        0, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, pad_token_id=tokenizer.pad_token_id
    )
    base.save_pretrained(tmp_path / "base")
    quantization = client_4bit_config(AutoConfig.from_pretrained(tmp_path / "base"), 2)
    with skip_on_bnb_cpu_limitation():  # only bitsandbytes' known "no CPU 4-bit kernels" errors skip
        model = AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=quantization, device_map="cpu", dtype=torch.float32
        )
        model(input_ids=torch.tensor([[5, 6, 7]]))
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert type(model.model.layers[2].mlp.down_proj) is torch.nn.Linear  # the server's blocks stay unquantized
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = HOSFLSFTTrainer(
        model,
        sft_args(tmp_path, max_steps=2),
        split_layer=2,
        train_dataset=conversations(16),
        processing_class=tokenizer,
        peft_config=lora,
    )
    client = trainer.split.client_parameters()
    assert client and {p.dtype for _, p in client} == {torch.float32}
    assert trainer.trajectory.environment["dtypes"] == ["float32"]
    before = {n: p.detach().clone() for n, p in client}
    trainer.train()
    assert all(not torch.equal(before[n], p) for n, p in trainer.split.client_parameters())
