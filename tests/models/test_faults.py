"""A reduction attempt that raises inside a Trainer run: training goes on with the model and optimizer
exactly as before the attempt, the failure is logged, and later attempts may still cut."""

import copy

import pytest
import torch
from helpers import random_ids, tiny_mamba

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

pytest.importorskip("datasets", reason="the Trainer tests build their data with datasets")
from datasets import Dataset  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import compressm_mamba as cm  # noqa: E402
from compressm_mamba.training import callback as callback_module  # noqa: E402
from compressm_mamba.models.registry import find_mixers  # noqa: E402

MAX_STEPS = 8
CONFIG = cm.CompressConfig(mode="rank", rank=4, warmup_fraction=0.5, attempts=2, calibration_batches=1)  # attempts 2, 4


def make_trainer(callbacks, out):
    ids = random_ids(32, 12, seed=0)
    ids[:, 3:] = ids[:, :-3]
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(out), max_steps=MAX_STEPS, per_device_train_batch_size=4, learning_rate=3e-3,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )
    return Trainer(model=tiny_mamba(state_size=8, hidden=16), args=args, train_dataset=data, callbacks=callbacks)


def optimizer_snapshot(optimizer):
    inner = getattr(optimizer, "optimizer", optimizer)
    groups = [list(g["params"]) for g in inner.param_groups]
    state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in inner.state[p].items()}
             for g in groups for p in g if p in inner.state}
    return groups, state


class Exploding:
    """An attribute update that fails in surgery's commit phase, after parameters were already replaced."""

    anything = 0

    def __setattr__(self, name, value):
        raise RuntimeError("injected failure inside surgery")


def inject_into_surgery(monkeypatch):
    real = callback_module.plans_for
    calls = {"n": 0}

    def plans_for(adapters, decisions):
        plans = real(adapters, decisions)
        calls["n"] += 1
        if calls["n"] == 1:
            plans[-1].attrs.append((Exploding(), "anything", 1))
        return plans

    monkeypatch.setattr(callback_module, "plans_for", plans_for)
    return "cutting the layers", "RuntimeError: injected failure inside surgery"


def inject_into_decision(monkeypatch):
    real = callback_module.decide_cuts
    calls = {"n": 0}

    def decide_cuts(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("injected failure while choosing ranks")
        return real(*args, **kwargs)

    monkeypatch.setattr(callback_module, "decide_cuts", decide_cuts)
    return "choosing ranks", "ValueError: injected failure while choosing ranks"


@pytest.mark.parametrize("inject", [inject_into_surgery, inject_into_decision], ids=["surgery", "decision"])
def test_a_failed_attempt_leaves_model_and_optimizer_and_training_goes_on(inject, monkeypatch, tmp_path):
    stage, message = inject(monkeypatch)
    seen = {}

    class Before(TrainerCallback):  # runs before ours at the failing attempt
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step == 2:
                seen["params"] = [(n, p, p.detach().clone()) for n, p in model.named_parameters()]
                seen["optimizer"] = optimizer_snapshot(optimizer)
                # config.compressm is always written (the uncut sizes before any cut): it must not move
                seen["compressm"] = copy.deepcopy(getattr(model.config, "compressm", None))

    class After(TrainerCallback):  # runs after ours
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step == 2:
                for (name, p), (_, old, value) in zip(model.named_parameters(), seen["params"]):
                    assert p is old and torch.equal(p, value), f"{name} changed"
                groups, opt_state = optimizer_snapshot(optimizer)
                old_groups, old_state = seen["optimizer"]
                assert all(a is b for g, h in zip(groups, old_groups) for a, b in zip(g, h))
                assert opt_state.keys() == old_state.keys()
                for p, st in opt_state.items():
                    for k, v in st.items():
                        assert torch.equal(v, old_state[p][k]) if torch.is_tensor(v) else v == old_state[p][k]
                assert [a.state_size for a in find_mixers(model)] == [8, 8]
                assert model.config.state_size == 8
                assert getattr(model.config, "compressm", None) == seen["compressm"]
                assert set(seen["compressm"]["state_sizes"].values()) == {8}
                seen["checked"] = True

    callback = cm.CompreSSMCallback(CONFIG)
    trainer = make_trainer([Before(), callback, After()], tmp_path)
    trainer.train()
    assert seen.get("checked")
    assert callback.failures == [{"step": 2, "stage": stage, "error": message}]
    logged = [e for e in trainer.state.log_history if e.get("compressm/failed")]
    assert logged == [{"step": 2, "compressm/failed": 1, "compressm/stage": stage, "compressm/error": message}]
    assert [r.step for r in callback.reports] == [4], "the later attempt did not cut"
    assert [a.state_size for a in find_mixers(trainer.model)] == [4, 4]
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == MAX_STEPS and all(torch.isfinite(torch.tensor(losses)))


def test_on_error_raise_re_raises(monkeypatch, tmp_path):
    inject_into_surgery(monkeypatch)
    callback = cm.CompreSSMCallback(CONFIG, on_error="raise")
    trainer = make_trainer([callback], tmp_path)
    with pytest.raises(RuntimeError, match="injected failure inside surgery"):
        trainer.train()
    assert [a.state_size for a in find_mixers(trainer.model)] == [8, 8]
    with pytest.raises(ValueError, match="on_error must be"):
        cm.CompreSSMCallback(CONFIG, on_error="ignore")
