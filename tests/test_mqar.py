"""The offline MQAR generator (compressm_mamba.app.mqar)."""

import importlib.util

import pytest
import torch

from compressm_mamba.app.mqar import (HELD_OUT_SEED_OFFSET, MQAR_FILLER, MQARSpec, mqar_accuracy, mqar_splits,
                                      mqar_tensors)

SPEC = MQARSpec(pairs=6, seq_len=48, vocab=32)

# The held-out split and the CLI run build `datasets.Dataset`s (the Trainer path); the generator does not.
needs_datasets = pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="needs datasets")


def test_same_seed_same_sequences_other_seed_others():
    a, la = mqar_tensors(20, SPEC, seed=3)
    b, lb = mqar_tensors(20, SPEC, seed=3)
    c, _ = mqar_tensors(20, SPEC, seed=4)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert a.shape == la.shape == (20, 48) and a.dtype == torch.long


def test_keys_and_values_come_from_disjoint_ranges():
    ids, _ = mqar_tensors(50, SPEC, seed=0)
    D = SPEC.pairs
    keys, values = ids[:, 0 : 2 * D : 2], ids[:, 1 : 2 * D : 2]
    assert set(SPEC.key_range).isdisjoint(SPEC.value_range)
    assert ((keys >= SPEC.key_range.start) & (keys < SPEC.key_range.stop)).all()
    assert ((values >= SPEC.value_range.start) & (values < SPEC.value_range.stop)).all()
    assert all(len(set(row.tolist())) == D for row in keys)  # keys distinct within a sequence
    assert int(ids.max()) < SPEC.vocab


def test_every_key_is_queried_once_and_the_answer_is_its_value():
    ids, labels = mqar_tensors(50, SPEC, seed=1)
    D = SPEC.pairs
    for row, lab in zip(ids.tolist(), labels.tolist()):
        pairs = dict(zip(row[0 : 2 * D : 2], row[1 : 2 * D : 2]))
        answers = [t for t, y in enumerate(lab) if y != -100]
        assert len(answers) == D
        queried = [row[t - 1] for t in answers]
        assert sorted(queried) == sorted(pairs)  # each key once
        for t in answers:
            assert t >= 2 * D + 1  # queries come after the context
            assert lab[t] == row[t] == pairs[row[t - 1]]
        # everything after the context that is neither a query key nor its answer is filler
        query_tokens = set(answers) | {t - 1 for t in answers}
        assert all(row[t] == MQAR_FILLER for t in range(2 * D, len(row)) if t not in query_tokens)


def test_only_answer_positions_are_in_the_loss():
    ids, labels = mqar_tensors(30, SPEC, seed=2)
    mask = labels != -100
    assert int(mask.sum()) == 30 * SPEC.pairs
    assert (ids[mask] >= SPEC.value_range.start).all()  # every labelled token is a value
    assert not mask[:, : 2 * SPEC.pairs].any()  # the context is never a target


@needs_datasets
def test_held_out_uses_another_seed():
    train, test = mqar_splits(16, 16, SPEC, seed=0)
    held, _ = mqar_tensors(16, SPEC, seed=HELD_OUT_SEED_OFFSET)
    assert torch.equal(torch.tensor(test["input_ids"]), held)
    assert not set(map(tuple, train["input_ids"])) & set(map(tuple, test["input_ids"]))


@pytest.mark.parametrize("kw", [dict(pairs=0), dict(pairs=10, seq_len=30), dict(pairs=8, vocab=10)])
def test_bad_knobs_are_refused(kw):
    with pytest.raises(ValueError, match="MQAR"):
        MQARSpec(**{**dict(pairs=4, seq_len=32, vocab=32), **kw})


@needs_datasets
def test_accuracy_reads_the_answer_positions():
    train, _ = mqar_splits(4, 1, SPEC, seed=0)

    class Oracle(torch.nn.Module):  # predicts each next token perfectly: accuracy 1 at the answers
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids):
            logits = torch.full((*ids.shape, SPEC.vocab), -10.0)
            logits[:, :-1].scatter_(2, ids[:, 1:, None], 10.0)
            return type("Out", (), {"logits": logits})()

    acc, loss = mqar_accuracy(Oracle(), train)
    assert acc == 1.0 and loss < 1e-6


@needs_datasets
@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="the Trainer needs accelerate")
def test_finetune_on_mqar_from_the_cli(tmp_path, capsys):
    import json

    from compressm_mamba.app.cli import main

    out = tmp_path / "run"
    assert main(["finetune", "--preset", "tiny", "--arch", "mamba2", "--data", "mqar", "--mqar-pairs", "2",
                 "--mqar-vocab", "12", "--mqar-train", "8", "--seq-len", "16", "--out", str(out), "--steps", "4",
                 "--batch-size", "2", "--mode", "rank", "--rank", "6", "--estimator", "mean_lti", "--attempts", "1",
                 "--warmup-fraction", "0.5", "--calibration-batches", "1"]) == 0
    assert "MQAR held-out accuracy" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert 0.0 <= report["mqar_accuracy"] <= 1.0 and set(report["state_sizes_after"].values()) == {6}
