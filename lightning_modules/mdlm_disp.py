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

from lightning_modules.disp_purification import SelfPurification
from lightning_modules.mdlm_finetune import MDLMFineTuning
from model_families.mdlm.inference import GenerationConfig


class DiSPPurification(SelfPurification, MDLMFineTuning):
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
        self.init_purification(
            disp, purify_generation, purify_batch_size, purify_chunk_size, purified_dir,
            GenerationConfig.from_dict,
        )  # fmt: skip
