"""The classification run behind `hosfl-hf train` and the recipes: task, data, model, training, evaluation."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..config import HOSFLConfig
from .arguments import ModelArguments, ScriptArguments

__all__ = ["build_task", "client_mask", "default_split_layer", "get_peft_config", "load_model", "load_splits", "main"]


def _torch_dtype(name: str) -> Any:
    return "auto" if name == "auto" else getattr(torch, name)


def _is_half(dtype: Any) -> bool:
    return isinstance(dtype, torch.dtype) and dtype in (torch.float16, torch.bfloat16)


def build_task(script_args: ScriptArguments) -> Any:
    """The [`~hosfl_hf.tasks.ClassificationTask`] of the run: the preset `task` (default `"sst2"` without a
    `dataset_name`) with each dataset flag that is set overriding it, or, with `dataset_name` and no `task`, a task
    built from the dataset flags alone (`prompt_template` required). `prompt="mezo"` is MeZO's SST-2 prompt."""
    from dataclasses import replace

    from ..tasks import ClassificationTask, get_task

    if script_args.task is not None or script_args.dataset_name is None:
        task = get_task(script_args.task or "sst2")
        if script_args.prompt == "mezo":
            if task.name != "sst2":
                raise ValueError(f"prompt='mezo' is defined for sst2 only, not {task.name!r}; use prompt='default'.")
            task = replace(task, template="{sentence} It was", verbalizers=(" terrible", " great"))
    else:
        if script_args.prompt_template is None:
            raise ValueError(
                f"--dataset_name {script_args.dataset_name} needs --prompt_template, a format string over the "
                "dataset's columns (e.g. 'Review: {text}\\nSentiment:'), or a preset --task."
            )
        if script_args.prompt == "mezo":
            raise ValueError(
                "prompt='mezo' is MeZO's SST-2 prompt: use it with --task sst2, or set --prompt_template."
            )
        name = os.path.basename(os.path.normpath(script_args.dataset_name)) or script_args.dataset_name
        task = ClassificationTask(name, script_args.prompt_template, test_split="test")
    overrides = {
        "dataset_name": script_args.dataset_name,
        "dataset_config": script_args.dataset_config,
        "train_split": script_args.dataset_train_split,
        "test_split": script_args.dataset_test_split,
        "template": script_args.prompt_template,
        "label_column": script_args.label_column,
        "verbalizers": tuple(script_args.verbalizers) if script_args.verbalizers else None,
    }
    return replace(task, **{k: v for k, v in overrides.items() if v is not None})


def load_splits(task: Any, script_args: ScriptArguments) -> tuple[Any, Any, Any]:
    """`(train, evaluation, test)` raw datasets of the protocol (`test` is `None` under `"glue"`), checked against the
    task (template columns, labels; see [`~hosfl_hf.tasks.ClassificationTask.check`]) before any training."""
    data_dir = script_args.data_dir
    train_split, test_split = task.train_split, task.test_split
    if script_args.protocol == "glue":
        train = task.load(train_split, data_dir, script_args.train_limit, seed=script_args.sample_seed)
        # The evaluation subset is fixed (seed 0) so that runs with different seeds are compared on the same set.
        evaluation = task.load(test_split, data_dir, script_args.eval_limit)
        test = None
    else:
        num_train = script_args.train_limit or 1000
        num_dev = script_args.eval_limit or 500
        pool = task.load(train_split, data_dir)
        if num_train + num_dev > len(pool):
            raise ValueError(f"{num_train} train + {num_dev} dev examples exceed the {len(pool)} of the training set.")
        pool = pool.shuffle(seed=script_args.sample_seed)
        train = pool.select(range(num_train))
        evaluation = pool.select(range(num_train, num_train + num_dev))
        test = task.load(test_split, data_dir, script_args.test_limit, seed=script_args.sample_seed)
    for name, dataset in ((train_split, train), (test_split, evaluation), (test_split, test)):
        if dataset is not None:
            task.check(dataset, name)
    return train, evaluation, test


