"""Behaviour off the default path: fp16 loss scaling, clipping, client precision, unsupported back-ends, repeated
training, seeds, resume, best model, gradient checkpointing, replay environment, and the lambda = dloss_i/dz factor."""

import copy
import dataclasses

import pytest
import torch
from conftest import counting_dataset, stack_collator, tiny_args, tiny_llama
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback

from hosfl_hf import CutActivations, HOSFLRunRecord, HOSFLTrainer, Trajectory, replay_trajectory, split_model
from hosfl_hf.rng import round_seeds
from hosfl_hf.zeroth_order import ZerothOrderEstimator

pytestmark = pytest.mark.usefixtures("single_thread")

# fp16 backward on the CPU overflows near 65504: a scale of 2**20 overflows for a few rounds, then trains.
INIT_SCALE_EXPONENT = 24


def make_trainer(tmp_path, model=None, peft_config=None, **overrides):
    return HOSFLTrainer(
        model if model is not None else tiny_llama(),
        tiny_args(tmp_path, **overrides),
        split_layer=2,
        train_dataset=counting_dataset(),
        data_collator=stack_collator,
        peft_config=peft_config,
    )


def client_weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.split.client_parameters()}


def all_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_replays_to(trainer, initial_model):
    replayed = replay_trajectory(initial_model, trainer.trajectory)
    got = dict(split_model(replayed, trainer.split.split_layer).client_parameters())
    for name, value in client_weights(trainer).items():
        assert torch.equal(got[name], value), name


def use_cpu_grad_scaler(trainer, init_scale, native_amp=True):
    """torch's CPU GradScaler in place of the one accelerate creates on GPUs (before `train()` prepares the
    optimizer, which takes the scaler from the accelerator). `native_amp` makes accelerate unscale before clipping
    and autocast the prepared model, as with fp16 on a GPU; without it the scaler unscales at its step."""
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
    trainer.accelerator.native_amp = native_amp


# ---------------------------------------------------------------------------------------------------- precision
class ScaleLog(TrainerCallback):
    """The rounds in which the loss scaler backed off: exactly the rounds whose server step it skipped."""

    def __init__(self, trainer):
        self.trainer, self.scale, self.skipped = trainer, None, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.scale = self.trainer.accelerator.scaler.get_scale()

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.accelerator.scaler.get_scale() < self.scale:
            self.skipped.append(state.global_step - 1)


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_fp16_overflow_skips_the_round_on_every_part_and_training_continues(tmp_path, optim):
    initial = tiny_llama()
    trainer = make_trainer(tmp_path, model=tiny_llama(), fp16=True, max_steps=10, logging_steps=1, optim=optim)
    use_cpu_grad_scaler(trainer, init_scale=2.0**20)  # large enough to overflow in some rounds
    scales = ScaleLog(trainer)
    trainer.add_callback(scales)
    server_before = {n: p.detach().clone() for n, p in trainer.split.server_parameters()}
    trainer.train()
    skipped = scales.skipped
    assert 1 <= len(skipped) < 10 and trainer.skipped_rounds == len(skipped)
    # No client update in a skipped round: nothing recorded, and the client schedule advanced once per applied round.
    assert [r.round for r in trainer.trajectory.rounds] == [r for r in range(10) if r not in skipped]
    assert trainer.client_lr_scheduler.last_epoch == 10 - len(skipped)
    assert trainer.state.log_history[-2]["fed/skipped_rounds"] == len(skipped)
    if optim == "adamw_torch":  # accelerate does not see a fused optimizer's skipped step (nor does the Trainer)
        assert trainer.lr_scheduler.last_epoch == 10 - len(skipped)
    # Nothing was applied in a skipped round: the trajectory replays to the trained client weights; the server did
    # train in the other rounds.
    assert_replays_to(trainer, initial)
    assert any(not torch.equal(p, server_before[n]) for n, p in trainer.split.server_parameters())


def test_zo_sfl_server_gradient_ignores_the_loss_scale_and_is_not_clipped(tmp_path):
    runs = {}
    for name, scale, clip in (("plain", None, 1.0), ("scaled", 2.0**10, 1.0), ("unclipped", None, 0.0)):
        trainer = make_trainer(tmp_path / name, algorithm="zo_sfl", max_steps=3, max_grad_norm=clip)
        if scale is not None:
            use_cpu_grad_scaler(trainer, init_scale=scale, native_amp=False)  # same fp32 forwards as "plain"
        trainer.train()
        runs[name] = all_weights(trainer.model)
    for name, value in runs["plain"].items():
        assert torch.equal(runs["scaled"][name], value), name
        assert torch.equal(runs["unclipped"][name], value), name


