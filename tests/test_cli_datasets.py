"""Generic text classification from the command line: a local folder (or file) dataset named with TRL's dataset
arguments, a prompt template and verbalizers; the checks that fail before training with a message naming the fix."""

import json
import random
from pathlib import Path

import pytest

from hosfl_hf import testing
from hosfl_hf.cli import cli

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models (conftest.py)

FILLER = [f"w{i}" for i in range(24)]
WORDS = ["Text", ":", "Label", "good", "bad", "yes", "no", "maybe", "very", *FILLER]


def tiny_checkpoint(path: Path) -> str:
    """A tiny random Llama and a byte-level word tokenizer: a word after a space is `Ġword` (one token); the bare
    words `yes` / `no` are not in the vocabulary (so `"yes"` without a leading space is the unknown token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = (
        ["<pad>", "<s>", "</s>", "<unk>", "Ċ"]
        + [w for w in WORDS if w not in ("yes", "no")]
        + [f"Ġ{w}" for w in WORDS]
    )
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    testing.tiny_llama(0, vocab_size=len(vocab), max_position_embeddings=64).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def toy_rows(n: int, seed: int, label_as: str = "int") -> list[dict]:
    """A learnable task: the label says whether the text holds `good` (1) or `bad` (0), among filler words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.sample(FILLER, 4)
        words.insert(rng.randrange(5), "good" if label else "bad")
        rows.append({"text": " ".join(words), "label": label if label_as == "int" else ["no", "yes"][label]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    write_jsonl(folder / "train.jsonl", toy_rows(600, seed=0))
    write_jsonl(folder / "test.jsonl", toy_rows(64, seed=1))
    (folder / "notes.txt").write_text("not data: only <split>.<ext> files are read\n")
    return folder


def flags(model_path: str, dataset: Path, out: Path, **overrides) -> list[str]:
    values = {
        "model_name_or_path": model_path,
        "dataset_name": str(dataset),
        "prompt_template": "Text: {text}\nLabel:",
        "split_layer": 2,
        "num_clients": 4,
        "clients_per_round": 2,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 64,
        "max_steps": 2,
        "learning_rate": 1e-2,
        "client_learning_rate": 1e-3,
        "use_peft": "false",
        "report_to": "none",
        "save_strategy": "no",
        "use_cpu": "true",
        "disable_tqdm": "true",
        "output_dir": str(out),
    }
    values.update(overrides)
    argv = ["train"]
    for key, value in values.items():
        argv += [f"--{key}", *(value if isinstance(value, list) else [str(value)])]
    return argv


def test_local_folder_dataset_learns_through_the_cli(model_path, toy_folder, tmp_path, capsys):
    out = tmp_path / "out"
    argv = flags(model_path, toy_folder, out, verbalizers=[" no", " yes"], max_steps=40, logging_steps=40)
    assert cli(argv) == 0
    printed = capsys.readouterr().out
    assert "[toy" in printed and "test accuracy before training:" in printed and "(64 examples, 40 rounds)" in printed
    metrics = json.loads((out / "all_results.json").read_text())
    assert metrics["before_accuracy"] < 0.75  # a random model on balanced labels
    assert metrics["after_accuracy"] >= 0.9, metrics
    assert len(json.loads((out / "hosfl_trajectory.json").read_text())["rounds"]) == 40


def test_string_labels_and_classlabel_names_give_default_verbalizers(model_path, tmp_path):
    from datasets import ClassLabel, Dataset, Features, Value

    from hosfl_hf.cli import build_task, make_parser

    # Parquet keeps the ClassLabel feature: its names are the default verbalizers (with a leading space).
    features = Features({"text": Value("string"), "label": ClassLabel(names=["no", "yes"])})
    folder = tmp_path / "parquet"
    folder.mkdir()
    Dataset.from_list(toy_rows(40, seed=2), features=features).to_parquet(str(folder / "train.parquet"))
    Dataset.from_list(toy_rows(16, seed=3), features=features).to_parquet(str(folder / "test.parquet"))
    script, _, _ = make_parser().parse_args_and_config(flags(model_path, folder, tmp_path / "o")[1:])
    task = build_task(script)
    assert task.verbalizers == ()
    task = task.with_verbalizers_of(task.load("train"))
    assert task.verbalizers == (" no", " yes") and task.test_split == "test"

    # String labels in a single file: matched to the verbalizers without their leading space.
    file = tmp_path / "strings.jsonl"
    write_jsonl(file, toy_rows(40, seed=4, label_as="str"))
    argv = flags(model_path, file, tmp_path / "o", dataset_test_split="train", verbalizers=[" no", " yes"])
    script, _, _ = make_parser().parse_args_and_config(argv[1:])
    task = build_task(script)
    rows = task.load("train")
    from transformers import AutoTokenizer

    tokenized = task.tokenize(rows, AutoTokenizer.from_pretrained(model_path))
    assert tokenized["labels"] == [["no", "yes"].index(label) for label in rows["label"]]
    assert build_task(script).with_verbalizers_of(rows).verbalizers == (" no", " yes")


@pytest.mark.parametrize(
    "case, overrides, message",
    [
        (
            "missing column",
            {"prompt_template": "Review: {sentence}\nLabel:", "verbalizers": [" no", " yes"]},
            r"reads column\(s\) \['sentence'\]",
        ),
        ("two tokens", {"verbalizers": [" no", " very good"]}, "Verbalizer ' very good' is 2 tokens"),
        ("no leading space", {"verbalizers": ["no", "yes"]}, "Try ' no', with a leading space"),
        ("out of range", {"verbalizers": [" no"]}, r"labels \[1\] in column 'label' outside the 1 classes"),
        ("empty split", {"dataset_test_split": "empty", "verbalizers": [" no", " yes"]}, "'empty' of .* is empty"),
        ("no template", {"prompt_template": None}, "needs --prompt_template"),
    ],
)
def test_bad_input_fails_before_training_with_its_fix(case, overrides, message, model_path, toy_folder, tmp_path):
    (toy_folder / "empty.jsonl").write_text("")
    values = {k: v for k, v in overrides.items() if v is not None}
    argv = flags(model_path, toy_folder, tmp_path / "out", **values)
    if overrides.get("prompt_template", "") is None:
        i = argv.index("--prompt_template")
        del argv[i : i + 2]
    with pytest.raises(ValueError, match=message):
        cli(argv)
    assert not (tmp_path / "out" / "all_results.json").exists()


@pytest.mark.parametrize("code", ["import hosfl_hf", "from hosfl_hf.cli import cli; cli(['--help'])"])
def test_import_and_help_print_no_warnings(code):
    """Optional back-ends (bitsandbytes, which peft imports when it is installed) stay quiet."""
    import subprocess
    import sys

    from conftest import subprocess_env

    result = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("direction_scales, guide_share", [("uniform", 0.0), ("gradient_rms", 0.0), ("uniform", 0.5)])
def test_cli_sensitivity_mask_alone_is_the_client_update(
    model_path, toy_folder, tmp_path, direction_scales, guide_share
):
    """--client_mask_density chooses a mask at set-up and --client_mask_only makes it the whole client update: the
    saved config and trajectory record it, only masked base tensors are in the client update, and their trained
    values are saved beside the adapters."""
    from hosfl_hf import HOSFLRunRecord, Trajectory
    from hosfl_hf.search_space import ClientMask

    out = tmp_path / "out"
    argv = flags(
        model_path,
        toy_folder,
        out,
        verbalizers=[" no", " yes"],
        use_peft="true",
        max_steps=3,
        client_mask_density=0.05,
        client_mask_only="true",
        client_mask_direction_scales=direction_scales,
        client_mask_guide_share=guide_share,
        save_strategy="no",
    )
    assert cli(argv) == 0
    config = HOSFLRunRecord.from_pretrained(out)
    mask = ClientMask.from_dict(config.client_mask)
    assert mask.density == 0.05 and mask.size > 0
    assert (mask.scales is not None) == (direction_scales == "gradient_rms")
    assert mask.guide_share == (guide_share or None) and (mask.guide is not None) == bool(guide_share)
    assert config.client_zo_modules == []
    trajectory = Trajectory.load(out)
    assert sorted(trajectory.parameter_names) == sorted(mask.indices)  # no adapter: the mask alone
    assert (out / "hosfl_client_mask_values.safetensors").is_file()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"client_mask_only": "true"}, "client_mask_only needs a mask"),
        ({"client_mask_density": 2.0}, r"must be in \(0, 1\]"),
        ({"client_mask": "m.json", "client_mask_density": 1e-4}, "not both"),
        ({"client_mask_direction_scales": "gradient_rms"}, "applies to a mask computed at set-up"),
        ({"client_mask_guide_share": 0.5}, "applies to a mask computed at set-up"),
        ({"client_mask_density": 1e-4, "client_mask_guide_share": 1.0}, r"must be in \[0, 1\)"),
    ],
)
def test_cli_mask_flags_are_checked(overrides, message, model_path, toy_folder, tmp_path):
    with pytest.raises(ValueError, match=message):
        cli(flags(model_path, toy_folder, tmp_path / "out", verbalizers=[" no", " yes"], **overrides))
