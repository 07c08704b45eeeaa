"""`hosfl-hf privacy-audit`: the privacy audit of `hosfl_hf.privacy` on the user's own data, from the command line.

```bash
hosfl-hf privacy-audit --task sst2 --split_layer 1 10 --cut_noise 0 1 --num_sentences 50
hosfl-hf privacy-audit --dataset_name my_data/ --prompt_template "Review: {text}\\nSentiment:" \\
    --verbalizers " bad" " good" --model_name_or_path smollm2 --split_layer 10 --output audit.json
```

The private sample is `num_sentences` rows of the training split, as training would send them (the task's prompts,
tokenized like `hosfl-hf train` with the same dataset flags). The attacker's public text is `public_dataset` (a preset
name or a local dataset; default: SST-2's training sentences), put into the task's prompt template when that template
reads one column (the server knows the run's template).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from .arguments import ScriptArguments

__all__ = ["PrivacyAuditArguments", "make_privacy_parser", "privacy_main"]


@dataclass
class PrivacyAuditArguments:
    """What `hosfl-hf privacy-audit` attacks, and with what budget.

    Parameters:
        model_name_or_path (`str`, defaults to `"smollm2"`): the model at the client's weights (the server knows it).
        split_layer (`list[int]`): the split layers to audit.
        cut_noise (`list[float]`): the noise scales `sigma` to audit ([`~hosfl_hf.privacy.CutDefense`]).
        cut_clip_norm (`float`, *optional*): the per-token clipping of every audited configuration.
        num_sentences (`int`, defaults to `50`): private rows attacked.
        public_dataset (`str`, defaults to `"sst2"`): the attacker's public text: a preset task or a local dataset.
        public_column (`str`, *optional*): its text column (default: the preset's first prompt column, else `text`).
        public_limit (`int`, defaults to `2000`): public rows the inversion is fitted on.
        top_k (`int`, defaults to `32`): candidates per position of the white-box search (`0`: whole vocabulary).
        white_box (`bool`, defaults to `True`): run the white-box search.
        output (`str`, *optional*): a JSON file for the results.
    """

    model_name_or_path: str = field(default="smollm2", metadata={"help": "Model at the client's weights."})
    split_layer: list[int] = field(default_factory=lambda: [10], metadata={"help": "Split layers to audit."})
    cut_noise: list[float] = field(default_factory=lambda: [0.0], metadata={"help": "Noise scales to audit."})
    cut_clip_norm: float | None = field(default=None, metadata={"help": "Per-token clipping of the cut."})
    num_sentences: int = field(default=50, metadata={"help": "Private rows attacked."})
    public_dataset: str = field(default="sst2", metadata={"help": "Attacker's public text: preset or dataset path."})
    public_column: str | None = field(default=None, metadata={"help": "Text column of the public dataset."})
    public_limit: int = field(default=2000, metadata={"help": "Public rows the inversion is fitted on."})
    top_k: int = field(default=32, metadata={"help": "White-box candidates per position (0: whole vocabulary)."})
    white_box: bool = field(default=True, metadata={"help": "Run the white-box search."})
    output: str | None = field(default=None, metadata={"help": "JSON file for the results."})


def make_privacy_parser():
    """The parser of `hosfl-hf privacy-audit`: the dataset flags of `hosfl-hf train` and [`PrivacyAuditArguments`]."""
    from .parser import HOSFLParser

    return HOSFLParser((ScriptArguments, PrivacyAuditArguments))


def _public_texts(args: PrivacyAuditArguments, task, data_dir: str | None) -> list[str]:
    from ..data import load_split
    from ..tasks import TASKS, template_columns

    if args.public_dataset in TASKS:
        public_task = TASKS[args.public_dataset]
        rows = public_task.load(public_task.train_split, data_dir, args.public_limit, seed=0)
        column = args.public_column or template_columns(public_task.template)[0]
    else:
        rows = load_split(args.public_dataset, "train", limit=args.public_limit, seed=0)
        column = args.public_column or "text"
    if column not in rows.column_names:
        raise ValueError(f"The public dataset has no column {column!r} (columns: {rows.column_names}).")
    texts = [str(t).strip() for t in rows[column]]
    columns = template_columns(task.template)
    if len(columns) == 1:
        texts = [task.template.format(**{columns[0]: t}) for t in texts]
    return texts


def privacy_main(script_args: ScriptArguments, args: PrivacyAuditArguments) -> list:
    """Runs the audit for every (split layer, noise) pair; prints a Markdown table; returns the [`PrivacyAudit`]s."""
    from ..models import load_model_and_tokenizer
    from ..privacy import CutDefense, PrivacyAudit, audit_privacy
    from .train import build_task

    task = build_task(script_args)
    model, tokenizer = load_model_and_tokenizer(args.model_name_or_path)
    rows = task.load(task.train_split, script_args.data_dir, args.num_sentences, seed=script_args.sample_seed)
    task = task.with_verbalizers_of(rows)
    task.check(rows, task.train_split)
    rows = task.tokenize(rows, tokenizer, script_args.max_length)
    private = [list(ids) for ids in rows["input_ids"]]
    labels = list(rows["labels"])
    public = [
        tokenizer(t, add_special_tokens=False)["input_ids"] for t in _public_texts(args, task, script_args.data_dir)
    ]
    public = [p for p in public if p]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    audits = []
    print(PrivacyAudit.markdown_header(), flush=True)
    for split_layer in args.split_layer:
        for noise in args.cut_noise:
            defense = CutDefense(noise=noise, clip_norm=args.cut_clip_norm)
            audit = audit_privacy(
                model,
                split_layer,
                private,
                public,
                defense=defense,
                labels=labels,
                top_k=args.top_k,
                white_box=args.white_box,
                pad_id=pad_id,
            )
            audits.append(audit)
            print(audit.markdown_row(), flush=True)
            if args.output:
                os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
                with open(args.output, "w") as f:
                    json.dump([a.to_dict() for a in audits], f, indent=1)
    print(
        f"Labels travel in clear: the server reads all {len(labels)} labels of the sample (see docs/privacy.md).",
        flush=True,
    )
    return audits
