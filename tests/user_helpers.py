"""Helpers of the user-run tests (tests/app/): tiny checkpoints saved with a tokenizer."""

import torch


def tiny_checkpoint(path, tokenizer, *, vocab=None, arch="mamba", state_size=8):
    """A tiny Mamba / Mamba2 checkpoint built from config, saved with ``tokenizer`` (if any)."""
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    vocab = vocab or len(tokenizer)
    ids = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)
    if arch == "mamba":
        model = MambaForCausalLM(MambaConfig(hidden_size=16, state_size=state_size, num_hidden_layers=2,
                                             vocab_size=vocab, **ids))
    else:
        model = Mamba2ForCausalLM(Mamba2Config(hidden_size=16, state_size=state_size, num_hidden_layers=2,
                                               vocab_size=vocab, head_dim=8, num_heads=4, n_groups=1, expand=2,
                                               chunk_size=16, **ids))
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return str(path)
