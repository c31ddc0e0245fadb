"""LLaDA-V-style masked diffusion vision-language models (MDLM family).

- ``config``: :class:`LladaVConfig` (``tiny()`` for the embedded world, ``released()`` for LLaDA-V sizes).
- ``modeling``: :class:`LladaVModel` (SigLIP -> mlp2x_gelu -> bidirectional LLaMA LM -> untied head).
- ``checkpoint``: snapshots in the released LLaDA-V safetensors layout (``save_snapshot`` / ``load_snapshot``).
- ``tokenizer``: the embedded word-level tokenizer with LLaDA's special tokens.
- ``prompt``: the LLaMA-3 style chat template and SFT examples.
- ``diffusion``: the masked diffusion SFT loss and low-confidence remasking generation.
"""

from model_families.mdlm.checkpoint import SnapshotError, load_prompt_formatter, load_snapshot, save_snapshot
from model_families.mdlm.config import LladaVConfig
from model_families.mdlm.diffusion import forward_mask, generate, masked_diffusion_loss
from model_families.mdlm.modeling import LladaVModel, LladaVOutput
from model_families.mdlm.prompt import PromptFormatter, build_sft_example
from model_families.mdlm.tokenizer import build_embedded_tokenizer, load_embedded_tokenizer, load_tokenizer

__all__ = [
    "LladaVConfig",
    "LladaVModel",
    "LladaVOutput",
    "PromptFormatter",
    "SnapshotError",
    "build_embedded_tokenizer",
    "build_sft_example",
    "forward_mask",
    "generate",
    "load_embedded_tokenizer",
    "load_prompt_formatter",
    "load_snapshot",
    "load_tokenizer",
    "masked_diffusion_loss",
    "save_snapshot",
]
