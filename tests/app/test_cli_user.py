"""The command line as a new user meets it: tokenizer and vocabulary errors, nothing lost, cheap checks
first, defaults and help in --help, progress on bench, docs that are in the repository."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("transformers")  # the tokenizers come with it

from user_helpers import tiny_checkpoint  # noqa: E402

from compressm_mamba.app import cli  # noqa: E402
from compressm_mamba.app.cli import main  # noqa: E402
from compressm_mamba.config import CompressConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--seq-len", "16", "--batches", "1", "--batch-size", "2", "--estimator", "mean_lti"]


def one_line_error(capsys, text):
    """The error is one line of ours (transformers' progress bars may share stderr), no traceback."""
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("compressm-mamba:")]
    assert len(ours) == 1 and text in ours[0] and "Traceback" not in err, err
    return ours[0]


def test_vocabulary_mismatch_is_an_error_before_training(tmp_path, licence_text, bpe_tokenizer, capsys):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", bpe_tokenizer, vocab=100)  # 400 tokens, 100 embeddings
    out = tmp_path / "run"
    assert main(["finetune", "--checkpoint", ckpt, "--data", str(licence_text), "--out", str(out), "--steps", "2"]) == 2
    one_line_error(capsys, "vocabulary mismatch: the tokenizer has 400 tokens but the model embeds 100")
    assert not (out / "trainer").exists() and not (out / "report.json").exists()


def test_a_checkpoint_without_tokenizer_asks_for_one(tmp_path, licence_text, capsys):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", None, vocab=300)
    assert main(["compress", ckpt, "--out", str(tmp_path / "small"), "--data", str(licence_text), "--mode", "rank",
                 "--rank", "4", *FAST]) == 2
    one_line_error(capsys, "has no tokenizer files: pass --tokenizer")
    assert main(["compress", ckpt, "--out", str(tmp_path / "small"), "--data", str(licence_text), "--mode", "rank",
                 "--rank", "4", "--tokenizer", "bytes", *FAST]) == 0
    assert (tmp_path / "small" / "tokenizer.json").is_file()  # the tokenizer used is saved with the result


def test_nothing_lost_and_normal_file_modes(tmp_path, licence_text, bpe_tokenizer, capsys):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", bpe_tokenizer)
    before = sorted(os.listdir(ckpt))
    args = ["--data", str(licence_text), "--mode", "rank", "--rank", "4", *FAST]
    for flags in ([], ["--overwrite"]):  # the input is never replaced, not even with --overwrite
        assert main(["compress", ckpt, "--out", ckpt, *args, *flags]) == 2
        one_line_error(capsys, "would replace the input")
    assert sorted(os.listdir(ckpt)) == before

    out = tmp_path / "mine"
    out.mkdir()
    (out / "NOTES.txt").write_text("my notes")
    assert main(["compress", ckpt, "--out", str(out), *args]) == 2
    one_line_error(capsys, "exists and is not empty")
    assert (out / "NOTES.txt").read_text() == "my notes"
    assert main(["finetune", "--preset", "tiny", "--out", str(out), "--steps", "1"]) == 2
    one_line_error(capsys, "exists and is not empty")

    old = os.umask(0o022)
    try:
        assert main(["compress", ckpt, "--out", str(tmp_path / "small"), *args]) == 0
    finally:
        os.umask(old)
    small = tmp_path / "small"
    assert stat.S_IMODE(small.stat().st_mode) == 0o755
    for f in small.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name


def test_rank_above_n_fails_before_any_calibration(tmp_path, bpe_tokenizer, monkeypatch, capsys):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", bpe_tokenizer, state_size=8)
    monkeypatch.setattr(cli, "_calibration", lambda *a: pytest.fail("calibration ran before the rank check"))
    assert main(["compress", ckpt, "--out", str(tmp_path / "x"), "--mode", "rank", "--rank", "12"]) == 2
    one_line_error(capsys, "--rank 12 is larger than backbone.layers.0.mixer's state size N=8")
    assert main(["analyze", ckpt, "--out", str(tmp_path / "s.png"), "--mode", "rank", "--rank", "12"]) == 2
    one_line_error(capsys, "--rank 12 is larger than")


def test_help_lists_defaults_from_compress_config_and_explains_the_main_options():
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    defaults = CompressConfig()
    for name in ("finetune", "compress", "analyze"):
        text = subs[name].format_help()
        for option in ("--tau", "--rank", "--out", "--data", "--tokenizer", "--text-column", "--overwrite"):
            action = next(a for a in subs[name]._actions if option in a.option_strings)
            assert action.help and len(action.help) > 10, (name, option)
        assert f"(default: {defaults.estimator})" in text and f"(default: {defaults.tau})" in text, name
        args = subs[name].parse_args(["ckpt", "--out", "x"] if name != "finetune" else [])
        for field in ("mode", "tau", "rank", "fraction", "estimator", "importance", "keep", "reduction", "gate", "seed"):
            assert getattr(args, field) == getattr(defaults, field), (name, field)
    finetune = subs["finetune"].parse_args([])
    assert (finetune.attempts, finetune.calibration_batches) == (defaults.attempts, defaults.calibration_batches)


def test_bench_reports_progress(tmp_path, capsys):
    script = tmp_path / "bench_sleep.py"
    script.write_text("import time\ntime.sleep(1.0)\nprint('table')\n")
    assert main(["bench", str(script), "--heartbeat", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "[1/1] bench_sleep.py: running" in out or "bench_sleep.py: running" in out
    assert "still running" in out and "done in" in out


def test_docs_live_in_the_repository():
    assert (ROOT / "docs" / "METHOD.md").is_file() and (ROOT / "docs" / "ENV.md").is_file()
    stale = []
    for path in [ROOT / "README.md", ROOT / "pyproject.toml", ROOT / "Makefile", *ROOT.glob("compressm_mamba/**/*.py"),
                 *ROOT.glob("docs/*.md"),
                 *ROOT.glob("bench/*.py"), *ROOT.glob("scripts/*"), *ROOT.glob("tests/**/*.py")]:
        text = path.read_text(encoding="utf-8", errors="replace")
        if ("shared/" + "METHOD.md") in text or ("shared/" + "ENV.md") in text:
            stale.append(str(path.relative_to(ROOT)))
    assert not stale, f"references to files outside the repository: {stale}"


def test_make_test_quick_is_a_subset():
    proc = subprocess.run(["make", "-n", "test-quick"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "pytest" in proc.stdout and "not slow" in proc.stdout
