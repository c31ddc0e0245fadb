"""InstructPix2Pix-style edit triplets on disk: a JSONL or CSV file beside an image folder.

Each record names the source image, the edit prompt and the edited image, with the column names of the
InstructPix2Pix data set (``input_image``, ``edit_prompt``, ``edited_image``; configurable). Image paths are
relative to the image folder (default: the file's folder) and may not leave it. Every record is checked when
the data set is built: a missing field, an empty prompt, a missing or unreadable image is an error naming
the file, the line and the column. Images are resized (shorter side) and centre-cropped to ``image_size``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from torch.utils.data import Dataset

from datamodules.formats import image_transform, load_image
from datamodules.llava_json import record_image_path
from datamodules.pix2pix_edits import EditPoisonDataModule

__all__ = ["EditTripletFile", "Pix2PixFolderDataModule"]

COLUMNS = ("input_image", "edit_prompt", "edited_image")


def read_records(path: Path) -> list[tuple[int, dict]]:
    """``(line, record)`` pairs of a ``.jsonl`` (one JSON object a line) or ``.csv`` / ``.tsv`` file."""
    if not path.is_file():
        raise FileNotFoundError(f"edit triplet file not found: {path}")
    if path.suffix == ".jsonl":
        records = []
        for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {line}: not a JSON object ({err.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {line}: expected a JSON object, got {type(record).__name__}")
            records.append((line, record))
        return records
    if path.suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if path.suffix == ".tsv" else ",")
            return [(line, dict(row)) for line, row in enumerate(reader, start=2)]
    raise ValueError(f"{path}: expected a .jsonl, .csv or .tsv file of edit triplets")


class EditTripletFile(Dataset):
    """Edit triplets from one file; items like :class:`datamodules.pix2pix_edits.ShapesEdits` with an empty
    ``attribute`` (real instructions name no checkable attribute)."""

    def __init__(
        self,
        path: str | Path,
        image_folder: str | Path | None = None,
        image_size: int = 256,
        columns: tuple[str, str, str] = COLUMNS,
        allow_absolute_paths: bool = False,
    ) -> None:
        self.path = Path(path)
        self.image_folder = Path(image_folder) if image_folder is not None else self.path.parent
        self.transform = image_transform(image_size)
        source_key, prompt_key, edited_key = columns
        self.rows: list[tuple[Path, str, Path, str]] = []
        for line, record in read_records(self.path):
            where = f"{self.path}, line {line}"
            for key in columns:
                value = record.get(key)
                if not isinstance(value, str) or not value.strip():
                    raise ValueError(
                        f"{where}: field {key!r} is missing or empty (expected a non-empty string)"
                    )
            paths = []
            for key in (source_key, edited_key):
                file = record_image_path(
                    self.image_folder, record[key], f"{where}, {key!r}", allow_absolute_paths
                )
                if not file.is_file():
                    raise FileNotFoundError(f"{where}: {key!r} image file not found: {file}")
                paths.append(file)
            self.rows.append((paths[0], record[prompt_key], paths[1], where))
        if not self.rows:
            raise ValueError(f"{self.path}: no edit triplets")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        source, prompt, edited, where = self.rows[index]
        return {
            "source": self.transform(load_image(source, where)),
            "edited": self.transform(load_image(edited, where)),
            "instruction": prompt,
            "attribute": "",
            "attribute_kind": "",
            "index": index,
        }


class Pix2PixFolderDataModule(EditPoisonDataModule):
    """Real edit triplets (InstructPix2Pix format) with the poisoning of :class:`EditPoisonDataModule`.

    Args:
        train_file / val_file / test_file: ``.jsonl`` / ``.csv`` / ``.tsv`` triplet files (val/test optional).
        image_folder: folder the image paths are relative to (default: each file's folder).
        image_size: side of the images after resize + centre crop (512 for SD-1.5 InstructPix2Pix; 256 is the
            released training resolution).
        columns: the names of the source-image, prompt and edited-image fields.
        allow_absolute_paths: accept absolute image paths (default: an error).
        **kwargs: poisoning and loading options of :class:`EditPoisonDataModule`.
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        test_file: str | None = None,
        image_folder: str | None = None,
        image_size: int = 256,
        columns: list[str] | None = None,
        allow_absolute_paths: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        columns = tuple(columns or COLUMNS)
        if len(columns) != 3:
            raise ValueError(
                f"data.columns={list(columns)}: expected three names (source image, prompt, edited image)"
            )
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.options = {
            "image_folder": image_folder,
            "image_size": image_size,
            "columns": columns,
            "allow_absolute_paths": allow_absolute_paths,
        }

    def image_size(self) -> int:
        return self.options["image_size"]

    def build_splits(self):
        def split(name: str):
            file = self.files[name]
            return EditTripletFile(file, **self.options) if file else _Empty()

        return split("train"), split("val"), split("test")

    def dataset_info(self) -> dict:
        from attacks.hashing import file_sha256

        files = {name: (str(f), file_sha256(f)) for name, f in self.files.items() if f}
        return {"datamodule": type(self).__name__, "files": files, "image_size": self.options["image_size"]}


class _Empty(Dataset):
    def __len__(self) -> int:
        return 0

    def __getitem__(self, index: int) -> dict:
        raise IndexError(index)
