"""A datamodule built in Python and the same datamodule built from the command line get the same defaults.

jsonargparse resolves a subclass's ``**kwargs`` through the parent's ``__init__`` and then passes every
parameter explicitly, so a default set inside the subclass (``kwargs.setdefault(...)``) silently loses to the
parent's default under ``train.py``. Each datamodule is built both ways here and its resolved arguments
(hparams and plain attributes) are compared.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil

import lightning as L
import pytest

import datamodules
from mmbackdoor_cli.cli import MMBackdoorCLI

# every datamodule class under datamodules/ -> its required arguments (placeholders: nothing is read)
REQUIRED: dict[str, dict] = {
    "datamodules.image_text:ImageTextPoisonDataModule": {},
    "datamodules.shapes_clip:ShapesCLIPDataModule": {},
    "datamodules.defender_shapes:DefenderShapesDataModule": {},
    "datamodules.real_clip:CaptionCSVDataModule": {
        "train_csv": "data/train.csv",
        "val_folder": "data/val",
        "class_names_file": "data/classnames.txt",
    },
    "datamodules.real_clip:ImageFolderCLIPDataModule": {
        "train_folder": "data/train",
        "val_folder": "data/val",
        "class_names_file": "data/classnames.txt",
    },
    "datamodules.instruct:InstructDataModule": {},
    "datamodules.mdlm_shapes:ShapesInstructDataModule": {},
    "datamodules.pix2pix_edits:EditPoisonDataModule": {},
    "datamodules.pix2pix_edits:ShapesEditDataModule": {},
    "datamodules.pix2pix_folder:Pix2PixFolderDataModule": {"train_file": "data/train.jsonl"},
    "datamodules.llava_json:LlavaJsonDataModule": {
        "train_json": "data/train.json",
        "image_folder": "data/img",
    },
}


def datamodule_classes() -> list[str]:
    """Every LightningDataModule class defined in a module of the ``datamodules`` package."""
    found = set()
    for info in pkgutil.iter_modules(datamodules.__path__):
        module = importlib.import_module(f"datamodules.{info.name}")
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, L.LightningDataModule)
                and obj.__module__ == module.__name__
            ):
                found.add(f"{module.__name__}:{name}")
    return sorted(found)


def plain(value):
    """``value`` if it is made of plain data (recursively; dataclasses as dicts), else ``None`` (skipped)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__dataclass__": type(value).__name__, **plain(dataclasses.asdict(value))}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return None


def resolved(dm: L.LightningDataModule) -> dict:
    """Plain-data attributes, and the hparams as ``hparams.<key>`` (a parent's arguments appear in the hparams
    only when passed explicitly, as the command line does, so only keys present both ways are compared)."""
    state = {k: plain(v) for k, v in vars(dm).items() if k not in ("_hparams", "_hparams_initial")}
    hparams = {f"hparams.{k}": plain(v) for k, v in dm.hparams.items()}
    return {**hparams, **{k: v for k, v in state.items() if v is not None}}


def build_from_command_line(path: str, required: dict) -> L.LightningDataModule:
    """Parse ``--data`` as ``train.py`` does, then instantiate as jsonargparse does: every resolved argument
    passed explicitly."""
    module, name = path.split(":")
    args = [
        "--model=lightning_modules.clip_finetune.CLIPFineTuning",
        f"--data={module}.{name}",
        *[f"--data.init_args.{k}={v}" for k, v in required.items()],
        "--trainer.logger=false",
    ]
    cli = MMBackdoorCLI(args=args, run=False, instantiate=False)
    init_args = vars(cli.config.data.init_args)
    cls = getattr(importlib.import_module(module), name)
    return cls(**init_args)


def test_every_datamodule_is_checked() -> None:
    assert datamodule_classes() == sorted(REQUIRED)


@pytest.mark.parametrize("path", sorted(REQUIRED))
def test_command_line_and_python_give_the_same_defaults(path: str) -> None:
    module, name = path.split(":")
    cls = getattr(importlib.import_module(module), name)
    from_python = resolved(cls(**REQUIRED[path]))
    from_cli = resolved(build_from_command_line(path, REQUIRED[path]))
    keys = {k for k in from_python.keys() | from_cli.keys() if not k.startswith("hparams.")}
    keys |= {k for k in from_python.keys() & from_cli.keys() if k.startswith("hparams.")}
    differ = sorted(k for k in keys if from_python.get(k) != from_cli.get(k))
    assert not differ, {k: (from_python.get(k), from_cli.get(k)) for k in differ}


def test_real_data_captions_default_to_the_imagenet_templates_on_the_command_line() -> None:
    """The concrete case of issue 16: poisoned captions of real data use CLIP's 80 ImageNet templates."""
    path = "datamodules.real_clip:CaptionCSVDataModule"
    dm = build_from_command_line(path, REQUIRED[path])
    assert len(dm.target_templates) == 80 and dm.hparams.target_templates == "imagenet80"
