"""Every method of the benchmark trains in the same trainer: loss falls, the right parts change, bytes are exact."""

import pytest
import torch
from conftest import SEQ, counting_dataset, stack_collator, tiny_args, tiny_llama

from hosfl_hf import HOSFLConfig, HOSFLTrainer
from hosfl_hf.algorithms import BackpropClient
from hosfl_hf.protocol.codec import encode
from hosfl_hf.protocol.messages import ClientForward, Cotangent

# method -> (client part changes, server part changes)
CHANGES = {
    "hosfl": (True, True),
    "splitlora": (True, True),
    "zo_sfl": (True, True),
    "fedavg_lora": (True, True),
    "centralized": (True, True),
    "mezo": (True, True),
    "frozen_client": (False, True),
    "client_only": (True, False),
}
ROUNDS, CLIENTS, BATCH, HIDDEN = 30, 2, 4, 32


pytestmark = pytest.mark.usefixtures("single_thread")


def run(tmp_path, algorithm, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        algorithm=algorithm,
        max_steps=ROUNDS,
        per_device_train_batch_size=BATCH,
        learning_rate=3e-3,
        client_learning_rate=1e-3,
        num_clients=4,
        clients_per_round=CLIENTS,
        logging_steps=10,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        num_perturbations=1 if algorithm in ("zo_sfl", "mezo") else 2,
    )
    values.update(overrides)
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = HOSFLTrainer(
        model, HOSFLConfig(**values), split_layer=2, train_dataset=counting_dataset(), data_collator=stack_collator
    )
    trainer.train()
    return trainer, before


@pytest.mark.parametrize("algorithm", list(CHANGES))
def test_method_trains_the_right_parts(tmp_path, algorithm):
    trainer, before = run(tmp_path, algorithm)
    params = dict(trainer.split.model.named_parameters())
    client_changed = any(not torch.equal(before[n], params[n]) for n in trainer.split.client_parameter_names)
    server_changed = any(
        not torch.equal(before[n], params[n]) for n in trainer.split.server_parameter_names if n in params
    )
    assert (client_changed, server_changed) == CHANGES[algorithm]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if algorithm in ("zo_sfl", "mezo", "client_only"):
        assert losses[-1] < losses[0]  # zeroth-order / client-only: slow but downhill
    else:
        assert losses[-1] < 0.85 * losses[0]


def test_byte_counters_per_method(tmp_path):
    cut = BATCH * SEQ * HIDDEN * 4  # fp32 hidden states; the collator sends no mask
    labels = BATCH * SEQ * 8  # int64
    per_client_rounds = ROUNDS * CLIENTS
    zo_sync = lambda p: 8 * p + 4 * p + 4 * p  # noqa: E731  seeds down, scalars up, averages down

    # Split methods on the round's loop: the bytes of the encoded messages (cut and lambda exactly; framing).
    trainer, _ = run(tmp_path / "a", "splitlora")
    lora_bytes = sum(p.numel() * 4 for _, p in trainer.client_update_parameters)

    def cut_bytes(r, c):  # the encoded cut of client c in round r (the ids are in its header)
        labels = torch.zeros(BATCH, SEQ, dtype=torch.long)
        return len(encode(ClientForward(r, c, torch.zeros(BATCH, SEQ, HIDDEN), labels=labels)))

    def lambda_bytes(r, c):
        return len(encode(Cotangent(r, c, torch.zeros(BATCH, SEQ, HIDDEN))))

    served = [(record["round"], c) for record in trainer.run.log for c in record["finishers"]]
    assert len(served) == per_client_rounds
    assert trainer.comm["activation_bytes"] == sum(cut_bytes(r, c) + lambda_bytes(r, c) for r, c in served)
    # The gradient up and the averaged gradient down: the size of the client's weights both ways, as FedAvg.
    assert 2 * lora_bytes < trainer.comm["sync_bytes"] / per_client_rounds < 2 * lora_bytes + 2000
    # ZO-SFL: 2P perturbed cuts and the labels up per client (P = 1 here), one message with one header; sync is
    # seeds and scalars.
    trainer, _ = run(tmp_path / "b", "zo_sfl")
    assert per_client_rounds * (2 * cut + labels) < trainer.comm["activation_bytes"]
    assert trainer.comm["activation_bytes"] < per_client_rounds * (2 * cut + labels + 1000)
    assert per_client_rounds * zo_sync(1) < trainer.comm["sync_bytes"] < per_client_rounds * 2000
    trainer, _ = run(tmp_path / "c", "frozen_client")
    served = [(record["round"], c) for record in trainer.run.log for c in record["finishers"]]
    assert trainer.comm["activation_bytes"] == sum(cut_bytes(r, c) for r, c in served)
    assert trainer.comm["sync_bytes"] < per_client_rounds * 1000  # the plan and the (empty) catch-up only
    assert all(r["client_learning_rate"] is None for r in trainer.run.log)  # no update was ever sent
    # FedAvg-LoRA: each client's gradient up and the new weights down, both the size of the trainable weights.
    trainer, _ = run(tmp_path / "d", "fedavg_lora")
    all_bytes = sum(p.numel() * 4 for p in trainer.model.parameters() if p.requires_grad)
    assert trainer.comm["activation_bytes"] == 0
    assert per_client_rounds * 2 * all_bytes < trainer.comm["sync_bytes"] < per_client_rounds * (2 * all_bytes + 2000)
    # Centralized: the batches are the data pooled at the server (`data_bytes`), not activations or sync.
    trainer, _ = run(tmp_path / "e", "centralized")
    assert trainer.comm["activation_bytes"] == 0 and trainer.run.traffic["data_bytes"] > per_client_rounds * labels


