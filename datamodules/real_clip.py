"""Real-data CLIP datamodules: CC3M-style caption CSV for training, ImageNet-style folders for zero-shot."""

from __future__ import annotations

from datamodules.formats import CaptionCSV, ImageFolderClassification
from datamodules.image_text import ImageTextPoisonDataModule


class CaptionCSVDataModule(ImageTextPoisonDataModule):
    """Train on image-caption pairs from a CSV/TSV; evaluate zero-shot on an ImageFolder + class-name file.

    Args:
        train_csv: CSV/TSV of image paths and captions (CC3M subset style).
        image_key / caption_key: its column names.
        image_root: folder for relative image paths (default: the CSV's folder).
        val_folder / test_folder: ImageFolder roots for zero-shot CA/ASR (test defaults to val).
        class_names_file: one human-readable class name per class folder, in sorted folder order.
        image_size: model input side (224 for RN50 / ViT-B-32).
        target_templates: templates of the poisoned captions (CLIP's 80 ImageNet templates for real data;
            declared here, not set inside ``**kwargs``, so that ``train.py`` sees this default too).
        **kwargs: poisoning and loading options of :class:`ImageTextPoisonDataModule`.
    """

    def __init__(
        self,
        train_csv: str,
        val_folder: str,
        class_names_file: str,
        test_folder: str | None = None,
        image_key: str = "filepath",
        caption_key: str = "title",
        image_root: str | None = None,
        image_size: int = 224,
        target_templates: str | list[str] = "imagenet80",
        **kwargs,
    ) -> None:
        super().__init__(target_templates=target_templates, **kwargs)
        self.save_hyperparameters()

    def build_splits(self):
        hp = self.hparams
        train = CaptionCSV(hp.train_csv, hp.image_key, hp.caption_key, hp.image_root, hp.image_size)
        val = ImageFolderClassification(hp.val_folder, hp.class_names_file, hp.image_size)
        test = (
            val
            if hp.test_folder is None
            else ImageFolderClassification(hp.test_folder, hp.class_names_file, hp.image_size)
        )
        return train, val, test, val.class_names, hp.image_size

    def dataset_info(self) -> dict:
        return {
            "datamodule": type(self).__name__,
            "train_csv": self.hparams.train_csv,
            "val_folder": self.hparams.val_folder,
        }


class ImageFolderCLIPDataModule(ImageTextPoisonDataModule):
    """Labelled ImageFolders for everything: training captions are `caption_template` with the class name.

    Useful for defenses that only hold a small clean labelled set (InverTune's defender, CleanCLIP on
    ImageNet-style data). `max_train_per_class` limits the defender's clean set. ``target_templates``
    defaults to ``imagenet80`` as in :class:`CaptionCSVDataModule`.
    """

    def __init__(
        self,
        train_folder: str,
        val_folder: str,
        class_names_file: str,
        test_folder: str | None = None,
        image_size: int = 224,
        caption_template: str = "a photo of a {}.",
        max_train_per_class: int | None = None,
        target_templates: str | list[str] = "imagenet80",
        **kwargs,
    ) -> None:
        super().__init__(target_templates=target_templates, **kwargs)
        self.save_hyperparameters()

    def build_splits(self):
        hp = self.hparams
        train = ImageFolderClassification(
            hp.train_folder, hp.class_names_file, hp.image_size, hp.caption_template, hp.max_train_per_class
        )
        val = ImageFolderClassification(hp.val_folder, hp.class_names_file, hp.image_size)
        test = (
            val
            if hp.test_folder is None
            else ImageFolderClassification(hp.test_folder, hp.class_names_file, hp.image_size)
        )
        return train, val, test, val.class_names, hp.image_size

    def dataset_info(self) -> dict:
        return {"datamodule": type(self).__name__, "train_folder": self.hparams.train_folder}
