"""Every fault and bad input of the fault-injection suite, injected many times on the in-process transport, plus a
soak run; writes `reliability.json` and `reliability.md` (the table in docs/reliability.md).

    python benchmarks/reliability.py --out docs/results            # ~5 min on 2 CPU cores
    python benchmarks/reliability.py --out /tmp/r --soak-rounds 40  # quicker

Each scenario runs a federation of a tiny random Llama (4 clients, 2 per round, 8 rounds) on a counting task and
checks its final state: rounds applied (none lost), every client's weights equal to the server's record of the
client part (nothing lost or double-applied), and, where the outcome is known exactly, bit-identity with the
reference run (uninterrupted for a server crash; the same client dropped for a rejected message). The soak run is
200 rounds, 10 clients, 5 per round, 20 % random dropout per client and exchange, and one attacker that sends its
scalars sign-flipped and x1e6, under each aggregation rule, with min_finishers=3 (and 1), and without the attacker.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hosfl_hf import HOSFLConfig  # noqa: E402
from hosfl_hf.protocol import FederatedRun, ReliabilitySettings, RoundSettings, SplitClient, SplitServer  # noqa: E402
from hosfl_hf.protocol.faults import Fault, FaultyTransport, ServerCrash, scale  # noqa: E402
from hosfl_hf.split import split_model  # noqa: E402
from hosfl_hf.trajectory import replay_trajectory  # noqa: E402

VOCAB, SEQ = 32, 12
NAN, INF = float("nan"), float("inf")


def tiny_llama(pad_token_id: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            # No padding row: with pad_token_id=0 the embedding of token 0 (a real token of the counting task) is
            # zero, RMSNorm then amplifies lambda ~500x on batches that contain it, and those clients' scalars
            # dominate every mean (see docs/reliability.md).
            pad_token_id=pad_token_id,
        )
        return LlamaForCausalLM(config)


def counting_rows(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, VOCAB, (1,), generator=g))
        seq = [(start + j) % VOCAB for j in range(SEQ)]
        rows.append({"input_ids": seq, "labels": seq})
    return rows


def collate(rows):
    return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels")}


class Federation:
    def __init__(
        self, folder, rounds, faults=(), reliability=None, checkpoint=False, seed=0, pad_token_id=None, **overrides
    ):
        values = dict(
            output_dir=str(folder / "out"),
            max_steps=rounds,
            per_device_train_batch_size=4,
            learning_rate=3e-3,
            client_learning_rate=1e-3,
            num_clients=4,
            clients_per_round=2,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            seed=7 + seed,
            disable_tqdm=True,
        )
        self.args = HOSFLConfig(**{**values, **overrides})
        self.rounds = rounds
        self.settings = RoundSettings.from_args(self.args, split_layer=2)
        self.base = tiny_llama(pad_token_id)
        self.data = counting_rows(400, seed)
        self.clients = {c: self.new_client(c) for c in range(self.settings.num_clients)}
        self.transport = FaultyTransport(self.clients, list(faults), restart=self.new_client, seed=seed)
        self.reliability = reliability or ReliabilitySettings()
        self.checkpoint_dir = str(folder / "ckpt") if checkpoint else None
        self.run = self.new_run()
        self.resumes = 0

    def new_client(self, c):
        return SplitClient(copy.deepcopy(self.base), c, self.settings, self.data, collate)

    def new_run(self, resume=False):
        server = SplitServer(copy.deepcopy(self.base), self.settings, self.args)
        kwargs = dict(reliability=self.reliability, base_model=self.base)
        if resume:
            return FederatedRun.resume(self.checkpoint_dir, server, self.transport, **kwargs)
        return FederatedRun(server, self.transport, checkpoint_dir=self.checkpoint_dir, **kwargs)

    def train(self):
        while True:
            try:
                self.run.run(self.rounds)
                break
            except ServerCrash:
                self.resumes += 1
                self.run = self.new_run(resume=True)
        digests = self.run.finish()
        expected = self.run.record_digest(self.base)
        return sum(d == expected for d in digests.values())

    def eval_loss(self) -> float:
        """The trained model's loss on held-out rows."""
        model = replay_trajectory(copy.deepcopy(self.base), self.run.server.trajectory)
        server = dict(self.run.server.parameters)
        for name, param in split_model(model, 2).server_parameters():
            param.data.copy_(server[name].data)
        with torch.no_grad():
            batch = collate(counting_rows(64, 999))
            return float(model(**batch).loss)

    def state(self):
        return (
            [r for r in self.run.server.trajectory.rounds],
            {n: p.detach().clone() for n, p in self.run.server.parameters},
        )


