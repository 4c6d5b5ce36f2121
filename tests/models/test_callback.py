"""CompreSSMCallback inside a real Hugging Face Trainer run (tiny models, CPU)."""

from types import SimpleNamespace

import pytest
import torch
from helpers import random_ids, tiny_mamba, tiny_mamba2

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

pytest.importorskip("datasets", reason="the Trainer tests build their data with datasets")
from datasets import Dataset  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import compressm_mamba as cm  # noqa: E402
from compressm_mamba.training.callback import attempt_steps  # noqa: E402
from compressm_mamba.models.registry import find_mixers  # noqa: E402

MODELS = {"mamba": tiny_mamba, "mamba2": tiny_mamba2}


def lm_dataset(n=64, length=24, seed=0):
    ids = random_ids(n, length, seed=seed)
    # a learnable pattern: every token repeats the one 3 back, so the state matters
    ids[:, 3:] = ids[:, :-3]
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def make_trainer(model, callbacks, tmp_path, max_steps=40, eval_dataset=None, **kw):
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=3e-3,
        lr_scheduler_type="linear", warmup_steps=2, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True, seed=0, data_seed=0, **kw,
    )
    return Trainer(model=model, args=args, train_dataset=lm_dataset(), eval_dataset=eval_dataset, callbacks=callbacks)


class StateSizeSpy(TrainerCallback):
    """Records the per-layer state sizes and the optimizer layout after every step (runs after ours)."""

    def __init__(self):
        self.sizes = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.sizes[state.global_step] = [a.state_size for a in find_mixers(model)]
        inner = getattr(optimizer, "optimizer", optimizer)
        group_params = {id(p) for g in inner.param_groups for p in g["params"]}
        assert group_params == {id(p) for p in model.parameters()}, "optimizer holds stale parameters"
        for p in model.parameters():
            if p in inner.state and "exp_avg" in inner.state[p]:
                assert inner.state[p]["exp_avg"].shape == p.shape


def losses(trainer):
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def learning_rates(trainer):
    return [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]


def test_attempt_schedule():
    config = cm.CompressConfig(mode="rank", rank=4, warmup_fraction=0.1, attempts=4)
    assert attempt_steps(config, 400) == [10, 20, 30, 40]
    assert attempt_steps(config, 40) == [1, 2, 3, 4]
    assert attempt_steps(config.replace(attempts=2, warmup_fraction=0.25), 40) == [5, 10]
    stable = config.replace(schedule="stable", stable_latest_fraction=0.5)
    assert attempt_steps(stable, 400) == list(range(10, 201, 10))
    with pytest.raises(ValueError, match="max_steps"):
        attempt_steps(config, 0)


@pytest.mark.parametrize("kind", MODELS)
def test_rank_mode_shrinks_every_layer_at_the_scheduled_step(kind, tmp_path):
    config = cm.CompressConfig(mode="rank", rank=4, warmup_fraction=0.25, attempts=2, calibration_batches=3)
    callback, spy = cm.CompreSSMCallback(config), StateSizeSpy()
    trainer = make_trainer(MODELS[kind](), [callback, spy], tmp_path / "run")
    trainer.train()
    assert callback.steps == [5, 10]
    # the geometric path: 16 -> 16·(4/16)^(1/2) = 8 at the first attempt, the rank at the last
    assert [r.step for r in callback.reports] == [5, 10]
    assert spy.sizes[4] == [16, 16] and spy.sizes[5] == [8, 8] and spy.sizes[9] == [8, 8]
    assert spy.sizes[10] == [4, 4] and spy.sizes[40] == [4, 4]
    assert all(torch.isfinite(torch.tensor(loss)) for loss in losses(trainer))
    logged = [e for e in trainer.state.log_history if "compressm/mean_state_size" in e]
    assert [(e["step"], e["compressm/mean_state_size"]) for e in logged][:2] == [(5, 8.0), (10, 4.0)]

    # the LR schedule is unbroken: identical to a run without the callback
    plain = make_trainer(MODELS[kind](), [], tmp_path / "plain")
    plain.train()
    assert learning_rates(trainer) == learning_rates(plain)
    # identical up to the cut (same seed, same data), different after
    assert losses(trainer)[:5] == pytest.approx(losses(plain)[:5], rel=1e-5)


