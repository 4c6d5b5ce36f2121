"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"), generated offline.

A sequence of ``seq_len`` tokens starts with ``pairs`` key-value pairs ``k1 v1 k2 v2 ...``; the rest
is filler (token 0) in which every key is queried once, in a random order and at random positions,
as the bigram ``k v``: the model must recall, on reading the key again, the value it was paired
with.  Keys come from tokens ``[1, 1 + K)`` and values from ``[1 + K, vocab)`` with
K = (vocab − 1) // 2, so a key never looks like a value.  Keys are distinct within a sequence,
values are drawn with replacement (as in Zoology).  The loss and the accuracy are taken at the
answer positions only: ``labels`` is −100 everywhere except at the value token of each query (the
model predicts it from the query key before it), so chance accuracy is 1 / (vocab − 1 − K).

Sequences are a pure function of ``seed``: the held-out set uses a different seed (``mqar_splits``),
so it holds new key-value assignments, never a training sequence again.

Shapes: ``mqar_tensors`` returns input_ids and labels, each (n, seq_len) int64.
"""

from __future__ import annotations

import torch

__all__ = ["MQAR_FILLER", "MQARSpec", "mqar_tensors", "mqar_dataset", "mqar_splits", "mqar_accuracy",
           "HELD_OUT_SEED_OFFSET"]

MQAR_FILLER = 0
HELD_OUT_SEED_OFFSET = 1_000_003  # held-out seed = train seed + this (never equal to a train seed in use)


class MQARSpec:
    """The task's knobs, validated.  ``vocab`` includes the filler token 0."""

    def __init__(self, pairs: int = 8, seq_len: int = 64, vocab: int = 64):
        for name, value in (("pairs", pairs), ("seq_len", seq_len), ("vocab", vocab)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MQAR {name} must be an integer >= 1, got {value!r}")
        self.pairs, self.seq_len, self.vocab = pairs, seq_len, vocab
        if self.n_keys < pairs:
            raise ValueError(f"MQAR needs at least pairs={pairs} distinct keys: vocab={vocab} gives "
                             f"{self.n_keys} keys (use vocab >= {2 * pairs + 2})")
        if self.n_values < 2:
            raise ValueError(f"MQAR vocab={vocab} leaves fewer than 2 value tokens")
        if seq_len < 4 * pairs:
            raise ValueError(f"MQAR seq_len={seq_len} is too short for {pairs} pairs and their {pairs} queries "
                             f"(needs seq_len >= 4 * pairs = {4 * pairs})")

    @property
    def n_keys(self) -> int:
        return (self.vocab - 1) // 2

    @property
    def key_range(self) -> range:
        return range(1, 1 + self.n_keys)

    @property
    def value_range(self) -> range:
        return range(1 + self.n_keys, self.vocab)

    @property
    def n_values(self) -> int:
        return len(self.value_range)

    def __repr__(self) -> str:
        return f"MQARSpec(pairs={self.pairs}, seq_len={self.seq_len}, vocab={self.vocab})"


def mqar_tensors(n: int, spec: MQARSpec, seed: int):
    """``n`` MQAR sequences from ``seed``: (input_ids, labels), each (n, seq_len) int64."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"MQAR needs n >= 1 sequences, got {n!r}")
    g = torch.Generator().manual_seed(int(seed))
    D, L = spec.pairs, spec.seq_len
    # Distinct keys per sequence: the first D of a random permutation of the key range.
    keys = torch.argsort(torch.rand(n, spec.n_keys, generator=g), dim=1)[:, :D] + spec.key_range.start
    values = torch.randint(spec.value_range.start, spec.vocab, (n, D), generator=g)
    ids = torch.full((n, L), MQAR_FILLER, dtype=torch.long)
    ids[:, 0 : 2 * D : 2], ids[:, 1 : 2 * D : 2] = keys, values
    labels = torch.full((n, L), -100, dtype=torch.long)
    # Queries: D of the (L − 2D) // 2 bigram slots after the context, each key once in a random order.
    slots = (L - 2 * D) // 2
    chosen = torch.sort(torch.argsort(torch.rand(n, slots, generator=g), dim=1)[:, :D], dim=1).values
    order = torch.argsort(torch.rand(n, D, generator=g), dim=1)
    key_pos = 2 * D + 2 * chosen  # (n, D)
    q_keys, q_values = keys.gather(1, order), values.gather(1, order)
    ids.scatter_(1, key_pos, q_keys)
    ids.scatter_(1, key_pos + 1, q_values)
    labels.scatter_(1, key_pos + 1, q_values)
    return ids, labels


def mqar_dataset(n: int, spec: MQARSpec, seed: int):
    """``mqar_tensors`` as a ``datasets.Dataset`` with ``input_ids`` and ``labels`` (HF causal-LM shift)."""
    from datasets import Dataset

    ids, labels = mqar_tensors(n, spec, seed)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def mqar_splits(n_train: int, n_test: int, spec: MQARSpec, seed: int = 0):
    """(train, held-out) datasets; the held-out set is drawn from seed + HELD_OUT_SEED_OFFSET."""
    return mqar_dataset(n_train, spec, seed), mqar_dataset(n_test, spec, seed + HELD_OUT_SEED_OFFSET)


@torch.no_grad()
def mqar_accuracy(model, dataset, batch: int = 32) -> tuple:
    """(accuracy, mean loss in nats) over the answer positions of ``dataset``.

    The prediction for the token at position t is the argmax of the logits at t − 1 (causal LM).
    """
    was_training = model.training
    model.eval()
    ids, labels = torch.tensor(dataset["input_ids"]), torch.tensor(dataset["labels"])
    device = next(model.parameters()).device
    correct = total = 0
    loss_sum = 0.0
    for i in range(0, len(ids), batch):
        x, y = ids[i : i + batch].to(device), labels[i : i + batch].to(device)
        logits = model(x).logits[:, :-1].float()
        target = y[:, 1:]
        mask = target != -100
        picked = logits[mask]
        correct += int((picked.argmax(-1) == target[mask]).sum())
        loss_sum += float(torch.nn.functional.cross_entropy(picked, target[mask], reduction="sum"))
        total += int(mask.sum())
    model.train(was_training)
    return correct / total, loss_sum / total
