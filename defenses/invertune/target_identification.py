"""InverTune step 1: identify the backdoor target class with a universal adversarial perturbation.

A backdoored CLIP model sends adversarially perturbed inputs disproportionately to its target class.
Build a universal adversarial perturbation (UAP) on the defender's clean images, zero-shot classify the
clean and the perturbed images, and take ``target = argmax_y [P_adv(y) - P_clean(y)]`` where ``P(y)`` is
the fraction of images whose top-1 prediction is ``y``.

The UAP objective follows AdvCLIP (Zhou et al., ACM MM 2023), untargeted and without its GAN
generator, discriminator and UMAP terms: the perturbation itself is optimised with Adam to *maximise*

    L_uap = InfoNCE(f(x), f(x_adv)) + text_weight * CE(cos(f(x_adv), T) / temperature, y_clean)

i.e. push ``f(x_adv)`` away from the clean embedding of the same image (the other images of the batch
are the negatives) and away from the text embedding of its clean zero-shot class ``y_clean`` (all
class texts ``T`` are the negatives). AdvCLIP pairs images with their captions; with a class
vocabulary the clean prediction's class text stands in for the caption. Defaults follow AdvCLIP's code
(``temperature`` 0.1 of ``info_nce``, ``text_weight`` = beta = 5).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defenses.invertune.zero_shot import (
    ImageData,
    Normalize,
    check_class_text_embeds,
    encode_images,
    eval_mode,
    frozen_parameters,
    iter_image_batches,
    model_device,
    zero_shot_logits,
)

UAPCallback = Callable[[dict[str, float]], None]


def _image_hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def uap_objective(
    clean_features: Tensor,
    adv_features: Tensor,
    class_text_embeds: Tensor,
    clean_predictions: Tensor,
    *,
    temperature: float = 0.1,
    text_weight: float = 5.0,
) -> Tensor:
    """The AdvCLIP-style untargeted objective to *maximise* (see the module docstring).

    ``clean_features``, ``adv_features``: ``B x D`` (normalised here); ``class_text_embeds``: ``C x D``;
    ``clean_predictions``: ``B`` zero-shot classes of the clean images.
    """
    clean = F.normalize(clean_features, dim=-1)
    adv = F.normalize(adv_features, dim=-1)
    image_term = F.cross_entropy(
        clean @ adv.T / temperature, torch.arange(clean.shape[0], device=clean.device)
    )
    text_term = F.cross_entropy(zero_shot_logits(adv, class_text_embeds) / temperature, clean_predictions)
    return image_term + text_weight * text_term


class UniversalPerturbation(nn.Module):
    """Base class of the universal perturbations: ``apply`` pastes/adds the UAP to [0, 1] images,
    ``project_`` restores the constraint after an optimiser step, ``fit`` optimises it."""

    default_lr: float = 1e-2

    def apply(self, images: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        return self.apply(images)

    @torch.no_grad()
    def project_(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def fit(
        self,
        model: nn.Module,
        images: ImageData,
        class_text_embeds: Tensor,
        normalize: Normalize,
        *,
        epochs: int = 5,
        max_steps: int | None = None,
        lr: float | None = None,
        batch_size: int = 64,
        temperature: float = 0.1,
        text_weight: float = 5.0,
        seed: int = 0,
        callback: UAPCallback | None = None,
    ) -> list[dict[str, float]]:
        """Optimise the perturbation with Adam to maximise :func:`uap_objective` on clean images.

        One Adam step per batch, ``epochs`` passes (tensor inputs are reshuffled with ``seed`` each
        epoch), stopping early after ``max_steps`` steps when given. The model is used in eval mode
        with frozen parameters. Returns the history (one dict per step); ``callback`` gets each record.
        """
        check_class_text_embeds(class_text_embeds)
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        device = model_device(model, class_text_embeds)
        self.to(device)
        text = class_text_embeds.to(device)
        optimizer = torch.optim.Adam(self.parameters(), lr=self.default_lr if lr is None else lr)
        generator = torch.Generator().manual_seed(seed)
        history: list[dict[str, float]] = []
        step = 0
        with eval_mode(model), frozen_parameters(model):
            for epoch in range(epochs):
                for batch in iter_image_batches(images, batch_size, name="images", generator=generator):
                    x = batch.to(device)
                    with torch.no_grad():
                        clean = encode_images(model, x, normalize)
                        predictions = zero_shot_logits(clean, text).argmax(dim=-1)
                    adv = encode_images(model, self.apply(x), normalize)
                    objective = uap_objective(
                        clean, adv, text, predictions, temperature=temperature, text_weight=text_weight
                    )
                    optimizer.zero_grad(set_to_none=True)
                    (-objective).backward()
                    optimizer.step()
                    self.project_()
                    record = {"step": float(step), "epoch": float(epoch), "objective": objective.item()}
                    history.append(record)
                    if callback is not None:
                        callback(record)
                    step += 1
                    if max_steps is not None and step >= max_steps:
                        return history
        return history


class SquarePatchUAP(UniversalPerturbation):
    """Base of the universal patches pasted by replacement: a square ``u`` (3 x s x s, kept in [0, 1]) of
    side ``s = floor(sqrt(area_fraction * H * W))`` that starts from U[0, 1] drawn with ``seed``; subclasses
    say where it goes (:meth:`apply`)."""

    def __init__(self, image_size: int | tuple[int, int], area_fraction: float, seed: int) -> None:
        super().__init__()
        height, width = _image_hw(image_size)
        if not 0.0 < area_fraction < 1.0:
            raise ValueError(f"area_fraction must be in (0, 1), got {area_fraction}")
        self.image_size = (height, width)
        self.side = int(math.sqrt(area_fraction * height * width))
        generator = torch.Generator().manual_seed(seed)
        self.patch = nn.Parameter(torch.rand(3, self.side, self.side, generator=generator))

    def check_images(self, images: Tensor) -> None:
        """Images of another size than the patch was built for are a ``ValueError`` naming both."""
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"images are {tuple(images.shape[-2:])}, the patch was built for {self.image_size}"
            )

    @torch.no_grad()
    def project_(self) -> None:
        self.patch.clamp_(0.0, 1.0)


class CornerPatchUAP(SquarePatchUAP):
    """AdvCLIP square patch pasted by replacement at the bottom-right corner.

    ``x_adv = M * u + (1 - M) * x`` where ``M`` is a square of side ``floor(sqrt(area_fraction * H * W))``
    (38 px at 224 for 3%) whose bottom-right corner sits ``margin`` px from the image's bottom-right
    corner (14 px at 224; by default scaled as ``round(14 * H / 224)``). The patch ``u`` (3 x s x s,
    kept in [0, 1]) starts from U[0, 1] drawn with ``seed``.
    """

    default_lr = 1e-2

    def __init__(
        self,
        image_size: int | tuple[int, int],
        *,
        area_fraction: float = 0.03,
        margin: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(image_size, area_fraction, seed)
        height, width = self.image_size
        side = self.side
        margin = round(14 * height / 224) if margin is None else int(margin)
        if side < 1 or side + margin > min(height, width):
            raise ValueError(
                f"a {side} px patch with a {margin} px margin does not fit a {height} x {width} image"
            )
        self.margin = margin
        self.top = height - margin - side
        self.left = width - margin - side

    def mask(self) -> Tensor:
        """The binary ``1 x H x W`` placement mask ``M``."""
        mask = torch.zeros(1, *self.image_size, device=self.patch.device)
        mask[:, self.top : self.top + self.side, self.left : self.left + self.side] = 1.0
        return mask

    def apply(self, images: Tensor) -> Tensor:
        self.check_images(images)
        out = images.clone()
        out[..., self.top : self.top + self.side, self.left : self.left + self.side] = self.patch.to(images)
        return out


class LinfUAP(UniversalPerturbation):
    """Additive universal perturbation over the whole image: ``x_adv = clip(x + delta, 0, 1)`` with
    ``||delta||_inf <= eps`` (8/255 by default); ``delta`` starts from U[-eps, eps] drawn with ``seed``."""

    default_lr = 1e-3

    def __init__(self, image_size: int | tuple[int, int], *, eps: float = 8 / 255, seed: int = 0) -> None:
        super().__init__()
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.image_size = _image_hw(image_size)
        self.eps = float(eps)
        generator = torch.Generator().manual_seed(seed)
        self.delta = nn.Parameter((torch.rand(3, *self.image_size, generator=generator) * 2 - 1) * eps)

    def apply(self, images: Tensor) -> Tensor:
        return (images + self.delta.to(images)).clamp(0.0, 1.0)

    @torch.no_grad()
    def project_(self) -> None:
        self.delta.clamp_(-self.eps, self.eps)


@dataclass(frozen=True)
class TargetIdentification:
    """Result of :func:`identify_target`. Histograms are fractions of the clean image set."""

    target: int
    """The class ranked first by ``score`` (``rise``: ``argmax_y [P_adv(y) - P_clean(y)]``; ties: lowest
    class index)."""
    ranking: list[int]
    """All classes sorted by the ``score`` statistic, largest first (stable)."""
    increase: Tensor
    """``P_adv - P_clean`` per class (``C``)."""
    margin: float
    """The ranking statistic (``score``) of the target minus the runner-up's."""
    p_clean: Tensor
    """Top-1 prediction histogram of the clean images (``C``, sums to 1)."""
    p_adv: Tensor
    """Top-1 prediction histogram of the perturbed images (``C``, sums to 1)."""
    num_images: int
    transitions: Tensor | None = None
    """``C x C`` counts: row ``s`` = clean prediction, column ``y`` = prediction under the UAP."""
    breadth: Tensor | None = None
    """Per class ``y``: the median over source classes ``s != y`` (with clean images) of the fraction of
    ``s``-predicted images that the UAP sends to ``y`` (:func:`breadth_of`)."""
    score: str = "rise"
    """Which statistic ranked the classes: ``rise`` (``increase``, the paper) or ``breadth``."""
    members: dict[str, Tensor] | None = None
    """With a :class:`~defenses.invertune.location_free.UnionUAP`: every member's own ranking statistic."""
    source: str | None = None
    """With a union: the member whose statistic ranked the target first."""

    @property
    def ranked_by(self) -> Tensor:
        """The statistic behind ``ranking`` and ``margin``: ``increase`` or ``breadth``."""
        if self.score == "breadth":
            assert self.breadth is not None
            return self.breadth
        return self.increase


