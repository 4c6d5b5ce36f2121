"""Resuming a Trainer run saved after a cut: the model is cut to the checkpoint's sizes before its weights
and optimizer state load, cuts already made are not repeated, and the run continues as if never stopped."""

import json
import os

import pytest
import torch
from helpers import random_ids, tiny_mamba, tiny_mamba2

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

pytest.importorskip("datasets", reason="the Trainer tests build their data with datasets")
from datasets import Dataset  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

import compressm_mamba as cm  # noqa: E402
from compressm_mamba.training.callback import REPORTS_FILE, STATE_FILE  # noqa: E402
from compressm_mamba.models.registry import find_mixers  # noqa: E402
from compressm_mamba.cut.state_sizes import (  # noqa: E402
    resize_for_state_dict_,
    resize_to_checkpoint_,
    state_sizes_in_state_dict,
)

MODELS = {
    "mamba": lambda: tiny_mamba(state_size=8, hidden=16),
    "mamba2": lambda: tiny_mamba2(state_size=8, hidden=16),
}
MAX_STEPS = 12


def dataset():
    ids = random_ids(64, 12, seed=0)
    ids[:, 3:] = ids[:, :-3]
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def make_trainer(model, callback, out, **kw):
    args = TrainingArguments(
        output_dir=str(out), max_steps=MAX_STEPS, per_device_train_batch_size=4, learning_rate=3e-3,
        lr_scheduler_type="linear", warmup_steps=2, logging_steps=1, report_to=[], save_strategy="steps",
        save_steps=6, use_cpu=True, disable_tqdm=True, seed=0, data_seed=0, **kw,
    )
    callbacks = [] if callback is None else [callback]
    return Trainer(model=model, args=args, train_dataset=dataset(), callbacks=callbacks)


def losses(trainer):
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def sizes(model):
    return [a.state_size for a in find_mixers(model)]


# Cuts at steps 4 and 8 (16 -> ... fixed fraction 0.5: 8 -> 4 -> 2), Gramians over the 3 steps before
# each; the checkpoint at step 6 comes after the first cut and inside the second calibration window.
TWO_CUTS = dict(mode="fixed", fraction=0.5, warmup_fraction=8 / 12, attempts=2, calibration_batches=3)


@pytest.mark.parametrize("kind", MODELS)
def test_resumed_run_continues_like_an_uninterrupted_one(kind, tmp_path):
    config = cm.CompressConfig(**TWO_CUTS)
    first = cm.CompreSSMCallback(config)
    full = make_trainer(MODELS[kind](), first, tmp_path / "run")
    full.train()
    assert [r.step for r in first.reports] == [4, 8]
    assert sizes(full.model) == [2, 2]
    checkpoint = tmp_path / "run" / "checkpoint-6"
    saved = json.loads((checkpoint / "config.json").read_text())
    assert set(saved["compressm"]["state_sizes"].values()) == {4}
    assert (checkpoint / STATE_FILE).is_file() and (checkpoint / REPORTS_FILE).is_file()

    # A fresh full-size model: the callback cuts it to the checkpoint's sizes while the Trainer loads it.
    second = cm.CompreSSMCallback(config)
    resumed = make_trainer(MODELS[kind](), second, tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert second.steps == [8], "the cut at step 4 was scheduled again"
    assert [r.step for r in second.reports] == [8]
    assert [d.kept.tolist() for d in second.reports[0].layers] == [d.kept.tolist() for d in first.reports[1].layers]
    assert sizes(resumed.model) == [2, 2]
    expected, got = losses(full), losses(resumed)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))  # steps 1-6 come from the checkpoint's history
    assert [got[s] for s in range(7, 13)] == pytest.approx([expected[s] for s in range(7, 13)], rel=1e-6, abs=1e-7)
    for (name, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_stable_schedule_is_not_repeated_after_resume(tmp_path):
    config = cm.CompressConfig(mode="rank", rank=4, schedule="stable", warmup_fraction=1 / 6, attempts=1,
                               calibration_batches=1, stable_jaccard=1e-6, stable_latest_fraction=1.0)
    first = cm.CompreSSMCallback(config)
    full = make_trainer(MODELS["mamba"](), first, tmp_path / "run")
    full.train()
    assert first.steps == [2, 4, 6, 8, 10, 12] and [r.step for r in first.reports] == [4]
    # Dropping the attempts before the checkpoint is not enough: attempts 8, 10, 12 remain, and the
    # stable schedule (which cuts once) must know that it already has.
    second = cm.CompreSSMCallback(config.replace(mode="tolerance", tau=0.5))  # would cut again if it attempted
    resumed = make_trainer(MODELS["mamba"](), second, tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))
    assert second.stopped and second.reports == [] and second.jaccard == []
    assert sizes(resumed.model) == [4, 4]
    expected, got = losses(full), losses(resumed)
    assert [got[s] for s in range(7, 13)] == pytest.approx([expected[s] for s in range(7, 13)], rel=1e-6, abs=1e-7)


