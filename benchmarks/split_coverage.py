"""Which causal LMs of the installed transformers `split_model` splits exactly, refuses, or cannot be checked.

    python benchmarks/split_coverage.py                 # writes docs/split_coverage.md and docs/split_coverage.json
    python benchmarks/split_coverage.py llama mllama   # a few model types, printed only

Each model type is built as a tiny random model (`hosfl_hf.coverage.tiny_config`), run unsplit on a padded batch
and split at every cut; see `hosfl_hf.coverage`. Single-threaded, CPU, no download; a few minutes for all types.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from hosfl_hf.coverage import causal_lm_model_types, check_model_type, render_markdown, versions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_types", nargs="*", help="model types to check (default: all, and write the docs)")
    parser.add_argument("--out", default=str(ROOT / "docs"), help="folder of split_coverage.md / .json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    results = []
    for model_type in args.model_types or causal_lm_model_types():
        start = time.perf_counter()
        result = check_model_type(model_type)
        results.append(result)
        print(f"{model_type:28s} {result.status:11s} {time.perf_counter() - start:6.2f}s {result.reason[:150]}")
    bad = [r.model_type for r in results if r.status in ("inexact", "error")]
    if not args.model_types:
        out = Path(args.out)
        (out / "split_coverage.md").write_text(render_markdown(results, versions()))
        payload = {"versions": versions(), "results": [r.to_dict() for r in results]}
        (out / "split_coverage.json").write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {out / 'split_coverage.md'} and {out / 'split_coverage.json'}")
    if bad:
        print(f"inexact or failing splits: {bad}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
