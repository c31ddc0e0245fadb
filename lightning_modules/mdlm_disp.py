"""DiSP: self-purification of the poisoned training set, then recovery fine-tuning, in one ``fit``.

Sequencing inside one ``train.py`` run (``python train.py --config configs/disp_*.yaml``):

1. the module is built from the **compromised** model (``init_from``) and the datamodule serves the
   poisoned training set exactly as it was used for poisoning (same config, or ``poison_manifest``);
2. ``setup("fit")`` (the process group exists and the datamodule is set up, but the strategy has not wrapped
   the model yet, so the same code runs under DDP and FSDP, whose wrapper turns the parameters into flat
   shards): the full compromised model, on the strategy's root device in the precision plugin's dtype,
   purifies the training set with inference-time masking (:func:`defenses.disp.purify.purify_dataset`): each
   rank takes its chunks, finished chunks survive an interruption, rank 0 writes
   ``<run>/purified/purified.json`` + ``manifest.json``; then every rank swaps the purified responses into the
   training set in place (:func:`defenses.disp.purified_set.use_purified`, through the datamodule's
   ``replace_responses``) and the model goes back to the device it was on, for the strategy to move or shard;
3. ``fit`` fine-tunes the compromised model on the purified set with the same SFT loss (recovery);
4. validation/test measure ASR and clean metrics of the recovered model; the export is the purified model.

A run given ``data.purified`` (a purified set from an earlier run) skips step 2. Pointing ``purified_dir`` at
the folder of an interrupted run resumes its purification.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from defenses.disp.masking import DiSPMasking
from defenses.disp.purified_set import purification_dataset, purification_source, use_purified
from defenses.disp.purify import purify_dataset
from lightning_modules.mdlm_finetune import MDLMFineTuning
from model_families.mdlm.inference import GenerationConfig

log = logging.getLogger(__name__)


class DiSPPurification(MDLMFineTuning):
    """Recovery fine-tuning on a self-purified data set (DiSP, Wan et al., 2026).

    Args:
        init_from: the compromised model's snapshot (required).
        disp: purification masking (:class:`DiSPMasking` keys): ``rho`` (0.45), ``selection``
            (``saliency`` / ``random`` / ``attention``), ``mode`` (``mask`` / ``drop``), ``estimator``
            (``vjp`` / ``jvp`` / ``exact``), ``num_probes`` (K), ``probe_chunk``, ``seed``.
        purify_generation: sampler settings for purification (default: ``generation``).
        purify_batch_size / purify_chunk_size: samples per batch / per resumable chunk.
        purified_dir: output folder of the purified set (default ``<run>/purified``); an existing folder
            from an interrupted run with the same settings is resumed.
        **kwargs: the fine-tuning options of :class:`MDLMFineTuning` (lr, trainable, generation, ...).
    """

    def __init__(
        self,
        init_from: str,
        disp: dict | None = None,
        purify_generation: dict | None = None,
        purify_batch_size: int = 64,
        purify_chunk_size: int = 512,
        purified_dir: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(init_from=init_from, **kwargs)
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
            GenerationConfig.from_dict(purify_generation) if purify_generation else self.generation
        )
        if purify_batch_size < 1 or purify_chunk_size < 1:
            raise ValueError("model.purify_batch_size and model.purify_chunk_size must be >= 1")
        self.purified_path: Path | None = None

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
        )

    def setup(self, stage: str) -> None:
        """Purify before the strategy wraps the model (see the module docstring); once per datamodule: a set
        given as ``data.purified`` (or one this run already purified) is trained on as it is."""
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