def test_rank_path_direct_cuts_to_rank_at_the_first_attempt(tmp_path):
    config = cm.CompressConfig(mode="rank", rank=4, rank_path="direct", warmup_fraction=0.25, attempts=2,
                               calibration_batches=3)
    callback, spy = cm.CompreSSMCallback(config), StateSizeSpy()
    make_trainer(MODELS["mamba"](), [callback, spy], tmp_path / "run").train()
    assert [r.step for r in callback.reports] == [5]  # the second attempt is gated (already at rank)
    assert spy.sizes[4] == [16, 16] and spy.sizes[5] == [4, 4] and spy.sizes[40] == [4, 4]


def test_geometric_rank_targets_follow_the_remaining_attempts():
    callback = cm.CompreSSMCallback(cm.CompressConfig(mode="rank", rank=12, attempts=4))
    callback.steps = [10, 20, 30, 40]
    callback._adapters = [SimpleNamespace(name="l0", state_size=128), SimpleNamespace(name="l1", state_size=8)]
    assert callback._rank_targets(10) == {"l0": 71, "l1": 8}  # a layer already below the rank stays
    callback._adapters[0].state_size = 39
    assert callback._rank_targets(30) == {"l0": 22, "l1": 8}  # depends on the current size: resumable
    assert callback._rank_targets(40) is None  # the last attempt cuts to the rank itself
    assert cm.CompreSSMCallback(cm.CompressConfig(mode="tolerance"))._rank_targets(10) is None


def test_tolerance_mode_and_collection_window(tmp_path):
    config = cm.CompressConfig(mode="tolerance", tau=0.2, warmup_fraction=0.2, attempts=2, calibration_batches=2)
    callback, spy = cm.CompreSSMCallback(config), StateSizeSpy()

    class CollectionSpy(TrainerCallback):
        active_at = []

        def on_step_end(self, args, state, control, **kwargs):
            # runs after ours: ours stops the collector at an attempt
            if callback._collector.active:
                self.active_at.append(state.global_step)

    trainer = make_trainer(tiny_mamba(), [callback, spy, CollectionSpy()], tmp_path)
    trainer.train()
    assert callback.steps == [4, 8]
    # collection runs over the 2 steps before each attempt only
    assert CollectionSpy.active_at == [3, 7]
    assert callback.reports, "tolerance 0.2 cut nothing"
    first = callback.reports[0]
    assert all(d.state_after < 16 and d.energy_kept >= 0.8 - 1e-9 for d in first.layers)
    assert spy.sizes[40] == [d.state_after for d in callback.reports[-1].layers]
    assert all(torch.isfinite(torch.tensor(loss)) for loss in losses(trainer))


def test_pragmatic_rollback_is_bit_exact_and_stops_reducing(tmp_path):
    snapshots = {"calls": 0}

    def metric(model):
        # a good metric before the cut, a much worse one after it
        snapshots["calls"] += 1
        return 1.0 if snapshots["calls"] == 1 else 2.0

    def optimizer_state(optimizer):
        inner = getattr(optimizer, "optimizer", optimizer)
        return {id(p): {k: v.clone() for k, v in inner.state[p].items()} for g in inner.param_groups
                for p in g["params"] if p in inner.state}

    class Before(TrainerCallback):  # runs before ours at the attempt step
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step == 5:
                snapshots["params"] = [(n, p, p.detach().clone()) for n, p in model.named_parameters()]
                snapshots["optimizer"] = optimizer_state(optimizer)

    class After(TrainerCallback):  # runs after ours
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step == 5:
                for (name, p), (_, old_p, old_value) in zip(model.named_parameters(), snapshots["params"]):
                    assert p is old_p and torch.equal(p, old_value), f"{name} not restored"
                restored = optimizer_state(optimizer)
                assert restored.keys() == snapshots["optimizer"].keys()
                for key, st in restored.items():
                    for k, v in st.items():
                        assert torch.equal(v, snapshots["optimizer"][key][k]), f"optimizer state {k} changed"
                snapshots["checked"] = True

    config = cm.CompressConfig(mode="pragmatic", fraction=0.5, warmup_fraction=0.2, attempts=2, calibration_batches=2)
    callback, spy = cm.CompreSSMCallback(config, metric_fn=metric), StateSizeSpy()
    trainer = make_trainer(tiny_mamba(), [Before(), callback, After(), spy], tmp_path, max_steps=50)
    trainer.train()
    assert snapshots.get("checked")
    assert callback.steps == [5, 10]
    assert callback.rolled_back == [5] and callback.stopped and not callback.reports
    assert snapshots["calls"] == 2, "a stopped callback kept evaluating"
    assert spy.sizes[50] == [16, 16]
    assert any(e.get("compressm/rolled_back") for e in trainer.state.log_history)