def load_model(model_args: ModelArguments, training_args: HOSFLConfig) -> tuple[Any, Any]:
    """The model (with 4-bit client blocks if asked) and its tokenizer; sets `training_args.split_layer` if unset.

    LoRA adapters are added by the trainer (`HOSFLTrainer(..., peft_config=get_peft_config(model_args))`)."""
    from ..models import SHIPPED_MODELS, load_model_and_tokenizer, shipped_model_path

    dtype = _torch_dtype(model_args.dtype)
    kwargs: dict[str, Any] = {"trust_remote_code": model_args.trust_remote_code}
    if model_args.model_revision is not None:
        kwargs["revision"] = model_args.model_revision
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    name = model_args.model_name_or_path
    split_layer = training_args.split_layer
    if model_args.load_in_4bit_client:
        from accelerate import PartialState
        from transformers import AutoConfig

        from ..lora import client_4bit_config

        if not model_args.use_peft:
            raise ValueError("load_in_4bit_client needs LoRA adapters (use_peft=True): 4-bit weights cannot train.")
        path = shipped_model_path(name) if name in SHIPPED_MODELS else name
        config = AutoConfig.from_pretrained(
            path, revision=model_args.model_revision, trust_remote_code=model_args.trust_remote_code
        )
        split_layer = split_layer if split_layer is not None else default_split_layer(config)
        compute_dtype = dtype if _is_half(dtype) else torch.float32
        kwargs["quantization_config"] = client_4bit_config(
            config,
            split_layer,
            compute_dtype=compute_dtype,
            quant_type=model_args.bnb_4bit_quant_type,
            double_quant=model_args.use_bnb_nested_quant,
        )
        on_gpu = torch.cuda.is_available() and not training_args.use_cpu
        kwargs["device_map"] = {"": PartialState().local_process_index} if on_gpu else "cpu"
    elif not model_args.use_peft and _is_half(dtype):
        raise ValueError(
            f"Training every weight needs dtype='float32' (got {model_args.dtype!r}): zeroth-order client updates of "
            "about client_learning_rate round away in half precision. Use LoRA (use_peft=True) or float32 weights "
            "with bf16=True for mixed-precision compute."
        )
    model, tokenizer = load_model_and_tokenizer(name, dtype=dtype, **kwargs)
    training_args.split_layer = split_layer if split_layer is not None else default_split_layer(model.config)
    return model, tokenizer