def test_stable_schedule_resumes_its_previous_kept_sets(tmp_path, monkeypatch):
    """A checkpoint between two stable attempts that did not cut: the next attempt compares with the
    kept sets saved in the checkpoint, exactly as the uninterrupted run did."""
    from compressm_mamba.training import callback as callback_module

    real = callback_module._jaccard
    monkeypatch.setattr(callback_module, "_jaccard", lambda a, b: min(0.99, real(a, b)))  # never settles
    config = cm.CompressConfig(mode="rank", rank=4, schedule="stable", warmup_fraction=1 / 6, attempts=1,
                               calibration_batches=1, stable_jaccard=1.0, stable_latest_fraction=1.0)
    first = cm.CompreSSMCallback(config)
    make_trainer(MODELS["mamba"](), first, tmp_path / "run").train()
    assert [s for s, _ in first.weyl] == [4, 6, 8, 10, 12] and [r.step for r in first.reports] == [12]
    second = cm.CompreSSMCallback(config)
    resumed = make_trainer(MODELS["mamba"](), second, tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))
    assert [s for s, _ in second.weyl] == [8, 10, 12], "the attempt at 8 had nothing to compare with"
    assert [w for _, w in second.weyl] == pytest.approx([w for s, w in first.weyl if s > 6], rel=1e-6)
    assert [r.step for r in second.reports] == [12]
    assert [d.kept.tolist() for d in second.reports[0].layers] == [d.kept.tolist() for d in first.reports[0].layers]


def test_plain_trainer_cannot_resume_a_cut_checkpoint_without_the_callback(tmp_path):
    config = cm.CompressConfig(**TWO_CUTS)
    make_trainer(MODELS["mamba"](), cm.CompreSSMCallback(config), tmp_path / "run").train()
    plain = make_trainer(MODELS["mamba"](), None, tmp_path / "plain")
    with pytest.raises(RuntimeError, match="size mismatch"):
        plain.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))
    # ... unless the model is first brought to the checkpoint's sizes: the one documented call
    model = MODELS["mamba"]()
    assert resize_to_checkpoint_(model, str(tmp_path / "run" / "checkpoint-6")) == {a.name: 4 for a in find_mixers(model)}
    make_trainer(model, None, tmp_path / "plain2").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))
    assert sizes(model) == [4, 4]  # no callback: no further cut


def test_balanced_checkpoint_sizes_are_read_from_the_state_dict(tmp_path):
    model, ids = tiny_mamba2(state_size=8, hidden=16), random_ids()
    cm.compress_(model, cm.CompressConfig(mode="rank", rank=3, reduction="balanced"), [ids])
    state = model.state_dict()
    fresh = tiny_mamba2(state_size=8, hidden=16)
    names = [a.name for a in find_mixers(fresh)]
    assert state_sizes_in_state_dict(fresh, state) == ({n: 3 for n in names}, {n: 8 for n in names})
    assert resize_for_state_dict_(fresh, state)
    assert not resize_for_state_dict_(fresh, state)  # already there
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model.eval()(ids).logits)


def test_load_state_dict_hook_leaves_larger_checkpoints_to_load_state_dict():
    big, small = MODELS["mamba"](), MODELS["mamba"]()
    cm.compress_(small, cm.CompressConfig(mode="rank", rank=3), [random_ids()])
    from compressm_mamba.cut.state_sizes import resize_on_load

    handle = resize_on_load(small)
    with pytest.raises(RuntimeError, match="size mismatch"):  # a cut cannot be undone by loading
        small.load_state_dict(big.state_dict())
    assert sizes(small) == [3, 3]
    handle.remove()


def test_resize_to_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resize_to_checkpoint_(MODELS["mamba"](), str(tmp_path))
    model = MODELS["mamba"]()
    names = [a.name for a in find_mixers(model)]
    (tmp_path / "config.json").write_text(json.dumps({"compressm": {"state_sizes": {names[0]: 9, names[1]: 4}}}))
    with pytest.raises(ValueError, match=rf"{names[0]}: recorded state size 9 is not in \[1, 8\]"):
        resize_to_checkpoint_(model, str(tmp_path))
    assert sizes(model) == [8, 8]
    os.remove(tmp_path / "config.json")
