"""[`HOSFLParser`]: `HfArgumentParser` with a `--config` YAML file and recipe defaults."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from transformers import HfArgumentParser

__all__ = ["HOSFLParser", "load_yaml_config"]


class HOSFLParser(HfArgumentParser):
    """`HfArgumentParser` with a `--config` YAML file: its keys are flag names; flags on the command line override
    them, and both override the recipe's `defaults`.

    Example:

    ```python
    >>> from hosfl_hf import HOSFLConfig
    >>> from hosfl_hf.cli import HOSFLParser, ModelArguments, ScriptArguments
    >>> parser = HOSFLParser((ScriptArguments, ModelArguments, HOSFLConfig))
    >>> script, model, training = parser.parse_args_and_config(
    ...     ["--task", "rte", "--split_layer", "4", "--output_dir", "out"], defaults={"num_clients": 12}
    ... )
    >>> script.task, model.lora_r, training.split_layer, training.num_clients, training.zo_eps
    ('rte', 8, 4, 12, 0.001)

    ```
    """

    def __init__(self, dataclass_types: Any, **kwargs: Any):
        super().__init__(dataclass_types, **kwargs)
        self.add_argument(
            "--config", default=None, help="YAML file of flag values (flags given on the command line override it)."
        )

    def parse_args_and_config(
        self, args: Sequence[str] | None = None, defaults: dict[str, Any] | None = None
    ) -> tuple[Any, ...]:
        """Parses `args` (default: `sys.argv[1:]`) over `defaults` and the `--config` file.

        Returns:
            One instance per dataclass, in the order given to the parser.

        Raises:
            `ValueError`: if the YAML file or `defaults` name a key that is not a flag.
        """
        args = list(sys.argv[1:] if args is None else args)
        config_parser = argparse.ArgumentParser(add_help=False)
        config_parser.add_argument("--config", default=None)
        known, rest = config_parser.parse_known_args(args)
        values = dict(defaults or {})
        if known.config is not None:
            values.update(load_yaml_config(known.config))
        flags = {action.dest for action in self._actions}
        unknown = sorted(set(values) - flags)
        if unknown:
            where = known.config or "the defaults"
            raise ValueError(f"{where} sets {unknown}, which are not flags of this script (see --help).")
        self.set_defaults(**values)
        outputs = self.parse_args_into_dataclasses(args=rest)
        return tuple(o for o in outputs if not isinstance(o, argparse.Namespace))


def load_yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    """The flag values of a YAML recipe file (a mapping of flag names to values)."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of flag names to values, got {type(data).__name__}.")
    return data
