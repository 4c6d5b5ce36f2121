"""One-shot compression of Hugging Face Mamba / Mamba2 models: surgery, collection, persistence, errors."""

import copy

import pytest
import torch
from helpers import assert_close, mamba2_reference_output, random_ids, tiny_mamba, tiny_mamba2

import compressm_mamba as cm
from compressm_mamba.cut.collect import GramianCollector
from compressm_mamba.cut.compress import decide_cuts
from compressm_mamba.models.base import CutPlan, ParamCut
from compressm_mamba.models.registry import find_mixers
from compressm_mamba.reference import gramians, selective_scan
from compressm_mamba.cut.state_sizes import resize_to_
from compressm_mamba.cut.surgery import apply_cuts

transformers = pytest.importorskip("transformers")

FLOAT = dict(rtol=1e-4, atol=1e-5)
MODELS = {"mamba": tiny_mamba, "mamba2": tiny_mamba2}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def snapshot(model):
    """Parameter objects and values, to prove a model was left untouched."""
    return [(name, p, p.detach().clone()) for name, p in model.named_parameters()]


def assert_untouched(model, snap):
    now = list(model.named_parameters())
    assert [n for n, _ in now] == [n for n, _, _ in snap]
    for (name, p), (_, old_p, old_value) in zip(now, snap):
        assert p is old_p, f"{name} was replaced"
        assert torch.equal(p, old_value), f"{name} changed"


def keep_plans(model, keep_fn):
    """Plans for every mixer keeping keep_fn(adapter) -> (ngroups, r)."""
    return [a.plan_select(keep_fn(a)) for a in find_mixers(model)]


@pytest.mark.parametrize("kind", MODELS)
def test_keep_all_cut_leaves_logits_unchanged(kind):
    model, ids = MODELS[kind](), random_ids()
    before = logits(model, ids)
    plans = keep_plans(model, lambda a: torch.arange(a.state_size).expand(a.ngroups, -1).clone())
    cuts = [(cut.module, cut.attr, cut.old) for plan in plans for cut in plan.params]
    apply_cuts(plans)
    assert all(getattr(module, attr) is not old for module, attr, old in cuts)  # new Parameters
    assert torch.equal(logits(model, ids), before)


def zero_dropped_states_(model, keep):
    """Zero the B and C inputs of the states not in keep (per group), keeping every parameter's shape."""
    for a in find_mixers(model):
        m, N, G = a.module, a.state_size, a.ngroups
        dropped = torch.ones(G, N, dtype=torch.bool)
        dropped[torch.arange(G)[:, None], keep] = False
        drop = dropped.reshape(-1).nonzero().squeeze(1)
        with torch.no_grad():
            if a.kind == "mamba1":
                R = m.time_step_rank
                m.x_proj.weight[R + drop] = 0
                m.x_proj.weight[R + N + drop] = 0
            else:
                I = m.intermediate_size
                for offset in (I, I + G * N):  # B block, C block inside the conv channels
                    m.conv1d.weight[offset + drop] = 0
                    m.conv1d.bias[offset + drop] = 0
                    m.in_proj.weight[I + offset + drop] = 0


@pytest.mark.parametrize("kind", MODELS)
def test_selection_cut_equals_zeroing_the_dropped_states(kind):
    model, ids = MODELS[kind](), random_ids()
    G = find_mixers(model)[0].ngroups
    keep = torch.tensor([[0, 2, 5, 11, 15], [1, 2, 3, 8, 9]])[:G]  # different states per group
    zeroed = copy.deepcopy(model)
    zero_dropped_states_(zeroed, keep)
    apply_cuts(keep_plans(model, lambda a: keep))
    assert all(a.state_size == 5 for a in find_mixers(model))
    cut_logits, zeroed_logits = logits(model, ids), logits(zeroed, ids)
    assert_close(cut_logits, zeroed_logits, **FLOAT, name="cut vs zeroed")
    assert (cut_logits - logits(MODELS[kind](), ids)).abs().max() > 1e-3, "the cut changed nothing"


