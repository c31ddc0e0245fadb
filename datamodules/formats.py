"""Real on-disk data formats: image-caption CSV/TSV (CC3M-subset style) and ImageFolder classification
with a class-name file and/or a class map (ImageNet-val style). Items are dicts like the embedded world's.

Everything is checked when the data set is built (at ``setup``), never first in a training batch: CSV rows
(missing or extra fields, empty values, missing image files), class names against the class folders (by
name, never by position alone) and class folders without images."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from model_families.loading import read_json_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def image_transform(image_size: int) -> T.Compose:
    """Resize the shorter side to `image_size`, centre-crop, to a float tensor in [0, 1] (CLIP's eval view)."""
    return T.Compose(
        [
            T.ToImage(),
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(image_size),
            T.ToDtype(torch.float32, scale=True),
        ]
    )


def load_image(path: Path, where: str) -> Image.Image:
    """Open an image as RGB; a missing or unreadable file is an error naming it and `where` it came from."""
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image file not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{where}: image file is unreadable: {path} ({err})") from err


class CaptionCSV(Dataset):
    """Image-caption pairs from a CSV or TSV file (CC3M subsets: columns `filepath` and `title`).

    Every row is checked at construction: a row with more or fewer fields than the header, an empty image
    path or caption, or (with ``check_files``) a missing image file is an error naming the file, the line and
    the column. Line numbers count the header as line 1.

    Args:
        path: the .csv / .tsv file (separator from the extension unless `separator` is given).
        image_key / caption_key: column names of the image path and the caption.
        image_root: folder that relative image paths are relative to (default: the file's folder).
        image_size: output side in pixels.
        check_files: check at construction that every image file exists (errors name line and path).
    """

    def __init__(
        self,
        path: str | Path,
        image_key: str = "filepath",
        caption_key: str = "title",
        image_root: str | Path | None = None,
        image_size: int = 224,
        separator: str | None = None,
        check_files: bool = True,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"caption file not found: {self.path}")
        sep = separator or ("\t" if self.path.suffix.lower() == ".tsv" else ",")
        root = Path(image_root) if image_root is not None else self.path.parent
        self.images: list[str] = []
        self.captions: list[str] = []
        self.lines: list[int] = []
        with self.path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=sep)
            columns = reader.fieldnames or []
            for key, role in ((image_key, "image_key"), (caption_key, "caption_key")):
                if key not in columns:
                    raise ValueError(f"{self.path}: column {key!r} ({role}) not found; columns are {columns}")
            for row in reader:
                where = f"{self.path}, line {reader.line_num}"
                if None in row:
                    raise ValueError(
                        f"{where}: {len(columns) + len(row[None])} fields for the {len(columns)} columns "
                        f"{columns} (quote fields that contain the separator {sep!r})"
                    )
                for key, role in ((image_key, "image_key"), (caption_key, "caption_key")):
                    value = row[key]
                    if value is None or not value.strip():
                        state = (
                            "missing (the row has fewer fields than the header)" if value is None else "empty"
                        )
                        raise ValueError(f"{where}: column {key!r} ({role}) is {state}")
                image = row[image_key]
                self.images.append(image if Path(image).is_absolute() else str(root / image))
                self.captions.append(row[caption_key])
                self.lines.append(reader.line_num)
        if not self.captions:
            raise ValueError(f"{self.path}: no data rows after the header (an empty training split)")
        if check_files:
            for line, p in zip(self.lines, self.images, strict=True):
                if not Path(p).is_file():
                    raise FileNotFoundError(f"{self.path}, line {line}: image file not found: {p}")
        self.transform = image_transform(image_size)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        image = load_image(Path(self.images[index]), f"{self.path}, line {self.lines[index]}")
        return {"image": self.transform(image), "caption": self.captions[index], "label": -1, "index": index}


def normalise_class_name(name: str) -> str:
    """Lower case, with each run of ``_``, ``-`` and white space as one space: ``Great_White-shark`` and
    ``great white shark`` are the same class."""
    return " ".join(re.split(r"[\s_\-]+", name.strip().lower())).strip()


def read_class_names(path: str | Path) -> list[str]:
    """One class name per line (blank lines ignored), in label order; a name given twice is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-name file not found: {path}")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path}: no class names")
    _check_unique([normalise_class_name(n) for n in names], names, f"{path}: class names")
    return names


def read_class_map(path: str | Path) -> dict[str, str]:
    """Class folder -> class name, from a JSON object (``{"n01440764": "tench"}``), a two-column CSV/TSV
    (``folder,name``; separator from the extension) or a text file of ``folder name...`` lines (the first
    white-space separated word is the folder, the rest the name, as in ImageNet's ``LOC_synset_mapping.txt``).
    Entries for folders that are not present are allowed (one map for several subsets)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class map file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = read_json_file(path, what="class map")
        if not all(isinstance(v, str) and v.strip() for v in data.values()):
            raise ValueError(f"{path}: expected a JSON object of class folder -> non-empty class name")
        return {str(k): v.strip() for k, v in data.items()}
    pairs: list[tuple[int, list[str]]] = []
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",")
            pairs = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        pairs = [(i + 1, line.strip().split(maxsplit=1)) for i, line in enumerate(lines) if line.strip()]
    mapping: dict[str, str] = {}
    for line, row in pairs:
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise ValueError(
                f"{path}, line {line}: expected two fields, class folder and class name; got {row}"
            )
        folder, name = row[0].strip(), row[1].strip()
        if folder in mapping:
            raise ValueError(f"{path}, line {line}: class folder {folder!r} is mapped twice")
        mapping[folder] = name
    if not mapping:
        raise ValueError(f"{path}: no class folder -> class name entries")
    return mapping


