"""`python -m hosfl_hf <command> [flags]`: the `hosfl-hf` console command (see `hosfl_hf.cli`)."""

import sys

from .cli import cli

if __name__ == "__main__":
    sys.exit(cli())
