"""The reference walk-through (python -m compressm_mamba.app.demo) runs end to end on stdlib bytes."""

from compressm_mamba.app.demo import main


def test_reference_demo_runs(capsys):
    assert main(["--dim", "4", "--state", "8", "--seqlen", "32", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    for estimator in ("mean_lti", "frozen", "ltv"):
        assert f"{estimator} |" in out