def test_pragmatic_keeps_a_harmless_cut(tmp_path):
    config = cm.CompressConfig(mode="pragmatic", fraction=0.5, warmup_fraction=0.2, attempts=2, calibration_batches=2,
                               rollback_tolerance=10.0)
    ids = random_ids(8, seed=1)
    eval_data = [{"input_ids": ids[:4], "labels": ids[:4]}, {"input_ids": ids[4:], "labels": ids[4:]}]
    callback, spy = cm.CompreSSMCallback(config, eval_data=eval_data), StateSizeSpy()
    trainer = make_trainer(tiny_mamba(), [callback, spy], tmp_path, max_steps=20)
    trainer.train()
    assert [r.step for r in callback.reports] == [2, 4]
    assert spy.sizes[20] == [4, 4]  # 16 -> 8 -> 4


def test_pragmatic_without_metric_is_refused(tmp_path):
    config = cm.CompressConfig(mode="pragmatic", warmup_fraction=0.2)
    trainer = make_trainer(tiny_mamba(), [cm.CompreSSMCallback(config)], tmp_path, max_steps=5)
    with pytest.raises(ValueError, match="pragmatic' needs a validation metric: pass metric_fn= or eval_data="):
        trainer.train()


def test_stable_schedule_cuts_once_when_the_kept_set_settles(tmp_path):
    config = cm.CompressConfig(mode="rank", rank=4, schedule="stable", warmup_fraction=0.1, attempts=2,
                               calibration_batches=2, stable_jaccard=0.5, stable_latest_fraction=0.5)
    callback, spy = cm.CompreSSMCallback(config), StateSizeSpy()
    trainer = make_trainer(tiny_mamba(), [callback, spy], tmp_path)
    trainer.train()
    assert callback.steps == list(range(2, 21, 2))
    assert len(callback.reports) == 1
    cut_step = callback.reports[0].step
    assert callback.jaccard and callback.jaccard[0][0] == 4
    assert [s for s, _ in callback.weyl] == [s for s, _ in callback.jaccard]
    # cut at the first attempt whose Jaccard reached the threshold, or at the backstop
    settled = [s for s, j in callback.jaccard if j >= 0.5]
    assert cut_step == (settled[0] if settled else 20)
    assert spy.sizes[cut_step - 1] == [16, 16] and spy.sizes[cut_step] == [4, 4]


def test_callback_refuses_a_non_mamba_model(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    trainer = make_trainer(model, [cm.CompreSSMCallback(cm.CompressConfig())], tmp_path, max_steps=2)
    with pytest.raises(TypeError, match="no supported Mamba mixer"):
        trainer.train()


def test_callback_needs_a_config():
    with pytest.raises(TypeError, match="CompressConfig"):
        cm.CompreSSMCallback({"mode": "rank"})


def test_saved_model_after_training_loads_back(tmp_path):
    config = cm.CompressConfig(mode="rank", rank=4, warmup_fraction=0.25, attempts=1, calibration_batches=2)
    model = tiny_mamba2()
    trainer = make_trainer(model, [cm.CompreSSMCallback(config)], tmp_path / "run", max_steps=12)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    loaded = cm.from_pretrained(str(tmp_path / "final"))
    ids = random_ids()
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.config.state_size == 4
