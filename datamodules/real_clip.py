"""Real-data CLIP datamodules: CC3M-style caption CSV for training, ImageNet-style folders for zero-shot."""

from __future__ import annotations

from datamodules.formats import CaptionCSV, ImageFolderClassification
from datamodules.image_text import ImageTextPoisonDataModule


def require_class_names(class_names_file: str | None, class_map_file: str | None) -> None:
    """The class folders need names: from a class-name file, a class map, or both."""
    if class_names_file is None and class_map_file is None:
        raise ValueError(
            "give data.class_names_file (class names, matched to the class folder names) or "
            "data.class_map_file (class folder -> class name, for folders named by id such as n01440764)"
        )


def same_classes(splits: dict[str, ImageFolderClassification]) -> list[str]:
    """The class names shared by every split (labels index one list); splits with other classes are an error."""
    (first, reference), *others = splits.items()
    for name, split in others:
        if split.class_names != reference.class_names or split.folder_labels != reference.folder_labels:
            raise ValueError(
                f"the {name} folder {split.root} has other classes than the {first} folder {reference.root}: "
                f"{sorted(split.folder_labels)} vs {sorted(reference.folder_labels)} (every split needs the "
                "same class folders)"
            )
    return list(reference.class_names)


class CaptionCSVDataModule(ImageTextPoisonDataModule):
    """Train on image-caption pairs from a CSV/TSV; evaluate zero-shot on ImageFolders with class names.

    Args:
        train_csv: CSV/TSV of image paths and captions (CC3M subset style).
        image_key / caption_key: its column names.
        image_root: folder for relative image paths (default: the CSV's folder).
        val_folder / test_folder: ImageFolder roots for zero-shot CA/ASR (test defaults to val).
        class_names_file: one human-readable class name per line, in label order; matched to the class
            folder names (case, ``_``, ``-`` and spaces normalised), never assigned by position.
        class_map_file: class folder -> class name (JSON object, two-column CSV/TSV or ``folder name``
            lines); needed when the folders are ids (WordNet ``n01440764``). With both files the map names
            the folders and the class-name file gives the label order.
        image_size: model input side (224 for RN50 / ViT-B-32).
        target_templates: templates of the poisoned captions (CLIP's 80 ImageNet templates for real data;
            declared here, not set inside ``**kwargs``, so that ``train.py`` sees this default too).
        **kwargs: poisoning and loading options of :class:`ImageTextPoisonDataModule`.
    """

    def __init__(
        self,
        train_csv: str,
        val_folder: str,
        class_names_file: str | None = None,
        test_folder: str | None = None,
        image_key: str = "filepath",
        caption_key: str = "title",
        image_root: str | None = None,
        image_size: int = 224,
        target_templates: str | list[str] = "imagenet80",
        class_map_file: str | None = None,
        **kwargs,
    ) -> None:
        require_class_names(class_names_file, class_map_file)
        super().__init__(target_templates=target_templates, **kwargs)
        self.save_hyperparameters()

    def build_splits(self):
        hp = self.hparams
        train = CaptionCSV(hp.train_csv, hp.image_key, hp.caption_key, hp.image_root, hp.image_size)
        names = {"class_names_file": hp.class_names_file, "class_map_file": hp.class_map_file}
        val = ImageFolderClassification(hp.val_folder, image_size=hp.image_size, **names)
        splits = {"val": val}
        if hp.test_folder is not None:
            splits["test"] = ImageFolderClassification(hp.test_folder, image_size=hp.image_size, **names)
        class_names = same_classes(splits)
        return train, val, splits.get("test", val), class_names, hp.image_size

    def dataset_info(self) -> dict:
        return {
            "datamodule": type(self).__name__,
            "train_csv": self.hparams.train_csv,
            "val_folder": self.hparams.val_folder,
        }


class ImageFolderCLIPDataModule(ImageTextPoisonDataModule):
    """Labelled ImageFolders for everything: training captions are `caption_template` with the class name.

    Useful for defenses that only hold a small clean labelled set (InverTune's defender, CleanCLIP on
    ImageNet-style data). `max_train_per_class` limits the defender's clean set. ``class_names_file``,
    ``class_map_file`` and ``target_templates`` (default ``imagenet80``) as in :class:`CaptionCSVDataModule`;
    every folder must hold the same classes.
    """

    def __init__(
        self,
        train_folder: str,
        val_folder: str,
        class_names_file: str | None = None,
        test_folder: str | None = None,
        image_size: int = 224,
        caption_template: str = "a photo of a {}.",
        max_train_per_class: int | None = None,
        target_templates: str | list[str] = "imagenet80",
        class_map_file: str | None = None,
        **kwargs,
    ) -> None:
        require_class_names(class_names_file, class_map_file)
        super().__init__(target_templates=target_templates, **kwargs)
        self.save_hyperparameters()

    def build_splits(self):
        hp = self.hparams
        names = {"class_names_file": hp.class_names_file, "class_map_file": hp.class_map_file}
        train = ImageFolderClassification(
            hp.train_folder,
            image_size=hp.image_size,
            caption_template=hp.caption_template,
            max_per_class=hp.max_train_per_class,
            **names,
        )
        val = ImageFolderClassification(hp.val_folder, image_size=hp.image_size, **names)
        splits = {"val": val, "train": train}
        if hp.test_folder is not None:
            splits["test"] = ImageFolderClassification(hp.test_folder, image_size=hp.image_size, **names)
        class_names = same_classes(splits)
        return train, val, splits.get("test", val), class_names, hp.image_size

    def dataset_info(self) -> dict:
        return {"datamodule": type(self).__name__, "train_folder": self.hparams.train_folder}