def same(a, b) -> bool:
    (ta, wa), (tb, wb) = a, b
    return ta == tb and all(torch.equal(wa[n], wb[n]) for n in wa)


def victim(round_index, k, seed=0):
    from hosfl_hf.federation import sample_clients

    return sample_clients(7 + seed, round_index, 4, 2)[k]


BAD = {
    "cut: wrong hidden size": ("forward", "hidden_states", lambda z: z[..., :-1]),
    "cut: wrong rank": ("forward", "hidden_states", lambda z: z[0]),
    "cut: float64": ("forward", "hidden_states", lambda z: z.double()),
    "cut: NaN activations": ("forward", "hidden_states", scale(NAN)),
    "cut: inf activations": ("forward", "hidden_states", scale(INF)),
    "cut: huge activations (x1e30)": ("forward", "hidden_states", scale(1e30)),
    "cut: huge activations (x1e6; activation_bound=1e3)": ("forward", "hidden_states", scale(1e6)),
    "cut: stale round id": ("forward", "round", lambda r: r + 1),
    "cut: unknown client id": ("forward", "client", 99),
    "cut: labels outside the vocabulary": ("forward", "labels", lambda y: y + 1000),
    "cut: labels of another shape": ("forward", "labels", lambda y: y[:, :-1]),
    "cut: float labels": ("forward", "labels", lambda y: y.float()),
    "scalars: count != P": ("probe", "scalars", lambda s: s[:1]),
    "scalars: NaN": ("probe", "scalars", lambda s: [NAN for _ in s]),
    "scalars: stale round id": ("probe", "round", lambda r: r - 1),
    "scalars: another client's id": ("probe", "client", "other"),
}


def scenarios(repeats: int):
    """name -> list of (faults, reliability, expected outcome, reference key) per repetition."""
    rounds = [3, 5, 1, 6, 4, 2, 7][:repeats]
    out = {}
    out["client error at forward"] = [([Fault("error", "forward", r, victim(r, 1))], None, "drop") for r in rounds]
    out["client error at probe"] = [([Fault("error", "probe", r, victim(r, 1))], None, "drop") for r in rounds]
    out["client error at update"] = [([Fault("error", "update", r, victim(r, 1))], None, "missed") for r in rounds]
    out["client timeout at probe (0.3 s > 0.2 s)"] = [
        ([Fault("slow", "probe", r, victim(r, 1), delay=0.3)], ReliabilitySettings(reply_timeout=0.2), "drop")
        for r in rounds[:3]
    ]
    out["every sampled client fails"] = [
        ([Fault("error", "forward", r, victim(r, 0)), Fault("error", "forward", r, victim(r, 1))], None, "skip")
        for r in rounds[:3]
    ]
    for name, (leg, field, edit) in BAD.items():
        cases = []
        # This tiny model's clean cuts have entries of magnitude ~4: a bound of 1e3 is generous.
        reliability = ReliabilitySettings(activation_bound=1e3) if "activation_bound" in name else None
        for r in rounds[:2]:
            change = victim(r, 0) if edit == "other" else edit
            cases.append(([Fault("edit", leg, r, victim(r, 1), field=field, edit=change)], reliability, "drop"))
        out[name] = cases
    out["client restart from nothing"] = [
        ([Fault("restart", "forward", r, victim(r, 0))], None, "restart") for r in rounds[:3]
    ]
    out["client restart from nothing (snapshot every 3)"] = [
        ([Fault("restart", "forward", r, victim(r, 0))], ReliabilitySettings(checkpoint_every=3), "restart")
        for r in rounds[:3]
    ]
    out["straggler away 6 rounds (snapshot every 3)"] = [
        ([Fault("error", "forward", None, 0, times=0)], ReliabilitySettings(checkpoint_every=3), "straggler")
    ]
    out["server crash while sending lambdas"] = [
        ([Fault("server_crash", "probe", r, after=1)], None, "crash") for r in rounds[:3]
    ]
    out["server crash after one finisher got the update"] = [
        ([Fault("server_crash", "update", r, after=1)], None, "crash") for r in rounds[:3]
    ]
    return out


