"""What a Flower run prints: one line per applied round and a closing summary (the numbers of `flower_summary.json`),
through Flower's own logger, so that `flwr run --stream`, the simulation and a deployment's SuperLink log show them."""

from __future__ import annotations

from logging import INFO
from typing import Any

from flwr.common.logger import log

__all__ = ["RoundPrinter", "format_bytes", "format_eval", "print_summary"]


def format_eval(metrics: dict[str, Any]) -> str:
    """`"eval acc 0.8125 loss 0.4412"` (verbalizers) or `"eval loss 2.3101 ppl 10.08"` (language modelling); `""`
    when `metrics` holds no evaluation."""
    if "eval_accuracy" in metrics:
        return f"eval acc {metrics['eval_accuracy']:.4f} loss {metrics['eval_loss']:.4f}"
    if "eval_loss" in metrics:
        return f"eval loss {metrics['eval_loss']:.4f} ppl {metrics['eval_perplexity']:.2f}"
    return ""


def format_bytes(count: float) -> str:
    """`1536` -> `"1.5 KiB"`."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


class RoundPrinter:
    """`FederatedRun(on_round=...)`: prints `round r/N | clients f/k | loss | lr | update norms | bytes | seconds`,
    plus `| eval ...` in a round the server evaluated (run-config `eval-every`)."""

    def __init__(self, num_rounds: int):
        self.num_rounds = num_rounds
        self.last_bytes = 0

    def __call__(self, record: dict[str, Any]) -> None:
        total = record["comm/activation_bytes"] + record["comm/sync_bytes"] + record["comm/catchup_bytes"]
        sent, self.last_bytes = total - self.last_bytes, total
        norms = f"server {record.get('server_update_norm', 0.0):.2e}"
        if "client_update_norm" in record:
            norms += f" client {record['client_update_norm']:.2e}"
        evaluation = format_eval(record)
        log(
            INFO,
            "HO-SFL round %d/%d | clients %d/%d | loss %.4f | lr %.2e client %.2e | update %s | %s | %.2f s%s",
            record["round"] + 1,
            self.num_rounds,
            len(record["finishers"]),
            len(record["clients"]),
            record["loss"],
            record["learning_rate"],
            record["client_learning_rate"],
            norms,
            format_bytes(sent),
            record["seconds"],
            f" | {evaluation}" if evaluation else "",
        )


def print_summary(summary: dict[str, Any], output_dir: str) -> None:
    """The closing lines: rounds and time, last loss, bytes per kind, faults, the clients' agreement, the output."""
    history = summary["history"]
    seconds = sum(summary["seconds_per_round"])
    rounds = len(history)
    log(
        INFO,
        "HO-SFL finished: %d rounds in %.1f s (%.2f s/round)%s",
        summary["rounds"],
        seconds,
        seconds / max(rounds, 1),
        f", resumed at round {summary['resumed_at']}" if summary.get("resumed_at") is not None else "",
    )
    if history:
        log(INFO, "HO-SFL final loss %.4f (first round %.4f)", history[-1]["loss"], history[0]["loss"])
    comm = summary["comm"]
    log(
        INFO,
        "HO-SFL traffic: activations %s, sync %s (of which catch-up %s)",
        format_bytes(comm["activation_bytes"]),
        format_bytes(comm["sync_bytes"]),
        format_bytes(comm["catchup_bytes"]),
    )
    if summary.get("eval"):
        log(INFO, "HO-SFL final %s (%s)", format_eval(summary["eval"]), summary.get("eval_dataset", ""))
    faults = {k: v for k, v in summary["counters"].items() if v}
    log(INFO, "HO-SFL faults: %s", faults or "none")
    identical = "all identical" if summary["clients_identical"] else f"unreachable {summary['unreachable_clients']}"
    log(INFO, "HO-SFL clients' weights: %s (digest %s)", identical, summary["client_digest"][:12])
    log(INFO, "HO-SFL output: %s", output_dir)