def test_splitlora_client_gradient_is_clipped_by_max_grad_norm(tmp_path):
    clip = 1e-3
    trainer = make_trainer(
        tmp_path,
        algorithm="splitlora",
        client_optimizer="sgd",
        client_learning_rate=1.0,
        max_steps=1,
        max_grad_norm=clip,
        lr_scheduler_type="constant",
    )
    before = client_weights(trainer)
    trainer.train()
    after = client_weights(trainer)
    step = torch.sqrt(sum(((after[n] - before[n]).double() ** 2).sum() for n in before))
    assert float(step) == pytest.approx(clip, rel=1e-4)  # lr 1 x the clipped gradient (its raw norm is far larger)


def test_client_runs_in_the_mixed_precision_with_and_without_peft(tmp_path):
    seen = {}
    for name, peft_config in (("plain", None), ("peft", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))):
        trainer = make_trainer(tmp_path / name, peft_config=peft_config, bf16=True, max_steps=1)
        dtypes = seen.setdefault(name, set())
        block = trainer.split.layers[0]  # runs only in client forwards (the server skips it)
        block.mlp.down_proj.register_forward_hook(lambda m, a, out, d=dtypes: d.add(out.dtype))
        trainer.train()
    assert seen["plain"] == seen["peft"] == {torch.bfloat16}


# ------------------------------------------------------------------------------------------------- parallelism
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(fsdp="full_shard"), "fsdp"),
        (dict(deepspeed="ds_config.json"), "deepspeed"),
        (dict(torch_compile=True), "torch_compile"),
        (dict(optim="lomo"), "LOMO"),
        (dict(accelerator_config={"dispatch_batches": True}), "dispatch_batches"),
        (dict(accelerator_config={"split_batches": True}), "split_batches"),
    ],
)
def test_unsupported_backends_are_rejected(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_args(tmp_path, **overrides)


def test_one_process_with_several_gpus_is_rejected(tmp_path):
    args = tiny_args(tmp_path)
    args._n_gpu = 2  # what TrainingArguments finds on a host with two visible GPUs
    with pytest.raises(ValueError, match="accelerate launch"):
        HOSFLTrainer(tiny_llama(), args, split_layer=2, train_dataset=counting_dataset(), data_collator=stack_collator)


# ------------------------------------------------------------------------------ repeated training, seeds, resume
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_second_train_call_continues_rounds_and_trains_the_client(tmp_path, optimizer):
    initial = tiny_llama()
    trainer = make_trainer(tmp_path, model=tiny_llama(), max_steps=3, client_optimizer=optimizer)
    trainer.train()
    first = client_weights(trainer)
    trainer.train()
    rounds = trainer.trajectory.rounds
    assert [r.round for r in rounds] == list(range(6))
    assert len({s for r in rounds for s in r.seeds}) == 6 * trainer.args.num_perturbations
    assert all(r.lr > 0 for r in rounds[3:])  # the client schedule restarts with the server's
    assert any(not torch.equal(first[n], v) for n, v in client_weights(trainer).items())
    assert trainer._get_train_sampler().start_round == 3
    assert_replays_to(trainer, initial)


def test_args_seed_seeds_the_adapters(tmp_path):
    def adapters(seed, global_seed):
        torch.manual_seed(global_seed)  # the caller's global RNG state must not matter
        trainer = make_trainer(tmp_path / f"{seed}-{global_seed}", peft_config=LoraConfig(r=2), seed=seed)
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_A" in n}

    first, again, other = adapters(1, 100), adapters(1, 200), adapters(2, 100)
    assert first and all(torch.equal(first[n], again[n]) for n in first)
    assert all(not torch.equal(first[n], other[n]) for n in first)


@pytest.mark.parametrize("change", [dict(zo_eps=2e-3), dict(client_optimizer="sgd"), dict(num_perturbations=3)])
def test_resume_refuses_changed_settings(tmp_path, change):
    make_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2).train()
    checkpoint = str(tmp_path / "out" / "checkpoint-2")
    resumed = make_trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, **change)
    with pytest.raises(ValueError, match=f"Cannot resume.*{next(iter(change))}"):
        resumed.train(resume_from_checkpoint=checkpoint)


