#!/usr/bin/env python
"""Evaluate one or more checkpoints on clean and triggered data (see mmbackdoor_cli/evaluate.py)."""

from mmbackdoor_cli.evaluate import main

if __name__ == "__main__":
    main()
