"""The trainer's numbers on a tiny run, per algorithm, against those pinned in `tests/data/pinned_rounds.json`: a
refactor of the round cannot change them unnoticed.

Every algorithm of `ALGORITHMS` has a case (`CASES` in `tests/pin_rounds.py`); each pins, exactly, the round records
(seeds, averaged scalars, learning rate), the logged losses, the traffic counters, and every tensor of the client part
and of the server part after four rounds (sha256 of the float32 bytes in name order, plus the first values of the
first and last trainable tensor). The 4-bit paths are not pinned (they need a GPU).

To regenerate, after a change of the numbers that is intended (say which and why in the commit message), run from the
repository root:

    python tests/pin_rounds.py

The pins were written with the torch release recorded in the file; float kernels differ between releases, so with
another release the comparison is skipped (`test_a_wrong_client_update_fails_the_pin` and
`tests/test_trainer.py::test_client_update_goes_downhill_and_its_sign_flip_uphill` still check the update's sign).
"""

import json
import tempfile
from pathlib import Path

import pytest
import torch
from pin_rounds import CASES, PIN_PATH, run_case, versions

import hosfl_hf.client_part as protocol_client
from hosfl_hf.algorithms import ALGORITHMS

pytestmark = pytest.mark.usefixtures("single_thread")

PINNED = json.loads(PIN_PATH.read_text())
SAME_TORCH = PINNED["torch"].split("+")[0] == torch.__version__.split("+")[0]
# The cases whose client is updated from seeds and scalars (`apply_zo_update`).
ZO_CLIENT_CASES = sorted(
    name for name, (overrides, _) in CASES.items() if ALGORITHMS[overrides["algorithm"]].client.zeroth_order
)


def mismatches(got: dict, pinned: dict) -> list[str]:
    """The fields of a case that differ from the pin (exact comparison)."""
    return [key for key in ("trajectory", "losses", "comm", "client", "server") if got[key] != pinned[key]]


def run(name: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return run_case(Path(tmp), CASES[name])


def test_every_algorithm_is_pinned():
    assert {overrides["algorithm"] for overrides, _ in CASES.values()} == set(ALGORITHMS)
    assert sorted(PINNED["cases"]) == sorted(CASES), "regenerate the pins: python tests/pin_rounds.py"
    for name, case in PINNED["cases"].items():
        for part in ("client", "server"):
            # Every part that trains has values pinned; a part that does not is still pinned by its digest.
            assert case[part]["sha256"] and len(case[part]["values"]) == min(2, len(case[part]["trainable"])), name


@pytest.mark.skipif(not SAME_TORCH, reason=f"pinned with torch {PINNED['torch']}, float kernels differ")
@pytest.mark.parametrize("name", sorted(CASES))
def test_round_numbers_match_the_pin(name):
    got, pinned = run(name), PINNED["cases"][name]
    for part in ("client", "server"):  # first the readable values, then everything
        assert got[part]["trainable"] == pinned[part]["trainable"], part
        assert got[part]["values"] == pinned[part]["values"], part
    assert not mismatches(got, pinned), (
        f"{mismatches(got, pinned)} differ from the pin (pinned with {PINNED['versions']}, running {versions()}); "
        "after an intended change, regenerate: python tests/pin_rounds.py"
    )


@pytest.mark.skipif(not SAME_TORCH, reason=f"pinned with torch {PINNED['torch']}, float kernels differ")
@pytest.mark.parametrize("name", ZO_CLIENT_CASES)
def test_a_wrong_client_update_fails_the_pin(name, monkeypatch):
    """The pin sees the client update: with its sign flipped (every holder negates the averaged scalars), the client
    weights differ from the pin while the first round's scalars (measured before any client update) do not."""
    real = protocol_client.apply_zo_update

    def flipped(parameters, optimizer, seeds, scalars, *args, **kwargs):
        return real(parameters, optimizer, seeds, [-v for v in scalars], *args, **kwargs)

    monkeypatch.setattr(protocol_client, "apply_zo_update", flipped)
    got, pinned = run(name), PINNED["cases"][name]
    assert got["trajectory"][0] == pinned["trajectory"][0]
    assert "client" in mismatches(got, pinned)
    assert got["client"]["values"] != pinned["client"]["values"]
