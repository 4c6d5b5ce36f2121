"""The application: command line, fine-tuning, demo, data and plots."""
