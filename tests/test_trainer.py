import copy
import json

import pytest
import torch
from conftest import SEQ, counting_dataset, stack_collator, tiny_args, tiny_llama
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from hosfl_hf import HOSFLTrainer, Trajectory, replay_trajectory
from hosfl_hf.protocol.codec import encode
from hosfl_hf.protocol.messages import ClientForward, Cotangent

pytestmark = pytest.mark.usefixtures("single_thread")


def make_args(tmp_path, **overrides):
    return tiny_args(tmp_path, **overrides)


def make_trainer(tmp_path, model=None, dataset=None, **overrides):
    model = model if model is not None else tiny_llama()
    return HOSFLTrainer(
        model,
        make_args(tmp_path, **overrides),
        split_layer=2,
        train_dataset=dataset if dataset is not None else counting_dataset(),
        data_collator=stack_collator,
    )


def client_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.split.client_parameters()}


def all_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_loss_falls_and_metrics_are_logged(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=40, logging_steps=10)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["loss"] < 0.8 * logs[0]["loss"]
    for key in ("comm/activation_bytes", "comm/sync_bytes", "zo/forward_passes", "zo/projected_grad"):
        assert key in logs[-1], key
    # Counters are cumulative over all clients and rounds.
    assert logs[-1]["comm/sync_bytes"] > logs[0]["comm/sync_bytes"]
    assert len(trainer.trajectory.rounds) == 40


def test_client_update_goes_downhill_and_its_sign_flip_uphill(tmp_path, monkeypatch):
    """The loss-falls test above cannot see the sign of the client update: the server's step dominates the loss
    (issue 27: flipping the client update changed its logged losses by 1e-3). Here the server is held (learning rate
    0), the two clients' batches are the whole 8-row training set each round, and the client takes plain SGD steps on
    a LoRA adapter. To first order such a step changes the loss by -lr/P sum_p <grad, u_p>^2 <= 0, so the logged loss
    (the round's, at the weights of its start) must fall every round, and rise every round when every holder negates
    the averaged scalars."""
    import hosfl_hf.client_part as protocol_client

    def losses(flip: bool) -> list[float]:
        real = protocol_client.apply_zo_update

        def flipped(parameters, optimizer, seeds, scalars, *args, **kwargs):
            return real(parameters, optimizer, seeds, [-v for v in scalars], *args, **kwargs)

        with monkeypatch.context() as patch:
            if flip:
                patch.setattr(protocol_client, "apply_zo_update", flipped)
            lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
            args = make_args(
                tmp_path / str(flip),
                max_steps=6,
                logging_steps=1,
                num_clients=2,
                learning_rate=0.0,
                client_optimizer="sgd",
                client_learning_rate=1e-2,
                client_lr_scheduler_type="constant",
            )
            trainer = HOSFLTrainer(
                tiny_llama(),
                args,
                split_layer=2,
                train_dataset=counting_dataset(8),
                data_collator=stack_collator,
                peft_config=lora,
            )
            trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    normal, flipped = losses(False), losses(True)
    assert len(normal) == len(flipped) == 6 and normal[0] == flipped[0]
    assert all(b < a for a, b in zip(normal, normal[1:])), normal
    assert all(b > a for a, b in zip(flipped, flipped[1:])), flipped
    assert flipped[-1] - normal[-1] > 0.005, (normal, flipped)


def test_byte_counters_are_exact_for_a_known_shape(tmp_path):
    """The trainer counts the bytes of the messages its round encodes (one implementation of traffic, the loop's):
    the cuts and lambdas exactly, the sync messages within their framing."""
    trainer = make_trainer(tmp_path, max_steps=3, num_perturbations=2)
    trainer.train()
    rounds, clients, batch, hidden, p = 3, 2, 4, 32, 2
    # Every message of a shape has the same length (one-digit round and client ids): fp32 cut, int64 labels, no
    # attention mask in this collator; lambda of the cut's shape.
    cut = ClientForward(0, 0, torch.zeros(batch, SEQ, hidden), labels=torch.zeros(batch, SEQ, dtype=torch.long))
    cotangent = Cotangent(0, 0, torch.zeros(batch, SEQ, hidden))
    payload = batch * SEQ * hidden * 4 * 2 + batch * SEQ * 8
    assert trainer.comm["activation_bytes"] == rounds * clients * (len(encode(cut)) + len(encode(cotangent)))
    assert payload < trainer.comm["activation_bytes"] / (rounds * clients) < payload + 1000  # the framing
    # Seeds and scalars: the plan, the catch-up, the P scalars up and the update down, each a few hundred bytes.
    assert rounds * clients * (8 * p + 4 * p + 4 * p) < trainer.comm["sync_bytes"] < rounds * clients * 2000
    # One reference forward plus one per direction (one-sided), per client and round.
    assert trainer.zo_forward_passes == rounds * clients * (1 + p)
    assert trainer.comm == {k: trainer.run.traffic[k] for k in trainer.comm}


