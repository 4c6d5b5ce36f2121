"""The drop-in mixer with a cache: prefill by our scan, decode by our state update, equal to transformers.

These re-ask, with the drop-in swapped in, what transformers' own Mamba model tests ask of the
model (state equivalence of a cached continuation, cache contents and shapes, greedy / beam
generation, padded batches, cached forward + backward, half precision), each with ``use_cache`` on
and off; and they check that transformers' own scan and step are never called on the way.  They
run on the installed transformers, so CI's lower-bound run covers 5.17 as well (cache access goes
through compressm_mamba.compat).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close, random_ids, tiny_mamba

import compressm_mamba as cm
from compressm_mamba import compat
from compressm_mamba.models.drop_in import replace_mixers_
from compressm_mamba.ops.selective_scan import last_call
from compressm_mamba.ops.selective_state_update import last_update_call

pytest.importorskip("transformers")


def pair(**kwargs):
    """transformers' model and a deep copy of it with the drop-in mixers."""
    hf = tiny_mamba(**kwargs)
    ours = copy.deepcopy(hf)
    replace_mixers_(ours)
    return hf, ours


@pytest.fixture
def hf_paths_forbidden(monkeypatch):
    """Make transformers' own scan, state update and conv functions raise while the drop-in model runs."""
    from transformers.models.mamba import modeling_mamba

    def forbid(name):
        def refuse(*args, **kwargs):
            raise AssertionError(f"transformers' {name} ran inside the drop-in model")
        return refuse

    def arm():
        for name in ("mamba_selective_scan", "mamba_selective_state_update", "causal_conv1d_fn",
                     "causal_conv1d_update"):
            monkeypatch.setattr(modeling_mamba, name, forbid(name))
    return arm


def states(cache, model):
    """(conv, recurrent) per layer, through compat, as float64 copies."""
    return [tuple(t.double().clone() for t in compat.cache_states(cache, layer.mixer.layer_idx))
            for layer in model.backbone.layers]


@pytest.mark.parametrize("use_cache", [True, False])
def test_forward_equals_hf_with_and_without_cache(use_cache):
    hf, ours = pair()
    ids = random_ids(3, 11)
    with torch.no_grad():
        want = hf(ids, use_cache=use_cache)
        got = ours(ids, use_cache=use_cache)
    assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5, name="logits")
    assert (got.cache_params is None) == (not use_cache) == (want.cache_params is None)
    if use_cache:  # the cache holds what transformers' own prefill stores: same shapes, same values
        for (conv_g, rec_g), (conv_w, rec_w) in zip(states(got.cache_params, ours), states(want.cache_params, hf)):
            assert conv_g.shape == (3, 64, 4) and rec_g.shape == (3, 64, 16)
            assert_close(conv_g, conv_w, rtol=1e-6, atol=1e-6, name="conv state")
            assert_close(rec_g, rec_w, rtol=1e-4, atol=1e-5, name="recurrent state")


def test_cached_continuation_equals_the_whole_sequence(hf_paths_forbidden):
    """transformers' state-equivalence check: prefill L-1 tokens, then one cached token = one forward of L."""
    _, ours = pair()
    ids = random_ids(2, 13)
    with torch.no_grad():
        whole = ours(ids).logits
        hf_paths_forbidden()
        first = ours(ids[:, :-1], use_cache=True)
        assert last_call["seqlen"] == 12
        last_update_call.clear()
        second = ours(ids[:, -1:], cache_params=first.cache_params, use_cache=True)
    assert last_update_call == {"backend": "torch", "state_size": 16}  # the decode step is ours
    assert_close(torch.cat([first.logits, second.logits], 1), whole, rtol=1e-4, atol=1e-5, name="logits")


def test_several_cached_tokens_continue_the_state():
    """A multi-token chunk after a prefill (chunked prompt, assisted decoding) continues the cached state
    (token by token through the state update) instead of restarting from zero."""
    _, ours = pair()
    ids = random_ids(2, 14)
    with torch.no_grad():
        whole = ours(ids).logits
        first = ours(ids[:, :8], use_cache=True)
        second = ours(ids[:, 8:], cache_params=first.cache_params, use_cache=True)
    assert_close(torch.cat([first.logits, second.logits], 1), whole, rtol=1e-4, atol=1e-5, name="logits")


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_equals_hf(use_cache, num_beams, hf_paths_forbidden):
    hf, ours = pair()
    ids = random_ids(2, 7)
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=num_beams, use_cache=use_cache,
                  attention_mask=torch.ones_like(ids), output_scores=True, return_dict_in_generate=True)
    want = hf.generate(ids, **kwargs)
    hf_paths_forbidden()
    got = ours.generate(ids, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for s_got, s_want in zip(got.scores, want.scores):
        assert_close(s_got, s_want, rtol=1e-4, atol=1e-4, name="scores")


def test_left_padded_batch_generates_like_hf():
    hf, ours = pair()
    ids = random_ids(3, 9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :5] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kwargs), hf.generate(ids, **kwargs))


