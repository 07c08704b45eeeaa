"""Instruction tuning with HO-SFL, offline: SST-2 phrased as chat turns, fine-tuned from the shipped
SmolLM2-135M-Instruct with `hosfl-hf sft` (TRL's SFT data handling: the chat template, loss on the answer only).

    python examples/sst2_chat_sft.py                         # 10 rounds on CPU (docs/your_data.md has the numbers)
    python examples/sst2_chat_sft.py --max_steps 40          # any `hosfl-hf sft` flag overrides the defaults below

The conversations are built at run time from the local GLUE copy (`hosfl_hf.tasks.default_data_dir()`, i.e.
`$HOSFL_DATA_DIR` or `../shared/data`) into `<output_dir>/data/{train,test}.jsonl`:

    system:    Answer with one word: positive or negative.
    user:      Sentiment of this movie review? <sentence>
    assistant: positive | negative

The run prints the test loss, perplexity and the accuracy of the highest-scoring answer (" negative" or
" positive") before and after training.
"""

import json
import os
import sys

from hosfl_hf.cli import cli
from hosfl_hf.tasks import get_task

# A short system turn (SmolLM2's chat template would add a longer default one): short rows keep the CPU run short.
SYSTEM = "Answer with one word: positive or negative."
QUESTION = "Sentiment of this movie review? {sentence}"
ANSWERS = ("negative", "positive")

DEFAULTS = {
    "model_name_or_path": "smollm2",
    "split_layer": 10,
    "num_clients": 10,
    "clients_per_round": 3,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 32,
    "max_steps": 10,
    "learning_rate": 1e-3,
    "client_learning_rate": 1e-4,
    "lr_scheduler_type": "linear",
    "warmup_steps": 1,
    "logging_steps": 10,
    "max_length": 128,
    "eval_limit": 100,
    "train_limit": 2000,
    "save_strategy": "no",
    "report_to": "none",
    "use_cpu": "true",
    "seed": 42,
    "output_dir": "outputs/sst2_chat_sft",
}


def write_conversations(folder: str) -> None:
    """`train.jsonl` (GLUE train) and `test.jsonl` (GLUE validation) of SST-2 as one-turn conversations."""
    os.makedirs(folder, exist_ok=True)
    task = get_task("sst2")
    for split, source in (("train", "train"), ("test", "validation")):
        with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
            for row in task.load(source):
                user = QUESTION.format(sentence=row["sentence"].strip())
                messages = [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": ANSWERS[row["label"]]},
                ]
                f.write(json.dumps({"messages": messages}) + "\n")


def main(argv: list[str]) -> int:
    output_dir = DEFAULTS["output_dir"]
    if "--output_dir" in argv:
        output_dir = argv[argv.index("--output_dir") + 1]
    data = os.path.join(output_dir, "data")
    write_conversations(data)
    flags = {**DEFAULTS, "dataset_name": data}
    args = ["sft"] + [item for key, value in flags.items() for item in (f"--{key}", str(value))]
    args += ["--answer_choices", *ANSWERS, *argv]  # flags given last win
    return cli(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
