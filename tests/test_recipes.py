"""Recipes and the `hosfl-hf` command: argument parsing, YAML files, in-process runs on tiny random models, and runs
through `accelerate launch` (1 and 2 CPU processes). Tiny checkpoints (model + word-level tokenizer) are written to
a temporary folder; the data is the offline GLUE copy of `hosfl_hf.tasks.default_data_dir()`."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, subprocess_env
from safetensors.torch import load_file

from hosfl_hf import HOSFLConfig, HOSFLTrainer
from hosfl_hf.cli import build_task, estimate_memory, load_splits, main, make_parser, parse_recipe_args
from hosfl_hf.tasks import default_data_dir

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = default_data_dir()

pytestmark = [
    pytest.mark.skipif(
        not os.path.isfile(os.path.join(DATA_DIR, "sst2", "train.jsonl")), reason=f"GLUE data not found in {DATA_DIR}"
    ),
    pytest.mark.usefixtures("single_thread"),  # tiny models (conftest.py)
]

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
# Prompt words and verbalizers of the tasks (each verbalizer must be one token).
PROMPT_WORDS = "Review Sentiment Question Answer True False or It was negative positive terrible great ? : . ,".split()


def tiny_checkpoint(path: Path, arch: str = "llama") -> str:
    """A tiny random causal LM and a word-level tokenizer whose vocabulary covers the first SST-2 / RTE rows."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    split_words = pre_tokenizers.Whitespace()
    words = set(PROMPT_WORDS)
    for task, columns in (("sst2", ["sentence"]), ("rte", ["sentence1", "sentence2"])):
        with open(os.path.join(DATA_DIR, task, "train.jsonl")) as f:
            for _, line in zip(range(200), f):
                row = json.loads(line)
                for column in columns:
                    words.update(w for w, _ in split_words.pre_tokenize_str(row[column]))
    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + sorted(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = split_words
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            **ids,
        )
        model = LlamaForCausalLM(config)
    else:  # bitsandbytes' CPU 4-bit kernels need in_features >= 64
        config = OPTConfig(
            vocab_size=len(vocab),
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=256,
            **ids,
        )
        model = OPTForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_llama_path(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="module")
