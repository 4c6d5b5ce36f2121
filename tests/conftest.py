import os
import sys

# Tests never download anything.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Make tests/helpers.py importable as `helpers` under --import-mode=importlib (which does not put
# the tests folder on sys.path); the repository root stays off sys.path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
