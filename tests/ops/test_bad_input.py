"""Bad and awkward input to every public op and to the model-level API: a clear error naming the
argument (or layer) with nothing changed, or — where the input is legitimate — the right answer."""

import copy
import importlib.util

import pytest
import torch
from helpers import assert_close, random_gramian_inputs, random_ids, random_scan_inputs, tiny_mamba, tiny_mamba2

from compressm_mamba import ops
from compressm_mamba.reference import gramian_statistics
from compressm_mamba.reference import selective_scan as reference_scan

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="needs transformers"
)

SCAN_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
GRAM_ARGS = ("delta", "A", "B", "C", "delta_bias")


def scan_inputs(**kw):
    return random_scan_inputs(dtype=torch.float32, **kw)


def gram_inputs(**kw):
    delta, A, B, C, bias = random_gramian_inputs(**kw)
    return dict(delta=delta.float(), A=A.float(), B=B.float(), C=C.float(), delta_bias=bias.float())


# ---- device mixes (the meta device stands in for a second device on a CPU machine) ---------------

@pytest.mark.parametrize("name", SCAN_ARGS)
def test_selective_scan_device_mix_names_the_argument(name):
    x = scan_inputs()
    x[name] = torch.empty_like(x[name], device="meta")
    other, where = ("delta", "meta") if name == "u" else (name, "meta")
    with pytest.raises(ValueError, match=rf"{other} is on (cpu|{where}) but u is on (meta|cpu): all inputs must share a device"):
        ops.selective_scan(**x)


@pytest.mark.parametrize("name", GRAM_ARGS + ("mask",))
def test_gramians_device_mix_names_the_argument(name):
    x = gram_inputs()
    x["mask"] = torch.ones(2, 9, dtype=torch.bool)
    if name == "delta":
        x["delta"] = torch.empty_like(x["delta"], device="meta")
        match = "A is on cpu but delta is on meta"
    else:
        x[name] = torch.empty_like(x[name], device="meta")
        match = f"{name} is on meta but delta is on cpu"
    with pytest.raises(ValueError, match=match):
        ops.gramians(**x)
    with pytest.raises(ValueError, match=match):
        ops.gramian_sums(**x, estimator="frozen")


# ---- wrong dtypes and shapes ---------------------------------------------------------------------

@pytest.mark.parametrize("name", SCAN_ARGS)
def test_selective_scan_integer_input_names_the_argument(name):
    x = scan_inputs()
    x[name] = x[name].long()
    with pytest.raises(TypeError, match=f"{name} must be a floating-point tensor, got torch.int64"):
        ops.selective_scan(**x)


@pytest.mark.parametrize("name", GRAM_ARGS)
def test_gramians_integer_input_names_the_argument(name):
    x = gram_inputs()
    x[name] = x[name].long()
    with pytest.raises(TypeError, match=f"{name} must be a floating-point tensor, got torch.int64"):
        ops.gramians(**x)


def test_non_tensor_inputs_name_the_argument():
    x = scan_inputs()
    x["B"] = x["B"].numpy()
    with pytest.raises(TypeError, match="B must be a tensor, got ndarray"):
        ops.selective_scan(**x)
    g = gram_inputs()
    with pytest.raises(TypeError, match=r"mask must be a \(batch=2, L=9\) tensor, got list"):
        ops.gramians(**g, mask=[[1] * 9] * 2)


