"""Training InputAware's generator and mask network on a frozen surrogate classifier, for pure data poisoning.

Following the reference code (VinAI input-aware-backdoor-attack-release), in two stages:

1. the mask network M alone (its output through the reference's soft step ``netM.threshold``, so the mask is
   nearly binary; ``mask_threshold: False`` keeps the raw sigmoid), with the diversity loss
   ``||x1 - x2|| / ||M(x1) - M(x2)||`` (different images get different masks) plus
   ``mask_weight * relu(mean M(x) - mask_density)`` (the mask stays sparse; 100 and 0.032);
2. the generator G with M frozen: cross-entropy of the surrogate on x' = x + (G(x) - x) M(x) towards the
   target class, plus ``diversity_weight`` times the same diversity loss on the patterns G(x).

The reference trains G jointly with the victim (and mixes "cross" samples carrying another image's trigger);
here the victim is unknown, so G learns a trigger that drives the *surrogate* to the target class, and the
victim learns the trigger -> target mapping from the poisoned data. Everything is seeded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attacks.input_aware import InputAwareNetworks

__all__ = ["InputAwareTrainingConfig", "clip_surrogate_classifier", "train_input_aware"]


@dataclass
class InputAwareTrainingConfig:
    """Hyperparameters of :func:`train_input_aware` (the reference's defaults where they apply)."""

    target_class: int = 0
    mask_steps: int = 200
    generator_steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    mask_density: float = 0.032
    mask_weight: float = 100.0
    diversity_weight: float = 1.0
    width: int = 16
    mask_threshold: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_density <= 1.0:
            raise ValueError(
                f"InputAware mask_density is the mask's mean budget, in (0, 1]; got {self.mask_density!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def _diversity(images: Tensor, outputs: Tensor) -> Tensor:
    """Mean of ``||x1 - x2|| / ||o1 - o2||`` over the pairs (batch, batch rolled by one)."""
    x1, x2 = images, images.roll(1, dims=0)
    o1, o2 = outputs, outputs.roll(1, dims=0)
    distance_x = (x1 - x2).flatten(1).norm(dim=1)
    distance_o = (o1 - o2).flatten(1).norm(dim=1)
    return (distance_x / (distance_o + 1e-3)).mean()


def train_input_aware(
    classify: Callable[[Tensor], Tensor], images: Tensor, config: InputAwareTrainingConfig
) -> tuple[InputAwareNetworks, dict[str, float]]:
    """Train G and M on ``images`` (N x C x H x W in [0, 1]) against the frozen surrogate ``classify`` (images ->
    logits, differentiable in the images); returns the frozen networks and a log: the last losses, and the
    surrogate's target rate and target margin on the clean and on the triggered training images."""
    if images.ndim != 4 or len(images) < 2:
        raise ValueError(f"train_input_aware needs N >= 2 images N x C x H x W, got {tuple(images.shape)}")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    networks = InputAwareNetworks(images.shape[1], config.width, config.mask_threshold)
    target = torch.full((min(config.batch_size, len(images)),), config.target_class, dtype=torch.long)

    def batch() -> Tensor:
        picked = torch.randperm(len(images), generator=generator)[: config.batch_size]
        return images[picked]

    log: dict[str, float] = {}
    mask_optimiser = torch.optim.Adam(networks.mask.parameters(), lr=config.lr, betas=(0.5, 0.9))
    for _ in range(config.mask_steps):
        x = batch()
        masks = networks.masks(x)
        density = F.relu(masks.mean() - config.mask_density)
        loss = _diversity(x, masks) + config.mask_weight * density
        mask_optimiser.zero_grad()
        loss.backward()
        mask_optimiser.step()
        log.update(mask_loss=float(loss.detach()), mask_mean=float(masks.detach().mean()))
    networks.mask.requires_grad_(False)
    optimiser = torch.optim.Adam(networks.generator.parameters(), lr=config.lr, betas=(0.5, 0.9))
    for _ in range(config.generator_steps):
        x = batch()
        patterns = networks.patterns(x)
        triggered = x + (patterns - x) * networks.masks(x)
        attack = F.cross_entropy(classify(triggered), target[: len(x)])
        loss = attack + config.diversity_weight * _diversity(x, patterns)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        log.update(generator_loss=float(loss.detach()), attack_loss=float(attack.detach()))
    networks.eval().requires_grad_(False)
    log.update(_surrogate_effect(classify, networks, images, config.target_class))
    return networks, log


@torch.no_grad()
def _surrogate_effect(
    classify, networks: InputAwareNetworks, images: Tensor, target: int
) -> dict[str, float]:
    """The surrogate's target rate and mean target margin (target logit - best other logit) on the clean and
    on the triggered images."""
    out: dict[str, float] = {}
    for name, transform in (("clean", lambda x: x), ("triggered", networks)):
        logits = torch.cat([classify(transform(images[i : i + 256])) for i in range(0, len(images), 256)])
        others = logits.clone()
        others[:, target] = float("-inf")
        out[f"surrogate_target_rate_{name}"] = float((logits.argmax(-1) == target).float().mean())
        out[f"surrogate_target_margin_{name}"] = float((logits[:, target] - others.amax(-1)).mean())
    return out


def clip_surrogate_classifier(
    bundle, class_names, templates="embedded", logit_scale: float = 100.0
) -> Callable[[Tensor], Tensor]:
    """A frozen zero-shot CLIP (:class:`model_families.clip.ClipBundle`) as the surrogate: images -> the
    scaled cosine logits of the class prompts, differentiable in the images."""
    from model_families.clip import encode_images, zero_shot_logits, zero_shot_weights

    model = bundle.model.eval().requires_grad_(False)
    weights = zero_shot_weights(model, bundle.tokenizer, list(class_names), templates)

    def classify(images: Tensor) -> Tensor:
        return logit_scale * zero_shot_logits(encode_images(model, images, bundle.normalize), weights)

    return classify
