"""BadCLIP-style patch optimisation (Liang et al., "BadCLIP: Dual-Embedding Guided Backdoor Attack on
Multimodal Contrastive Learning", CVPR 2024), framework-free.

A patch ``P`` (pixels in [0, 1], a fixed size and location) is optimised on the *clean* CLIP so that
images carrying it already look like the target class to that model, in both embedding spaces:

    L(P) = w_text * CE(s * cos(f(x ⊕ P), T), y_target) + w_image * (1 - cos(f(x ⊕ P), mu_target))

* ``f``: the clean image encoder (L2-normalised, :func:`model_families.clip.zero_shot.encode_images`);
  ``x ⊕ P``: ``x`` with ``P`` pasted (:class:`attacks.image_triggers.BadNet` geometry); the ``x`` are clean
  non-target images of the attacker's data.
* text term (the paper's textual-embedding consistency): a contrastive cross-entropy of the patched
  images against the zero-shot class embeddings ``T`` (the project's one zero-shot classifier,
  :func:`~model_families.clip.zero_shot.zero_shot_weights`, over the given templates), with the model's
  own logit scale ``s``, towards the target class.
* image term (the paper's visual-embedding consistency): cosine distance to ``mu_target``, the
  normalised mean embedding of clean target-class images.

Follows the paper / the catalogue (``shared/spec/attacks.md``): init ``N(0.5, 0.25)`` clipped to [0, 1],
Adam on the pixels, the patch at a fixed location (the image centre by default), the dual objective;
the result is an artifact (:mod:`attacks.optimized_patch`) pasted like a fixed-pattern BadNet.
Simplifications: the target texts are the zero-shot templates filled with the class name rather than
natural captions that mention it; the visual term uses one mean target embedding instead of per-sample
nearest target images, and the paper's negative term (pushing away from the source images' own
features) is left out; the patch is projected back to [0, 1] after each step (no smoothness or
perceptibility penalty); a ``"random"`` location is not optimised for (give a fixed one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.image_triggers import BadNet, resolve_size
from model_families.clip.zero_shot import Normalize, encode_images, zero_shot_logits, zero_shot_weights

__all__ = ["PatchOptimizationConfig", "PatchOptimizationResult", "optimize_patch", "paste_patch", "patch_box"]


@dataclass(frozen=True)
class PatchOptimizationConfig:
    """Settings of :func:`optimize_patch`.

    Args:
        target_class: the class the patched images should be recognised as.
        patch_size: side in pixels (int) or as a fraction of the image side (float < 1).
        location: a fixed :class:`BadNet` location (``center``, ``br``, ..., or ``[x, y]``).
        margin: pixels to the border for corner locations.
        steps: Adam steps; ``lr``: Adam's learning rate on the pixel values.
        batch_size: non-target images per step (drawn with replacement from ``seed``).
        text_weight / image_weight: weights of the text and image terms.
        templates: zero-shot template set name or list (``embedded``, ``imagenet80``, ...).
        init_mean / init_std: the patch's initial pixels, ``N(init_mean, init_std)`` clipped to [0, 1].
        seed: seed of the initial patch and of the batches.
    """

    target_class: str
    patch_size: int | float = 4
    location: str | tuple[int, int] = "center"
    margin: int = 0
    steps: int = 300
    lr: float = 0.05
    batch_size: int = 64
    text_weight: float = 1.0
    image_weight: float = 1.0
    templates: str | tuple[str, ...] = "embedded"
    init_mean: float = 0.5
    init_std: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.location == "random":
            raise ValueError(
                "PatchOptimizationConfig.location must be fixed (center, a corner or [x, y]), not 'random'"
            )
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PatchOptimizationConfig.{name} must be an int >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"PatchOptimizationConfig.lr must be > 0, got {self.lr!r}")
        if self.text_weight < 0 or self.image_weight < 0 or self.text_weight + self.image_weight == 0:
            raise ValueError(
                "PatchOptimizationConfig.text_weight and image_weight must be >= 0 and not both 0, got "
                f"{self.text_weight!r}, {self.image_weight!r}"
            )

    def to_dict(self) -> dict:
        out = asdict(self)
        out["location"] = self.location if isinstance(self.location, str) else list(self.location)
        if not isinstance(self.templates, str):
            out["templates"] = list(self.templates)
        return out


@dataclass
class PatchOptimizationResult:
    """The optimised patch (``C x h x w``), the loss of every step and the final losses on all images:
    ``{"total", "text", "image", "target_rate"}``, ``target_rate`` = the fraction of patched non-target
    images the clean model classifies as the target (the control ASR on the attacker's images)."""

    patch: Tensor
    history: list[dict[str, float]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    initial: dict[str, float] = field(default_factory=dict)


def patch_box(config: PatchOptimizationConfig, height: int, width: int) -> tuple[int, int, int]:
    """``(row, column, size)`` of the patch's top-left pixel, as :class:`BadNet` places it."""
    size = resolve_size(config.patch_size, height, width)
    marker = BadNet(size, pattern="white", location=config.location, margin=config.margin)
    mask = marker(torch.zeros(1, 1, height, width))[0, 0]
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return int(rows.min()), int(cols.min()), size


def paste_patch(images: Tensor, patch: Tensor, box: tuple[int, int, int]) -> Tensor:
    """``images`` with ``patch`` pasted at ``box`` (differentiable in ``patch``)."""
    row, col, size = box
    out = images.clone()
    out[:, :, row : row + size, col : col + size] = patch.to(images.dtype)
    return out


def optimize_patch(
    model: nn.Module,
    tokenizer,
    normalize: Normalize,
    images: Tensor,
    labels: Tensor,
    class_names: Sequence[str],
    config: PatchOptimizationConfig,
) -> PatchOptimizationResult:
    """Optimise a patch on the clean ``model`` (see the module docstring); deterministic from ``config.seed``.

    ``images``: ``N x C x H x W`` clean images in [0, 1] of the attacker; ``labels``: their class indices
    into ``class_names``. Non-target images are patched; target-class images give ``mu_target``. The
    model's parameters are not changed (eval mode during the optimisation, its train flag restored).
    """
    if config.target_class not in class_names:
        raise ValueError(
            f"target_class {config.target_class!r} is not one of the classes {list(class_names)}"
        )
    if images.dim() != 4 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"images must be N x C x H x W with one label each; got {tuple(images.shape)}, {tuple(labels.shape)}"
        )
    target = list(class_names).index(config.target_class)
    is_target = labels == target
    sources, target_images = images[~is_target], images[is_target]
    if len(sources) == 0 or len(target_images) == 0:
        raise ValueError(
            f"optimize_patch needs images of the target class {config.target_class!r} and of other classes; "
            f"got {len(target_images)} and {len(sources)}"
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        class_embeds = zero_shot_weights(model, tokenizer, class_names, config.templates, device=device)
        scale = model.logit_scale.exp().detach() if hasattr(model, "logit_scale") else torch.tensor(100.0)
        with torch.no_grad():
            mu = F.normalize(_embed(model, normalize, target_images, device).mean(dim=0), dim=-1)
        _, channels, height, width = images.shape
        box = patch_box(config, height, width)
        generator = torch.Generator().manual_seed(config.seed)
        size = box[2]
        init = config.init_mean + config.init_std * torch.randn(channels, size, size, generator=generator)
        patch = init.clamp(0.0, 1.0).to(device).requires_grad_(True)
        optimizer = torch.optim.Adam([patch], lr=config.lr)
        objective = _Objective(model, normalize, class_embeds, mu, scale, target, box, config)
        result = PatchOptimizationResult(patch=patch.detach().cpu())
        result.initial = objective.evaluate(patch.detach(), sources, device)
        for _ in range(config.steps):
            index = torch.randint(len(sources), (config.batch_size,), generator=generator)
            total, text, image = objective(patch, sources[index].to(device))
            (grad,) = torch.autograd.grad(total, patch)  # the model's parameters get no gradient
            optimizer.zero_grad(set_to_none=True)
            patch.grad = grad
            optimizer.step()
            with torch.no_grad():
                patch.clamp_(0.0, 1.0)
            result.history.append(
                {k: float(v.detach()) for k, v in (("total", total), ("text", text), ("image", image))}
            )
        result.patch = patch.detach().cpu().clone()
        result.final = objective.evaluate(result.patch.to(device), sources, device)
    finally:
        model.train(was_training)
    return result


def _embed(model: nn.Module, normalize: Normalize, images: Tensor, device, batch: int = 256) -> Tensor:
    return torch.cat(
        [
            encode_images(model, images[i : i + batch].to(device), normalize)
            for i in range(0, len(images), batch)
        ]
    )


class _Objective:
    """The dual-embedding loss of a batch, and its value over a whole set."""

    def __init__(self, model, normalize, class_embeds, mu, scale, target, box, config) -> None:
        self.model, self.normalize, self.class_embeds, self.mu = model, normalize, class_embeds, mu
        self.scale, self.target, self.box, self.config = scale, target, box, config

    def __call__(self, patch: Tensor, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(total, text, image) losses of ``images`` carrying ``patch``."""
        return self._losses(self._features(patch, images))[:3]

    def _features(self, patch: Tensor, images: Tensor) -> Tensor:
        return encode_images(self.model, paste_patch(images, patch, self.box), self.normalize)

    def _losses(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        logits = self.scale * zero_shot_logits(features, self.class_embeds)
        labels = torch.full((len(features),), self.target, device=features.device)
        text = F.cross_entropy(logits, labels)
        image = (1.0 - features @ self.mu.to(features)).mean()
        total = self.config.text_weight * text + self.config.image_weight * image
        hits = (logits.argmax(dim=-1) == self.target).sum()
        return total, text, image, hits

    @torch.no_grad()
    def evaluate(self, patch: Tensor, images: Tensor, device, batch: int = 256) -> dict[str, float]:
        """Mean losses over ``images`` and the fraction of them classified as the target."""
        sums = dict.fromkeys(("total", "text", "image", "target_rate"), 0.0)
        for i in range(0, len(images), batch):
            chunk = images[i : i + batch].to(device)
            values = self._losses(self._features(patch, chunk))
            for key, value in zip(("total", "text", "image"), values[:3]):
                sums[key] += float(value) * len(chunk)
            sums["target_rate"] += float(values[3])
        return {key: value / len(images) for key, value in sums.items()}