@pytest.mark.parametrize(
    "name, shape, match",
    [
        ("u", (2, 5), r"u must be a \(batch, dim, L\) tensor"),
        ("delta", (2, 5, 10), r"delta must have u's shape \(2, 5, 11\), got \(2, 5, 10\)"),
        ("A", (5, 7, 2), r"A must be \(dim=5, N\), got \(5, 7, 2\)"),
        ("A", (4, 7), r"A must be \(dim=5, N\), got \(4, 7\)"),
        ("B", (2, 7, 10), r"B must be \(batch=2, N=7, L=11\)"),
        ("C", (3, 7, 11), r"C must be \(batch=2, N=7, L=11\)"),
        ("B", (2, 3, 7, 11), r"B: dim=5 is not a multiple of ngroups=3"),
        ("D", (4,), r"D must be \(dim=5,\), got \(4,\)"),
        ("z", (2, 5, 10), r"z must have u's shape \(2, 5, 11\), got \(2, 5, 10\)"),
        ("delta_bias", (5, 1), r"delta_bias must be \(dim=5,\), got \(5, 1\)"),
    ],
)
def test_selective_scan_shapes_name_the_argument(name, shape, match):
    x = scan_inputs()
    x[name] = torch.randn(shape)
    with pytest.raises(ValueError, match=match):
        ops.selective_scan(**x)


@pytest.mark.parametrize(
    "name, shape, match",
    [
        ("delta", (2, 3), r"delta must be a \(batch, dim, L\) tensor"),
        ("A", (2, 6), r"A must be \(dim=3, N\), got \(2, 6\)"),
        ("B", (2, 6, 8), r"B must be \(batch=2, N=6, L=9\)"),
        ("C", (2, 5, 9), r"C must be \(batch=2, N=6, L=9\)"),
        ("delta_bias", (4,), r"delta_bias must be \(dim=3,\), got \(4,\)"),
        ("mask", (2, 8), r"mask must be \(batch=2, L=9\), got \(2, 8\)"),
    ],
)
def test_gramians_shapes_name_the_argument(name, shape, match):
    x = gram_inputs()
    x[name] = torch.ones(shape, dtype=torch.bool) if name == "mask" else torch.randn(shape)
    with pytest.raises(ValueError, match=match):
        ops.gramians(**x)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton", "cuda"])
@pytest.mark.parametrize("name", ["B", "C"])
def test_time_invariant_B_or_C_is_refused_on_every_backend(name, backend):
    """mamba_ssm accepts a (dim, N) B/C constant over time; ops.selective_scan refuses it (validation
    comes before the backend is chosen, so every backend says the same) and names the equivalent."""
    x = scan_inputs()
    dim, N = x["A"].shape
    x[name] = torch.randn(dim, N)
    with pytest.raises(ValueError, match=rf"{name} of shape \(dim={dim}, N={N}\) \(constant over time\) is not supported"):
        ops.selective_scan(**x, backend=backend)
    with pytest.raises(ValueError, match="constant over time"):
        reference_scan(**x)


def test_complex_A_is_out_of_scope_and_refused():
    x = scan_inputs()
    x["A"] = x["A"].to(torch.complex64)
    with pytest.raises(TypeError, match="A must be a floating-point tensor, got torch.complex64"):
        ops.selective_scan(**x)


def test_unknown_backend_and_estimator_are_named():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.selective_scan(**scan_inputs(), backend="fast")
    with pytest.raises(ValueError, match="estimator must be one of"):
        ops.gramians(**gram_inputs(), estimator="exact")


def test_mixed_float_dtypes_are_legitimate():
    """A float16 / bfloat16 / float64 argument among float32 ones is computed in the wider dtype."""
    x = scan_inputs()
    expected = reference_scan(**{k: v.double() for k, v in x.items()})
    for name in SCAN_ARGS:
        for dtype in (torch.float16, torch.bfloat16, torch.float64):
            y = dict(x)
            y[name] = y[name].to(dtype)
            out = ops.selective_scan(**y)
            assert out.dtype == (y["u"].dtype if name == "u" else torch.float32)  # the output follows u
            reference = reference_scan(**{k: v.double() for k, v in y.items()})  # the same (rounded) values
            tol = 1e-4 if out.dtype != torch.float16 and out.dtype != torch.bfloat16 else 2e-2
            finite = reference.abs() < 6e4  # fp16 cannot hold larger outputs
            assert_close(out.double()[finite], reference[finite], rtol=tol, atol=tol, name=f"{name} as {dtype}")
            if dtype == torch.float64:
                assert_close(out, expected, rtol=1e-4, atol=1e-4, name=f"{name} as float64")


