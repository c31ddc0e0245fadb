"""DiSP self-purification as a LightningModule mixin, for every family: the compromised model relabels its own
poisoned training set at ``setup("fit")`` (:func:`defenses.disp.purify.purify_dataset`, through the family's
DiSP adapter, :class:`defenses.disp.family.DiSPFamily`), then ``fit`` fine-tunes it on the purified set.

The family's module lists :class:`SelfPurification` before its fine-tuning class, calls
:meth:`SelfPurification.init_purification` after its own ``__init__`` and returns its adapter from
``disp_family()`` (None: LLaDA-V's path). The sequencing is described in :mod:`lightning_modules.mdlm_disp`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from defenses.disp.masking import DiSPMasking
from defenses.disp.purified_set import purification_dataset, purification_source, use_purified
from defenses.disp.purify import purify_dataset

log = logging.getLogger(__name__)


class SelfPurification:
    """Mixin of DiSP's purification (see the module docstring)."""

    def init_purification(
        self,
        disp: dict | None,
        purify_generation: dict | None,
        purify_batch_size: int,
        purify_chunk_size: int,
        purified_dir: str | None,
        generation_from_dict: Callable[[dict], Any],
    ) -> None:
        """Record the purification settings (hyperparameters beside the parent's) and check them."""
        extra = {
            "disp": disp,
            "purify_generation": purify_generation,
            "purify_batch_size": purify_batch_size,
            "purify_chunk_size": purify_chunk_size,
            "purified_dir": purified_dir,
        }
        # the parent saved its own arguments; add ours (a second save_hyperparameters would drop the parent's)
        self.hparams.update(extra)
        self._hparams_initial.update(copy.deepcopy(extra))
        self.disp = DiSPMasking.from_dict(disp)
        self.purify_generation = (
            generation_from_dict(purify_generation) if purify_generation else self.generation
        )
        if purify_batch_size < 1 or purify_chunk_size < 1:
            raise ValueError("model.purify_batch_size and model.purify_chunk_size must be >= 1")
        self.purified_path: Path | None = None

    def disp_family(self):
        """The family's DiSP adapter; None: LLaDA-V's (:class:`defenses.disp.family.MDLMDiSP`)."""
        return None

    def purify(self) -> Path:
        """Run self-purification on the attached datamodule's training set (all ranks); returns its path."""
        trainer = self.trainer
        datamodule = trainer.datamodule
        dataset = purification_dataset(datamodule)  # a TypeError naming the class for other datamodules
        out_dir = Path(self.hparams.purified_dir or Path(trainer.default_root_dir) / "purified")
        source = purification_source(datamodule, self.hparams.init_from)
        return purify_dataset(
            self.model,
            dataset,
            datamodule.collator,
            out_dir,
            self.tokenizer,
            self.disp,
            self.purify_generation,
            batch_size=self.hparams.purify_batch_size,
            chunk_size=self.hparams.purify_chunk_size,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            barrier=trainer.strategy.barrier,
            source=source,
            family=self.disp_family(),
        )

    def setup(self, stage: str) -> None:
        """Purify before the strategy wraps the model; once per datamodule: a set given as ``data.purified``
        (or one this run already purified) is trained on as it is."""
        super().setup(stage)
        if stage != "fit":
            return
        datamodule = self.trainer.datamodule
        if getattr(datamodule, "purified_path", None):
            log.info("DiSP: training on the given purified set %s", datamodule.purified_path)
            return
        strategy = self.trainer.strategy
        # what the strategy would do first anyway (bf16-true casts the module): the dtype DiSP always ran in
        strategy.precision_plugin.convert_module(self)
        home = next(self.model.parameters()).device
        self.model.to(strategy.root_device)
        try:
            self.purified_path = self.purify()
        finally:
            self.model.to(home)  # the strategy moves (DDP) or shards (FSDP) it from where it was
        use_purified(datamodule, self.purified_path)
