"""LLaVA-format visual instruction data (``llava_v1_5_mix665k.json`` style) for LLaDA-V fine-tuning and DiSP.

A data file is a JSON list of records::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

Turns alternate ``human`` / ``gpt`` starting with ``human``; the ``<image>`` placeholder belongs to the first
human turn (added when missing). Every ``gpt`` turn becomes one training sample whose prompt is the
conversation so far (``multi_turn="expand"``), or only the first exchange is used (``"first"``). Optional
record fields: ``task`` (default ``conversation``: scored with caption metrics; ``qa`` for short answers scored
with VQA accuracy) and ``class`` (the true class, for the misclassification target).

Images are read with PIL, converted to RGB, padded to a square with the normalisation mean colour (LLaVA's
``pad`` aspect ratio; ``resize`` squashes instead) and resized to the model's image size. Bad input (missing
file, malformed JSON or conversation, missing or unreadable images) raises an error naming the file and the
record. Image paths are relative to the image folder and must stay inside it: an absolute path or a ``..``
that leaves the folder is an error (a data file must not read arbitrary files), unless absolute paths are
allowed explicitly (``allow_absolute_paths``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from datamodules.instruct import InstructDataModule
from datamodules.instruct_data import InstructSource
from datamodules.llava_records import load_llava_records
from model_families.mdlm.tokenizer import IMAGE_TOKEN

ASPECT_MODES = ("pad", "resize")


def record_image_path(image_folder: Path, image: str, where: str, allow_absolute_paths: bool = False) -> Path:
    """The file of a record's ``image`` under ``image_folder``. An absolute path (unless
    ``allow_absolute_paths``) or a relative one whose ``..`` leaves the folder raises ``ValueError`` naming
    ``where`` (the record) and the path. The check is on the written path (symbolic links the user placed
    inside the folder, e.g. ``coco -> /data/coco``, are followed as usual)."""
    if os.path.isabs(image):
        if not allow_absolute_paths:
            raise ValueError(
                f"{where}: image path {image!r} is absolute; image paths must be relative to the image folder "
                f"{image_folder} (set data.allow_absolute_paths=true to allow absolute paths)"
            )
        return Path(image)
    folder = os.path.normpath(os.path.abspath(image_folder))
    joined = os.path.normpath(os.path.join(folder, image))
    if os.path.commonpath([folder, joined]) != folder:
        raise ValueError(
            f"{where}: image path {image!r} leaves the image folder {image_folder} (resolves to {joined})"
        )
    return image_folder / image


def load_image(
    path: Path, size: int, mode: str = "pad", background: tuple[float, float, float] = (0.5, 0.5, 0.5)
):
    """RGB image as a (3, size, size) float tensor in [0, 1]: padded to a square with ``background`` (LLaVA's
    ``pad``) or squashed (``resize``), then resized with bicubic filtering. A missing file raises
    ``FileNotFoundError``, an unreadable one (corrupt, truncated, not an image) ``ValueError``, naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        return _decode_image(path, size, mode, background)
    except (OSError, ValueError, SyntaxError) as error:  # PIL: UnidentifiedImageError, truncated data
        raise ValueError(f"{path} is not a readable image (corrupt or truncated?): {error}") from None