# ---- layouts, precision, tiny state --------------------------------------------------------------

def _non_contiguous(t):
    """The same values in a transposed (non-contiguous) layout."""
    if t.dim() < 2:
        return t.repeat_interleave(2)[::2]
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_non_contiguous_inputs_give_the_contiguous_result(backend):
    x = scan_inputs(ngroups=None)
    y = {k: _non_contiguous(v) for k, v in x.items()}
    assert not any(v.is_contiguous() for k, v in y.items() if v.dim() >= 2)
    assert_close(ops.selective_scan(**y, delta_softplus=True, backend=backend),
                 ops.selective_scan(**x, delta_softplus=True, backend=backend), rtol=1e-5, atol=1e-6, name="scan")
    g = gram_inputs(ngroups=3)
    h = {k: _non_contiguous(v) for k, v in g.items()}
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :3] = False
    for estimator in ("mean_lti", "frozen", "ltv"):
        P, Q = ops.gramians(**g, mask=mask, estimator=estimator, backend=backend)
        P2, Q2 = ops.gramians(**h, mask=_non_contiguous(mask.T).T, estimator=estimator, backend=backend)
        assert_close(P2, P, rtol=1e-5, atol=1e-7, name=f"{estimator} P")
        assert_close(Q2, Q, rtol=1e-5, atol=1e-7, name=f"{estimator} Q")


@pytest.mark.parametrize("estimator", ["frozen", "ltv", "mean_lti"])
def test_fp16_inputs_accumulate_wider_than_fp16(estimator):
    """Gramian terms of large fp16 inputs overflow fp16 (max 65504); the sums are accumulated in
    float32 per batch (float64 across batches in the collector) and match the float64 reference."""
    g = gram_inputs(dim=3, N=4, L=16)
    half = {k: v.half() for k, v in g.items()}
    half["B"] = (half["B"] * 300).half()  # b b^T ~ 1e5 per token: inf in fp16
    half["C"] = (half["C"] * 300).half()
    assert torch.isinf(half["B"] * half["B"] * 2).any()  # in fp16 the terms overflow
    stats = ops.gramian_sums(**half, estimator=estimator, delta_softplus=True)
    reference = gramian_statistics(**{k: v.double() for k, v in half.items()}, estimator=estimator,
                                   delta_softplus=True)
    assert stats.count == reference.count
    for key, value in stats.sums.items():
        assert value.dtype in (torch.float32, torch.float64), key
        assert torch.isfinite(value).all(), key
        assert_close(value, reference.sums[key], rtol=2e-4, atol=1e-3, name=key)
    from compressm_mamba.reference import gramians_from_statistics

    P, Q = gramians_from_statistics(stats)
    P_ref, Q_ref = gramians_from_statistics(reference)
    assert torch.isfinite(P).all() and torch.isfinite(Q).all()
    assert_close(P, P_ref, rtol=2e-4, atol=1e-3, name="P")
    assert_close(Q, Q_ref, rtol=2e-4, atol=1e-3, name="Q")
    assert float(P.abs().max()) > 0 and float(Q.abs().max()) > 0
    if estimator != "mean_lti":  # token sums of squared terms: far beyond fp16's 65504
        assert max(float(v.abs().max()) for v in stats.sums.values()) > 65504


@needs_transformers
def test_collector_accumulates_fp16_batches_in_float64():
    from compressm_mamba.cut.collect import GramianCollector
    from compressm_mamba.models.registry import find_mixers

    adapter = find_mixers(tiny_mamba(state_size=4, hidden=16, layers=1))[0]
    collector = GramianCollector([adapter], "frozen")
    g = gram_inputs(dim=adapter.channels, N=4, L=8, seed=3)
    B, C = (g["B"] * 300).half(), (g["C"] * 300).half()
    for _ in range(3):
        collector.add_system(adapter, g["delta"].half(), g["A"].half(), B, C)
    stats = collector.stats[adapter.name]
    assert all(v.dtype == torch.float64 and torch.isfinite(v).all() for v in stats.sums.values())
    single = ops.gramian_sums(g["delta"].half(), g["A"].half(), B, C, estimator="frozen")
    assert_close(stats.sums["P"], 3 * single.sums["P"].double(), rtol=1e-6, atol=0, name="P")