def test_server_and_client_parts_both_change(tmp_path):
    model = tiny_llama()
    before = all_params(model)
    trainer = make_trainer(tmp_path, model=model, max_steps=3)
    trainer.train()
    after = all_params(model)
    client = set(trainer.split.client_parameter_names)
    assert all(not torch.equal(before[n], after[n]) for n, _ in trainer.split.client_parameters())
    changed_server = [n for n in trainer.split.server_parameter_names if not torch.equal(before[n], after[n])]
    assert changed_server and not (set(changed_server) & client)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_replay_trajectory_is_bit_identical(tmp_path, optimizer):
    model = tiny_llama()
    initial = copy.deepcopy(model)
    trainer = make_trainer(tmp_path, model=model, client_optimizer=optimizer, max_steps=10)
    trainer.train()
    trained = client_state(trainer)
    assert any(not torch.equal(trained[n], p) for n, p in initial.named_parameters() if n in trained)
    # Through the JSON file, as a straggler would receive it.
    path = tmp_path / "trajectory.json"
    trainer.trajectory.save(path)
    replay_trajectory(initial, Trajectory.load(path))
    replayed = dict(initial.named_parameters())
    for name, value in trained.items():
        assert torch.equal(replayed[name], value), name


def test_same_seeds_give_identical_weights(tmp_path):
    runs = []
    for i in range(2):
        trainer = make_trainer(tmp_path / str(i), max_steps=5)
        trainer.train()
        runs.append(all_params(trainer.model))
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def test_save_model_round_trips(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3)
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert (out / "hosfl_trajectory.json").is_file()
    data = json.loads((out / "hosfl_trajectory.json").read_text())
    assert len(data["rounds"]) == 3 and data["split_layer"] == 2
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 32, (2, SEQ))
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, trainer.model(ids).logits)


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    full = make_trainer(tmp_path / "full", max_steps=8, client_optimizer="adamw")
    full.train()
    expected = all_params(full.model)

    first = make_trainer(tmp_path / "resumed", max_steps=8, save_strategy="steps", save_steps=3)
    first.train()
    checkpoint = tmp_path / "resumed" / "out" / "checkpoint-3"
    assert (checkpoint / "hosfl_client_state.pt").is_file()

    second = make_trainer(tmp_path / "resumed", max_steps=8, save_strategy="steps", save_steps=3)
    second.train(resume_from_checkpoint=str(checkpoint))
    got = all_params(second.model)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert [r.scalars for r in second.trajectory.rounds] == [r.scalars for r in full.trajectory.rounds]
    assert second.comm == full.comm


def test_dirichlet_partition_trains(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, partition="dirichlet", dirichlet_alpha=0.5)
    assert sum(len(s) for s in trainer.shards) == 200
    trainer.train()
    assert len(trainer.trajectory.rounds) == 2


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_clients", 0),
        ("clients_per_round", 5),
        ("partition", "random"),
        ("dirichlet_alpha", 0.0),
        ("num_perturbations", 0),
        ("zo_eps", -1e-3),
        ("zo_eps", float("nan")),
        ("zo_estimator", "three_sided"),
        ("client_optimizer", "adam"),
        ("client_learning_rate", -1.0),
        ("client_weight_decay", float("inf")),
        ("gradient_accumulation_steps", 5),
        ("split_layer", 0),
    ],
)
def test_invalid_config_values_raise(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        make_args(tmp_path, **{field: value})


def test_dataset_without_input_ids_raises(tmp_path):
    from datasets import Dataset

    raw = Dataset.from_list([{"sentence": "good", "label": 1}] * 20)
    with pytest.raises(ValueError, match="input_ids"):
        HOSFLTrainer(tiny_llama(), make_args(tmp_path), split_layer=2, train_dataset=raw)


def test_dirichlet_without_label_column_raises(tmp_path):
    ds = counting_dataset().remove_columns("label")
    with pytest.raises(ValueError, match="partition_column"):
        make_trainer(tmp_path, dataset=ds, partition="dirichlet")


def test_missing_or_bad_split_layer_raises(tmp_path):
    with pytest.raises(ValueError, match="split"):
        HOSFLTrainer(tiny_llama(), make_args(tmp_path), train_dataset=counting_dataset(), data_collator=stack_collator)
    with pytest.raises(ValueError, match="1..3"):
        HOSFLTrainer(tiny_llama(), make_args(tmp_path), split_layer=4, train_dataset=counting_dataset())


def test_nan_loss_raises_before_any_update(tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    before = all_params(model)
    trainer = make_trainer(tmp_path, model=model, max_steps=2)
    with pytest.raises(ValueError, match="loss"):
        trainer.train()
    after = all_params(model)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, equal_nan=True)


def test_nan_scalars_raise_and_nothing_is_applied(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, max_steps=2)
    before = all_params(trainer.model)
    monkeypatch.setattr(trainer.estimator, "projected_scalars", lambda *a, **k: [float("nan"), 1.0], raising=True)
    with pytest.raises(ValueError, match="non-finite"):
        trainer.train()
    # The server's step is taken after the last client of the round: nothing moved.
    after = all_params(trainer.model)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert trainer.trajectory.rounds == []
