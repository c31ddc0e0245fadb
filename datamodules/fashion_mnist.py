"""Fashion-MNIST as the project's real-data world: read the IDX files Debian ships (``dataset-fashion-mnist``),
from their folder or from the package's ``.deb``, and split them into a captioned training set, the
defender's captioned clean set, and labelled validation / test folders (``scripts/build_fashion_mnist.py``).

Everything is framework-free and checked: an IDX file with a wrong magic number, wrong dimensions or a size
that does not match its header is an error naming the file; a ``.deb`` without the files is an error naming
the package and what it holds.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_families.clip.zero_shot import TEMPLATE_SETS

CLASS_NAMES: tuple[str, ...] = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
"""The 10 labels in the official order (README: T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt,
Sneaker, Bag, Ankle boot), written as caption words."""

CAPTION_TEMPLATES: tuple[str, ...] = TEMPLATE_SETS["product"]
"""Training captions use the same templates as zero-shot evaluation in this world (``product``)."""

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
APT_HINT = (
    "install it with `sudo apt-get install dataset-fashion-mnist` (files in "
    f"{DEFAULT_SOURCE}), or without root `apt-get download dataset-fashion-mnist` and pass the .deb as --source"
)
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_MAGIC, LABEL_MAGIC = 0x00000803, 0x00000801  # unsigned bytes, 3 dims / 1 dim


@dataclass(frozen=True)
class Split:
    """One official split: ``images`` N x 28 x 28 uint8, ``labels`` N int64 in [0, 10)."""

    images: np.ndarray
    labels: np.ndarray


def parse_idx(data: bytes, name: str, magic: int) -> np.ndarray:
    """Decode one gzip-compressed IDX file (``data``, named ``name`` in errors) with the expected ``magic``."""
    try:
        raw = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{name}: not a complete gzip file ({err})") from err
    if len(raw) < 4:
        raise ValueError(f"{name}: {len(raw)} bytes, shorter than the 4-byte IDX magic number")
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise ValueError(
            f"{name}: IDX magic number 0x{found:08x}, expected 0x{magic:08x} "
            f"({'images, 3 dimensions' if magic == IMAGE_MAGIC else 'labels, 1 dimension'}, unsigned bytes)"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{name}: truncated header ({len(raw)} bytes, expected at least {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise ValueError(
            f"{name}: {len(raw)} bytes after decompression, but the header's dimensions {list(dims)} need "
            f"{expected} (a truncated or padded file)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def decode_split(images_gz: bytes, labels_gz: bytes, names: tuple[str, str]) -> Split:
    """Both files of one split; their counts, the 28 x 28 size and the label range are checked."""
    images = parse_idx(images_gz, names[0], IMAGE_MAGIC)
    labels = parse_idx(labels_gz, names[1], LABEL_MAGIC).astype(np.int64)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{names[0]}: images are {images.shape[1]} x {images.shape[2]}, expected 28 x 28")
    if len(images) != len(labels):
        raise ValueError(f"{names[0]} holds {len(images)} images but {names[1]} {len(labels)} labels")
    if len(labels) and labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"{names[1]}: label {labels.max()} outside 0..{len(CLASS_NAMES) - 1}")
    return Split(images, labels)


def read_ar_members(path: Path) -> dict[str, bytes]:
    """The members of an ``ar`` archive (a ``.deb``): name -> bytes."""
    data = path.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise ValueError(f"{path}: not a .deb (ar archive): missing the '!<arch>' header")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        if header[58:60] != b"`\n":
            raise ValueError(f"{path}: corrupt ar member header at byte {pos}")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = data[pos + 60 : pos + 60 + size]
        if len(body) != size:
            raise ValueError(f"{path}: member {name!r} truncated ({len(body)} of {size} bytes)")
        members[name] = body
        pos += 60 + size + (size % 2)
    return members


def read_deb(path: Path) -> dict[str, bytes]:
    """The four IDX ``.gz`` files (by base name) from the package's ``data.tar.xz`` (or ``.gz``)."""
    members = read_ar_members(path)
    tar_name = next((n for n in members if n.startswith("data.tar")), None)
    if tar_name is None:
        raise ValueError(f"{path}: no data.tar.* member (members: {sorted(members)})")
    if tar_name not in ("data.tar.xz", "data.tar.gz", "data.tar"):
        raise ValueError(f"{path}: {tar_name} is not readable here (expected data.tar.xz or data.tar.gz)")
    wanted = {n for pair in FILES.values() for n in pair}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(members[tar_name]), mode="r:*") as tar:
            for member in tar.getmembers():
                base = Path(member.name).name
                if member.isfile() and base in wanted:
                    found[base] = tar.extractfile(member).read()
    except (tarfile.TarError, lzma.LZMAError, EOFError) as err:
        raise ValueError(f"{path}: {tar_name} is unreadable ({err})") from err
    missing = sorted(wanted - set(found))
    if missing:
        raise ValueError(f"{path}: the package holds none of {missing} (is it dataset-fashion-mnist?)")
    return found


def read_source(source: str | Path) -> tuple[dict[str, bytes], dict[str, str]]:
    """The four IDX files' bytes and a record of where they came from (path and sha256 of each file)."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"Fashion-MNIST source not found: {source}; {APT_HINT}")
    if source.is_file():
        files = read_deb(source)
        record = {"deb": str(source), "deb_sha256": hashlib.sha256(source.read_bytes()).hexdigest()}
    else:
        files = {}
        for name in (n for pair in FILES.values() for n in pair):
            if not (source / name).is_file():
                raise FileNotFoundError(
                    f"{source / name} not found (Fashion-MNIST source folder); {APT_HINT}"
                )
            files[name] = (source / name).read_bytes()
        record = {"folder": str(source)}
    record.update({name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())})
    return files, record


def load_splits(files: dict[str, bytes]) -> dict[str, Split]:
    """``{"train": ..., "t10k": ...}`` from the four files' bytes."""
    return {split: decode_split(files[a], files[b], (a, b)) for split, (a, b) in FILES.items()}


def stratified_indices(labels: np.ndarray, counts: dict[str, int], rng: np.random.Generator, what: str):
    """Disjoint index sets per part (``counts``: part -> images per class), drawn per class from ``rng``."""
    out: dict[str, list[int]] = {part: [] for part in counts}
    for c in range(len(CLASS_NAMES)):
        pool = rng.permutation(np.flatnonzero(labels == c))
        need = sum(counts.values())
        if len(pool) < need:
            raise ValueError(f"{what}: class {CLASS_NAMES[c]!r} has {len(pool)} images, {need} are needed")
        start = 0
        for part, n in counts.items():
            out[part] += pool[start : start + n].tolist()
            start += n
    return {part: sorted(idx) for part, idx in out.items()}


def folder_name(class_name: str) -> str:
    """Class folder of a class (``ankle boot`` -> ``ankle_boot``); the datamodules match it to the name."""
    return class_name.replace(" ", "_")


def caption(class_name: str, rng: np.random.Generator) -> str:
    """One training caption: a template drawn from ``rng`` filled with the class name."""
    return CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(class_name)
