"""DiSP's inference-time vision-token masking: pick the top-rho vision tokens and mask or delete them.

``DiSPMasking`` scores the vision tokens of a batch at the first generation step (saliency by default,
random or attention-based selection as ablations), selects ``round(rho * N)`` tokens per sample and returns
the model keyword arguments that apply the intervention at every denoising step:

* ``mode="mask"`` (default, our reading of the paper): the selected tokens' embeddings are replaced by the
  mask token's embedding (``vision_token_mask``), positions unchanged;
* ``mode="drop"``: the selected tokens are deleted from the sequence (``vision_token_drop``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from defenses.disp.saliency import ESTIMATORS, attention_saliency, vision_token_saliency
from model_families.mdlm.inference import (
    GenerationConfig,
    extend_attention_mask,
    first_step_input,
    generate_ids,
)

SELECTIONS = ("saliency", "random", "attention")
MODES = ("mask", "drop")


def top_fraction(scores: torch.Tensor, rho: float) -> torch.Tensor:
    """Boolean (B, N) selecting the ``round(rho * N)`` highest scores of each row (ties: lower index first)."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"mask ratio rho must be in [0, 1], got {rho}")
    batch, tokens = scores.shape
    k = round(rho * tokens)
    selected = torch.zeros(batch, tokens, dtype=torch.bool, device=scores.device)
    if k == 0:
        return selected
    # stable descending sort so equal scores keep index order (deterministic)
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices[:, :k]
    return selected.scatter(1, order, True)


@dataclass(frozen=True)
class DiSPMasking:
    """Settings of DiSP's vision-token masking.

    Args:
        rho: fraction of vision tokens to mask (0.45 in the paper's summaries).
        selection: ``saliency`` (DiSP), ``random`` or ``attention`` (ablations).
        mode: ``mask`` (replace by the mask embedding) or ``drop`` (delete the tokens).
        estimator: saliency estimator ``vjp`` / ``jvp`` / ``exact`` (see :mod:`defenses.disp.saliency`).
        num_probes: Hutchinson probes K per sample.
        probe_chunk: probes per vmapped call (memory bound at real scale); None: all at once.
        seed: seed of the probes and of random selection.
    """

    rho: float = 0.45
    selection: str = "saliency"
    mode: str = "mask"
    estimator: str = "vjp"
    num_probes: int = 4
    probe_chunk: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.rho) <= 1.0:
            raise ValueError(f"disp rho must be in [0, 1], got {self.rho}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"disp selection {self.selection!r}; expected one of {SELECTIONS}")
        if self.mode not in MODES:
            raise ValueError(f"disp mode {self.mode!r}; expected one of {MODES}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"disp estimator {self.estimator!r}; expected one of {ESTIMATORS}")
        if self.num_probes < 1:
            raise ValueError(f"disp num_probes must be >= 1, got {self.num_probes}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DiSPMasking:
        data = dict(data or {})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown disp keys {sorted(unknown)}; expected some of {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def scores(
        self,
        model: Any,
        prompt_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        gen_length: int,
        prompt_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Per-token scores (B, N) at the first generation step (prompt + ``gen_length`` masks)."""
        mask_id = model.config.mask_token_id
        ids = first_step_input(prompt_ids, gen_length, mask_id)
        attention = extend_attention_mask(prompt_mask, gen_length)
        response = torch.zeros_like(ids, dtype=torch.bool)
        response[:, prompt_ids.shape[1] :] = True
        if self.selection == "saliency":
            return vision_token_saliency(
                model,
                ids,
                attention,
                pixel_values=pixel_values,
                response_mask=response,
                num_probes=self.num_probes,
                estimator=self.estimator,
                generator=generator,
                probe_chunk=self.probe_chunk,
            )
        if self.selection == "attention":
            return attention_saliency(
                model, ids, attention, pixel_values=pixel_values, response_mask=response
            )
        count = model.config.num_vision_tokens
        device = generator.device if generator is not None else "cpu"
        return torch.rand(prompt_ids.shape[0], count, generator=generator, device=device).to(
            prompt_ids.device
        )

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """The tokens to intervene on, (B, N) bool."""
        return top_fraction(scores, self.rho)

    def model_kwargs(self, selected: torch.Tensor) -> dict[str, torch.Tensor]:
        """Keyword arguments that apply the intervention in :class:`LladaVModel`'s forward."""
        return {"vision_token_mask" if self.mode == "mask" else "vision_token_drop": selected}


def masked_generate_ids(
    model: Any,
    prompt_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    generation: GenerationConfig,
    masking: DiSPMasking | None,
    prompt_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Generated ids (B, gen_length) with DiSP's inference-time masking (none when ``masking`` is None or
    rho = 0), and the selected tokens (B, N) (None without masking).

    ``generator`` seeds the token scores (probes, random selection) and then the sampling (``temperature >
    0``, ``random`` remasking), so equally seeded calls give equal ids."""
    if masking is None or masking.rho == 0:
        return generate_ids(model, prompt_ids, pixel_values, generation, prompt_mask, generator), None
    scores = masking.scores(model, prompt_ids, pixel_values, generation.gen_length, prompt_mask, generator)
    selected = masking.select(scores)
    ids = generate_ids(
        model, prompt_ids, pixel_values, generation, prompt_mask, generator, **masking.model_kwargs(selected)
    )
    return ids, selected