def test_cached_forward_and_backward_equal_hf():
    """A training-mode forward that also fills a cache: gradients flow through our scan as through HF's."""
    hf, ours = pair()
    ids = random_ids(2, 10)
    grads = {}
    for label, model in (("hf", hf), ("ours", ours)):
        model.train()
        model.zero_grad()
        out = model(ids, labels=ids, use_cache=True)
        assert out.cache_params is not None
        out.loss.backward()
        grads[label] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["hf"].items():
        assert_close(grads["ours"][name], g, rtol=1e-3, atol=1e-5, name=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_decodes_like_hf(dtype):
    hf, ours = pair()
    hf.to(dtype)
    ours.to(dtype)
    ids = random_ids(2, 8)
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
        got = ours.generate(ids, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    for s_got, s_want in zip(got.scores, want.scores):
        assert_close(s_got.float(), s_want.float(), rtol=5e-2, atol=5e-2, name="scores")


def test_generate_after_a_cut_equals_hf_on_the_cut_weights(hf_paths_forbidden):
    """compress_ to N=4, then generate: the drop-in (scan prefill + decode kernel at N=4) equals
    transformers' own mixer running on the same cut weights."""
    _, ours = pair()
    ids = random_ids(4, 16)
    report = cm.compress_(ours, cm.CompressConfig(mode="rank", rank=4), [ids])
    assert [d.state_after for d in report.layers] == [4, 4]
    hf_cut = copy.deepcopy(ours)
    hf_class = type(hf_cut.backbone.layers[0].mixer).__mro__[2]  # (ours, _DropInScan, MambaMixer)
    assert hf_class.__name__ == "MambaMixer"
    for layer in hf_cut.backbone.layers:
        layer.mixer.__class__ = hf_class
    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  attention_mask=torch.ones_like(ids[:2, :7]))
    want = hf_cut.generate(ids[:2, :7], **kwargs)
    hf_paths_forbidden()
    last_update_call.clear()
    got = ours.generate(ids[:2, :7], **kwargs)
    assert last_update_call["state_size"] == 4 and last_call["state_size"] == 4
    assert torch.equal(got.sequences, want.sequences)
    for s_got, s_want in zip(got.scores, want.scores):
        assert_close(s_got, s_want, rtol=1e-4, atol=1e-4, name="scores")


def test_cuda_scan_backend_decodes_with_a_named_backend():
    """backend='cuda' has no decode kernel: replace_mixers_ says so and the step falls to 'auto'."""
    model = tiny_mamba()
    with pytest.warns(UserWarning, match="no one-token state-update kernel"):
        replace_mixers_(model, backend="cuda")
    with torch.no_grad():
        assert model.backbone.layers[0].mixer._step_backend() == "auto"
    with pytest.raises(ValueError, match="no CUDA state-update kernel"):
        replace_mixers_(model, backend="cuda", decode_backend="cuda")
    replace_mixers_(model, backend="reference", decode_backend="torch")
    assert model.backbone.layers[0].mixer._step_backend() == "torch"


@pytest.mark.requires_mamba_ssm
def test_mamba_ssm_module_prefill_and_steps_equal_its_full_forward():
    """mamba_ssm's inference_params protocol: the drop-in's prefill + one-token steps = the full forward."""
    from compressm_mamba import _optional

    # Through _optional: on CPU mamba_ssm imports only under a temporary stand-in for its CUDA module.
    Mamba = _optional.mamba_ssm_class("mamba_ssm.modules.mamba_simple", "Mamba")
    InferenceParams = _optional.mamba_ssm_class("mamba_ssm.utils.generation", "InferenceParams")

    torch.manual_seed(0)
    holder = torch.nn.ModuleDict({"mixer": Mamba(d_model=16, d_state=12, layer_idx=0, use_fast_path=False)}).eval()
    replace_mixers_(holder)
    mixer = holder["mixer"]
    hidden = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1))
    params = InferenceParams(max_seqlen=16, max_batch_size=2)
    with torch.no_grad():
        whole = mixer(hidden)
        outs = [mixer(hidden[:, :5], inference_params=params)]
        for t in range(5, 9):
            params.seqlen_offset = t
            outs.append(mixer(hidden[:, t:t + 1], inference_params=params))
    assert_close(torch.cat(outs, 1), whole, rtol=1e-4, atol=1e-5, name="out")


def test_gramian_sink_sees_prefills_and_chunks_but_not_generation_steps():
    """Like the collector's hooks: every multi-token forward is calibration data, a cached one-token step is not."""
    _, ours = pair()
    seen = []
    mixer = ours.backbone.layers[0].mixer
    mixer.gramian_sink = lambda delta, A, B, C, mask: seen.append(delta.shape[-1])
    ids = random_ids(2, 12)
    with torch.no_grad():
        cache = ours(ids[:, :6], use_cache=True).cache_params  # prefill: 6
        ours(ids[:, 6:7], cache_params=cache, use_cache=True)  # generation step: not seen
        ours(ids[:, 7:], cache_params=cache, use_cache=True)  # a 5-token chunk after a prefix: 5
        ours(ids[:, :3], use_cache=False)  # no cache: 3
    assert seen == [6, 5, 3]