def get_peft_config(model_args: ModelArguments) -> Any:
    """The `peft_config` of [`HOSFLTrainer`]: one `LoraConfig` for both parts, a `(client, server)` pair with `None`
    for the part without adapters, or `None` without LoRA."""
    if not model_args.use_peft:
        return None
    from peft import LoraConfig

    lora = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=list(model_args.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    return {"both": lora, "client": (lora, None), "server": (None, lora)}[model_args.lora_parts]


def client_mask(
    script_args: ScriptArguments, model: Any, peft_config: Any, train: Any, trainer_kwargs: dict, args
) -> Any:
    """The run's [`~hosfl_hf.search_space.ClientMask`]: loaded from `client_mask`, or chosen by gradient sensitivity
    on the first `client_mask_batches` batches of the shuffled training set (seeded by `args.seed`), on a copy of the
    model with the run's adapters (the mask names the adapter model's parameters; its LoRA-B starts at zero, so the
    base weights' gradients do not depend on the adapters' initialisation). `None` without a mask."""
    import copy

    from ..lora import get_split_peft_model
    from ..search_space import ClientMask, sensitivity_mask
    from ..split import split_model

    if script_args.client_mask is not None:
        return ClientMask.load(script_args.client_mask)
    if script_args.client_mask_density is None:
        return None
    calibration = copy.deepcopy(model)
    if peft_config is not None:
        with torch.random.fork_rng(devices=[]):  # peft's init draws from the global RNG; leave the caller's as it was
            calibration = get_split_peft_model(calibration, peft_config, args.split_layer)
    size = args.per_device_train_batch_size
    count = min(script_args.client_mask_batches * size, len(train))
    rows = train.shuffle(seed=args.seed).select(range(count))
    collate = trainer_kwargs["data_collator"]
    batches = []
    for start in range(0, count, size):
        batch = collate([rows[i] for i in range(start, min(start + size, count))])
        batch.pop("logits_to_keep", None)
        batches.append(batch)
    split = split_model(calibration, args.split_layer)
    return sensitivity_mask(
        split,
        batches,
        script_args.client_mask_density,
        loss_func=trainer_kwargs.get("compute_loss_func"),
        direction_scales=script_args.client_mask_direction_scales,
        guide_share=script_args.client_mask_guide_share,
    )


def default_split_layer(config: Any) -> int:
    """A quarter of the decoder blocks on the client (at least one): 10 of OPT-13B's 40, 7 of SmolLM2's 30."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return max(1, text_config.num_hidden_layers // 4)


def main(script_args: ScriptArguments, model_args: ModelArguments, training_args: HOSFLConfig) -> dict[str, float]:
    """Trains with HO-SFL, evaluates before and after, saves the model (adapters), the trajectory and the metrics
    to `output_dir`, and pushes to the Hub if `push_to_hub` is set.

    Prints one line per evaluation set: `[task] <set> accuracy before: x%  after: y%  (n examples, r rounds)`.

    Returns:
        `dict[str, float]`: the metrics (`before_accuracy`, `after_accuracy`, and under the `"mezo"` protocol
        `before_test_accuracy`, `test_accuracy`).
    """
    from ..trainer import HOSFLTrainer

    task = build_task(script_args)
    if not task.verbalizers:  # from the label column's ClassLabel names
        task = task.with_verbalizers_of(task.load(task.train_split, script_args.data_dir))
    raw_train, raw_eval, raw_test = load_splits(task, script_args)
    model, tokenizer = load_model(model_args, training_args)
    task.verbalizer_ids(tokenizer)  # one token each, checked before the model is split
    train = task.tokenize(raw_train, tokenizer, script_args.max_length)
    evaluation = task.tokenize(raw_eval, tokenizer, script_args.max_length)
    test = task.tokenize(raw_test, tokenizer, script_args.max_length) if raw_test is not None else None
    peft_config = get_peft_config(model_args)
    trainer_kwargs = task.trainer_kwargs(tokenizer)
    mask = client_mask(script_args, model, peft_config, train, trainer_kwargs, training_args)
    if script_args.client_mask_only:
        training_args.client_zo_modules = []
    trainer = HOSFLTrainer(
        model,
        training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=peft_config,
        client_mask=mask,
        **trainer_kwargs,
    )
    # (name, dataset, metric prefix before training, metric prefix after training)
    sets = [("dev" if test is not None else task.test_split, evaluation, "before", "after")]
    if test is not None:
        sets.append(("test", test, "before_test", "test"))

    def report(line: str) -> None:
        if trainer.is_world_process_zero():
            print(f"[{task.name}] {line}", flush=True)

    metrics: dict[str, float] = {}
    if script_args.evaluate_before:
        for name, dataset, before, _ in sets:
            metrics.update(trainer.evaluate(dataset, metric_key_prefix=before))
            accuracy = metrics[f"{before}_accuracy"]
            report(f"{name} accuracy before training: {100 * accuracy:.2f}% ({len(dataset)} examples)")
    trainer.train()
    for name, dataset, before, after in sets:
        metrics.update(trainer.evaluate(dataset, metric_key_prefix=after))
        before_key = f"{before}_accuracy"
        before_text = f"before: {100 * metrics[before_key]:.2f}%  " if before_key in metrics else ""
        run = f"{len(dataset)} examples, {trainer.state.global_step} rounds"
        if trainer.args.world_size > 1:
            run += f", {trainer.args.world_size} processes"
        report(f"{name} accuracy {before_text}after: {100 * metrics[f'{after}_accuracy']:.2f}%  ({run})")
    trainer.save_model(training_args.output_dir)
    trainer.save_metrics("all", metrics)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=task.name)
    end_processes(trainer)
    return metrics


def end_processes(trainer: Any) -> None:
    """Ends a multi-process launch cleanly: waits until every process has saved, then destroys the process group.

    A process that leaves the interpreter while the gloo/NCCL group is still alive can abort in the group's destructor
    ("terminate called without an active exception", exit code -6) although its work is done, and `accelerate launch`
    then reports the whole run as failed. No-op in a single process.
    """
    if trainer.args.world_size > 1:
        trainer.accelerator.wait_for_everyone()
        trainer.accelerator.end_training()
