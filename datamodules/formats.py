"""Real on-disk data formats: image-caption CSV/TSV (CC3M-subset style) and ImageFolder classification
with a class-name file (ImageNet-val style). Items are dicts like the embedded world's."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

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

    Args:
        path: the .csv / .tsv file (separator from the extension unless `separator` is given).
        image_key / caption_key: column names of the image path and the caption.
        image_root: folder that relative image paths are relative to (default: the file's folder).
        image_size: output side in pixels.
        check_files: check at construction that every image file exists (errors name row and path).
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
        with self.path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=sep)
            columns = reader.fieldnames or []
            for key, role in ((image_key, "image_key"), (caption_key, "caption_key")):
                if key not in columns:
                    raise ValueError(f"{self.path}: column {key!r} ({role}) not found; columns are {columns}")
            rows = [(r[image_key], r[caption_key]) for r in reader]
        root = Path(image_root) if image_root is not None else self.path.parent
        self.images = [p if Path(p).is_absolute() else str(root / p) for p, _ in rows]
        self.captions = [c for _, c in rows]
        if check_files:
            for row, p in enumerate(self.images):
                if not Path(p).is_file():
                    raise FileNotFoundError(f"{self.path}, row {row + 2}: image file not found: {p}")
        self.transform = image_transform(image_size)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        image = load_image(Path(self.images[index]), f"{self.path}, row {index + 2}")
        return {"image": self.transform(image), "caption": self.captions[index], "label": -1, "index": index}


def read_class_names(path: str | Path, expected: int | None = None) -> list[str]:
    """One class name per line (blank lines ignored), in the sorted order of the class folders."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-name file not found: {path}")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if expected is not None and len(names) != expected:
        raise ValueError(
            f"{path}: {len(names)} class names for {expected} class folders (one name per folder, in sorted folder order)"
        )
    return names


class ImageFolderClassification(Dataset):
    """ImageFolder layout (`root/<class folder>/<image>`) with human-readable names from a class-name file.

    Captions are `caption_template` filled with the class name, so the same data can fine-tune CLIP.
    """

    def __init__(
        self,
        root: str | Path,
        class_names_file: str | Path,
        image_size: int = 224,
        caption_template: str = "a photo of a {}.",
        max_per_class: int | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        folders = sorted(p for p in self.root.iterdir() if p.is_dir())
        if not folders:
            raise ValueError(f"{self.root}: no class sub-folders (expected root/<class>/<image files>)")
        self.class_names = read_class_names(class_names_file, expected=len(folders))
        self.samples: list[tuple[Path, int]] = []
        for label, folder in enumerate(folders):
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            self.samples += [(p, label) for p in files[:max_per_class]]
        self.caption_template = caption_template
        self.transform = image_transform(image_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        path, label = self.samples[index]
        image = load_image(path, f"{self.root}")
        caption = self.caption_template.format(self.class_names[label])
        return {"image": self.transform(image), "caption": caption, "label": label, "index": index}