def tiny_opt_path(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny_opt"), "opt")


def tiny_flags(model_path: str, output_dir: Path, **overrides) -> list[str]:
    values = {
        "model_name_or_path": model_path,
        "split_layer": 2,
        "max_steps": 2,
        "train_limit": 120,
        "eval_limit": 16,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 16,
        "output_dir": str(output_dir),
        "disable_tqdm": "true",
        "data_dir": DATA_DIR,
    }
    values.update(overrides)
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


# ---------------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("recipe", ["sst2-smollm2", "rte-smollm2"])
def test_yaml_files_equal_the_recipes(recipe):
    """`python recipes/glue_cpu.py --config recipes/<name>.yaml` and `hosfl-hf <name>` run the same job."""
    yaml_path = ROOT / "recipes" / f"{recipe.replace('-', '_')}.yaml"
    from_yaml = make_parser().parse_args_and_config(["--config", str(yaml_path)])
    from_recipe = parse_recipe_args(recipe, [])
    for a, b in zip(from_yaml[:2], from_recipe[:2]):
        assert dataclasses.asdict(a) == dataclasses.asdict(b)
    assert from_yaml[2].to_dict() == from_recipe[2].to_dict()


def test_flags_override_the_config_file():
    script, model, training = make_parser().parse_args_and_config(
        ["--config", str(ROOT / "recipes" / "sst2_smollm2.yaml"), "--max_steps", "3", "--lora_r", "4"]
    )
    assert (training.max_steps, model.lora_r) == (3, 4)
    assert (training.learning_rate, training.client_learning_rate, script.eval_limit) == (1e-3, 1e-4, 512)
    assert training.report_to == []  # "none"


def test_config_file_values_are_typed_like_flags(tmp_path):
    """Lists, nulls and YAML strings such as `1e-4` (a string in YAML 1.1) come out as the flags' types."""
    path = tmp_path / "run.yaml"
    path.write_text(
        "lora_target_modules: [q_proj, k_proj, v_proj]\nreport_to: [tensorboard]\neval_limit: null\n"
        "learning_rate: 1e-4\nuse_cpu: true\noutput_dir: out\n"
    )
    script, model, training = make_parser().parse_args_and_config(["--config", str(path)])
    assert model.lora_target_modules == ["q_proj", "k_proj", "v_proj"] and training.report_to == ["tensorboard"]
    assert script.eval_limit is None and training.learning_rate == 1e-4 and training.use_cpu is True


def test_unknown_config_keys_are_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("task: sst2\nnum_client: 4\n")
    with pytest.raises(ValueError, match="num_client"):
        make_parser().parse_args_and_config(["--config", str(path)])


def test_paper_hyperparameters_are_the_defaults():
    script, model, training = parse_recipe_args("opt13b-sst2", ["--use_cpu", "true"])  # bf16 needs a GPU or CPU
    paper = dict(num_clients=10, clients_per_round=3, num_perturbations=2, zo_eps=1e-3, learning_rate=1e-5)
    paper.update(client_learning_rate=1e-5, client_optimizer="adamw", zo_estimator="one_sided")
    assert {k: getattr(training, k) for k in paper} == paper
    assert (model.lora_r, model.lora_alpha, model.lora_target_modules, model.lora_parts) == (
        8,
        16,
        ["q_proj", "v_proj"],
        "both",
    )
    assert script.max_length == 128
    # The OPT-13B setting: bf16 server, split after 10 of 40 blocks, MeZO's SST-2 protocol.
    assert (model.model_name_or_path, model.dtype, training.bf16, training.split_layer) == (
        "facebook/opt-13b",
        "bfloat16",
        True,
        10,
    )
    assert (script.protocol, script.prompt, script.train_limit, script.eval_limit) == ("mezo", "mezo", 1000, 500)
    assert training.gradient_accumulation_steps == training.clients_per_round
    # A plain `HOSFLConfig` carries the same federation defaults.
    plain = HOSFLConfig(output_dir="x")
    assert {k: getattr(plain, k) for k in paper} == paper


def test_mezo_protocol_sizes_are_1000_500_872():
    script, _, _ = parse_recipe_args("opt13b-sst2", ["--data_dir", DATA_DIR, "--use_cpu", "true"])
    task = build_task(script)
    train, dev, test = load_splits(task, script)
    assert (len(train), len(dev), len(test)) == (1000, 500, 872)
    assert not set(train["idx"]) & set(dev["idx"])  # dev is drawn from the training set, without overlap
    assert task.prompt(train[0]).endswith(" It was") and task.verbalizers == (" terrible", " great")


# ----------------------------------------------------------------------------------------------- in-process runs
def recount_accuracy(model, script, tokenizer) -> tuple[int, int]:
    """(correct, examples) on the recipe's evaluation set, counted here: per example, is the label's verbalizer the
    one with the larger last-position logit. One batch of the task's collator, as the recipe's evaluation pads."""
    task = build_task(script)
    _, raw_eval, _ = load_splits(task, script)
    rows = task.tokenize(raw_eval, tokenizer, script.max_length)
    batch = task.trainer_kwargs(tokenizer)["data_collator"]([rows[i] for i in range(len(rows))])
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits[:, -1, task.verbalizer_ids(tokenizer)]
    return int((logits.argmax(-1) == labels).sum()), len(rows)


@pytest.mark.parametrize("task", ["sst2", "rte"])
def test_cpu_recipe_runs_in_process(task, tiny_llama_path, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = f"{task}-smollm2"
    out = tmp_path / "out"
    script, model_args, training = parse_recipe_args(recipe, tiny_flags(tiny_llama_path, out))
    metrics = main(script, model_args, training)
    # Both accuracies are what the models score, recounted from the checkpoint (before: the base, as LoRA starts at
    # B = 0) and from the saved adapters (after).
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval()
    correct, n = recount_accuracy(base, script, tokenizer)
    assert n == 16 and metrics["before_accuracy"] == correct / n, (metrics["before_accuracy"], correct)
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_path), str(out)).eval()
    correct, n = recount_accuracy(trained, script, tokenizer)
    assert metrics["after_accuracy"] == correct / n, (metrics["after_accuracy"], correct)
    printed = capsys.readouterr().out
    assert f"[{task}] validation accuracy before:" in printed and "(16 examples, 2 rounds)" in printed
    for name in ("adapter_model.safetensors", "hosfl_trajectory.json", "all_results.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert len(json.loads((out / "hosfl_trajectory.json").read_text())["rounds"]) == 2


def test_opt13b_recipe_on_a_tiny_opt_with_4bit_client_and_bf16(tiny_opt_path, tmp_path, capsys):
    from bitsandbytes.nn import Linear4bit

    from hosfl_hf.cli import get_peft_config, load_model

    flags = tiny_flags(
        tiny_opt_path, tmp_path / "out", load_in_4bit_client="true", use_cpu="true", train_limit=60, test_limit=16
    )
    flags += ["--eval_steps", "1", "--save_steps", "2"]
    script, model_args, training = parse_recipe_args("opt13b-sst2", flags)
    model, tokenizer = load_model(model_args, training)
    layers = model.model.decoder.layers
    assert isinstance(layers[0].self_attn.q_proj, Linear4bit) and isinstance(layers[1].fc1, Linear4bit)  # client
    assert not isinstance(layers[2].fc1, Linear4bit) and layers[2].fc1.weight.dtype == torch.bfloat16  # server
    no_eval = dataclasses.replace(training, eval_strategy="no")
    trainer = HOSFLTrainer(model, no_eval, processing_class=tokenizer, peft_config=get_peft_config(model_args))
    lora = [n for n, _ in trainer.split.client_parameters()]
    assert lora and all("lora_" in n for n in lora)
    assert all(p.dtype == torch.float32 for _, p in trainer.split.client_parameters())  # adapters in fp32
    # The run below builds the same adapters (same seed): their initial values, by the name peft saves them under.
    initial = {
        n.replace(".default", ""): p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n
    }
    assert {int(n.split(".layers.")[1].split(".")[0]) for n in initial} == {0, 1, 2, 3}  # both parts have adapters
    del model, trainer

    metrics = main(script, model_args, training)
    assert {"before_accuracy", "after_accuracy", "before_test_accuracy", "test_accuracy"} <= set(metrics)
    # Every adapter tensor of the client (4-bit blocks, zeroth-order) and of the server (bf16 blocks, backprop) moved,
    # by about two steps of learning rate 1e-5 (not by another initialisation).
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert set(saved) == set(initial)
    moved = {n: float((saved[n].float() - initial[n].float()).abs().max()) for n in initial}
    assert all(0 < m < 1e-3 for m in moved.values()), moved
    printed = capsys.readouterr().out
    assert "[sst2] dev accuracy before:" in printed and "[sst2] test accuracy before:" in printed
    assert "(16 examples, 2 rounds)" in printed
    assert (tmp_path / "out" / "checkpoint-2").is_dir()


# ------------------------------------------------------------------------------------------ accelerate launch
# On a machine without GPUs `--multi_gpu` starts CPU processes (gloo); `--cpu --num_processes 2` would start only one
# process (accelerate needs mpirun for several CPU processes). CUDA_VISIBLE_DEVICES="" keeps them on the CPU.
ONE_PROCESS = ["--cpu", "--num_processes", "1"]
TWO_PROCESSES = ["--multi_gpu", "--num_processes", "2"]


@pytest.mark.parametrize(
    "recipe, launch",
    [("glue_cpu", ONE_PROCESS), ("glue_cpu", TWO_PROCESSES), ("opt13b_sst2", TWO_PROCESSES)],
    ids=["glue_cpu-1-process", "glue_cpu-2-processes", "opt13b_sst2-2-processes"],
)
def test_accelerate_launch(recipe, launch, tiny_llama_path, tiny_opt_path, tmp_path):
    out = tmp_path / "out"
    # `python -m accelerate.commands.accelerate_cli` is the `accelerate` command (found even when the venv's bin/ is
    # not on PATH).
    accelerate = [sys.executable, "-m", "accelerate.commands.accelerate_cli"]
    command = [*accelerate, "launch", *launch, "--num_machines", "1", "--mixed_precision", "no"]
    command += ["--dynamo_backend", "no", "--main_process_port", str(free_port())]
    command.append(str(ROOT / "recipes" / f"{recipe}.py"))
    if recipe == "glue_cpu":
        command += ["--config", str(ROOT / "recipes" / "sst2_smollm2.yaml"), *tiny_flags(tiny_llama_path, out)]
        evaluations = ["validation"]
    else:  # the OPT-13B recipe on a tiny OPT: bf16 server, 4-bit client blocks, MeZO protocol, on CPU
        flags = dict(use_cpu="true", load_in_4bit_client="true", train_limit=60, test_limit=16, eval_steps=1)
        command += tiny_flags(tiny_opt_path, out, **flags)
        evaluations = ["dev", "test"]
    result = subprocess.run(command, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    processes = int(launch[-1])
    suffix = f", {processes} processes" if processes > 1 else ""
    for name in evaluations:
        assert f"[sst2] {name} accuracy before training:" in result.stdout, result.stdout
        assert f"[sst2] {name} accuracy before: " in result.stdout, result.stdout
    assert result.stdout.count(f"(16 examples, 2 rounds{suffix})") == len(evaluations), result.stdout
    # A smoke test of the recipes under `accelerate launch`; what several processes must agree on is checked by
    # tests/test_distributed.py. Here: the run wrote a trajectory of its 2 rounds next to the final weights.
    assert "after_accuracy" in json.loads((out / "all_results.json").read_text())
    trajectory = json.loads((out / "hosfl_trajectory.json").read_text())
    assert [r["round"] for r in trajectory["rounds"]] == [0, 1]


# ----------------------------------------------------------------------------------------------------------- CLI
def test_python_m_hosfl_hf_help():
    result = subprocess.run(
        [sys.executable, "-m", "hosfl_hf", "--help"], env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for command in ("train", "sst2-smollm2", "rte-smollm2", "opt13b-sst2", "memory", "env"):
        assert command in result.stdout


def test_cli_recipe_help_shows_the_recipe_defaults(capsys):
    from hosfl_hf.cli import cli

    with pytest.raises(SystemExit) as exit_info:
        cli(["opt13b-sst2", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--load_in_4bit_client" in text and "facebook/opt-13b" in text


def test_cli_unknown_command_fails(capsys):
    from hosfl_hf.cli import cli

    assert cli(["trian"]) == 2


def test_cli_runs_a_recipe(tiny_llama_path, tmp_path, capsys):
    from hosfl_hf.cli import cli

    assert cli(["sst2-smollm2", *tiny_flags(tiny_llama_path, tmp_path / "out", max_steps=1)]) == 0
    assert "(16 examples, 1 rounds)" in capsys.readouterr().out


def test_cli_train_with_a_config_file(tiny_llama_path, tmp_path, capsys):
    from hosfl_hf.cli import cli

    config = tmp_path / "run.yaml"
    config.write_text(f"task: rte\nmodel_name_or_path: {tiny_llama_path}\nsplit_layer: 1\nnum_clients: 4\n")
    flags = tiny_flags(tiny_llama_path, tmp_path / "out", max_steps=1, use_cpu="true", report_to="none")
    flags = flags[2:]  # the model comes from the file
    assert cli(["train", "--config", str(config), *flags]) == 0
    assert "[rte] validation accuracy before:" in capsys.readouterr().out


def test_cli_memory_and_env(capsys):
    from hosfl_hf.cli import cli

    assert cli(["memory", "--model", "facebook/opt-13b", "--split_layer", "10", "--client_4bit"]) == 0
    text = capsys.readouterr().out
    assert "12.85B parameters (estimated, not measured)" in text and "| total (estimate) |" in text
    assert cli(["env"]) == 0
    assert "transformers:" in capsys.readouterr().out


# -------------------------------------------------------------------------------------------- memory estimate
def test_memory_estimate_arithmetic():
    """The documented OPT-13B arithmetic: 12.85B parameters, 2 bytes each in bf16, 4-bit client blocks."""
    gib = 2**30
    bf16 = estimate_memory("facebook/opt-13b", split_layer=10, batch_size=16)
    assert round(bf16.parameters, 2) == 12.85
    assert bf16.client_weights + bf16.server_weights == pytest.approx(12_853_473_280 * 2 / gib)
    per_block = 314_639_360  # parameters of one OPT-13B decoder block
    assert bf16.client_weights == pytest.approx(10 * per_block * 2 / gib)
    nf4 = estimate_memory("facebook/opt-13b", split_layer=10, batch_size=16, client_4bit=True)
    linear = 4 * 5120 * 5120 + 2 * 5120 * 20480  # linear weights of a block, 4-bit + fp32 absmax per 64
    assert nf4.client_weights == pytest.approx(10 * (linear * (0.5 + 4 / 64) + (per_block - linear) * 2) / gib)
    # LoRA r=8 on q, v of 40 blocks: 6.55M fp32 parameters with gradients and AdamW states.
    assert bf16.adapters == pytest.approx(40 * 2 * 8 * (5120 + 5120) * 16 / gib)
    # Activations scale with the batch; checkpointing keeps block inputs plus one block.
    double = estimate_memory("facebook/opt-13b", split_layer=10, batch_size=32)
    assert double.server_activations == pytest.approx(2 * bf16.server_activations)
    checkpointed = estimate_memory("facebook/opt-13b", split_layer=10, batch_size=16, gradient_checkpointing=True)
    assert checkpointed.server_activations < bf16.server_activations / 10
