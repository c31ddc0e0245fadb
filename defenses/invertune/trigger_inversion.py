"""InverTune step 2: invert the backdoor trigger of the identified target class.

The trigger is a mask ``m`` and a pattern ``t``, both ``3 x H x W``, applied as
``x' = m * t + (1 - m) * x`` to [0, 1] images. They minimise (weights: the authors' code defaults)

    L = 5 * L_align + 0.5 * L_emb + 1 * L_sim + 0.01 * L_mask

- ``L_align = CE(cos(f(x'), T) / tau, target)``, tau = 0.07, over all class text embeddings ``T``;
- ``L_emb = ||F(x') - F(x_ref)||_F``, the Frobenius norm of the ``B x D`` difference between the
  L2-normalised features of the triggered batch and of reference target-class images;
- ``L_sim = 1 - SSIM(x', x)``;
- ``L_mask = ||m||_1``.

The authors initialise ``m = 1`` and ``t ~ U[0, 1]``, take one Adam step (lr 0.01) per batch of 64
clean non-target images for about 10 epochs and clamp ``m`` and ``t`` to their valid ranges after
each step. Here images are in [0, 1] pixel space, so ``t`` is clamped to [0, 1] (the authors clamp it
to the normalised range of the same pixels).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defenses.invertune.zero_shot import (
    ImageData,
    Normalize,
    check_class_text_embeds,
    check_target,
    encode_images,
    eval_mode,
    frozen_parameters,
    iter_image_batches,
    model_device,
    zero_shot_logits,
)

Parameterization = Literal["clamp", "sigmoid", "tanh"]
ReferenceMode = Literal["pairwise", "mean", "first"]
InversionCallback = Callable[[dict[str, float], "InvertedTrigger"], None]

_INIT_EPS = 1e-3  # keeps the sigmoid/tanh inverse finite for the initial mask of ones


class InvertedTrigger(nn.Module):
    """A mask/pattern trigger ``x' = m * t + (1 - m) * x`` with ``m, t`` of shape ``3 x H x W``.

    ``parameterization``:
    - ``"clamp"`` (authors): ``m`` and ``t`` are the raw parameters, clamped to [0, 1] by
      :meth:`project_` after each optimiser step; init ``m = 1``, ``t ~ U[0, 1]`` (seeded).
    - ``"sigmoid"``: ``m = sigmoid(a)``, ``t = sigmoid(b)``; ``"tanh"``: ``m = (tanh(a) + 1) / 2``, same
      for ``t``. Both start from the same init (the mask from ``1 - 1e-3``); :meth:`project_` is a no-op.

    ``mask_channels=1`` shares one ``1 x H x W`` mask across the colour channels (Neural Cleanse's
    choice; an option here, the spec's mask has the image's shape).

    ``history`` holds the loss records of :func:`invert_trigger` (one dict per step).
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        *,
        parameterization: Parameterization = "clamp",
        seed: int = 0,
        mask_channels: int | None = None,
    ) -> None:
        super().__init__()
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
        if mask_channels not in (None, 1, image_shape[0]):
            raise ValueError(
                f"mask_channels must be 1 or {image_shape[0]} (the image's), got {mask_channels}"
            )
        if parameterization not in ("clamp", "sigmoid", "tanh"):
            raise ValueError(
                f"parameterization must be 'clamp', 'sigmoid' or 'tanh', got {parameterization!r}"
            )
        self.parameterization = parameterization
        generator = torch.Generator().manual_seed(seed)
        pattern = torch.rand(*image_shape, generator=generator)
        mask = torch.ones(mask_channels or image_shape[0], *image_shape[1:])
        self.mask_param = nn.Parameter(self._inverse(mask))
        self.pattern_param = nn.Parameter(self._inverse(pattern))
        self.history: list[dict[str, float]] = []

    def _inverse(self, value: Tensor) -> Tensor:
        if self.parameterization == "clamp":
            return value
        value = value.clamp(_INIT_EPS, 1 - _INIT_EPS)
        if self.parameterization == "sigmoid":
            return torch.logit(value)
        return torch.atanh(2 * value - 1)

    def _forward_map(self, raw: Tensor) -> Tensor:
        if self.parameterization == "clamp":
            return raw
        if self.parameterization == "sigmoid":
            return torch.sigmoid(raw)
        return (torch.tanh(raw) + 1) / 2

    @property
    def mask(self) -> Tensor:
        """``m`` in [0, 1], ``3 x H x W``."""
        return self._forward_map(self.mask_param)

    @property
    def pattern(self) -> Tensor:
        """``t`` in [0, 1], ``3 x H x W``."""
        return self._forward_map(self.pattern_param)

    def apply(self, images: Tensor) -> Tensor:
        """``m * t + (1 - m) * x`` for [0, 1] images ``B x 3 x H x W``."""
        mask = self.mask.to(images)
        return mask * self.pattern.to(images) + (1 - mask) * images

    def forward(self, images: Tensor) -> Tensor:
        return self.apply(images)

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp ``m`` and ``t`` to [0, 1] (``"clamp"`` parameterisation only)."""
        if self.parameterization == "clamp":
            self.mask_param.clamp_(0.0, 1.0)
            self.pattern_param.clamp_(0.0, 1.0)


def gaussian_window(
    window_size: int = 11, sigma: float = 1.5, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Normalised 1-D Gaussian window ``g_i ∝ exp(-(i - (n-1)/2)^2 / (2 sigma^2))``."""
    coords = torch.arange(window_size, dtype=dtype) - (window_size - 1) / 2
    window = torch.exp(-(coords**2) / (2 * sigma**2))
    return window / window.sum()


