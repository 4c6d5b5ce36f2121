"""LoRA-wrapped models (peft): a cut slices the adapters' rows too (issue 14, item 5)."""

import copy

import pytest
import torch
from family_models import tiny
from helpers import assert_close

pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="peft is not installed (scripts/setup_venv.sh installs it)")

import compressm_mamba as cm  # noqa: E402
from compressm_mamba.cut.state_sizes import record_state_sizes  # noqa: E402
from compressm_mamba.cut.surgery import apply_cuts  # noqa: E402
from compressm_mamba.models.registry import find_mixers  # noqa: E402

FLOAT = dict(rtol=1e-4, atol=1e-5)
CASES = {"mamba": ["x_proj", "in_proj"], "mamba2": ["in_proj"], "bamba": ["in_proj", "out_proj"]}


def ids(batch=2, length=12, seed=0):
    return torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def lora(family, seed=0):
    torch.manual_seed(seed)
    # init_lora_weights=False: B is random, not zero, so the adapters change the output
    return peft.get_peft_model(tiny(family), peft.LoraConfig(r=4, target_modules=CASES[family],
                                                             init_lora_weights=False))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def per_layer_cut_(model, sizes):
    adapters = find_mixers(model)
    apply_cuts([a.plan_select(torch.arange(r).expand(a.ngroups, r).clone()) for a, r in zip(adapters, sizes)])
    record_state_sizes(model, adapters)


@pytest.mark.parametrize("family", CASES)
def test_cut_slices_lora_rows_and_merged_equals_unmerged(family, tmp_path):
    model, x = lora(family), ids()
    report = cm.compress_(model, cm.CompressConfig(mode="rank", rank=5, estimator="mean_lti"), [x])
    assert [d.state_after for d in report.layers] == [5, 5]
    m = find_mixers(model)[0].module
    proj = m.x_proj if family == "mamba" else m.in_proj
    assert proj.lora_B["default"].weight.shape[0] == proj.base_layer.weight.shape[0] == proj.out_features
    unmerged = logits(model, x)
    merged = copy.deepcopy(model).merge_and_unload()
    assert_close(logits(merged, x), unmerged, **FLOAT, name="merged vs unmerged")
    # names are recorded for the base model, which merge_and_unload() returns
    assert set(model.config.compressm["state_sizes"]) == {a.name for a in find_mixers(merged)}
    merged.save_pretrained(tmp_path)
    assert_close(logits(cm.from_pretrained(str(tmp_path)), x), unmerged, **FLOAT, name="merged, saved, loaded")


def test_unmerged_adapter_saves_and_loads_on_the_cut_base(tmp_path):
    model, x = lora("mamba2"), ids()
    per_layer_cut_(model, [5, 3])
    expected = logits(model, x)
    model.save_pretrained(tmp_path / "adapter")
    copy.deepcopy(model).unload().save_pretrained(tmp_path / "base")  # the cut base weights, adapters removed
    base = cm.from_pretrained(str(tmp_path / "base"))
    assert [a.state_size for a in find_mixers(base)] == [5, 3]
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert torch.equal(logits(loaded, x), expected)


def test_names_recorded_under_the_peft_wrapper_load(tmp_path):
    """A config written before the fix recorded base_model.model.* names: they still load."""
    model = tiny("mamba")
    per_layer_cut_(model, [5, 3])
    model.config.compressm = {"state_sizes": {"base_model.model." + k: v
                                              for k, v in model.config.compressm["state_sizes"].items()},
                              "loader": "compressm"}
    model.save_pretrained(tmp_path)
    assert [a.state_size for a in find_mixers(cm.from_pretrained(str(tmp_path)))] == [5, 3]


def test_trainer_keeps_training_the_lora_adapters_after_a_cut(tmp_path):
    pytest.importorskip("accelerate")
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    x = ids(batch=4, length=12, seed=4)
    model = lora("mamba2")
    callback = cm.CompreSSMCallback(cm.CompressConfig(mode="rank", rank=4, rank_path="direct", attempts=1,
                                                      warmup_fraction=0.5, calibration_batches=1, estimator="mean_lti"))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": x.tolist(),
                                                                               "labels": x.tolist()}),
                      callbacks=[callback])
    trainer.train()
    assert len(callback.reports) == 1 and all(a.state_size == 4 for a in find_mixers(model))
    assert trainer.state.global_step == 2
    in_proj = find_mixers(model)[0].module.in_proj
    B = in_proj.lora_B["default"].weight
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert any(p is B for g in inner.param_groups for p in g["params"])
    assert inner.state[B]["exp_avg"].shape == B.shape == (in_proj.base_layer.out_features, 4)
    assert int(inner.state[B]["step"]) == 2  # stepped after the cut
    assert not in_proj.base_layer.weight.requires_grad  # frozen base stays frozen


def test_lora_on_out_proj_runs_on_cpu_and_peft_refuses_it_where_fused_kernels_bypass_it():
    """peft#2274: mamba_ssm's fused Mamba2 kernel reads out_proj.weight directly, so LoRA on out_proj
    does nothing there.  transformers takes that kernel only in training with mamba_ssm on a GPU; on a
    CPU its training forward calls out_proj as a module, and the adapter counts.  peft refuses
    out_proj for the families it knows (mamba, mamba2, falcon_mamba, falcon_h1, nemotron_h), not for
    Bamba, whose training forward on a GPU takes the same fused kernel."""
    model, x = lora("bamba").train(), ids()
    with torch.no_grad():
        with_adapter = model(x).logits
        with model.disable_adapter():
            without = model(x).logits
    assert (with_adapter - without).abs().max() > 1e-3
    with pytest.raises(ValueError, match="out_proj.*incompatible with Mamba-based models"):
        peft.get_peft_model(tiny("mamba2"), peft.LoraConfig(r=4, target_modules=["out_proj"]))


def test_adapters_on_conv1d_are_refused_and_the_model_untouched():
    # peft adapts a depthwise conv only with a rank divisible by its groups (96 channels here)
    model = peft.get_peft_model(tiny("bamba"), peft.LoraConfig(r=96, target_modules=["conv1d"]))
    snap = [(n, p, p.detach().clone()) for n, p in model.named_parameters()]
    first = find_mixers(model)[0].name
    with pytest.raises(ValueError, match=rf"{first}.conv1d: .*peft adapter"):
        cm.compress_(model, cm.CompressConfig(mode="rank", rank=3, estimator="mean_lti"), [ids()])
    for (n, p), (_, old, value) in zip(model.named_parameters(), snap):
        assert p is old and torch.equal(p, value), n
