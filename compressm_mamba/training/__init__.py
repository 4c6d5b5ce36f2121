"""Training integration: the Trainer callback and data parallelism."""