def test_data_seed_is_recorded(tmp_path):
    trainer = make_trainer(tmp_path, data_seed=11, max_steps=1)
    config = trainer.hosfl_split_config()
    assert config.data_seed == 11 and config.training_kwargs()["data_seed"] == 11
    assert HOSFLRunRecord.from_dict(config.to_dict()).data_seed == 11


def test_best_model_at_end_keeps_trajectory_and_weights_together(tmp_path):
    initial = tiny_llama()
    trainer = HOSFLTrainer(
        tiny_llama(),
        tiny_args(
            tmp_path,
            max_steps=6,
            eval_strategy="steps",
            eval_steps=2,
            save_strategy="steps",
            save_steps=2,
            load_best_model_at_end=True,
            metric_for_best_model="loss",
            greater_is_better=True,
        ),
        split_layer=2,
        train_dataset=counting_dataset(),
        eval_dataset=counting_dataset(16, seed=1),
        data_collator=stack_collator,
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6")  # an earlier round must be the best here
    best_round = int(best.rsplit("-", 1)[1])
    assert [r.round for r in trainer.trajectory.rounds] == list(range(best_round))
    assert_replays_to(trainer, initial)
    trainer.save_model(str(tmp_path / "final"))
    assert Trajectory.load(tmp_path / "final").rounds == trainer.trajectory.rounds


# -------------------------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_gradient_checkpointing_keeps_the_server_gradients(arch):
    """The recomputed first server block sees the injected cut activations: lambda and the server's gradients are
    the same with and without gradient checkpointing."""
    from transformers import OPTConfig, OPTForCausalLM

    def build():
        if arch == "llama":
            return tiny_llama(layers=4)
        torch.manual_seed(0)
        return OPTForCausalLM(
            OPTConfig(
                vocab_size=32,
                hidden_size=32,
                ffn_dim=64,
                num_hidden_layers=4,
                num_attention_heads=4,
                word_embed_proj_dim=32,
                dropout=0.1,
            )
        )

    ids = torch.randint(4, 32, (2, 7), generator=torch.Generator().manual_seed(0))
    results = []
    for checkpointing in (False, True):
        model = build().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        parts = split_model(model, split_layer=2)
        cut = parts.client(input_ids=ids)
        z = cut.hidden_states.detach().requires_grad_(True)
        with torch.random.fork_rng():
            torch.manual_seed(1)  # the same dropout masks in both runs (checkpointing replays the RNG state)
            loss = parts.server(dataclasses.replace(cut, hidden_states=z), labels=ids).loss
            loss.backward()
        grads = {n: p.grad.clone() for n, p in parts.server_parameters()}
        results.append((loss.item(), z.grad.clone(), grads))
    (loss_a, lam_a, grads_a), (loss_b, lam_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-6) and torch.allclose(lam_a, lam_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and all(torch.allclose(grads_a[n], grads_b[n], atol=1e-6) for n in grads_a)


def test_gradient_checkpointing_of_call_is_refused(tmp_path, monkeypatch):
    """A transformers release that checkpoints `__call__` (hooks inside the checkpoint) is refused."""
    from torch import nn
    from transformers.modeling_layers import GradientCheckpointingLayer

    monkeypatch.setattr(GradientCheckpointingLayer, "__call__", nn.Module.__call__, raising=False)
    with pytest.raises(ValueError, match="Gradient checkpointing"):
        make_trainer(tmp_path, gradient_checkpointing=True)


# ------------------------------------------------------------------------------------------- replay and RNG
def test_replay_upcasts_half_precision_adapters(tmp_path):
    def bf16_peft_model():
        with torch.random.fork_rng():
            torch.manual_seed(3)
            model = tiny_llama().to(torch.bfloat16)
            config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
            return get_peft_model(model, config, autocast_adapter_dtype=False)

    initial = bf16_peft_model()
    assert {p.dtype for n, p in initial.named_parameters() if "lora_" in n} == {torch.bfloat16}
    trainer = make_trainer(tmp_path, model=bf16_peft_model(), max_steps=3)
    trainer.train()
    assert trainer.trajectory.environment["dtypes"] == ["float32"]
    assert_replays_to(trainer, initial)


def test_replay_refuses_another_environment(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.train()
    moved = copy.deepcopy(trainer.trajectory)
    moved.environment = {**moved.environment, "torch": "1.13.0"}
    with pytest.raises(ValueError, match="torch: recorded '1.13.0'"):
        replay_trajectory(tiny_llama(), moved)
    replay_trajectory(tiny_llama(), moved, check_environment_match=False)  # the caller's explicit choice


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_lambda_is_the_per_client_loss_gradient(tmp_path, bf16):
    """Round 0's averaged scalars equal (1/K) sum_i <dL_i/dz_i, z_i(theta + mu u_p) - z_i(theta)> computed with
    explicit per-client autograd on the initial model (pins the x K factor of lambda). Under bf16 every forward
    runs in its own autocast region, so each probe sees its own perturbation (no stale cast weights)."""
    trainer = make_trainer(tmp_path, max_steps=1, bf16=bf16, num_perturbations=3)
    trainer.train()
    assert trainer.estimator.swaps  # the probes ran with one extra tensor, not a copy of the client's weights
    args, dataset = trainer.args, counting_dataset()
    parts = split_model(tiny_llama(), 2)
    estimator = ZerothOrderEstimator(parts.client_parameters(), args.zo_eps, args.zo_estimator)
    seeds = round_seeds(args.seed, 0, args.num_perturbations)
    sampler = trainer._get_train_sampler()

    def precision():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def client(ids):
        with precision():
            return parts.client(input_ids=ids).hidden_states

    total = [0.0] * len(seeds)
    for c in sampler.clients(0):
        batch = stack_collator([dataset[i] for i in sampler.client_batch(0, c)])
        z = client(batch["input_ids"]).detach().requires_grad_(True)
        with precision():
            loss = parts.server(CutActivations(hidden_states=z), labels=batch["labels"]).loss.float()
        (lam,) = torch.autograd.grad(loss, z)
        scalars = estimator.projected_scalars(lambda b=batch: client(b["input_ids"]), z.detach(), lam, seeds)
        total = [t + s for t, s in zip(total, scalars)]
    expected = [t / args.clients_per_round for t in total]
    assert trainer.trajectory.rounds[0].scalars == pytest.approx(expected, rel=1e-6, abs=0)


def test_each_batch_names_its_client(tmp_path, monkeypatch):
    """The client of a batch comes with the batch (every example carries the id of the shard that holds it), and it
    is the sampler's client for that micro-step; a batch that mixes clients is refused."""
    from hosfl_hf.trainer import CLIENT_KEY

    trainer = make_trainer(tmp_path, max_steps=3)
    seen = []
    original = trainer._batch_client

    def record(inputs, round_index):
        seen.append((round_index, original(inputs, round_index)))
        return seen[-1][1]

    monkeypatch.setattr(trainer, "_batch_client", record)
    trainer.train()
    sampler = trainer._get_train_sampler()
    assert seen == [(r, c) for r in range(3) for c in sampler.clients(r)]
    with pytest.raises(RuntimeError, match="one batch must come from one of the round's sampled clients"):
        original({CLIENT_KEY: torch.tensor([sampler.clients(0)[0], sampler.clients(0)[1]])}, 0)


# ----------------------------------------------------------------------------------------- robust aggregation
def poisoned_run(tmp_path, aggregation, attack=None):
    """20 rounds, 5 of 5 clients per round, SGD client; client 0 multiplies its scalars by `attack` (if any)."""
    trainer = make_trainer(
        tmp_path / f"{aggregation}-{attack}",
        max_steps=20,
        num_clients=5,
        clients_per_round=5,
        logging_steps=5,
        client_optimizer="sgd",
        client_learning_rate=1e-4,
        aggregation=aggregation,
        lr_scheduler_type="constant",
    )
    reply = trainer.holder.reply

    def attacked(plan, cotangent):
        message = reply(plan, cotangent)
        if attack is not None and message.client == 0:
            message.scalars = [v * attack for v in message.scalars]
        return message

    trainer.holder.reply = attacked  # the in-process client that answers for client 0 lies
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, client_weights(trainer)


@pytest.mark.parametrize("attack", [1e6, -1e6])
def test_robust_aggregation_withstands_one_poisoning_client_of_five(tmp_path, attack):
    mean_losses, mean_weights = poisoned_run(tmp_path, "mean", attack)
    # Client weights start within |w| <= 1 (norm weights are 1): the mean lets the attacker blow them up, the robust
    # rules keep them in range and the loss falling.
    assert max(float(w.abs().max()) for w in mean_weights.values()) > 10
    for rule in ("median", "trimmed_mean"):
        losses, weights = poisoned_run(tmp_path, rule, attack)
        assert losses[-1] < losses[0] and max(float(w.abs().max()) for w in weights.values()) < 2, rule