def test_splitlora_client_gradient_equals_full_backprop(tmp_path, monkeypatch):
    """The averaged client gradient of one FO-SFL round equals backprop of the round's mean loss on the full model."""
    model = tiny_llama()
    reference = tiny_llama()
    trainer = HOSFLTrainer(
        model,
        HOSFLConfig(
            output_dir=str(tmp_path),
            algorithm="splitlora",
            max_steps=1,
            per_device_train_batch_size=BATCH,
            num_clients=4,
            clients_per_round=CLIENTS,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
        ),
        split_layer=2,
        train_dataset=counting_dataset(),
        data_collator=stack_collator,
    )
    captured = {}

    def capture(rule, server, plan, replies):  # the clients' gradients, summed by the server in the plan's order
        total = sum(replies[c].gradient for c in plan.clients)
        sizes = [p.numel() for _, p in trainer.client_update_parameters]
        for (name, p), grad in zip(trainer.client_update_parameters, torch.split(total, sizes)):
            captured[name] = grad.view(p.shape)
        raise KeyboardInterrupt

    monkeypatch.setattr(BackpropClient, "close", capture)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()

    indices = list(trainer._get_train_sampler())[: CLIENTS * BATCH]
    dataset = counting_dataset()
    loss = 0.0
    for c in range(CLIENTS):
        batch = stack_collator([dataset[i] for i in indices[c * BATCH : (c + 1) * BATCH]])
        loss = loss + reference(**batch).loss / CLIENTS
    loss.backward()
    grads = {n: p.grad for n, p in reference.named_parameters()}
    assert captured
    for name, grad in captured.items():
        torch.testing.assert_close(grad, grads[name], rtol=1e-4, atol=1e-6)


def test_a_new_algorithm_is_one_registry_entry(tmp_path, monkeypatch):
    """A method is a server rule and a client rule: registering one entry is enough for HOSFLConfig and the trainer
    (here: split learning where neither part trains)."""
    from hosfl_hf.algorithms import ALGORITHMS, Algorithm, ClientRule, ServerRule

    monkeypatch.setitem(
        ALGORITHMS, "nothing_trains", Algorithm("nothing_trains", True, ServerRule(False), ClientRule())
    )
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = HOSFLTrainer(
        model,
        tiny_args(tmp_path, algorithm="nothing_trains", max_steps=2),
        split_layer=2,
        train_dataset=counting_dataset(),
        data_collator=stack_collator,
    )
    trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert trainer.comm["activation_bytes"] > 0 and trainer.trajectory.rounds == []
    assert all(r["client_learning_rate"] is None for r in trainer.run.log)  # no client update was ever sent
