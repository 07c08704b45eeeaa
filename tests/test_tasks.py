import pytest
import torch
from transformers import PreTrainedTokenizerFast
from transformers.modeling_outputs import CausalLMOutput

from hosfl_hf.metrics import load_accuracy
from hosfl_hf.tasks import TASKS, VerbalizerCollator, VerbalizerLoss, default_data_dir, get_task


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "Review", ":", "Sentiment", "negative", "positive", "good", "bad", "True", "False", "Answer"]
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({"Ġ" + w: i + len(words) for i, w in enumerate(words)})
    vocab["[UNK]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def test_registered_tasks_and_unknown_name():
    assert set(TASKS) == {"sst2", "rte"}
    with pytest.raises(ValueError, match="sst2"):
        get_task("mnli")


def test_shared_data_loads_with_datasets():
    data_dir = default_data_dir()
    sst2 = get_task("sst2").load("validation", data_dir)
    assert len(sst2) == 872 and set(sst2.column_names) >= {"sentence", "label"}
    rte = get_task("rte").load("validation", data_dir, limit=100, seed=1)
    assert len(rte) == 100
    # The subset is fixed by its seed.
    assert rte["idx"] == get_task("rte").load("validation", data_dir, limit=100, seed=1)["idx"]


def test_missing_data_dir_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="HOSFL_DATA_DIR"):
        get_task("sst2").load("train", str(tmp_path))


def test_prompt_and_tokenize(tokenizer):
    from datasets import Dataset

    task = get_task("sst2")
    assert task.prompt({"sentence": " good \n", "label": 1}) == "Review: good\nSentiment:"
    ds = task.tokenize(
        Dataset.from_list([{"sentence": "good", "label": 1}, {"sentence": "bad bad", "label": 0}]), tokenizer
    )
    assert ds["labels"] == [1, 0] and "input_ids" in ds.column_names
    assert task.verbalizer_ids(tokenizer) == [
        tokenizer.convert_tokens_to_ids("Ġnegative"),
        tokenizer.convert_tokens_to_ids("Ġpositive"),
    ]


def test_multi_token_verbalizer_is_rejected(tokenizer):
    from hosfl_hf.tasks import ClassificationTask

    with pytest.raises(ValueError, match="one"):
        ClassificationTask("x", "{sentence}", (" very good", " bad")).verbalizer_ids(tokenizer)


def test_collator_left_pads_and_keeps_last_logit(tokenizer):
    batch = VerbalizerCollator(tokenizer)([{"input_ids": [5, 6, 7], "labels": 1}, {"input_ids": [8], "labels": 0}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [1, 0] and batch["logits_to_keep"] == 1


def test_verbalizer_loss_is_cross_entropy_over_verbalizers():
    logits = torch.randn(3, 2, 10)
    labels = torch.tensor([0, 1, 1])
    loss = VerbalizerLoss([4, 7])(CausalLMOutput(logits=logits), labels)
    expected = torch.nn.functional.cross_entropy(logits[:, -1, [4, 7]], labels)
    assert torch.allclose(loss, expected)


def test_accuracy_metric_matches_evaluate():
    metric = load_accuracy()
    assert metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])["accuracy"] == 0.75
    with pytest.raises(ValueError, match="predictions"):
        metric.compute(predictions=[0, 1], references=[0, 1, 0])
