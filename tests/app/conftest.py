"""Fixtures of a new user's run: a real (BPE) tokenizer trained offline, text nobody here wrote."""

import os

import pytest

LICENCE = "/usr/share/common-licenses/GPL-3"


@pytest.fixture(scope="session")
def licence_text(tmp_path_factory):
    """The GNU GPL 3 text (the system's copy when there is one), as a file named without a suffix."""
    if os.path.isfile(LICENCE):
        text = open(LICENCE, encoding="utf-8").read()
    else:  # a system without licence texts: Python's own sources are text nobody here wrote either
        import sysconfig

        text = open(os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py"), encoding="utf-8").read()
    path = tmp_path_factory.mktemp("text") / "GPL-3"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def bpe_tokenizer(licence_text):
    """A byte-level BPE tokenizer with a vocabulary of 400 (> 256, as real ones are), trained in a second."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(licence_text)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")