def _check_unique(keys: list[str], shown: list[str], what: str) -> None:
    seen: dict[str, str] = {}
    for key, name in zip(keys, shown, strict=True):
        if key in seen:
            raise ValueError(
                f"{what}: {seen[key]!r} and {name!r} are the same name after normalising case, '_', '-' and spaces"
            )
        seen[key] = name


def _listing(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... ({len(items) - limit} more)' if len(items) > limit else ''}]"


def assign_class_names(
    root: Path, folders: list[str], class_names_file: str | Path | None, class_map_file: str | Path | None
) -> tuple[list[str], dict[str, int]]:
    """The class names in label order and the label of each class folder.

    - class-name file only: names are matched to folder names after normalising case, ``_``, ``-`` and
      spaces, in any order; the labels follow the file's order. Folders and names must match one to one.
    - class map only: each folder's name from the map; labels in sorted folder order.
    - both: names from the map, labels in the class-name file's order (the map's names must be the file's).
    """
    if class_names_file is None and class_map_file is None:
        raise ValueError(
            f"{root}: give a class-name file (data.class_names_file) or a class map (data.class_map_file)"
        )
    if class_map_file is not None:
        mapping = read_class_map(class_map_file)
        unmapped = [f for f in folders if f not in mapping]
        if unmapped:
            raise ValueError(
                f"{root}: class folders {_listing(unmapped)} have no entry in the class map {class_map_file} "
                f"(its folders: {_listing(sorted(mapping))})"
            )
        mapped = [mapping[f] for f in folders]
        _check_unique(
            [normalise_class_name(n) for n in mapped], mapped, f"{class_map_file}: class names of {root}"
        )
        if class_names_file is None:
            return mapped, {f: i for i, f in enumerate(folders)}
        keys = {f: mapping[f] for f in folders}
        source = f"the class map {class_map_file}"
    else:
        keys = {f: f for f in folders}
        source = "the folder names"
    names = read_class_names(class_names_file)
    index = {normalise_class_name(n): i for i, n in enumerate(names)}
    labels = {f: index.get(normalise_class_name(k)) for f, k in keys.items()}
    _check_unique([normalise_class_name(k) for k in keys.values()], list(keys.values()), f"{root}: {source}")
    unmatched_folders = [
        f if keys[f] == f else f"{f} ({keys[f]})" for f, label in labels.items() if label is None
    ]
    matched = {label for label in labels.values() if label is not None}
    unmatched_names = [n for i, n in enumerate(names) if i not in matched]
    if not unmatched_folders and not unmatched_names:
        return names, labels
    if class_map_file is None and len(unmatched_folders) == len(folders):
        raise ValueError(
            f"{root}: none of the {len(folders)} class folders {_listing(folders)} is a name in the class-name "
            f"file {class_names_file} {_listing(names)}. Folders named by id (e.g. WordNet ids n01440764) need "
            "data.class_map_file: a class folder -> class name file (JSON object, two-column CSV/TSV, or "
            "'folder name' lines). If the class-name file is in sorted folder order, write the map with "
            f"`paste <(ls {root}) {class_names_file} > class_map.tsv`"
        )
    raise ValueError(
        f"{root}: class folders and class names do not match (after normalising case, '_', '-' and spaces). "
        f"Folders without a name in {class_names_file}: {_listing(unmatched_folders)}; names without a folder: "
        f"{_listing(unmatched_names)}. All folders ({source}): {_listing(list(keys.values()))}; all names: "
        f"{_listing(names)}"
    )


def _visible(path: Path) -> bool:
    return not path.name.startswith(
        "."
    )  # hidden folders (.ipynb_checkpoints) and AppleDouble files (._x.jpg)


class ImageFolderClassification(Dataset):
    """ImageFolder layout (`root/<class folder>/<image>`) with human-readable class names.

    The names come from a class-name file (matched to the folder names, see :func:`assign_class_names`)
    and/or a class map (folder -> name). A class folder without images is an error naming it.
    Captions are `caption_template` filled with the class name, so the same data can fine-tune CLIP.
    """

    def __init__(
        self,
        root: str | Path,
        class_names_file: str | Path | None = None,
        image_size: int = 224,
        caption_template: str = "a photo of a {}.",
        max_per_class: int | None = None,
        class_map_file: str | Path | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        folders = sorted(p for p in self.root.iterdir() if p.is_dir() and _visible(p))
        if not folders:
            raise ValueError(f"{self.root}: no class sub-folders (expected root/<class>/<image files>)")
        self.class_names, labels = assign_class_names(
            self.root, [f.name for f in folders], class_names_file, class_map_file
        )
        self.folder_labels = labels
        self.samples: list[tuple[Path, int]] = []
        empty = []
        for folder in sorted(folders, key=lambda p: labels[p.name]):
            files = sorted(
                p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and _visible(p)
            )
            if not files:
                empty.append(folder.name)
            self.samples += [(p, labels[folder.name]) for p in files[:max_per_class]]
        if empty:
            raise ValueError(
                f"{self.root}: {len(empty)} of {len(folders)} class folders have no image files "
                f"({', '.join(IMAGE_EXTENSIONS)}): {_listing(empty)}"
            )
        self.caption_template = caption_template
        self.transform = image_transform(image_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        path, label = self.samples[index]
        image = load_image(path, f"{self.root}")
        caption = self.caption_template.format(self.class_names[label])
        return {"image": self.transform(image), "caption": caption, "label": label, "index": index}
