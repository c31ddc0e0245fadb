"""Command-line entry points (train.py, evaluate.py)."""