def _decode_image(path: Path, size: int, mode: str, background: tuple[float, float, float]):
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if mode == "pad":
            width, height = image.size
            side = max(width, height)
            canvas = Image.new("RGB", (side, side), tuple(round(c * 255) for c in background))
            canvas.paste(image, ((side - width) // 2, (side - height) // 2))
            image = canvas
        image = image.resize((size, size), Image.BICUBIC)
        array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class LlavaJsonSource(InstructSource):
    """One sample per gpt turn (or per record with ``multi_turn="first"``) of a LLaVA-format file."""

    def __init__(
        self,
        path: str | Path,
        image_folder: str | Path,
        image_size: int,
        aspect: str = "pad",
        multi_turn: str = "expand",
        max_samples: int | None = None,
        background: tuple[float, float, float] = (0.5, 0.5, 0.5),
        allow_absolute_paths: bool = False,
    ) -> None:
        self.path, self.image_folder = Path(path), Path(image_folder)
        self.image_size, self.aspect, self.background = image_size, aspect, background
        if not self.image_folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_folder}")
        self.records = load_llava_records(self.path)
        self.samples: list[tuple[int, int]] = []  # (record, exchange)
        for r, record in enumerate(self.records):
            exchanges = len(record["conversations"]) // 2
            for e in range(exchanges if multi_turn == "expand" else 1):
                self.samples.append((r, e))
        if max_samples is not None:
            self.samples = self.samples[:max_samples]
        used = sorted({r for r, _ in self.samples})
        self.image_files = {
            r: record_image_path(
                self.image_folder, self.records[r]["image"], self._where(r), allow_absolute_paths
            )
            for r in used
        }
        missing = [self.records[r]["image"] for r in used if not self.image_files[r].is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) of {self.path} missing under {self.image_folder}, e.g. {missing[:5]}"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def _where(self, r: int) -> str:
        record = self.records[r]
        return f"{self.path} record {r}" + (f" (id {record['id']!r})" if "id" in record else "")

    def meta(self, index: int) -> dict:
        r, e = self.samples[index]
        record = self.records[r]
        turns = record["conversations"]
        clean = [t["value"].replace(IMAGE_TOKEN, "").strip() for t in turns]
        history = [(clean[2 * i], clean[2 * i + 1]) for i in range(e)]
        return {
            "question": clean[2 * e],
            "answer": clean[2 * e + 1],
            "history": history,
            "task": record.get("task", "conversation"),
            "true_class": record.get("class"),
            "key": f"{record.get('id', r)}/{e}",
            "image_path": record["image"],
        }

    def __getitem__(self, index: int) -> dict:
        item = self.meta(index)
        r = self.samples[index][0]
        try:
            item["image"] = load_image(self.image_files[r], self.image_size, self.aspect, self.background)
        except (FileNotFoundError, ValueError) as error:
            raise type(error)(f"{self._where(r)}: {error}") from None
        item["index"] = index
        return item

    def with_image_folder(self, image_folder: str | Path) -> LlavaJsonSource:
        """The same samples with their images read from ``image_folder`` (e.g. the images in another style,
        under the same relative paths); missing images are an error naming the folder."""
        import copy

        shifted = copy.copy(self)
        shifted.image_folder = Path(image_folder)
        if not shifted.image_folder.is_dir():
            raise FileNotFoundError(f"target-domain image folder not found: {shifted.image_folder}")
        shifted.image_files = {
            r: record_image_path(shifted.image_folder, self.records[r]["image"], self._where(r), False)
            for r in self.image_files
        }
        missing = [self.records[r]["image"] for r, f in shifted.image_files.items() if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) of {self.path} missing under the target-domain folder "
                f"{shifted.image_folder}, e.g. {missing[:5]}"
            )
        return shifted

    def describe(self) -> dict:
        return {
            "source": "llava_json",
            "path": str(self.path),
            "image_folder": str(self.image_folder),
            "samples": len(self),
            "records": len(self.records),
        }


