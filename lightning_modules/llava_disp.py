"""DiSP on LLaVA: the poisoned LLaVA purifies its own training set with the same defense code as LLaDA-V
(saliency of the vision tokens, the top-rho masked, self-relabelling; :mod:`lightning_modules.disp_purification`)
through LLaVA's DiSP adapter (:class:`model_families.llava.disp.LlavaDiSP`), then is fine-tuned back on the
purified set, in one ``fit``:

    python train.py --config configs/disp_llava_shapes.yaml
"""

from __future__ import annotations

from lightning_modules.disp_purification import SelfPurification
from lightning_modules.llava_finetune import LlavaFineTuning
from model_families.llava.disp import LlavaDiSP
from model_families.llava.generation import LlavaGeneration


class LlavaDiSPPurification(SelfPurification, LlavaFineTuning):
    """Recovery fine-tuning of a LLaVA model on its self-purified data set (DiSP, Wan et al., 2026).

    Args:
        init_from: the compromised LLaVA export (required).
        disp: purification masking (:class:`defenses.disp.masking.DiSPMasking` keys; ``selection``
            ``saliency`` or ``random``: LLaVA's adapter supplies no ``attention`` scores). ``mode: mask`` sets
            the selected vision tokens to zero, ``drop`` removes them from attention.
        purify_generation: :class:`~model_families.llava.generation.LlavaGeneration` keys for purification
            (default: ``generation``).
        purify_batch_size / purify_chunk_size: samples per batch / per resumable chunk.
        purified_dir: output folder of the purified set (default ``<run>/purified``; an interrupted one resumes).
        **kwargs: the fine-tuning options of :class:`LlavaFineTuning` (lr, trainable, generation, ...).
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
            LlavaGeneration.from_dict,
        )  # fmt: skip

    def disp_family(self) -> LlavaDiSP:
        return LlavaDiSP.from_module(self, self.purify_generation)
