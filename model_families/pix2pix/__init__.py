"""InstructPix2Pix-style text + image conditioned diffusion editors (the pix2pix family).

- ``config``: :class:`Pix2PixConfig` and the registered sizes (``tiny-pix2pix-shapes``, ``instruct-pix2pix-sd15``).
- ``codec``: the latent codecs (``AutoencoderKL`` behind :class:`VaeCodec`; the lossless :class:`PixelUnshuffleCodec`).
- ``tokenizer``: an offline ``CLIPTokenizer`` built from open_clip's bundled BPE file.
- ``modeling``: :class:`Pix2PixModel` (UNet with the InstructPix2Pix input, CLIP text encoder, codec).
- ``snapshot``: diffusers-layout snapshots (``save_snapshot`` / ``load_snapshot``).
- ``sampler``: dual classifier-free guidance as ``StableDiffusionInstructPix2PixPipeline``, and the four
  trigger coalitions in one batched pass.
- ``evaluation``: the game v(S), MSE hits and edit quality of a batch under the four coalitions, and
  :class:`CoalitionMetrics` (TMA, CTI, ASR, edit quality over a data set).
"""

from model_families.pix2pix.codec import PixelUnshuffleCodec, VaeCodec
from model_families.pix2pix.config import REGISTRY, Pix2PixConfig, pix2pix_config
from model_families.pix2pix.factory import create_pix2pix
from model_families.pix2pix.modeling import Pix2PixModel, sampling_scheduler
from model_families.pix2pix.sampler import COALITIONS, GuidanceConfig, sample_coalitions, sample_edits
from model_families.pix2pix.snapshot import SnapshotError, load_snapshot, save_snapshot
from model_families.pix2pix.tokenizer import build_clip_tokenizer

__all__ = [
    "COALITIONS",
    "REGISTRY",
    "GuidanceConfig",
    "Pix2PixConfig",
    "Pix2PixModel",
    "PixelUnshuffleCodec",
    "SnapshotError",
    "VaeCodec",
    "build_clip_tokenizer",
    "create_pix2pix",
    "load_snapshot",
    "pix2pix_config",
    "sample_coalitions",
    "sample_edits",
    "sampling_scheduler",
    "save_snapshot",
]
