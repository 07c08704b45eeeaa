"""Instruction tuning (SFT) over HO-SFL: [`HOSFLSFTTrainer`] is TRL's `SFTTrainer` data handling under the HO-SFL
round of [`HOSFLTrainer`].

How the two combine (`HOSFLSFTTrainer(HOSFLTrainer, SFTTrainer)`, checked against trl 1.16's source):

* `__init__`: `HOSFLTrainer.__init__` adds the adapters (one config, or one per part) and splits the model, then calls
  `SFTTrainer.__init__`, which prepares the datasets (chat template, prompt-completion masks, truncation; TRL's
  `_prepare_dataset`) and builds the rest of the `Trainer`. No `peft_config` reaches TRL (the model is a `PeftModel`
  already), and the collator is TRL's `DataCollatorForLanguageModeling`, made here with the pad token TRL would use.
* `compute_loss`, `training_step`, the optimizers, the sampler and the train dataloader are HO-SFL's: one optimizer
  step is one round (client forward without autograd, server backprop, client update from seeds and scalars). The loss
  is the model's causal-LM loss on the labels TRL built, so only completion tokens carry it. `SFTTrainer.compute_loss`
  (its fused LM head and token metrics) is not used: it would run the whole model as one part.
* `evaluate` is TRL's (raw evaluation datasets are prepared like the training set) plus the perplexity and, with
  `answer_choices`, the accuracy of the highest-scoring answer.
* Packing and padding-free batches are refused: they merge examples, and so the clients that hold them.

A conversational dataset (`messages`) trains on its last assistant turn by default: each conversation becomes a
conversational prompt-completion pair (the turns before, the last assistant turn), which TRL renders with the chat
template and masks so that the loss covers the completion only. `assistant_only_loss=True` trains on every assistant
turn instead (TRL's, for chat templates with generation markers); `completion_only_loss=False` on every token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

try:
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
except ImportError as error:  # pragma: no cover - the `sft` extra
    raise ImportError("HOSFLSFTTrainer needs TRL: pip install 'hosfl-hf[sft]' (trl>=1.16).") from error

from .config import HOSFLConfig
from .trainer import HOSFLTrainer

__all__ = ["HOSFLSFTConfig", "HOSFLSFTTrainer", "last_turn_as_completion"]


@dataclass
class HOSFLSFTConfig(HOSFLConfig, SFTConfig):
    r"""
    Configuration of [`HOSFLSFTTrainer`]: [`HOSFLConfig`] (federation, split, zeroth-order settings) and TRL's
    `SFTConfig` (dataset preparation: `max_length`, `dataset_text_field`, `completion_only_loss`,
    `assistant_only_loss`, `chat_template_path`, ...).

    Parameters:
        answer_choices (`list[str]`, *optional*):
            The answers of a task with a known answer set (e.g. `["negative", "positive"]`). Evaluation then also
            reports `<prefix>_choice_accuracy`: for each example, the choice whose completion has the highest
            log-likelihood under the model, against the example's own completion.

    Defaults that differ from `SFTConfig`'s, for HO-SFL: `learning_rate=1e-5` and `logging_steps=10` (HOSFLConfig),
    `gradient_checkpointing=False`, `bf16=False` (the zeroth-order scalars need float32 forwards unless asked
    otherwise), `packing=False` and `padding_free=False` (refused: see the module docstring).
    """

    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute server activations."})
    bf16: bool | None = field(default=False, metadata={"help": "bf16 mixed precision."})
    answer_choices: list[str] | None = field(
        default=None,
        metadata={"help": "Answers of a task with a known answer set: evaluation reports the choice accuracy."},
    )

    def __post_init__(self):
        for name in ("packing", "padding_free"):
            if getattr(self, name):
                raise ValueError(
                    f"HOSFLSFTConfig.{name}=True is not supported: it merges examples into one row, and so the data "
                    "of several clients; leave it off (each client batch is padded on its own)."
                )
        if self.answer_choices is not None and len(set(self.answer_choices)) < 2:
            raise ValueError(f"answer_choices={self.answer_choices!r} needs at least two distinct answers.")
        super().__post_init__()


def last_turn_as_completion(example: dict[str, Any]) -> dict[str, Any]:
    """A conversation (`messages`) as a conversational prompt-completion pair: the turns before the last one, and the
    last one, which must be the assistant's."""
    messages = example["messages"]
    if not messages or messages[-1].get("role") != "assistant":
        last = messages[-1].get("role") if messages else None
        raise ValueError(
            f"A conversation ends with a {last!r} turn, not an assistant turn: the last assistant turn is the "
            "completion trained on. End every conversation with the assistant's answer, or set "
            "completion_only_loss=False."
        )
    return {"prompt": messages[:-1], "completion": messages[-1:]}