@torch.no_grad()
def identify_target(
    model: nn.Module,
    images: ImageData,
    class_text_embeds: Tensor,
    uap: UniversalPerturbation | Callable[[Tensor], Tensor],
    normalize: Normalize,
    batch_size: int = 256,
    score: str = "rise",
) -> TargetIdentification:
    """Zero-shot classify the clean and the ``uap``-perturbed images and rank classes by ``score``:
    ``rise`` = ``P_adv(y) - P_clean(y)`` (the paper) or ``breadth`` (:func:`breadth_of`: how evenly the
    UAP pulls images of *every* other class into ``y``); the top class is the suspected backdoor target.

    ``uap`` should already be fitted (:meth:`UniversalPerturbation.fit`); any callable mapping [0, 1]
    images to perturbed [0, 1] images works. Zero-shot prediction is ``argmax_c cos(f(x), t_c)``.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    num_classes = check_class_text_embeds(class_text_embeds)
    if num_classes < 2:
        raise ValueError(f"class_text_embeds needs at least 2 classes to rank, got {num_classes}")
    device = model_device(model, class_text_embeds)
    text = class_text_embeds.to(device)
    transitions = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    total = 0
    with eval_mode(model):
        for batch in iter_image_batches(images, batch_size, name="images"):
            x = batch.to(device)
            clean = zero_shot_logits(encode_images(model, x, normalize), text).argmax(dim=-1)
            adv = zero_shot_logits(encode_images(model, uap(x), normalize), text).argmax(dim=-1)
            transitions += torch.bincount(clean * num_classes + adv, minlength=num_classes**2)
            total += x.shape[0]
    counts = transitions.view(num_classes, num_classes).cpu()
    p_clean = counts.sum(dim=1).double() / total
    p_adv = counts.sum(dim=0).double() / total
    increase = p_adv - p_clean
    breadth = breadth_of(counts)
    ranked_by = increase if score == "rise" else breadth
    ranking = torch.sort(ranked_by, descending=True, stable=True).indices.tolist()
    return TargetIdentification(
        target=ranking[0],
        ranking=ranking,
        increase=increase,
        margin=float(ranked_by[ranking[0]] - ranked_by[ranking[1]]),
        p_clean=p_clean,
        p_adv=p_adv,
        num_images=total,
        transitions=counts,
        breadth=breadth,
        score=score,
    )


SCORES = ("rise", "breadth")
"""The ranking statistics of :func:`identify_target`."""


def breadth_of(transitions: Tensor) -> Tensor:
    """Per class ``y``: the (lower) median over the source classes ``s != y`` that have clean images of
    ``transitions[s, y] / sum_y' transitions[s, y']``, the fraction of the images predicted ``s`` that the
    UAP sends to ``y``; 0 where no other class has images.

    A backdoor's trigger works on images of every class, so its target draws from all of them; a natural
    adversarial direction of the model (a class that similar-looking classes fall into) draws from its
    neighbours only. The rise in top-1 frequency cannot tell the two apart; the median over source
    classes can (a majority of the classes must flow into ``y``).
    """
    counts = transitions.double()
    per_source = counts.sum(dim=1, keepdim=True)
    rates = counts / per_source.clamp(min=1)
    num_classes = counts.shape[0]
    out = torch.zeros(num_classes, dtype=torch.float64)
    has_images = per_source[:, 0] > 0
    for y in range(num_classes):
        sources = has_images.clone()
        sources[y] = False
        if sources.any():
            out[y] = rates[sources, y].median()
    return out
