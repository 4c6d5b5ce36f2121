"""GHOST's forward-pass state score (reference.ghost) and importance='ghost' through the cut pipeline."""

import pytest
import torch

from compressm_mamba.reference import ghost_sums, state_importance


def _system(batch=2, dim=3, N=5, L=7, P=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    delta = torch.rand(batch, dim, L, generator=g, dtype=torch.float64) + 0.1
    A = -(torch.rand(dim, N, generator=g, dtype=torch.float64) + 0.2)
    B = torch.randn(batch, N, L, generator=g, dtype=torch.float64)
    C = torch.randn(batch, N, L, generator=g, dtype=torch.float64)
    x = torch.randn(batch, dim, P, L, generator=g, dtype=torch.float64)
    return delta, A, B, C, x


def test_ghost_matches_an_explicit_scan():
    delta, A, B, C, x = _system()
    batch, dim, L = delta.shape
    N, P = A.shape[1], x.shape[2]
    expected = torch.zeros(dim, N, dtype=torch.float64)
    for b in range(batch):
        for d in range(dim):
            h = torch.zeros(N, P, dtype=torch.float64)
            for t in range(L):
                h = torch.exp(delta[b, d, t] * A[d])[:, None] * h + (delta[b, d, t] * B[b, :, t])[:, None] * x[b, d, :, t]
                expected[d] += (h ** 2).sum(1) * C[b, :, t] ** 2
    got = ghost_sums(delta, A, B, C, x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_state_with_zero_C_or_zero_B_ranks_last():
    delta, A, B, C, x = _system(N=6)
    C[:, 2] = 0.0  # never read: unobservable
    B[:, 4] = 0.0  # never excited: uncontrollable
    s = state_importance(None, None, "ghost", ghost=ghost_sums(delta, A, B, C, x))
    assert s[2] == 0 and s[4] == 0
    assert (s[[0, 1, 3, 5]] > 0).all()
    assert set(torch.argsort(s)[:2].tolist()) == {2, 4}


def test_padding_adds_nothing():
    delta, A, B, C, x = _system()
    mask = torch.ones(delta.shape[0], delta.shape[2], dtype=torch.bool)
    mask[:, -3:] = False  # right padding: the score equals that of the unpadded prefix
    padded = ghost_sums(delta, A, B, C, x, mask=mask)
    prefix = ghost_sums(delta[..., :-3], A, B[..., :-3], C[..., :-3], x[..., :-3])
    torch.testing.assert_close(padded, prefix, rtol=1e-12, atol=1e-12)


def test_ghost_rule_needs_its_sums():
    with pytest.raises(ValueError, match="GHOST sums"):
        state_importance(None, None, "ghost")


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_compress_with_ghost_importance_cuts_and_uses_the_scan(arch):
    from compressm_mamba import CompressConfig, compress_
    from compressm_mamba.app.train import build_model
    from compressm_mamba.cut.collect import GramianCollector
    from compressm_mamba.models.registry import find_mixers

    model = build_model("tiny", 16, arch=arch, seed=0)
    ids = torch.randint(0, 16, (2, 12), generator=torch.Generator().manual_seed(0))
    adapters = find_mixers(model)
    collector = GramianCollector(adapters, "mean_lti", ghost=True)
    with torch.no_grad(), collector:
        model(ids)
    scores = collector.ghost_scores()
    assert set(scores) == {a.name for a in adapters}
    for a in adapters:
        assert scores[a.name].shape == (a.channels, a.state_size) and (scores[a.name] >= 0).all()
    report = compress_(model, CompressConfig(mode="rank", rank=5, estimator="mean_lti", importance="ghost"), [ids])
    expected = {}
    for a in adapters:
        s = scores[a.name].sum(0)
        expected[a.name] = torch.sort(torch.argsort(s, descending=True, stable=True)[:5]).values
    for d in report.layers:
        assert d.state_after == 5
        torch.testing.assert_close(d.kept[0], expected[d.name])
    assert model(ids).logits.shape == (2, 12, 16)


def test_ghost_cannot_drive_balanced_reduction():
    from compressm_mamba import CompressConfig

    with pytest.raises(ValueError, match="ghost"):
        CompressConfig(importance="ghost", reduction="balanced")