def run_scenarios(folder: Path, repeats: int, rounds: int = 8) -> list[dict]:
    clean = Federation(folder / "clean", rounds)
    clean.train()
    clean_state = clean.state()
    rows = []
    for name, cases in scenarios(repeats).items():
        row = {
            "fault": name,
            "injected": 0,
            "runs": len(cases),
            "dropped": 0,
            "rejected": 0,
            "skipped": 0,
            "missed_updates": 0,
            "resumes": 0,
            "rounds_applied": 0,
            "rounds_lost": 0,
            "clients_identical": 0,
            "clients": 0,
            "bit_identical_to_reference": 0,
            "seconds": 0.0,
        }
        for index, (faults, reliability, expect) in enumerate(cases):
            start = time.perf_counter()
            sub = folder / f"{name}-{index}".replace(" ", "_").replace("/", "_")
            crash = expect == "crash"
            fed = Federation(sub, rounds, faults, reliability, checkpoint=crash)
            if expect == "straggler":
                fed.run.run(6)
                fed.transport.faults.clear()
            identical = fed.train()
            c = fed.run.counters
            row["injected"] += sum(fed.transport.injected.values())
            row["dropped"] += c["fed/dropped_clients"]
            row["rejected"] += c["fed/rejected_messages"]
            row["skipped"] += c["fed/skipped_rounds"]
            row["missed_updates"] += c["fed/missed_updates"]
            row["resumes"] += fed.resumes
            row["rounds_applied"] += len(fed.run.server.trajectory.rounds)
            row["rounds_lost"] += rounds - len(fed.run.server.trajectory.rounds)
            row["clients_identical"] += identical
            row["clients"] += len(fed.clients)
            if crash:  # exact reference: the uninterrupted run
                row["bit_identical_to_reference"] += same(fed.state(), clean_state)
            elif expect == "drop" and not (faults[0].action == "error" and faults[0].leg == "forward"):
                # exact reference: the same client failing its forward (nothing it sent was used)
                f = faults[0]
                ref = Federation(sub / "ref", rounds, [Fault("error", "forward", f.round, f.client)], reliability)
                ref.train()
                row["bit_identical_to_reference"] += same(fed.state(), ref.state())
            else:
                row["bit_identical_to_reference"] = None
            row["seconds"] += time.perf_counter() - start
        row["outcome"] = {
            "drop": "client dropped for the round; round completed",
            "missed": "round completed; client caught up later",
            "skip": "round skipped, retried with a new sample",
            "restart": "rebuilt from base + history (dropped once where the server assumed its lost state)",
            "straggler": "caught up from snapshot + tail",
            "crash": "server resumed from its checkpoint",
        }[cases[0][2]]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def soak(
    folder: Path, rounds: int, rule: str, dropout: float = 0.2, attacker: int | None = 3, min_finishers: int = 3
) -> dict:
    """SGD clients (AdamW's normalisation would mute a scaled attack): the attacker's scalars sign-flipped, x1e6.
    `min_finishers=3`: with fewer, a median or trimmed mean of 1-2 values protects nothing."""
    edit = scale(-1e6)
    faults = [] if attacker is None else [Fault("edit", "probe", None, attacker, field="scalars", edit=edit, times=0)]
    start = time.perf_counter()
    fed = Federation(
        folder,
        rounds,
        faults,
        ReliabilitySettings(checkpoint_every=20, min_finishers=min_finishers),
        num_clients=10,
        clients_per_round=5,
        aggregation=rule,
        client_optimizer="sgd",
        client_learning_rate=1e-4,
    )
    fed.transport.dropout = dropout
    initial = fed.eval_loss()
    try:
        identical = f"{fed.train()}/{len(fed.clients)}"
        stopped = None
    except RuntimeError as error:  # no client could finish a round any more
        identical, stopped = "n/a", str(error)[:200]
    final = fed.eval_loss()
    c = fed.run.counters
    peak = max(float(p.detach().abs().max()) for _, p in fed.run.record.parameters) if fed.run.record else None
    return {
        "aggregation": rule,
        "rounds": rounds,
        "dropout": dropout,
        "attacker": attacker,
        "min_finishers": min_finishers,
        "rounds_applied": len(fed.run.server.trajectory.rounds),
        "stopped": stopped,
        "random_dropouts": fed.transport.injected.get("dropout", 0),
        "attacker_messages": fed.transport.injected.get("edit", 0),
        **{k.split("/")[1]: v for k, v in c.items()},
        "eval_loss_initial": initial,
        "eval_loss_final": final if math.isfinite(final) else str(final),
        "client_weight_max_abs": peak,
        "clients_identical": identical,
        "catchup_bytes": fed.run.traffic["catchup_bytes"],
        "seconds": time.perf_counter() - start,
    }