def mamba1_reference_output(mixer, hidden):
    """The HF Mamba mixer's output rebuilt from our reference scan on our recomputed (delta, B, C)."""
    adapter = find_mixers(torch.nn.ModuleDict({"m": mixer}))[0]
    delta, A, B, C = adapter.ssm_inputs(hidden)
    L = hidden.shape[1]
    x, z = mixer.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)
    u = mixer.act(mixer.conv1d(x)[..., :L])
    y = selective_scan(u.double(), delta.double(), A.double(), B.double(), C.double(), mixer.D.double(), z.double())
    return mixer.out_proj(y.float().transpose(1, 2))


def test_recomputed_ssm_inputs_reproduce_the_hf_forward():
    """The collector's (delta, A, B, C) are the ones the HF mixer really uses: the reference scan on
    them reproduces the mixer's output."""
    model = tiny_mamba()
    mixer = model.backbone.layers[0].mixer
    hidden = torch.randn(2, 13, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(mamba1_reference_output(mixer, hidden), mixer(hidden), **FLOAT, name="mixer output")


def test_recomputed_ssm_inputs_reproduce_the_hf_mamba2_forward():
    model = tiny_mamba2()
    adapter = find_mixers(model)[1]
    hidden = torch.randn(2, 13, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_close(mamba2_reference_output(adapter, hidden), adapter.module(hidden), **FLOAT, name="mixer output")


@pytest.mark.parametrize("kind", MODELS)
def test_collector_accumulates_sums_with_bounded_memory(kind):
    model = MODELS[kind]()
    adapters = find_mixers(model)
    collector = GramianCollector(adapters, "ltv")
    batches = [random_ids(seed=s) for s in range(3)]
    with collector, torch.no_grad():
        for ids in batches:
            model(ids)
    assert collector.batches == 3 and not collector.active
    for a in adapters:
        stats = collector.stats[a.name]
        assert stats.count == 3 * 4 * 24
        assert all(v.shape == (a.channels, a.state_size, a.state_size) for v in stats.sums.values())
    # the per-layer Gramians equal the reference on the concatenated batches
    a = adapters[0]
    hidden = []
    hook = a.module.register_forward_pre_hook(lambda m, args: hidden.append(args[0].detach()))
    with torch.no_grad():
        model(torch.cat(batches))
    hook.remove()
    delta, A, B, C = a.ssm_inputs(hidden[0])
    P_ref, Q_ref = gramians(delta.double(), A.double(), B.double(), C.double(), estimator="ltv")
    P, Q = collector.gramians()[a.name]
    assert_close(P, P_ref, rtol=1e-4, atol=1e-7, name="P")
    assert_close(Q, Q_ref, rtol=1e-4, atol=1e-7, name="Q")


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("estimator", ["mean_lti", "frozen", "ltv"])
def test_compress_one_shot_rank_mode(kind, estimator):
    model, ids = MODELS[kind](), random_ids()
    report = cm.compress_(model, cm.CompressConfig(mode="rank", rank=6, estimator=estimator), [ids[:2], ids[2:]])
    assert [d.state_after for d in report.layers] == [6, 6]
    assert all(a.state_size == 6 for a in find_mixers(model))
    assert model.config.state_size == 6
    assert model.config.compressm["state_sizes"] == {d.name: 6 for d in report.layers}
    assert torch.isfinite(logits(model, ids)).all()
    table = str(report)
    assert "backbone.layers.1.mixer" in table and "energy kept" in table
    assert all(0 < d.energy_kept < 1 for d in report.layers)
    assert report.to_dict()["layers"][0]["state_after"] == 6


def test_compress_keeps_the_most_important_states():
    model, ids = tiny_mamba(), random_ids()
    report = cm.compress_(model, cm.CompressConfig(mode="rank", rank=4), [ids])
    for d in report.layers:
        top = torch.sort(d.importance[0], descending=True).indices[:4].sort().values
        assert d.kept[0].tolist() == top.tolist()


def test_compress_tolerance_mode_and_dict_batches():
    model, ids = tiny_mamba(), random_ids()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    report = cm.compress_(model, cm.CompressConfig(mode="tolerance", tau=0.3), [batch])
    for d in report.layers:
        assert d.state_after < 16
        assert d.energy_kept >= 0.7 - 1e-9
    assert torch.isfinite(logits(model, ids)).all()


def test_optimizer_moments_are_sliced_and_rekeyed():
    model, ids = tiny_mamba(), random_ids()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    mixer = model.backbone.layers[0].mixer
    old_A, old_x = mixer.A_log, mixer.x_proj.weight
    old_state = {k: v.clone() for k, v in opt.state[old_A].items()}
    old_x_avg = opt.state[old_x]["exp_avg"].clone()
    report = cm.compress_(model, cm.CompressConfig(mode="rank", rank=5), [ids], optimizer=opt)
    idx = report.layers[0].kept[0]
    new_A = mixer.A_log
    assert new_A is not old_A and old_A not in opt.state
    assert torch.equal(opt.state[new_A]["exp_avg"], old_state["exp_avg"][:, idx])
    assert torch.equal(opt.state[new_A]["exp_avg_sq"], old_state["exp_avg_sq"][:, idx])
    assert torch.equal(opt.state[new_A]["step"], old_state["step"])
    R = mixer.time_step_rank
    rows = torch.cat([torch.arange(R), R + idx, R + 16 + idx])
    assert torch.equal(opt.state[mixer.x_proj.weight]["exp_avg"], old_x_avg[rows])
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert params == {id(p) for p in model.parameters()}
    for p in model.parameters():
        if p in opt.state:
            assert opt.state[p]["exp_avg"].shape == p.shape
    # and training continues
    model(ids, labels=ids).loss.backward()
    opt.step()


def test_surgery_is_all_or_nothing():
    model, ids = tiny_mamba(), random_ids()
    opt = torch.optim.Adam(model.parameters())
    model(ids, labels=ids).loss.backward()
    opt.step()
    snap, before = snapshot(model), logits(model, ids)
    groups = [list(g["params"]) for g in opt.param_groups]
    plans = keep_plans(model, lambda a: torch.arange(4)[None])

    def boom(t):
        raise RuntimeError("injected failure while slicing")

    plans[1].params.append(ParamCut(plans[1].params[0].module, "D", boom))
    with pytest.raises(RuntimeError, match="injected"):
        apply_cuts(plans, opt)
    assert_untouched(model, snap)
    assert [list(g["params"]) for g in opt.param_groups] == groups
    assert all(a.state_size == 16 for a in find_mixers(model))
    assert torch.equal(logits(model, ids), before)

    class Exploding:  # an attribute update that fails in the commit phase
        anything = 0

        def __setattr__(self, name, value):
            raise RuntimeError("injected failure while committing")

    plans = keep_plans(model, lambda a: torch.arange(4)[None])
    plans[1].attrs.append((Exploding(), "anything", 1))
    with pytest.raises(RuntimeError, match="committing"):
        apply_cuts(plans, opt)
    assert_untouched(model, snap)
    assert [list(g["params"]) for g in opt.param_groups] == groups
    assert torch.equal(logits(model, ids), before)


# ---- persistence -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", MODELS)
def test_uniform_cut_saves_as_a_plain_checkpoint(kind, tmp_path):
    model, ids = MODELS[kind](), random_ids()
    cm.compress_(model, cm.CompressConfig(mode="rank", rank=5), [ids])
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin")), "only safetensors"
    vanilla_cls = type(model)
    loaded = vanilla_cls.from_pretrained(tmp_path).eval()
    assert loaded.config.state_size == 5
    assert torch.equal(logits(loaded, ids), expected)
    ours = cm.from_pretrained(str(tmp_path)).eval()
    assert torch.equal(logits(ours, ids), expected)


@pytest.mark.parametrize("kind", MODELS)
def test_per_layer_state_sizes_save_load_and_generate(kind, tmp_path):
    model, ids = MODELS[kind](), random_ids()
    names = [a.name for a in find_mixers(model)]
    resize_to_(model, {names[0]: 7, names[1]: 3})
    expected = logits(model, ids)
    gen = model.generate(ids[:1, :6], max_new_tokens=5, do_sample=False)
    model.save_pretrained(tmp_path)
    with pytest.raises(Exception):  # vanilla transformers cannot build layers of different sizes
        type(model).from_pretrained(tmp_path)
    loaded = cm.from_pretrained(str(tmp_path))
    assert [a.state_size for a in find_mixers(loaded)] == [7, 3]
    assert torch.equal(logits(loaded, ids), expected)
    assert torch.equal(loaded.generate(ids[:1, :6], max_new_tokens=5, do_sample=False), gen)
    # generation with a cache equals greedy decoding without one (the per-layer cache is sized right)
    seq = ids[:1, :6]
    for _ in range(5):
        seq = torch.cat([seq, logits(loaded, seq)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(seq, gen)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        cm.from_pretrained(str(tmp_path / "missing"))


# ---- bad input -------------------------------------------------------------------------------

def test_non_mamba_model_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    snap = snapshot(model)
    with pytest.raises(TypeError, match="holds no supported Mamba mixer. Supported mixers: .*MambaMixer"):
        cm.compress_(model, cm.CompressConfig(mode="rank", rank=2), [random_ids()])
    assert_untouched(model, snap)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="rank", rank=0), "CompressConfig.rank must be an integer >= 1"),
        (dict(mode="rank"), "CompressConfig.rank must be set"),
        (dict(mode="tolerance", tau=0.0), r"CompressConfig.tau must be in \(0, 1\)"),
        (dict(mode="tolerance", tau=1.5), r"CompressConfig.tau must be in \(0, 1\)"),
        (dict(mode="shrink"), "CompressConfig.mode must be one of"),
        (dict(estimator="exact"), "CompressConfig.estimator must be one of"),
        (dict(keep="median"), "CompressConfig.keep must be one of"),
        (dict(attempts=0), "CompressConfig.attempts must be an integer >= 1"),
        (dict(warmup_fraction=0.0), "CompressConfig.warmup_fraction"),
        (dict(gate=1.5), "CompressConfig.gate"),
        (dict(schedule="later"), "CompressConfig.schedule must be one of"),
    ],
)
def test_config_validation_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cm.CompressConfig(**kwargs)