@needs_transformers
def test_state_size_one():
    x = scan_inputs(N=1)
    assert_close(ops.selective_scan(**x), reference_scan(**{k: v.double() for k, v in x.items()}),
                 rtol=1e-4, atol=1e-5, name="N=1 scan")
    g = gram_inputs(N=1)
    P, Q = ops.gramians(**g)
    assert P.shape == Q.shape == (3, 1, 1) and (P >= 0).all() and (Q >= 0).all()

    import compressm_mamba as cm
    from compressm_mamba.models.registry import find_mixers

    model, ids = tiny_mamba(state_size=4, hidden=16), random_ids()
    report = cm.compress_(model, cm.CompressConfig(mode="rank", rank=1), [ids])
    assert [d.state_after for d in report.layers] == [1, 1]
    assert all(a.state_size == 1 for a in find_mixers(model))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    # a model built with N = 1: nothing to cut, a clear no-op
    one = tiny_mamba(state_size=1, hidden=16)
    report = cm.compress_(one, cm.CompressConfig(mode="tolerance", tau=0.5), [ids])
    assert not report.changed and "nothing was cut" in str(report)


# ---- model level ---------------------------------------------------------------------------------

MODELS = {"mamba": lambda: tiny_mamba(state_size=8, hidden=16), "mamba2": lambda: tiny_mamba2(state_size=8, hidden=16)}


def _snapshot(model):
    return [(n, p, p.detach().clone()) for n, p in model.named_parameters()]


def _assert_untouched(model, snap):
    for (name, p), (_, old, value) in zip(model.named_parameters(), snap):
        assert p is old and torch.equal(p, value), name


