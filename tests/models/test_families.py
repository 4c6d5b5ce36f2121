"""The checks every model family with Mamba layers must pass, through the one API (issue 14).

For each of transformers' ten families (tiny models from config, tests/family_models.py): a keep-all
cut is the identity; a cut to r equals the uncut model with the dropped states zeroed (per group,
n_groups ∈ {1, 2, 4} for Mamba2-style layers); per-layer sizes survive save → from_pretrained, and
a uniform cut loads in plain transformers where the family's config can describe it; generate()
with the family's cache (hybrid caches included) agrees with full forwards after a cut; a Trainer
run with the callback cuts and trains on; non-SSM layers are never touched; bad input is refused
with the model untouched.  Family specifics live in tests/models/test_<family>.py.
"""

import copy

import pytest
import torch
from family_models import (FAMILIES, MAMBA2_STYLE, PLAIN_LOADABLE, config_kwargs, reference_mixer_output, some_states,
                           tiny, zero_dropped_)
from helpers import assert_close

transformers = pytest.importorskip("transformers")

import compressm_mamba as cm  # noqa: E402
from compressm_mamba.cut.state_sizes import record_state_sizes  # noqa: E402
from compressm_mamba.cut.surgery import apply_cuts  # noqa: E402
from compressm_mamba.models.registry import families, find_mixers  # noqa: E402

FLOAT = dict(rtol=1e-4, atol=1e-5)
FAST = dict(estimator="mean_lti")  # the estimator does not matter for these checks; mean_lti is cheapest


def ids(batch=2, length=16, seed=0):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def cut_(model, keep_fn):
    """Apply plan_select(keep_fn(adapter)) to every SSM layer; returns the kept sets by layer name."""
    kept = {a.name: keep_fn(a) for a in find_mixers(model)}
    apply_cuts([a.plan_select(kept[a.name]) for a in find_mixers(model)])
    record_state_sizes(model, find_mixers(model))
    return kept


def non_ssm_params(model):
    ssm = {a.name for a in find_mixers(model)}
    return {n: p for n, p in model.named_parameters() if not any(n.startswith(s + ".") for s in ssm)}


def test_every_family_module_is_registered_and_tested():
    import os

    here = os.path.dirname(__file__)
    assert set(families()) == set(FAMILIES) | {"mamba_ssm"}
    for family in families():
        assert os.path.exists(os.path.join(here, f"test_{family}.py")), f"tests/models/test_{family}.py is missing"


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_cut_is_the_identity(family):
    model, x = tiny(family), ids()
    before = logits(model, x)
    cut_(model, lambda a: torch.arange(a.state_size).expand(a.ngroups, -1).clone())
    assert torch.equal(logits(model, x), before)


@pytest.mark.parametrize("family, groups", [(f, 2) for f in FAMILIES if f not in MAMBA2_STYLE]
                         + [(f, g) for f in MAMBA2_STYLE for g in (1, 2, 4)])
def test_cut_equals_the_model_with_dropped_states_zeroed(family, groups):
    model, x = tiny(family, groups=groups), ids()
    reference = copy.deepcopy(model)
    others = {n: (p, p.detach().clone()) for n, p in non_ssm_params(model).items()}
    kept = cut_(model, lambda a: some_states(a, 5, seed=len(a.name)))
    for a in find_mixers(reference):
        zero_dropped_(a, kept[a.name])
    out = logits(model, x)
    assert torch.isfinite(out).all()
    assert_close(out, logits(reference, x), **FLOAT, name=f"{family} cut vs zeroed")
    assert [a.state_size for a in find_mixers(model)] == [5] * len(kept)
    for n, p in non_ssm_params(model).items():  # attention, MLP, MoE, norms, embeddings: same objects, same values
        assert p is others[n][0] and torch.equal(p, others[n][1]), n


@pytest.mark.parametrize("family", FAMILIES)
def test_recomputed_system_is_the_one_the_forward_scans_before_and_after_a_cut(family):
    """What the Gramians are computed from (hooks call ``ssm_inputs``) is what the mixer runs."""
    if family == "falcon_h1":  # its gated-norm variant, with non-trivial µP multipliers
        torch.manual_seed(0)
        config = transformers.AutoConfig.for_model(family, **config_kwargs(family), mamba_rms_norm=True,
                                                   ssm_in_multiplier=0.7, ssm_multipliers=[1.5, 0.5, 2.0, 0.25, 3.0])
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    else:
        model = tiny(family)
    hidden = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(5))
    for step in ("before", "after"):
        for a in find_mixers(model):
            with torch.no_grad():
                assert_close(reference_mixer_output(a, hidden), a.module(hidden), rtol=1e-4, atol=1e-5,
                             name=f"{a.name} {step} the cut")
        if step == "before":
            cut_(model, lambda a: some_states(a, 5, seed=len(a.name)))


@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_sizes_survive_save_and_load(family, tmp_path):
    model, x = tiny(family), ids()
    sizes = [5, 3, 6]
    names = [a.name for a in find_mixers(model)]
    target = dict(zip(names, sizes))
    cut_(model, lambda a: some_states(a, target[a.name], seed=1))
    model.save_pretrained(tmp_path)
    loaded = cm.from_pretrained(str(tmp_path))
    assert [a.state_size for a in find_mixers(loaded)] == sizes[: len(names)]
    assert torch.equal(logits(loaded, x), logits(model, x))


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_cut_loads(family, tmp_path):
    model, x = tiny(family), ids()
    cut_(model, lambda a: some_states(a, 4, seed=2))
    model.save_pretrained(tmp_path)
    if family in PLAIN_LOADABLE:  # a plain checkpoint of the family: transformers alone loads it
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
        assert "compressm" in loaded.config.to_dict()
    else:  # x_proj stays at N (normalise, then select): only our loader builds it
        with pytest.raises(Exception):
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
        loaded = cm.from_pretrained(str(tmp_path))
    assert [a.state_size for a in find_mixers(loaded)] == [4] * len(find_mixers(model))
    assert torch.equal(logits(loaded, x), logits(model, x))