def test_config_is_frozen():
    config = cm.CompressConfig()
    with pytest.raises(Exception):
        config.tau = 0.5
    assert config.replace(tau=0.2).tau == 0.2
    with pytest.raises(ValueError, match="tau"):
        config.replace(tau=2.0)


@pytest.mark.parametrize("kind", MODELS)
def test_rank_above_state_size_leaves_model_untouched(kind):
    model = MODELS[kind]()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"backbone.layers.0.mixer: rank=17 exceeds the layer's state size N=16"):
        cm.compress_(model, cm.CompressConfig(mode="rank", rank=17), [random_ids()])
    assert_untouched(model, snap)


def test_diverged_model_gives_a_clear_error_and_is_untouched():
    model = tiny_mamba()
    with torch.no_grad():
        model.backbone.layers[1].mixer.x_proj.weight[3, 0] = float("nan")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"backbone.layers.1.mixer: Gramian P of channel \d+ contains NaN"):
        cm.compress_(model, cm.CompressConfig(mode="rank", rank=4), [random_ids()])
    for (name, p), (_, old_p, old_value) in zip(model.named_parameters(), snap):
        assert p is old_p and torch.equal(p.nan_to_num(), old_value.nan_to_num()), name


def test_empty_calibration_is_refused():
    model = tiny_mamba()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="calibration is empty"):
        cm.compress_(model, cm.CompressConfig(mode="rank", rank=4), [])
    assert_untouched(model, snap)