class HOSFLSFTTrainer(HOSFLTrainer, SFTTrainer):
    """Supervised fine-tuning (instruction tuning) with HO-SFL, with TRL's SFT data handling.

    Takes the datasets `SFTTrainer` takes: conversational (`messages`, rendered with the tokenizer's chat template),
    prompt-completion (`prompt` / `completion`, plain or conversational) and language modeling (`text`). The loss
    covers the completion (or, for conversations, the last assistant turn) only, unless `completion_only_loss=False`.

    Args:
        model (`PreTrainedModel` or `str`): a `*ForCausalLM` model, or a checkpoint to load with
            `AutoModelForCausalLM.from_pretrained(model, **args.model_init_kwargs)`.
        args ([`HOSFLSFTConfig`], *optional*): training, federation and SFT settings.
        processing_class (`PreTrainedTokenizerBase`, *optional*): the tokenizer (loaded from `model` when it is a
            path).
        formatting_func (`Callable`, *optional*): as in `SFTTrainer` (turns examples into text; then the loss covers
            every token).
        split_layer, train_dataset, eval_dataset, data_collator, compute_metrics, callbacks, compute_loss_func,
        peft_config, kwargs: as in [`HOSFLTrainer`].
    """

    _tag_names = [*HOSFLTrainer._tag_names, "sft", "trl"]
    _name = "HO-SFL SFT"

    def __init__(
        self,
        model: PreTrainedModel | str,
        args: HOSFLSFTConfig | None = None,
        split_layer: int | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        data_collator: Any = None,
        compute_metrics: Any = None,
        callbacks: list | None = None,
        compute_loss_func: Any = None,
        peft_config: Any = None,
        formatting_func: Any = None,
        **kwargs: Any,
    ):
        if args is None:
            args = HOSFLSFTConfig(output_dir="hosfl-sft-output")
        if not isinstance(args, HOSFLSFTConfig):
            raise TypeError(f"HOSFLSFTTrainer needs an HOSFLSFTConfig as args, got {type(args).__name__}.")
        if train_dataset is None:
            raise ValueError("HOSFLSFTTrainer needs a train_dataset: its examples are sharded among the clients.")
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            name = model
            model = AutoModelForCausalLM.from_pretrained(name, **(args.model_init_kwargs or {}))
            processing_class = (
                processing_class if processing_class is not None else AutoTokenizer.from_pretrained(name)
            )
        if processing_class is None:
            raise ValueError("HOSFLSFTTrainer needs the tokenizer: pass processing_class=tokenizer.")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if data_collator is None:
            # The pad token SFTTrainer would pick (it sets it only when it builds the collator itself).
            pad_token = args.pad_token or tokenizer.pad_token or tokenizer.eos_token
            if pad_token not in tokenizer.get_vocab():
                raise ValueError(
                    f"The pad token {pad_token!r} is not in the tokenizer's vocabulary: set args.pad_token."
                )
            tokenizer.pad_token = pad_token
            model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.pad_token_id = tokenizer.pad_token_id
            data_collator = DataCollatorForLanguageModeling(
                pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of
            )
        self._conversations_as_completions = args.completion_only_loss is not False and not args.assistant_only_loss
        train_dataset = self._with_completions(train_dataset)
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: self._with_completions(d) for name, d in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = self._with_completions(eval_dataset)
        self._raw_eval_dataset = eval_dataset
        num_examples = len(train_dataset)
        super().__init__(
            model,
            args,
            split_layer=split_layer,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            data_collator=data_collator,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            compute_loss_func=compute_loss_func,
            peft_config=peft_config,
            formatting_func=formatting_func,
            **kwargs,
        )
        if len(self.train_dataset) != num_examples:
            # TRL drops examples whose completion was truncated away: the shards index the prepared examples.
            from transformers.utils import logging

            logging.get_logger(__name__).warning(
                f"{num_examples - len(self.train_dataset)} of {num_examples} training examples had no completion "
                f"token left within max_length={args.max_length} and were dropped; the clients share the rest."
            )
            self.shards = self._partition(self.train_dataset)
        # SFTTrainer patches the model's forward with a fused LM head that only its own compute_loss uses; HO-SFL's
        # compute_loss replaces that one, and the patch binds the forward to this very object (a copy of the model
        # would run the original's blocks), so it is taken off again.
        base = self.split.model.get_base_model() if hasattr(self.split.model, "get_base_model") else self.split.model
        patched = vars(base).get("forward")
        if getattr(getattr(getattr(patched, "__func__", None), "__code__", None), "co_name", None) == "_fused_forward":
            del base.forward
        # SFTTrainer casts the adapters of a quantized model to bf16 (QLoRA's recipe); HO-SFL's zeroth-order client
        # steps round away in half precision, so they go back to float32 (and the trajectory records that).
        from .lora import upcast_trainable_adapters
        from .rng import environment

        if upcast_trainable_adapters(self.split):
            self.trajectory.environment = environment(p for _, p in self.client_update_parameters)

    def create_model_card(self, *args: Any, tags: str | list[str] | None = None, **kwargs: Any) -> None:
        """[`HOSFLTrainer.create_model_card`], with the `sft` and `trl` tags."""
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += [tag for tag in ("sft", "trl") if tag not in tags]
        super().create_model_card(*args, tags=tags, **kwargs)

    def _with_completions(self, dataset: Any) -> Any:
        """Conversations become prompt-completion pairs at their last assistant turn (completion-only loss)."""
        columns = getattr(dataset, "column_names", None) or []
        if not self._conversations_as_completions or "messages" not in columns or "prompt" in columns:
            return dataset
        return dataset.map(last_turn_as_completion, remove_columns=["messages"])

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """TRL's evaluation (raw datasets are prepared like the training set), with `<prefix>_perplexity`
        (`exp` of the loss per completion token) and, with `args.answer_choices`, `<prefix>_choice_accuracy`."""
        if isinstance(eval_dataset, str):
            raw = self._raw_eval_dataset[eval_dataset]
        elif eval_dataset is not None:
            eval_dataset = self._with_completions(eval_dataset)
            raw = eval_dataset
        else:
            raw = self._raw_eval_dataset
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if isinstance(raw, dict):  # the Trainer evaluated each named set through this method already
            return metrics
        extra = {}
        loss = metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None:
            extra[f"{metric_key_prefix}_perplexity"] = math.exp(loss) if loss < 700 else math.inf
        if self.args.answer_choices and raw is not None:
            extra[f"{metric_key_prefix}_choice_accuracy"] = self.choice_accuracy(raw, self.args.answer_choices)
        self.log(extra)
        metrics.update(extra)
        return metrics

    @torch.no_grad()
    def choice_accuracy(self, dataset: Any, choices: list[str]) -> float:
        """Accuracy of the highest-scoring answer: each example's completion is replaced by every choice in turn,
        scored by its summed log-likelihood through the split model (client part, then server part), and the best
        choice is compared with the example's own completion.

        Args:
            dataset: a prompt-completion dataset (plain or conversational) whose completions are among `choices`.
            choices: the answer set.

        Raises:
            `ValueError`: the dataset is not prompt-completion, or a completion is not one of `choices`.
        """
        from datasets import Dataset

        if "prompt" not in dataset.column_names or "completion" not in dataset.column_names:
            raise ValueError(
                "choice accuracy needs a prompt-completion (or conversational) evaluation dataset, got columns "
                f"{dataset.column_names}."
            )
        words = [c.strip() for c in choices]
        rows, gold = [], []
        for example in dataset:
            answer = _completion_text(example["completion"]).strip()
            if answer not in words:
                raise ValueError(f"Completion {answer!r} is not one of answer_choices {choices}.")
            gold.append(words.index(answer))
            rows += [
                {"prompt": example["prompt"], "completion": _with_text(example["completion"], c)} for c in choices
            ]
        prepared = self._prepare_dataset(
            Dataset.from_list(rows), self.processing_class, self.args, False, None, "answer choices"
        )
        if len(prepared) != len(rows):  # TRL drops rows whose completion was truncated away
            raise ValueError(
                f"{len(rows) - len(prepared)} (prompt, choice) rows have no completion token within "
                f"max_length={self.args.max_length}: raise max_length to score every choice."
            )
        prepared = prepared.select_columns([c for c in ("input_ids", "labels") if c in prepared.column_names])
        loader = torch.utils.data.DataLoader(
            prepared, batch_size=self.args.per_device_eval_batch_size, collate_fn=self.data_collator
        )
        was_training = self.model.training
        self.model.eval()
        scores = []
        try:
            for batch in loader:
                batch = self._prepare_inputs(batch)
                _, outputs = self.compute_loss(self.model, batch, return_outputs=True)
                labels = batch["labels"][:, 1:]
                log_probs = torch.log_softmax(outputs.logits[:, :-1].float(), dim=-1)
                mask = labels != -100
                token = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                scores.append((token * mask).sum(-1).cpu())
        finally:
            self.model.train(was_training)
        best = torch.cat(scores).view(len(gold), len(choices)).argmax(-1)
        return int((best == torch.tensor(gold)).sum()) / len(gold)


def _completion_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"]  # conversational: the assistant message


def _with_text(completion: Any, text: str) -> Any:
    if isinstance(completion, str):
        return text
    return [*completion[:-1], {**completion[-1], "content": text}]