def ssim(
    x: Tensor,
    y: Tensor,
    *,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Mean SSIM (Wang et al., 2004) of two ``B x C x H x W`` batches.

    ``SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))``
    with local statistics from a separable Gaussian window (11 taps, sigma 1.5) applied per channel
    without padding ("valid", as in the reference implementation and ``pytorch_msssim``),
    ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``; averaged over channels, positions and the batch.
    (torchmetrics' SSIM pads by reflection and differs in the third decimal, hence this function.)
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"ssim needs two B x C x H x W tensors of equal shape, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if min(x.shape[-2:]) < window_size:
        raise ValueError(
            f"images of size {tuple(x.shape[-2:])} are smaller than the {window_size} px SSIM window"
        )
    channels = x.shape[1]
    window = gaussian_window(window_size, sigma, dtype=x.dtype).to(x.device)
    kernel_h = window.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    kernel_w = window.view(1, 1, 1, -1).expand(channels, 1, 1, -1)

    def blur(z: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(z, kernel_h, groups=channels), kernel_w, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov_xy = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return ssim_map.mean()


def align_loss(
    image_features: Tensor, class_text_embeds: Tensor, target: int, temperature: float = 0.07
) -> Tensor:
    """``L_align = CE(cos(f(x'), T) / tau, target)``, mean over the batch."""
    logits = zero_shot_logits(image_features, class_text_embeds) / temperature
    labels = torch.full((logits.shape[0],), int(target), dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels)


def match_reference_features(
    reference_features: Tensor, batch_size: int, mode: ReferenceMode = "pairwise"
) -> Tensor:
    """The ``batch_size x D`` reference rows ``L_emb`` compares the triggered batch with.

    - ``"pairwise"`` (default; what the authors' code does with equal batches of 64): triggered image
      ``i`` is compared with reference ``i mod R``, i.e. the references cycled to the batch size;
    - ``"mean"``: every triggered image is compared with the mean reference feature;
    - ``"first"``: every triggered image is compared with reference 0 (the authors' code whenever the
      two batch sizes differ).
    """
    if reference_features.ndim != 2 or reference_features.shape[0] == 0:
        raise ValueError(
            f"reference_features must be a non-empty R x D tensor, got {tuple(reference_features.shape)}"
        )
    if mode == "pairwise":
        index = torch.arange(batch_size, device=reference_features.device) % reference_features.shape[0]
        return reference_features[index]
    if mode == "mean":
        return reference_features.mean(dim=0, keepdim=True).expand(batch_size, -1)
    if mode == "first":
        return reference_features[:1].expand(batch_size, -1)
    raise ValueError(f"reference mode must be 'pairwise', 'mean' or 'first', got {mode!r}")


def embedding_loss(
    image_features: Tensor, reference_features: Tensor, mode: ReferenceMode = "pairwise"
) -> Tensor:
    """``L_emb = || F(x') - F_ref ||_F`` over the ``B x D`` matrices of L2-normalised features, with the
    reference rows matched to the batch by :func:`match_reference_features` (``mode``)."""
    features = F.normalize(image_features, dim=-1)
    reference = match_reference_features(F.normalize(reference_features, dim=-1), features.shape[0], mode)
    return torch.linalg.matrix_norm(features - reference.to(features), ord="fro")


def similarity_loss(triggered_images: Tensor, clean_images: Tensor) -> Tensor:
    """``L_sim = 1 - SSIM(x', x)`` on [0, 1] images (see :func:`ssim`)."""
    return 1 - ssim(triggered_images, clean_images, data_range=1.0)


def mask_l1_loss(mask: Tensor) -> Tensor:
    """``L_mask = ||m||_1 = sum |m|`` over all ``3 x H x W`` mask entries."""
    return mask.abs().sum()


def invert_trigger(
    model: nn.Module,
    clean_images: ImageData,
    target: int,
    class_text_embeds: Tensor,
    reference_images: Tensor,
    normalize: Normalize,
    epochs: int = 10,
    lr: float = 0.01,
    batch_size: int = 64,
    seed: int = 0,
    *,
    temperature: float = 0.07,
    align_weight: float = 5.0,
    embedding_weight: float = 0.5,
    similarity_weight: float = 1.0,
    mask_weight: float = 0.01,
    reference_mode: ReferenceMode = "pairwise",
    parameterization: Parameterization = "clamp",
    steps_per_batch: int = 1,
    max_steps: int | None = None,
    mask_channels: int | None = None,
    noise_std: float = 0.0,
    callback: InversionCallback | None = None,
) -> InvertedTrigger:
    """Invert the trigger of class ``target`` on clean (non-target) images; see the module docstring.

    ``clean_images``: tensor or iterable of batches (tensor inputs are split into ``batch_size``
    batches and reshuffled with ``seed`` each epoch; the last, smaller batch is kept).
    ``reference_images``: ``R x 3 x H x W`` clean images of the target class. The model runs in eval
    mode with frozen parameters. Each step appends ``{step, epoch, total, align, embedding, similarity,
    mask_l1}`` to ``trigger.history`` and passes it to ``callback(record, trigger)``.
    """
    num_classes = check_class_text_embeds(class_text_embeds)
    target = check_target(target, num_classes)
    if reference_images.ndim != 4 or reference_images.shape[0] == 0:
        raise ValueError(
            f"reference_images is empty or not a R x 3 x H x W tensor: shape {tuple(reference_images.shape)}"
        )
    if epochs < 1 or steps_per_batch < 1:
        raise ValueError(f"epochs and steps_per_batch must be >= 1, got {epochs} and {steps_per_batch}")
    device = model_device(model, class_text_embeds)
    text = class_text_embeds.to(device)
    trigger = InvertedTrigger(
        tuple(reference_images.shape[1:]),
        parameterization=parameterization,
        seed=seed,
        mask_channels=mask_channels,
    )
    trigger.to(device)
    optimizer = torch.optim.Adam(trigger.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    step = 0
    with eval_mode(model), frozen_parameters(model):
        with torch.no_grad():
            reference = torch.cat(
                [encode_images(model, b.to(device), normalize) for b in reference_images.split(batch_size)]
            )
        for epoch in range(epochs):
            for batch in iter_image_batches(
                clean_images, batch_size, name="clean_images", generator=generator
            ):
                x = batch.to(device)
                for _ in range(steps_per_batch):
                    triggered = trigger.apply(x)
                    seen = triggered
                    if noise_std > 0:  # robust inversion: the model sees a noisy copy of x'
                        noise = torch.randn(triggered.shape, generator=generator) * noise_std
                        seen = (triggered + noise.to(triggered)).clamp(0.0, 1.0)
                    features = encode_images(model, seen, normalize)
                    parts = {
                        "align": align_loss(features, text, target, temperature),
                        "embedding": embedding_loss(features, reference, reference_mode),
                        "similarity": similarity_loss(triggered, x),
                        "mask_l1": mask_l1_loss(trigger.mask),
                    }
                    total = (
                        align_weight * parts["align"]
                        + embedding_weight * parts["embedding"]
                        + similarity_weight * parts["similarity"]
                        + mask_weight * parts["mask_l1"]
                    )
                    optimizer.zero_grad(set_to_none=True)
                    total.backward()
                    optimizer.step()
                    trigger.project_()
                    record = {"step": float(step), "epoch": float(epoch), "total": total.item()}
                    record.update({name: value.item() for name, value in parts.items()})
                    trigger.history.append(record)
                    if callback is not None:
                        callback(record, trigger)
                    step += 1
                    if max_steps is not None and step >= max_steps:
                        return trigger
    return trigger


@torch.no_grad()
def inverted_trigger_asr(
    model: nn.Module,
    images: ImageData,
    trigger: InvertedTrigger | Callable[[Tensor], Tensor],
    target: int,
    class_text_embeds: Tensor,
    normalize: Normalize,
    *,
    batch_size: int = 256,
    exclude_target: bool = True,
) -> float:
    """Attack success rate of a trigger: the fraction of triggered images zero-shot classified as
    ``target``. With ``exclude_target`` the images whose *clean* prediction already is ``target``
    are left out (the usual ASR denominator without labels)."""
    num_classes = check_class_text_embeds(class_text_embeds)
    target = check_target(target, num_classes)
    device = model_device(model, class_text_embeds)
    text = class_text_embeds.to(device)
    hits = counted = 0
    with eval_mode(model):
        for batch in iter_image_batches(images, batch_size, name="images"):
            x = batch.to(device)
            triggered = zero_shot_logits(encode_images(model, trigger(x), normalize), text).argmax(dim=-1)
            keep = torch.ones_like(triggered, dtype=torch.bool)
            if exclude_target:
                keep = zero_shot_logits(encode_images(model, x, normalize), text).argmax(dim=-1) != target
            hits += int((triggered[keep] == target).sum())
            counted += int(keep.sum())
    if counted == 0:
        raise ValueError(f"images: every clean image is already predicted as target {target}; ASR undefined")
    return hits / counted
