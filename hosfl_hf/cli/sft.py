"""The instruction-tuning run behind `hosfl-hf sft`: any SFT dataset (conversational `messages`, prompt-completion or
`text`), named with TRL's dataset arguments, trained with [`~hosfl_hf.sft.HOSFLSFTTrainer`] (needs `trl`: the `sft`
extra).

```bash
hosfl-hf sft --dataset_name chats/ --split_layer 10 --max_steps 40 --answer_choices negative positive
```

It prints the evaluation loss, perplexity and (with `--answer_choices`) the accuracy of the highest-scoring answer on
the test split before and after training, then saves the model, the trajectory and the metrics to `output_dir`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, make_dataclass
from typing import Any

from .arguments import ModelArguments
from .parser import HOSFLParser

__all__ = ["SFTModelArguments", "SFTScriptArguments", "make_sft_parser", "sft_main"]


@dataclass
class SFTScriptArguments:
    """The data of an SFT run.

    Parameters:
        dataset_name (`str`): a Hub id, or a local folder / file that `datasets.load_dataset` reads (a folder holding
            `train.jsonl` and `test.jsonl`, say), with `messages`, `prompt` / `completion` or `text` columns.
        dataset_config (`str`, *optional*): the dataset's configuration name.
        dataset_train_split (`str`, defaults to `"train"`), dataset_test_split (`str`, defaults to `"test"`): the
            splits trained and evaluated on; `dataset_test_split=None` skips evaluation.
        train_limit (`int`, *optional*), eval_limit (`int`, *optional*): seeded random subsets of the splits.
        sample_seed (`int`, defaults to `0`): seed of the training subset (the evaluation subset uses seed 0).
        evaluate_before (`bool`, defaults to `True`): also evaluate before training.
    """

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub id, or local folder/file with messages, prompt/completion or text."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_test_split: str | None = field(default="test", metadata={"help": "Evaluation split (None: none)."})
    train_limit: int | None = field(default=None, metadata={"help": "Training examples (seeded subset)."})
    eval_limit: int | None = field(default=None, metadata={"help": "Evaluation examples (fixed subset)."})
    sample_seed: int = field(default=0, metadata={"help": "Seed of the training subset."})
    evaluate_before: bool = field(default=True, metadata={"help": "Evaluate before training too."})


# `trust_remote_code` is a field of SFTConfig too, and a flag can belong to one dataclass only: the SFT command reads
# it from the training arguments (see `sft_main`).
SFTModelArguments = make_dataclass(
    "SFTModelArguments",
    [(f.name, f.type, f) for f in fields(ModelArguments) if f.name != "trust_remote_code"],
)
SFTModelArguments.__doc__ = "[`ModelArguments`] without `trust_remote_code` (a flag of `HOSFLSFTConfig`)."


def make_sft_parser() -> HOSFLParser:
    """The parser of `hosfl-hf sft`: [`SFTScriptArguments`], [`ModelArguments`] and [`HOSFLSFTConfig`]."""
    from ..sft import HOSFLSFTConfig

    return HOSFLParser(
        (SFTScriptArguments, SFTModelArguments, HOSFLSFTConfig),
        description="Instruction tuning (SFT) of a causal LM with HO-SFL, with TRL's SFT data handling.",
    )


def sft_main(script_args: SFTScriptArguments, model_args: Any, training_args: Any) -> dict[str, float]:
    """Trains with [`~hosfl_hf.sft.HOSFLSFTTrainer`], evaluates before and after, saves to `output_dir` and pushes if
    `push_to_hub` is set. Prints one line per metric: `[sft] <split> <metric> before: x  after: y`.

    Returns:
        `dict[str, float]`: the metrics (`before_loss`, `before_perplexity`, `after_loss`, ..., and
        `*_choice_accuracy` with `answer_choices`).
    """
    from ..data import load_split
    from ..sft import HOSFLSFTTrainer
    from .train import end_processes, get_peft_config, load_model

    if not isinstance(model_args, ModelArguments):  # SFTModelArguments
        model_args = ModelArguments(**asdict(model_args), trust_remote_code=training_args.trust_remote_code)
    if script_args.dataset_name is None:
        raise ValueError("hosfl-hf sft needs --dataset_name: a Hub id, or a local folder or file of SFT examples.")
    name, config = script_args.dataset_name, script_args.dataset_config
    train = load_split(
        name, script_args.dataset_train_split, config, script_args.train_limit, seed=script_args.sample_seed
    )
    test = None
    if script_args.dataset_test_split:
        test = load_split(name, script_args.dataset_test_split, config, script_args.eval_limit)
    model, tokenizer = load_model(model_args, training_args)
    trainer = HOSFLSFTTrainer(
        model,
        training_args,
        train_dataset=train,
        eval_dataset=test,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )

    def report(line: str) -> None:
        if trainer.is_world_process_zero():
            print(f"[sft] {line}", flush=True)

    keys = ["loss", "perplexity"] + (["choice_accuracy"] if training_args.answer_choices else [])
    metrics: dict[str, float] = {}
    if test is not None and script_args.evaluate_before:
        metrics.update(trainer.evaluate(metric_key_prefix="before"))
        report(f"{script_args.dataset_test_split} before training: {_format(metrics, 'before', keys)}")
    trainer.train()
    if test is not None:
        metrics.update(trainer.evaluate(metric_key_prefix="after"))
        rounds = f"({len(test)} examples, {trainer.state.global_step} rounds)"
        for key in keys:
            before = f"before: {_value(metrics, f'before_{key}', key)}  " if f"before_{key}" in metrics else ""
            after = _value(metrics, f"after_{key}", key)
            report(f"{script_args.dataset_test_split} {key} {before}after: {after}  {rounds}")
    trainer.save_model(training_args.output_dir)
    trainer.save_metrics("all", metrics)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=name)
    end_processes(trainer)
    return metrics


def _value(metrics: dict[str, float], name: str, key: str) -> str:
    value = metrics[name]
    return f"{100 * value:.2f}%" if key.endswith("accuracy") else f"{value:.4f}"


def _format(metrics: dict[str, float], prefix: str, keys: list[str]) -> str:
    return ", ".join(f"{key} {_value(metrics, f'{prefix}_{key}', key)}" for key in keys)