def _cached_scores_match_full_forwards(model, prompt, new_tokens=3):
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    full = logits(model, out.sequences)  # no cache: every position from scratch
    L = prompt.shape[1]
    for i, scores in enumerate(out.scores):
        assert_close(scores, full[:, L - 1 + i], **FLOAT, name=f"decode step {i}")
    return out.sequences


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_the_family_cache_before_and_after_a_cut(family):
    model = tiny(family)
    prompt = ids(batch=2, length=6, seed=3)
    _cached_scores_match_full_forwards(model, prompt)
    report = cm.compress_(model, cm.CompressConfig(mode="rank", rank=5, **FAST), [ids()])
    assert [d.state_after for d in report.layers] == [5] * len(report.layers)
    _cached_scores_match_full_forwards(model, prompt)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("mamba", "mamba2")])  # those: test_callback.py
def test_trainer_run_with_the_callback_cuts_and_trains_on(family, tmp_path):
    pytest.importorskip("accelerate")
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    x = ids(batch=4, length=12, seed=4)
    data = Dataset.from_dict({"input_ids": x.tolist(), "labels": x.tolist()})
    model = tiny(family).train()
    # one attempt at step 1 (direct to rank 4), then a step at the new size
    callback = cm.CompreSSMCallback(cm.CompressConfig(mode="rank", rank=4, rank_path="direct", attempts=1,
                                                      warmup_fraction=0.5, calibration_batches=1, **FAST))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    assert callback.steps == [1] and [len(r.layers) for r in callback.reports] == [len(find_mixers(model))]
    assert all(a.state_size == 4 for a in find_mixers(model))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert trainer.state.global_step == 2 and len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # the cut parameters are the optimizer's, and it stepped them after the cut
    inner = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    A_log = find_mixers(model)[0].module.A_log
    assert any(p is A_log for g in inner.param_groups for p in g["params"])
    assert inner.state[A_log]["exp_avg"].shape == A_log.shape and int(inner.state[A_log]["step"]) == 2


@pytest.mark.parametrize("family", ["jamba", "bamba", "zamba2"])
def test_layer_filter_cuts_only_the_chosen_layers(family):
    model = tiny(family)
    first, *rest = [a.name for a in find_mixers(model)]
    others = {n: (p, p.detach().clone()) for n, p in model.named_parameters() if not n.startswith(first + ".")}
    report = cm.compress_(model, cm.CompressConfig(mode="rank", rank=3, layers=(rf"^{first}$",), **FAST), [ids()])
    assert [d.name for d in report.layers] == [first]
    assert [a.state_size for a in find_mixers(model)] == [3] + [8] * len(rest)
    for n, (p, value) in others.items():
        assert dict(model.named_parameters())[n] is p and torch.equal(p, value), n
    # the torchao-style filter: the same choice as a callable
    model2 = tiny(family)
    report2 = cm.compress_(model2, cm.CompressConfig(mode="rank", rank=3, **FAST), [ids()],
                           filter_fn=lambda name, module: name == first)
    assert [d.name for d in report2.layers] == [first]


def _snapshot(model):
    return [(n, p, p.detach().clone()) for n, p in model.named_parameters()]


def _assert_untouched(model, snap):
    now = list(model.named_parameters())
    assert [n for n, _ in now] == [n for n, _, _ in snap]
    for (n, p), (_, old, value) in zip(now, snap):
        assert p is old and torch.equal(p, value), n


@pytest.mark.parametrize("family", ["falcon_mamba", "nemotron_h"])
def test_bad_input_names_layer_and_argument_and_leaves_the_model_untouched(family):
    model = tiny(family)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"layers='attention' matches no SSM layer.*layers\.0\."):
        cm.compress_(model, cm.CompressConfig(mode="rank", rank=3, layers="attention", **FAST), [ids()])
    first = find_mixers(model)[0].name
    with pytest.raises(ValueError, match=rf"{first}: .*9"):
        cm.compress_(model, cm.CompressConfig(mode="rank", rank=9, **FAST), [ids()])
    with pytest.raises(ValueError, match=rf"{first}: reduction='balanced'"):
        cm.compress_(model, cm.CompressConfig(mode="rank", rank=3, reduction="balanced", **FAST), [ids()])
    _assert_untouched(model, snap)
    with pytest.raises(ValueError, match="CompressConfig.layers"):
        cm.CompressConfig(layers="(")


@pytest.mark.parametrize("family", FAMILIES)
def test_scan_input_comes_with_the_system_on_request(family):
    """``ssm_inputs(with_x=True)`` (GHOST's state score needs the scan input) returns the same system
    plus x shaped per channel (Mamba1 layouts) or per head (Mamba2)."""
    model = tiny(family)
    hidden = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(6))
    for a in find_mixers(model):
        *system, x = a.ssm_inputs(hidden, with_x=True)
        assert all(torch.equal(s, t) for s, t in zip(system, a.ssm_inputs(hidden)))
        per_channel = (2, a.channels, 6) if a.kind == "mamba1" else (2, a.channels, a.module.head_dim, 6)
        assert x.shape == per_channel and torch.isfinite(x).all()
