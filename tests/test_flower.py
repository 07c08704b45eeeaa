"""HO-SFL over Flower: the simulation gives the in-process trainer's model (client weights and trajectory
bit-identical, server weights within float tolerance), and every client, including those that skipped rounds,
ends with the same client part after catch-up. Processes are started in their own group and stopped by pid."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import counting_dataset, stack_collator, subprocess_env, tiny_args, tiny_llama, write_flower_inputs
from safetensors.torch import load_file

pytest.importorskip("flwr")

from hosfl_hf import HOSFLTrainer, Trajectory  # noqa: E402
from hosfl_hf.federation import sample_clients  # noqa: E402
from hosfl_hf.integrations.flower.local import stop_process  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
HERE = Path(__file__).parent
ROUNDS, CLIENTS = 4, 3


def run(command, timeout, **kwargs):
    """Runs a command in its own process group; the whole group is stopped whatever happens."""
    process = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        stop_process(process)
    return process.returncode, output


def write_inputs(folder: Path, rounds: int) -> dict:
    return write_flower_inputs(folder, **{"num-rounds": rounds, "num-clients": CLIENTS, "clients-per-round": 2})


def trainer_reference(tmp_path, rounds, algorithm="hosfl"):
    args = tiny_args(tmp_path, num_clients=CLIENTS, clients_per_round=2, max_steps=rounds, algorithm=algorithm)
    trainer = HOSFLTrainer(
        tiny_llama(), args, split_layer=2, train_dataset=counting_dataset(), data_collator=stack_collator
    )
    trainer.train()
    return trainer


def check_against_trainer(out: Path, state: Path, trainer):
    summary = json.loads((out / "flower_summary.json").read_text())
    assert summary["clients_identical"] and summary["rounds"] == trainer.args.max_steps
    # The server logs the trainer's per-round numbers (the same loop): the learning rates of every round.
    assert [h["client_learning_rate"] for h in summary["history"]] == [
        r["client_learning_rate"] for r in trainer.run.log
    ]
    assert [h["learning_rate"] for h in summary["history"]] == [r["learning_rate"] for r in trainer.run.log]
    assert all(h["loss"] > 0 for h in summary["history"])
    assert Trajectory.load(out).rounds == trainer.trajectory.rounds
    saved = load_file(out / "model.safetensors")
    client = dict(trainer.split.client_parameters())
    for name, value in client.items():
        assert torch.equal(saved[name], value), name
    for name, value in trainer.split.server_parameters():
        torch.testing.assert_close(saved[name], value, rtol=1e-5, atol=1e-6)
    # Every client's own state (skipped rounds included) equals the trained client part.
    states = sorted(state.glob("*/client-*/client_parameters.safetensors"))
    assert len(states) == CLIENTS
    for path in states:
        weights = load_file(path)
        assert all(torch.equal(weights[n], v) for n, v in client.items()), path
    return summary


@pytest.mark.parametrize("launcher", ["python-api", "flwr-run"])
def test_simulation_equals_the_trainer(tmp_path, launcher):
    """3 clients, 2 per round, 4 rounds in simulation: started from Python (`run_simulation`) or with `flwr run`
    against a simulation SuperLink this test starts (and stops, by pid). The server evaluates every 2 rounds and
    reports to `flower_metrics.jsonl`: neither changes the training (still the trainer's model)."""
    from hosfl_hf.integrations.flower.local import LocalDeployment

    config = write_inputs(tmp_path, ROUNDS)
    config.update({"eval-dataset": str(held_out_rows(tmp_path)), "eval-every": 2, "report-to": "jsonl"})
    if launcher == "python-api":
        (tmp_path / "config.json").write_text(json.dumps(config))
        env = dict(subprocess_env(), RAY_DEDUP_LOGS="0", FLWR_HOME=str(tmp_path / "flwr"))
        command = [sys.executable, str(HERE / "flower_simulation.py"), str(tmp_path / "config.json"), str(CLIENTS)]
        code, output = run(command, timeout=420, env=env, cwd=tmp_path)
    else:
        simulation = LocalDeployment(CLIENTS, state_dir=tmp_path / "state", workdir=tmp_path / "sim", simulation=True)
        with simulation:
            code, output = simulation.run(config, timeout=420)
    assert (tmp_path / "out" / "flower_summary.json").is_file(), output[-6000:]
    trainer = trainer_reference(tmp_path / "trainer", ROUNDS)
    # A client that was not sampled in the last round caught up only at the end, yet ends identical.
    assert set(range(CLIENTS)) - set(sample_clients(7, ROUNDS - 1, CLIENTS, 2))
    summary = check_against_trainer(tmp_path / "out", tmp_path / "state", trainer)
    # Sync traffic is seeds and scalars (plus message headers), tiny next to the cuts and lambdas.
    assert summary["comm"]["sync_bytes"] < summary["comm"]["activation_bytes"] / 5
    check_evaluation(tmp_path / "out", tmp_path / "eval.jsonl", output, every=2)


def check_evaluation(out: Path, eval_rows: Path, output: str, every: int):
    """The evaluated rounds carry eval metrics (in the summary, the progress lines and the jsonl report); the last
    one and the final evaluation equal the saved model's loss, computed independently."""
    from transformers import AutoModelForCausalLM

    from hosfl_hf.integrations.flower.reporting import JSONL_NAME

    summary = json.loads((out / "flower_summary.json").read_text())
    history = summary["history"]
    evaluated = [h["round"] + 1 for h in history if "eval_loss" in h]
    assert evaluated == [r for r in range(1, len(history) + 1) if r % every == 0]
    final = summary["eval"]
    assert history[-1]["eval_loss"] == final["eval_loss"]  # replayed mid-run == the saved model, bit for bit
    loss, tokens = independent_lm_loss(AutoModelForCausalLM.from_pretrained(out), eval_rows)
    assert final["eval_tokens"] == tokens and final["eval_loss"] == pytest.approx(loss, rel=1e-6)
    assert final["eval_perplexity"] == pytest.approx(float(torch.tensor(loss).exp()), rel=1e-6)
    for h in history:  # the progress line of every evaluated round shows its loss
        line = f"HO-SFL round {h['round'] + 1}/{len(history)} | "
        assert line in output, output[-3000:]
        if "eval_loss" in h:
            assert f"eval loss {h['eval_loss']:.4f} ppl {h['eval_perplexity']:.2f}" in output
    assert f"HO-SFL final eval loss {final['eval_loss']:.4f}" in output
    report = [json.loads(line) for line in (out / JSONL_NAME).read_text().splitlines()]
    assert [r["round"] for r in report] == [*range(1, len(history) + 1), len(history)]
    assert [r["loss"] for r in report[:-1]] == [h["loss"] for h in history]
    assert [r.get("eval_loss") for r in report[:-1]] == [h.get("eval_loss") for h in history]
    assert report[-1] == {"round": len(history), **final}


def test_simulation_resumes_from_the_server_checkpoint(tmp_path):
    """The ServerApp dies right after sending round 1's update; a new run with the same `checkpoint-dir` resumes at
    round 2 with the clients' saved states (the clients that applied round 1 do not apply it again) and ends as the
    uninterrupted trainer: client part and trajectory bit for bit."""
    # The update exchange is what the crash follows: the updates are not deferred to the next plan here.
    config = {
        **write_inputs(tmp_path, ROUNDS),
        "checkpoint-dir": str(tmp_path / "checkpoint"),
        "deferred-updates": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    env = dict(subprocess_env(), RAY_DEDUP_LOGS="0", FLWR_HOME=str(tmp_path / "flwr"))
    command = [sys.executable, str(HERE / "flower_simulation.py"), str(tmp_path / "config.json"), str(CLIENTS)]
    crash = json.dumps({"server_crash_after_round": 1})
    code, output = run([*command, crash], timeout=420, env=env, cwd=tmp_path)
    assert not (tmp_path / "out").exists() and (tmp_path / "checkpoint").is_dir(), output[-6000:]
    code, output = run(command, timeout=420, env=env, cwd=tmp_path)
    assert (tmp_path / "out" / "flower_summary.json").is_file(), output[-6000:]
    summary = check_against_trainer(tmp_path / "out", tmp_path / "state", trainer_reference(tmp_path / "t", ROUNDS))
    assert summary["resumed_at"] == 2
    assert summary["counters"]["fed/behind"] == 0 and summary["events"] == []  # states kept, nothing applied twice


def test_app_folder_declares_every_run_config_key(tmp_path):
    import tomllib

    from hosfl_hf.integrations.flower import DEFAULT_RUN_CONFIG
    from hosfl_hf.integrations.flower.config import write_app

    example = (HERE.parent / "examples" / "flower" / "pyproject.toml").read_text()
    assert example == (Path(write_app(tmp_path)) / "pyproject.toml").read_text()  # examples/flower is generated
    app = tomllib.loads(example)["tool"]["flwr"]["app"]
    assert app["config"] == DEFAULT_RUN_CONFIG
    assert app["components"]["clientapp"] == "hosfl_hf.integrations.flower.client_app:app"


def test_loopback_deployment_writes_the_trainers_artifacts(tmp_path):
    """flower-superlink + 3 flower-supernodes on 127.0.0.1 (a new ClientApp process per message), 2 rounds of
    SplitLoRA (a non-HO-SFL algorithm; HO-SFL's deployment is the TLS test): the written artifacts load, and the
    client part equals the in-process trainer's bit for bit."""
    from transformers import AutoModelForCausalLM

    from hosfl_hf import HOSFLRunRecord
    from hosfl_hf.integrations.flower.local import LocalDeployment

    config = {**write_inputs(tmp_path, 2), "algorithm": "splitlora"}
    with LocalDeployment(num_nodes=CLIENTS, state_dir=tmp_path / "state", workdir=tmp_path / "deploy") as deployment:
        code, output = deployment.run(config, timeout=480)
    # `flwr run` exits 0 even when the ServerApp failed: judge the run by what it wrote.
    assert (tmp_path / "out" / "flower_summary.json").is_file(), output[-6000:]
    trainer = trainer_reference(tmp_path / "trainer", 2, algorithm="splitlora")
    check_against_trainer(tmp_path / "out", tmp_path / "state", trainer)
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    record = HOSFLRunRecord.from_pretrained(tmp_path / "out")
    assert record.split_layer == 2 and record.algorithm == "splitlora"
    assert (tmp_path / "out" / "README.md").is_file()


def test_simulation_drops_a_failing_node_like_the_in_process_transport(tmp_path):
    """A node whose ClientApp fails its probe in round 2 (a Flower client mod raises) is dropped for that round, and
    the run ends exactly as the in-process transport's run with the same fault: same trajectory, same client part."""
    import copy

    from hosfl_hf.integrations.flower.config import build_args, load_dataset, load_model, make_collator, resolve
    from hosfl_hf.protocol import FederatedRun, SplitClient, SplitServer
    from hosfl_hf.protocol.faults import Fault, FaultyTransport

    rounds, failing_round = 4, 2
    config = write_inputs(tmp_path, rounds)
    victim = sample_clients(7, failing_round, CLIENTS, 2)[1]
    (tmp_path / "config.json").write_text(json.dumps(config))
    fault = json.dumps({"leg": "probe", "partition": victim, "round": failing_round})
    env = dict(subprocess_env(), RAY_DEDUP_LOGS="0", FLWR_HOME=str(tmp_path / "flwr"))
    command = [sys.executable, str(HERE / "flower_simulation.py"), str(tmp_path / "config.json"), str(CLIENTS), fault]
    code, output = run(command, timeout=420, env=env, cwd=tmp_path)
    assert (tmp_path / "out" / "flower_summary.json").is_file(), output[-6000:]
    summary = json.loads((tmp_path / "out" / "flower_summary.json").read_text())
    assert summary["counters"]["fed/dropped_clients"] == 1 and summary["clients_identical"]
    (event,) = summary["events"]
    assert (event["round"], event["client"], event["leg"]) == (failing_round, victim, "probe")
    assert "injected failure" in event["reason"]

    resolved = resolve(config)
    settings, args = build_args(resolved)
    base, dataset, collator = load_model(resolved), load_dataset(resolved), make_collator(resolved)
    clients = {c: SplitClient(copy.deepcopy(base), c, settings, dataset, collator) for c in range(CLIENTS)}
    transport = FaultyTransport(clients, [Fault("error", "probe", round=failing_round, client=victim)])
    reference = FederatedRun(SplitServer(copy.deepcopy(base), settings, args), transport)
    reference.run(rounds)
    assert Trajectory.load(tmp_path / "out").rounds == reference.server.trajectory.rounds
    saved = load_file(tmp_path / "out" / "model.safetensors")
    for name, value in reference.server.parameters:
        torch.testing.assert_close(saved[name], value, rtol=1e-5, atol=1e-6)
    reference.finish()
    for name, value in clients[victim].parameters:
        assert torch.equal(saved[name], value), name


def test_secure_deployment_trains_with_registered_nodes_and_refuses_others(tmp_path):
    """TLS on the SuperLink (a test CA made with `cryptography`) and SuperNode authentication, 2 registered nodes,
    2 rounds: the SuperLink serves TLS only, with the certificate the test CA signed; a node with an unknown key is
    refused (it exits with Flower's 'failed to activate' code and is never listed); the run over TLS writes the
    usual artifacts and every client ends with the trainer's client part."""
    import socket
    import ssl

    from hosfl_hf.integrations.flower.local import LocalDeployment, write_node_key

    config = write_flower_inputs(tmp_path, **{"num-rounds": 2, "num-clients": 2, "clients-per-round": 2})
    with LocalDeployment(num_nodes=2, state_dir=tmp_path / "state", workdir=tmp_path / "d", secure=True) as d:
        context = ssl.create_default_context(cafile=str(d.tls["ca"]))
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")  # verified against the test CA
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as raw:  # plain HTTP gets no HTTP answer
            raw.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            raw.settimeout(5)
            try:
                answer = raw.recv(64)
            except (TimeoutError, ConnectionError):
                answer = b""
            assert not answer.startswith(b"HTTP/")

        stranger_key, _ = write_node_key(tmp_path / "stranger", "stranger")  # never registered
        stranger = d.start_node(0, stranger_key, name="stranger")
        code, output = d.run(config, timeout=300)
        try:
            stranger.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("an unregistered SuperNode was not refused")
        log = (d.logs / "stranger.log").read_text()
        assert stranger.returncode != 0 and "Failed to activate SuperNode" in log, log[-3000:]
        nodes = d.supernodes()
        assert len(nodes) == 2, nodes  # the two registered nodes only
    assert (tmp_path / "out" / "flower_summary.json").is_file(), output[-6000:]
    summary = json.loads((tmp_path / "out" / "flower_summary.json").read_text())
    assert summary["rounds"] == 2 and summary["clients_identical"] and summary["counters"]["fed/dropped_clients"] == 0
    args = tiny_args(tmp_path / "trainer", num_clients=2, clients_per_round=2, max_steps=2)
    trainer = HOSFLTrainer(
        tiny_llama(), args, split_layer=2, train_dataset=counting_dataset(), data_collator=stack_collator
    )
    trainer.train()
    assert Trajectory.load(tmp_path / "out").rounds == trainer.trajectory.rounds
    saved = load_file(tmp_path / "out" / "model.safetensors")
    client = dict(trainer.split.client_parameters())
    assert all(torch.equal(saved[n], v) for n, v in client.items())
    for path in sorted((tmp_path / "state").glob("*/client-*/client_parameters.safetensors")):
        assert all(torch.equal(load_file(path)[n], v) for n, v in client.items()), path


# ------------------------------------------------------------------------------------------- evaluation, report-to
def held_out_rows(folder: Path) -> Path:
    """Counting rows of another seed than the training rows: the server's held-out set."""
    path = folder / "eval.jsonl"
    with open(path, "w") as f:
        for row in counting_dataset(24, seed=1):
            f.write(json.dumps({"input_ids": row["input_ids"], "labels": row["labels"]}) + "\n")
    return path


def independent_lm_loss(model, path: Path) -> tuple[float, int]:
    """Token-weighted mean of the model's own causal-LM loss, one row at a time (not the evaluator's code)."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            count = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * count
            tokens += count
    return total / tokens, tokens


def test_evaluation_of_a_language_model_is_its_token_weighted_loss(tmp_path):
    from hosfl_hf.integrations.flower.config import resolve
    from hosfl_hf.integrations.flower.evaluation import evaluate_model, load_eval_set

    config = write_inputs(tmp_path, 1)
    config = resolve({**config, "eval-dataset": str(held_out_rows(tmp_path)), "eval-batch-size": 5})
    model = tiny_llama()
    metrics = evaluate_model(model, load_eval_set(config))
    loss, tokens = independent_lm_loss(model, tmp_path / "eval.jsonl")
    assert metrics["eval_tokens"] == tokens == 24 * 11
    assert metrics["eval_loss"] == pytest.approx(loss, rel=1e-6)
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-6)
    assert model.training  # the model's mode is restored


def test_evaluation_of_a_classification_task_is_verbalizer_accuracy(tmp_path):
    """`eval-task=sst2`: raw SST-2 rows, prompted with the model folder's tokenizer; accuracy is the share of rows
    whose verbalizer has the larger last-position logit, computed here row by row without padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hosfl_hf.integrations.flower.config import resolve
    from hosfl_hf.integrations.flower.evaluation import evaluate_model, load_eval_set

    words = ["[PAD]", "Review", ":", "Sentiment", "negative", "positive", "good", "bad", "film", "dull", "fine"]
    vocab = {w: i for i, w in enumerate(words)} | {"Ġ" + w: i + len(words) for i, w in enumerate(words)}
    vocab["[UNK]"] = len(vocab)  # 23 < the tiny Llama's 32
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")
    model = tiny_llama(seed=3)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    sentences = ["good film", "bad film", "dull", "fine film good", "bad bad dull film", "good", "film", "fine"]
    rows = [{"sentence": s, "label": i % 2, "idx": i} for i, s in enumerate(sentences)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"model": str(tmp_path / "model"), "dataset": "unused.jsonl", "eval-batch-size": 3}
    config = resolve({**config, "eval-dataset": str(tmp_path / "eval.jsonl"), "eval-task": "sst2"})
    metrics = evaluate_model(model, load_eval_set(config))

    ids = [tokenizer.convert_tokens_to_ids("Ġnegative"), tokenizer.convert_tokens_to_ids("Ġpositive")]
    correct, losses = 0, []
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer(f"Review: {row['sentence']}\nSentiment:", return_tensors="pt")["input_ids"]
            scores = model(input_ids=prompt).logits[0, -1, ids]
            correct += int(scores.argmax()) == row["label"]
            losses.append(float(torch.nn.functional.cross_entropy(scores[None], torch.tensor([row["label"]]))))
    assert metrics["eval_examples"] == len(rows)
    assert metrics["eval_accuracy"] == correct / len(rows)
    assert metrics["eval_loss"] == pytest.approx(sum(losses) / len(rows), rel=1e-5)


def test_evaluation_and_report_to_refuse_bad_run_configs(tmp_path):
    from hosfl_hf.integrations.flower.config import build_args, resolve
    from hosfl_hf.integrations.flower.evaluation import load_eval_set
    from hosfl_hf.integrations.flower.reporting import RoundReporter

    config = resolve(write_inputs(tmp_path, 1))
    with pytest.raises(ValueError, match="need 'eval-dataset'"):
        load_eval_set({**config, "eval-every": 2})
    with pytest.raises(ValueError, match=r"no \['input_ids', 'labels'\] column"):
        (tmp_path / "raw.jsonl").write_text('{"sentence": "x", "label": 0}\n')
        load_eval_set({**config, "eval-dataset": str(tmp_path / "raw.jsonl")})
    _, args = build_args(config)
    with pytest.raises(ValueError, match="not supported"):
        RoundReporter(args, "no-such-tracker")


def test_report_to_drives_transformers_callbacks_and_jsonl(tmp_path):
    """`report-to` sends each round's metrics through transformers' callback hooks (a recording callback stands in
    for TensorBoard, which is not installed here) and to `flower_metrics.jsonl`."""
    from transformers import TrainerCallback

    from hosfl_hf.integrations.flower.config import build_args, resolve
    from hosfl_hf.integrations.flower.reporting import JSONL_NAME, RoundReporter

    class Recorder(TrainerCallback):
        calls = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.calls.append("begin")

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.calls.append((state.global_step, logs))

        def on_train_end(self, args, state, control, **kwargs):
            self.calls.append("end")

    _, args = build_args(resolve({**write_inputs(tmp_path, 2), "output-dir": str(tmp_path / "o")}))
    reporter = RoundReporter(args, "jsonl", callbacks=[Recorder()])
    base = {"learning_rate": 1e-3, "client_learning_rate": 1e-4, "finishers": [0, 2], "clients": [0, 2]}
    records = [
        {**base, "round": 0, "loss": 3.0, "seconds": 0.5, "comm/activation_bytes": 10, "events": []},
        {**base, "round": 1, "loss": 2.5, "seconds": 0.4, "comm/activation_bytes": 20, "eval_loss": 2.0},
    ]
    for record in records:
        reporter(record)
    reporter.close({"eval_loss": 1.5})
    expected = [
        {"loss": 3.0, "learning_rate": 1e-3, "client_learning_rate": 1e-4, "finishers": 2, "seconds": 0.5},
        {"loss": 2.5, "learning_rate": 1e-3, "client_learning_rate": 1e-4, "finishers": 2, "seconds": 0.4},
    ]
    expected[0]["comm/activation_bytes"], expected[1]["comm/activation_bytes"] = 10, 20
    expected[1]["eval_loss"] = 2.0
    assert Recorder.calls == ["begin", (1, expected[0]), (2, expected[1]), (2, {"eval_loss": 1.5}), "end"]
    lines = [json.loads(line) for line in (tmp_path / "o" / JSONL_NAME).read_text().splitlines()]
    assert lines == [{"round": 1, **expected[0]}, {"round": 2, **expected[1]}, {"round": 2, "eval_loss": 1.5}]


def test_prepare_writes_the_inputs_the_documented_commands_read(tmp_path, capsys):
    """`python -m hosfl_hf.integrations.flower.prepare OUT` (docs/federated.md, step 1): a loadable model folder,
    tokenized training rows and held-out rows of another seed, and the run-config keys that point at them."""
    from transformers import AutoModelForCausalLM

    from hosfl_hf.integrations.flower.config import resolve
    from hosfl_hf.integrations.flower.evaluation import load_eval_set
    from hosfl_hf.integrations.flower.prepare import main

    keys = main([str(tmp_path / "data")])
    assert capsys.readouterr().out.strip().endswith(f'eval-dataset="{tmp_path / "data" / "eval.jsonl"}"')
    model = AutoModelForCausalLM.from_pretrained(keys["model"])
    train = [json.loads(line) for line in Path(keys["dataset"]).read_text().splitlines()]
    held_out = [json.loads(line) for line in Path(keys["eval-dataset"]).read_text().splitlines()]
    assert (len(train), len(held_out)) == (240, 48) and all(r["input_ids"] == r["labels"] for r in train)
    assert max(max(r["input_ids"]) for r in train) < model.config.vocab_size
    assert {tuple(r["input_ids"]) for r in held_out} != {tuple(r["input_ids"]) for r in train[:48]}
    assert len(load_eval_set(resolve(keys)).rows) == 48
    with pytest.raises(SystemExit):
        main([str(tmp_path / "x"), "--task", "sst2"])  # a random model has no tokenizer for the prompts
