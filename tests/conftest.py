"""Shared fixtures: the real configs, shrunk for tests (CPU, no logger, tiny sizes)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(autouse=True)
def _few_threads():
    """2-core machines: one intra-op thread: tiny models gain little from two, and it avoids oversubscription."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_overrides(root, train_size=256, val_size=128, test_size=128, epochs=1) -> list[str]:
    """Overrides that make any embedded CLIP config run in seconds, writing into `root`."""
    return [
        "--trainer.logger=false",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.max_epochs={epochs}",
        f"--trainer.default_root_dir={root}",
        f"--data.init_args.train_size={train_size}",
        f"--data.init_args.val_size={val_size}",
        f"--data.init_args.test_size={test_size}",
        "--trainer.check_val_every_n_epoch=1",
    ]
