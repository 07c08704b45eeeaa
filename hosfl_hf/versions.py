"""The releases this version of hosfl_hf was tested with (a fresh `pip install -e ".[test]"` on the day of the
release), printed by `hosfl-hf env` next to the installed ones."""

from __future__ import annotations

__all__ = ["TESTED_VERSIONS", "version_report"]

TESTED_VERSIONS: dict[str, str] = {
    "torch": "2.13.0",
    "transformers": "5.25.0",
    "peft": "0.22.0",
    "accelerate": "1.16.0",
    "datasets": "5.2.0",
    "trl": "1.16.0",
    "bitsandbytes": "0.50.2",
    "flwr": "1.42.0",
}
"""Package -> the release the whole test suite passed with."""


def version_report() -> list[str]:
    """One line per package: the installed release, and the tested one where they differ."""
    import importlib.metadata as metadata

    lines = []
    for package in ("hosfl-hf", *TESTED_VERSIONS):
        try:
            installed = metadata.version(package)
        except metadata.PackageNotFoundError:
            installed = "not installed"
        tested = TESTED_VERSIONS.get(package)
        note = "" if tested is None or installed.split("+")[0] == tested else f" (tested with {tested})"
        lines.append(f"{package}: {installed}{note}")
    return lines
