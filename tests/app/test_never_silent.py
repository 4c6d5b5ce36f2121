"""Never silent, fast by default, pictures that agree with the model: the callback's log lines, the
short-calibration warning, config.compressm when nothing is cut, the fast scan without asking, the
speed-up measured without collection steps, and the spectra plots."""

import logging

import pytest
import torch
from helpers import tiny_mamba

pytest.importorskip("transformers")

from compressm_mamba import CompressConfig  # noqa: E402
from compressm_mamba.app.data import TokenDataset  # noqa: E402


def train(model, config, steps=4, seq=16):
    pytest.importorskip("accelerate", reason="the Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments

    from compressm_mamba.training.callback import CompreSSMCallback

    ids = torch.randint(0, 64, (16, seq), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments("unused", max_steps=steps, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, logging_strategy="no")
    callback = CompreSSMCallback(config)
    Trainer(model=model, args=args, train_dataset=TokenDataset(ids), callbacks=[callback]).train()
    return callback


def test_every_attempt_and_layer_decision_is_logged_and_nothing_cut_still_records(caplog):
    """The README's tolerance example at N=16 may cut nothing: it must say so, per layer, and why."""
    model = tiny_mamba(state_size=16)
    config = CompressConfig(mode="tolerance", tau=0.01, attempts=1, warmup_fraction=0.5, calibration_batches=8,
                            estimator="mean_lti")
    with caplog.at_level(logging.INFO, logger="compressm_mamba"):
        callback = train(model, config)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("compressm_mamba")]
    attempt = [m for m in messages if m.startswith("CompreSSMCallback: attempt at step 2")]
    assert attempt and "Gramians over 2 batches" in attempt[0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("saw 2 calibration batches, fewer than the 8 asked" in m for m in warnings), warnings
    for layer in ("backbone.layers.0.mixer", "backbone.layers.1.mixer"):
        line = next(m for m in messages if f"{layer}: " in m)
        assert ("cut 16 -> " in line or "not cut (stays 16)" in line) and "tolerance tau=0.01" in line, line
    assert model.config.compressm["state_sizes"] == {f"backbone.layers.{i}.mixer": a for i, a in
                                                     enumerate([m.mixer.A_log.shape[1] for m in model.backbone.layers])}
    if not callback.reports:
        assert any("no layer cut" in m for m in messages)


def test_the_gate_is_named_when_it_stops_a_cut():
    from compressm_mamba.cut.compress import _reason

    importance = torch.tensor([[10.0] * 15 + [0.01]])  # tolerance keeps 15 of 16: not below 0.95 x 16
    reason = _reason(importance, 16, 16, CompressConfig(mode="tolerance", tau=0.01), None)
    assert reason.startswith("not cut (stays 16)") and "15 of 16" in reason and "gate 0.95 x 16 = 15.2" in reason


def test_the_callback_runs_the_fast_scan_without_being_asked():
    from compressm_mamba.models.drop_in import mixer_class

    model = tiny_mamba(state_size=8)
    train(model, CompressConfig(mode="rank", rank=4, attempts=1, warmup_fraction=0.5, calibration_batches=1,
                                estimator="mean_lti"), steps=2)
    assert all(type(layer.mixer) is mixer_class() for layer in model.backbone.layers)
    assert all(layer.mixer.last_state_size == 4 for layer in model.backbone.layers)  # it ran, after the cut


def test_speed_up_leaves_out_collection_steps_and_spectra_show_every_cut(tmp_path):
    for name in ("accelerate", "matplotlib"):
        pytest.importorskip(name, reason=f"finetune and its plots need {name}")
    from compressm_mamba.app.plots import cut_spectra_figure, training_figure
    from compressm_mamba.app.train import finetune

    config = CompressConfig(mode="rank", rank=4, attempts=2, warmup_fraction=0.5, calibration_batches=2,
                            estimator="mean_lti")
    result = finetune(str(tmp_path / "run"), preset="tiny", config=config, seq_len=16, batch_size=2, max_steps=8,
                      max_bytes=8_000, quiet=True)
    report = result.report
    collecting = [s["step"] for s in report["step_times"] if s["collecting"]]
    assert collecting == [1, 2, 3, 4]  # the windows before the attempts at steps 2 and 4
    # before the first cut (step 2) there is no plain step (step 1 collects): no number rather than a wrong one
    assert report["tokens_per_s_before_cut"] is None
    after = [s["seconds"] for s in report["step_times"] if s["step"] > 4]
    assert report["tokens_per_s_after_cut"] == pytest.approx(2 * 16 * len(after) / sum(after))

    from compressm_mamba.cut.compress import CompressionReport, LayerDecision

    reports = []
    for cut in report["cuts"]:
        layers = [LayerDecision(l["name"], l["kind"], l["state_before"], l["state_after"], torch.tensor(l["kept"]),
                                torch.tensor(l["importance"]), torch.zeros(1)) for l in cut["layers"]]
        reports.append(CompressionReport(layers, config, step=cut["step"]))
    fig = cut_spectra_figure(reports)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.lines]
    assert len(panels) == 2 and "final N per layer 4/4" in fig._suptitle.get_text()
    for ax in panels:
        assert ax.get_xlabel() and ax.get_ylabel()
        assert len(ax.get_legend().get_texts()) == len(reports)  # one curve per cut
        assert all(float(t).is_integer() for t in ax.get_xticks())
    quiet = dict(report, cuts=[])
    assert all(ax.get_legend() is None for ax in training_figure(quiet).axes)  # no empty legend box