def test_balanced_reduction_is_refused_for_mamba1():
    model = tiny_mamba()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="reduction='balanced' needs a Mamba2 mixer"):
        cm.compress_(model, cm.CompressConfig(mode="rank", rank=4, reduction="balanced"), [random_ids()])
    assert_untouched(model, snap)


def test_gramians_collected_before_a_cut_are_refused():
    model, ids = tiny_mamba(), random_ids()
    adapters = find_mixers(model)
    collector = GramianCollector(adapters)
    with collector, torch.no_grad():
        model(ids)
    stale = collector.gramians()
    resize_to_(model, {a.name: 8 for a in adapters})
    with pytest.raises(ValueError, match="were they collected before a cut"):
        decide_cuts(find_mixers(model), stale, cm.CompressConfig(mode="rank", rank=4))


def test_plan_select_rejects_bad_indices():
    adapter = find_mixers(tiny_mamba())[0]
    with pytest.raises(ValueError, match="out of range"):
        adapter.plan_select(torch.tensor([[0, 16]]))
    with pytest.raises(ValueError, match="repeat"):
        adapter.plan_select(torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match="ngroups=1"):
        adapter.plan_select(torch.tensor([1, 2]))
    assert isinstance(adapter.plan_select(torch.tensor([[1, 2]])), CutPlan)
