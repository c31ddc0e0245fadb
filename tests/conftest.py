"""Shared fixtures: the real configs, shrunk for tests (CPU, no logger, tiny sizes)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(autouse=True)
def _few_threads():
    """2-core machines: one intra-op thread: tiny models gain little from two, and it avoids oversubscription."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """``scripts/<name>.py`` as a module (scripts are not a package; their folder goes on ``sys.path`` so
    that they can import each other, as when run from the command line)."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def identity(x: torch.Tensor) -> torch.Tensor:
    """A normalisation that does nothing (the toy InverTune models take [0, 1] images as they are)."""
    return x


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


class ToyLinearBackdoor(nn.Module):
    """A linear "backdoored" embedding over 4 classes for the InverTune tests: classes 0, 1, 3 follow
    the mean red, green and blue values; class 2 (the target) lights up with ``8 * backdoor_feature(x)
    - 0.8``, so a feature of 0.1 or more opens the backdoor. Subclasses define ``backdoor_feature``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        with torch.no_grad():
            self.proj.weight.copy_(
                torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 8.0], [0, 0, 1.0, 0]])
            )
            self.proj.bias.copy_(torch.tensor([0.0, 0.0, -0.8, 0.0]))

    def backdoor_feature(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        channel_means = x.mean(dim=(2, 3))
        return self.proj(torch.cat([channel_means, self.backdoor_feature(x)[:, None]], dim=1))


def quiet_trainer(root, **kwargs):
    """A CPU ``lightning.Trainer`` for tests: no logger, checkpoints, progress bar or model summary unless
    ``kwargs`` asks for them (any Trainer argument may be given)."""
    import lightning as L

    settings = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": root,
    }
    return L.Trainer(**{**settings, **kwargs})