@needs_transformers
@pytest.mark.parametrize("kind", MODELS)
def test_left_padding_does_not_enter_the_gramians(kind):
    """A left-padded batch gives the Gramians (and the cut) of its unpadded sequences, end to end."""
    import compressm_mamba as cm
    from compressm_mamba.cut.collect import GramianCollector
    from compressm_mamba.cut.compress import run_calibration
    from compressm_mamba.models.registry import find_mixers

    long, short = random_ids(1, 16, seed=1), random_ids(1, 10, seed=2)
    padded = torch.cat([long, torch.cat([torch.zeros(1, 6, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(padded)
    mask[1, :6] = 0
    unpadded = [long, short]
    left = [{"input_ids": padded, "attention_mask": mask, "labels": padded}]

    model = MODELS[kind]()
    adapters = find_mixers(model)
    a, b = GramianCollector(adapters, "ltv"), GramianCollector(adapters, "ltv")
    run_calibration(model, unpadded, a)
    run_calibration(model, left, b)
    for adapter in adapters:
        sa, sb = a.stats[adapter.name], b.stats[adapter.name]
        assert sa.count == sb.count == 26
        for key in sa.sums:
            assert_close(sb.sums[key], sa.sums[key], rtol=1e-4, atol=1e-6 * float(sa.sums[key].abs().max()),
                         name=f"{adapter.name} {key}")
    # and without the mask the padding does change them (the test can tell)
    c = GramianCollector(adapters, "ltv")
    run_calibration(model, [padded], c)
    assert c.stats[adapters[0].name].count == 32

    config = cm.CompressConfig(mode="tolerance", tau=0.2)
    m1, m2 = MODELS[kind](), MODELS[kind]()
    r1, r2 = cm.compress_(m1, config, unpadded), cm.compress_(m2, config, left)
    for d1, d2 in zip(r1.layers, r2.layers):
        assert d1.state_after == d2.state_after and torch.equal(d1.kept, d2.kept)
        assert_close(d2.importance, d1.importance, rtol=1e-3, atol=1e-9, name=d1.name)


@needs_transformers
@pytest.mark.parametrize("kind", MODELS)
def test_a_cut_requested_twice_is_a_clear_no_op(kind):
    import compressm_mamba as cm

    model, ids = MODELS[kind](), random_ids()
    config = cm.CompressConfig(mode="rank", rank=4)
    assert cm.compress_(model, config, [ids]).changed
    snap = _snapshot(model)
    again = cm.compress_(model, config, [ids])
    assert not again.changed and [d.state_after for d in again.layers] == [4, 4]
    assert "nothing was cut" in str(again)
    _assert_untouched(model, snap)
    with pytest.raises(ValueError, match=r"backbone.layers.0.mixer: rank=6 exceeds the layer's state size N=4"):
        cm.compress_(model, config.replace(rank=6), [ids])
    _assert_untouched(model, snap)


@needs_transformers
def test_bad_calibration_batches_are_named_and_the_model_untouched():
    import compressm_mamba as cm

    model = tiny_mamba(state_size=8, hidden=16)
    snap = _snapshot(model)
    config = cm.CompressConfig(mode="rank", rank=4)
    ids = random_ids()
    with pytest.raises(TypeError, match=r"calibration batch 0: input_ids must be a \(batch, L\) tensor of integer token ids"):
        cm.compress_(model, config, [{"input_ids": ids.float()}])
    with pytest.raises(TypeError, match=r"calibration batch 1: input_ids must be a \(batch, L\) tensor of integer"):
        cm.compress_(model, config, [ids, {"input_ids": ids[0]}])
    with pytest.raises(ValueError, match=r"calibration batch 0: attention_mask must have input_ids' shape \(4, 24\)"):
        cm.compress_(model, config, [{"input_ids": ids, "attention_mask": torch.ones(4, 23)}])
    with pytest.raises(TypeError, match="calibration batches must be dicts of model inputs or tensors, got list"):
        cm.compress_(model, config, [[1, 2, 3]])
    _assert_untouched(model, snap)


@needs_transformers
def test_collector_names_the_layer_for_a_bad_mixer_input():
    from compressm_mamba.cut.collect import GramianCollector
    from compressm_mamba.models.registry import find_mixers

    adapters = find_mixers(tiny_mamba(state_size=8, hidden=16))
    collector = GramianCollector(adapters)
    with pytest.raises(ValueError, match="backbone.layers.1.mixer: mixer input has 8 features, the layer takes 16"):
        collector.add(adapters[1], torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"backbone.layers.0.mixer: attention_mask must be \(batch, L\) = \(2, 5\)"):
        collector.add(adapters[0], torch.randn(2, 5, 16), torch.ones(2, 4))
    with pytest.raises(ValueError, match="backbone.layers.0.mixer: mixer input must be a floating-point"):
        collector.add(adapters[0], torch.ones(2, 5, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="backbone.layers.0.mixer: attention_mask is on meta"):
        collector.add(adapters[0], torch.randn(2, 5, 16), torch.ones(2, 5, device="meta"))
    assert collector.stats == {}


def test_callback_with_a_non_mamba_model_is_refused_and_leaves_it_alone():
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel, TrainerControl, TrainerState

    import compressm_mamba as cm

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    snap = _snapshot(model)
    callback = cm.CompreSSMCallback(cm.CompressConfig())
    state, control = TrainerState(max_steps=10), TrainerControl()
    callback.on_init_end(None, state, control, model=model)  # no resume hook on a model it cannot cut
    assert callback._resume_hook is None and not model._load_state_dict_pre_hooks
    with pytest.raises(TypeError, match="holds no supported Mamba mixer"):
        callback.on_train_begin(None, state, control, model=model)
    _assert_untouched(model, snap)
    model.load_state_dict(copy.deepcopy(model.state_dict()))