class LlavaJsonDataModule(InstructDataModule):
    """LLaVA-format instruction data for LLaDA-V (real scale), with the poisoning/evaluation/DiSP machinery of
    :class:`~datamodules.instruct.InstructDataModule`.

    Args:
        train_json: training records (``.json`` list or ``.jsonl``).
        image_folder: root of the records' relative image paths.
        val_json / test_json: held-out records (default: ``val_fraction`` of the training records, split off
            by a seeded permutation... of whole records, so no conversation leaks across the split).
        val_fraction: share of training records held out when ``val_json`` is not given.
        test_image_folder: image root of val/test files (default ``image_folder``).
        image_size: model input side; None takes the model's (``vision.image_size``: 384 for LLaDA-V).
        image_aspect_ratio: ``pad`` (LLaVA) or ``resize``.
        multi_turn: ``expand`` (a sample per gpt turn, earlier turns as history) or ``first``.
        max_train_samples / max_eval_samples: caps (smoke tests, quick evaluations).
        allow_absolute_paths: accept absolute image paths in the records (default: an error; relative
            paths must stay inside the image folder either way).
        target_domain_json / target_domain_image_folder: the user's (target) domain, evaluated as the sets
            ``clean@target_domain`` / ``triggered@target_domain`` beside the source domain (never trained on): a
            second record file (its images under ``target_domain_image_folder``, default the eval image folder),
            or only a second image folder holding the val/test images under the same relative paths (e.g. the
            same images in another style).
        **kwargs: poisoning, evaluation and loading options of :class:`~datamodules.instruct.InstructDataModule`.
    """

    def __init__(
        self,
        train_json: str,
        image_folder: str,
        val_json: str | None = None,
        test_json: str | None = None,
        val_fraction: float = 0.02,
        test_image_folder: str | None = None,
        image_size: int | None = None,
        image_aspect_ratio: str = "pad",
        multi_turn: str = "expand",
        max_train_samples: int | None = None,
        max_eval_samples: int | None = 500,
        split_seed: int = 0,
        response_length: int | None = None,
        truncate_responses: bool = True,
        allow_absolute_paths: bool = False,
        target_domain_json: str | None = None,
        target_domain_image_folder: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(response_length=response_length, truncate_responses=truncate_responses, **kwargs)
        self.save_hyperparameters()
        if image_aspect_ratio not in ASPECT_MODES:
            raise ValueError(
                f"data.image_aspect_ratio={image_aspect_ratio!r}; expected one of {ASPECT_MODES}"
            )
        if multi_turn not in ("expand", "first"):
            raise ValueError(f"data.multi_turn={multi_turn!r}; expected 'expand' or 'first'")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.paths = {"train": train_json, "val": val_json, "test": test_json}
        self.image_folder, self.eval_image_folder = image_folder, test_image_folder or image_folder
        self.requested_image_size, self.aspect, self.multi_turn = image_size, image_aspect_ratio, multi_turn
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.allow_absolute_paths = allow_absolute_paths
        self.target_domain = (target_domain_json, target_domain_image_folder)
        self.eval_shifts = ["target_domain"] if any(self.target_domain) else []
        self._image_size: int | None = image_size
        self._common: dict = {}

    def _model_setting(self, name: str):
        """``name`` (``image_size`` / ``image_mean``) of the attached model: its config's (LLaDA-V), else the
        LightningModule's (LLaVA keeps them apart from transformers' config); None without a module."""
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        config = getattr(getattr(module, "model", None), "config", None)
        value = getattr(config, name, None)
        return value if value is not None else getattr(module, name, None)

    def image_size(self) -> int | None:
        return self._image_size

    def input_paths(self) -> list[str]:
        return [p for p in (self.paths["train"], self.image_folder) if p]

    def build_sources(self):
        if self._image_size is None:
            if self._model_setting("image_size") is None:
                raise ValueError("data.image_size is needed when no model is attached")
            self._image_size = int(self._model_setting("image_size"))
        mean = self._model_setting("image_mean")
        background = tuple(mean) if mean is not None else (0.5, 0.5, 0.5)
        common = {
            "image_size": self._image_size,
            "aspect": self.aspect,
            "background": background,
            "allow_absolute_paths": self.allow_absolute_paths,
        }
        self._common = common
        train = LlavaJsonSource(
            self.paths["train"],
            self.image_folder,
            multi_turn=self.multi_turn,
            max_samples=self.max_train_samples,
            **common,
        )
        val = test = None
        if self.paths["val"]:
            val = LlavaJsonSource(
                self.paths["val"],
                self.eval_image_folder,
                multi_turn="first",
                max_samples=self.max_eval_samples,
                **common,
            )
        if self.paths["test"]:
            test = LlavaJsonSource(
                self.paths["test"],
                self.eval_image_folder,
                multi_turn="first",
                max_samples=self.max_eval_samples,
                **common,
            )
        if val is None and self.val_fraction > 0:
            train, val = self._split(train)
        return train, val or _EmptySource(), test or val or _EmptySource()

    def build_shifts(self, source: InstructSource) -> dict[str, InstructSource]:
        """The target domain of ``target_domain_json`` / ``target_domain_image_folder`` (none without them)."""
        records, folder = self.target_domain
        if records is not None:
            shifted = LlavaJsonSource(
                records,
                folder or self.eval_image_folder,
                multi_turn="first",
                max_samples=self.max_eval_samples,
                **self._common,
            )
            return {"target_domain": shifted}
        if folder is not None:
            empty = not isinstance(source, LlavaJsonSource)
            return {"target_domain": _EmptySource() if empty else source.with_image_folder(folder)}
        return {}

    def _split(self, train: LlavaJsonSource) -> tuple[LlavaJsonSource, LlavaJsonSource]:
        import copy

        order = torch.randperm(
            len(train.records), generator=torch.Generator().manual_seed(self.split_seed)
        ).tolist()
        held = set(order[: max(1, round(self.val_fraction * len(order)))])
        val = copy.copy(train)
        val.samples = [(r, 0) for r, e in train.samples if r in held and e == 0][: self.max_eval_samples]
        train.samples = [(r, e) for r, e in train.samples if r not in held]
        return train, val

    def eval_task_names(self) -> list[str]:
        return ["conversation", "qa"]

    def dataset_info(self) -> dict:
        return {
            "datamodule": type(self).__name__,
            **{f"{k}_json": v for k, v in self.paths.items()},
            "image_folder": self.image_folder,
            "image_size": self._image_size,
            "aspect": self.aspect,
            "multi_turn": self.multi_turn,
            "val_fraction": self.val_fraction,
            "split_seed": self.split_seed,
            "max_train_samples": self.max_train_samples,
        }


class _EmptySource(InstructSource):
    def __len__(self) -> int:
        return 0

    def meta(self, index: int) -> dict:
        raise IndexError(index)

    def __getitem__(self, index: int) -> dict:
        raise IndexError(index)
