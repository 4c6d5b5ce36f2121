"""replace_mixers_: the drop-in mixer equals the HF mixer, collects without recompute, follows cuts."""

import copy

import pytest
import torch
from helpers import assert_close, random_ids, tiny_mamba

import compressm_mamba as cm
from compressm_mamba.cut.collect import GramianCollector
from compressm_mamba.models.drop_in import mixer_class, replace_mixers_
from compressm_mamba.models.registry import find_mixers
from compressm_mamba.ops.selective_scan import last_call

pytest.importorskip("transformers")


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_outputs_and_gradients_equal_the_hf_mixer(backend):
    hf, ids = tiny_mamba(), random_ids()
    ours = copy.deepcopy(hf)
    names = replace_mixers_(ours, backend=backend)
    assert names == ["backbone.layers.0.mixer", "backbone.layers.1.mixer"]
    assert all(type(ours.get_submodule(n)) is mixer_class() for n in names)
    assert ours.state_dict().keys() == hf.state_dict().keys()
    hf.train(), ours.train()  # the training path (no cache)
    loss_hf, grads_hf = loss_and_grads(hf, ids)
    loss_ours, grads_ours = loss_and_grads(ours, ids)
    assert_close(loss_ours, loss_hf, rtol=1e-5, atol=1e-6, name="loss")
    assert grads_ours.keys() == grads_hf.keys()
    for name in grads_hf:
        assert_close(grads_ours[name], grads_hf[name], rtol=1e-3, atol=1e-5, name=f"grad {name}")


def test_padding_mask_and_generation_match_hf():
    hf, ids = tiny_mamba(), random_ids()
    ours = copy.deepcopy(hf)
    replace_mixers_(ours)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        assert_close(ours(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits,
                     rtol=1e-4, atol=1e-5, name="masked logits")
    assert torch.equal(ours.generate(ids[:1, :6], max_new_tokens=4, do_sample=False),
                       hf.generate(ids[:1, :6], max_new_tokens=4, do_sample=False))


def test_collection_uses_the_forward_values_without_a_hook():
    hf, ids = tiny_mamba(), random_ids()
    ours = copy.deepcopy(hf)
    replace_mixers_(ours)
    results = {}
    for label, model in (("hooks", hf), ("sink", ours)):
        adapters = find_mixers(model)
        collector = GramianCollector(adapters, "ltv")
        with collector, torch.no_grad():
            model(ids)
            if label == "sink":
                assert all(not a.module._forward_pre_hooks for a in adapters), "a hook recomputed the inputs"
                assert all(a.module.gramian_sink is not None for a in adapters)
        assert all(getattr(a.module, "gramian_sink", None) is None for a in adapters)
        results[label] = collector.gramians()
    for name in results["hooks"]:
        for got, want in zip(results["sink"][name], results["hooks"][name]):
            assert_close(got, want, rtol=1e-5, atol=1e-8, name=name)


def test_a_cut_mid_training_switches_the_kernel_state_size(tmp_path):
    """The training loop never restarts: after the callback's cut the next forward's scan runs with N=4."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    pytest.importorskip("datasets", reason="the Trainer run builds its data with datasets")
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = tiny_mamba()
    replace_mixers_(model)
    ran_with = {}

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            ran_with[state.global_step] = (last_call["state_size"], last_call["backend"],
                                           [m.last_state_size for m in (model.backbone.layers[0].mixer,
                                                                        model.backbone.layers[1].mixer)])

    ids = random_ids(32, 24)
    config = cm.CompressConfig(mode="rank", rank=4, warmup_fraction=0.5, attempts=1, calibration_batches=2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids.tolist(),
                                                                               "labels": ids.tolist()}),
                      callbacks=[cm.CompreSSMCallback(config), Spy()])
    trainer.train()
    assert ran_with[4] == (16, "torch", [16, 16])  # step 4 ran before the cut at its end
    assert ran_with[5] == (4, "torch", [4, 4])
    assert ran_with[8] == (4, "torch", [4, 4])
    assert all(type(m.mixer) is mixer_class() for m in model.backbone.layers)


def test_replace_refuses_models_without_mamba_mixers():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(TypeError, match="no transformers MambaMixer"):
        replace_mixers_(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)))
    with pytest.raises(ValueError, match="backend must be one of"):
        replace_mixers_(tiny_mamba(), backend="fastest")