SOAKS = [  # aggregation, attacker (client id or None), min_finishers
    ("mean", 3, 3),
    ("median", 3, 3),
    ("trimmed_mean", 3, 3),
    ("mean", None, 3),
    ("median", None, 3),
    ("median", 3, 1),
]


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]


def markdown(result: dict) -> str:
    rows = []
    for r in result["scenarios"]:
        exact = "n/a" if r["bit_identical_to_reference"] is None else f"{r['bit_identical_to_reference']}/{r['runs']}"
        rows.append(
            [r["fault"], r["runs"], r["injected"], r["dropped"], r["rejected"], r["skipped"], r["resumes"]]
            + [r["rounds_lost"], f"{r['clients_identical']}/{r['clients']}", exact, r["outcome"]]
        )
    header = ["fault / bad input", "runs", "injected", "dropped", "rejected", "skipped rounds", "resumes"]
    header += ["rounds lost", "clients = record", "bit-identical to reference", "outcome"]
    lines = table(header, rows)
    soak_rows = []
    for s in result["soak"]:
        final = s["eval_loss_final"]
        final = f"{final:.3f}" if isinstance(final, float) else final
        soak_rows.append(
            [s["aggregation"], "none" if s["attacker"] is None else f"client {s['attacker']}", s["min_finishers"]]
            + [f"{s['rounds_applied']}/{s['rounds']}", s["random_dropouts"], s["attacker_messages"]]
            + [f"{s['client_weight_max_abs']:.3g}"]
            + [
                s["dropped_clients"],
                s["skipped_rounds"],
                s["missed_updates"],
                f"{s['eval_loss_initial']:.3f} -> {final}",
            ]
            + [s["clients_identical"], s["catchup_bytes"], f"{s['seconds']:.0f}"]
        )
    header = ["aggregation", "attacker", "min finishers", "rounds applied", "random dropouts", "attacker messages"]
    header += ["client max abs weight"]
    header += ["dropped", "skipped rounds"]
    header += ["missed updates", "eval loss start -> end", "clients = record", "catch-up bytes", "seconds"]
    return "\n".join(lines + ["", "Soak runs:", ""] + table(header, soak_rows)) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions of each single-client fault")
    parser.add_argument("--soak-rounds", type=int, default=200)
    parser.add_argument("--rules", nargs="+", default=["mean", "median", "trimmed_mean"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging_off()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = run_scenarios(folder, args.repeats)
        soaks = []
        for rule in args.rules:
            for attacker, min_finishers in ((3, 3), (None, 3), (3, 1)):
                name = f"soak-{rule}-{attacker}-{min_finishers}"
                soaks.append(
                    soak(folder / name, args.soak_rounds, rule, attacker=attacker, min_finishers=min_finishers)
                )
                print(json.dumps(soaks[-1]), flush=True)
    result = {
        "command": "python benchmarks/reliability.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "versions": {"torch": torch.__version__},
        "scenarios": rows,
        "soak": soaks,
    }
    os.makedirs(args.out, exist_ok=True)
    Path(args.out, "reliability.json").write_text(json.dumps(result, indent=1))
    Path(args.out, "reliability.md").write_text(markdown(result))
    embed(Path(__file__).resolve().parents[1] / "docs" / "reliability.md", markdown(result))


BEGIN, END = "<!-- begin: generated by benchmarks/reliability.py -->", "<!-- end: generated -->"


def embed(page: Path, tables: str) -> None:
    """Puts the tables into `page` between its markers (docs/reliability.md shows what the last run measured)."""
    if not page.is_file():
        return
    text = page.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        page.write_text(head + BEGIN + "\n" + tables + rest[rest.index(END) :])


def logging_off():
    import logging

    logging.getLogger("hosfl_hf").setLevel(logging.ERROR)
    random.seed(0)


if __name__ == "__main__":
    main()
