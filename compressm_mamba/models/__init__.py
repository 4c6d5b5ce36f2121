"""Model-family adapters: what each SSM layer is, how its states group, how to cut it; the drop-in mixers."""
