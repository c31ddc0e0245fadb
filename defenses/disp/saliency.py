"""Vision-token saliency of DiSP: curvature of the output KL divergence along each vision token.

At the **first generation step** (the prompt followed by ``gen_length`` mask tokens, every response position
masked) let ``v_i`` be the i-th projected vision embedding, ``J_{r,i} = d logits_r / d v_i`` (V x D) and
``F_r = diag(p_r) - p_r p_r^T`` the Fisher information of the categorical output at response position ``r``.
The saliency of token ``i`` is the Fisher-Jacobian quadratic form

    s_i = sum_r tr(J_{r,i}^T F_r J_{r,i})

i.e. the trace of the Hessian at 0 of ``delta -> KL(p(v) || p(v + delta e_i))`` over all directions of
token ``i``: the local directional curvature of the KL, summed over directions.

Estimators (all Hutchinson-style, unbiased; ``num_probes`` = K):

* ``vjp`` (default): output-space probes. With ``u`` Rademacher over (positions x vocabulary) and
  ``w = sqrt(p) * u - p (sqrt(p) . u)`` per position (so ``E[w w^T] = F``), ``g = J^T w`` is one
  vector-Jacobian product for **all** tokens at once and ``s_i ~ (1/K) sum_k ||g_{k,i}||^2``. K backward
  passes per batch, batched over probes with ``torch.func.vmap``; the cost does not grow with the number of
  vision tokens (729 per crop for LLaDA-V).
* ``jvp``: input-space probes, as the published description reads. For each token ``i`` and Rademacher
  ``z_k`` in R^D, ``J_i z_k`` is one Jacobian-vector product (``torch.func.jvp``, vmapped over tokens and
  probes) and ``s_i ~ (1/K) sum_k sum_r (J_{r,i} z_k)^T F_r (J_{r,i} z_k)``. N x K forward passes.
* ``exact``: the full Jacobian (``torch.func.jacrev``) per sample; for tests and tiny models only.

Forward-mode AD has no kernel for CPU/flash SDPA, and vmap has no batching rule for SDPA's backward, so the
language model runs with eager attention while saliency is computed (identical outputs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.func import jacrev, jvp, vjp, vmap

ESTIMATORS = ("vjp", "jvp", "exact")


@contextlib.contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """Run ``model.language_model`` with eager attention inside the block (restored afterwards)."""
    config = model.language_model.config
    previous = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous


@contextlib.contextmanager
def without_input_grad_hooks(model: Any) -> Iterator[None]:
    """Remove transformers' ``enable_input_require_grads`` embedding hooks (set by gradient checkpointing and
    peft) inside the block: they call ``requires_grad_`` during the forward, which ``torch.func`` forbids."""
    owners = [m for m in model.modules() if getattr(m, "_require_grads_hooks", None)]
    for owner in owners:
        owner.disable_input_require_grads()
    try:
        yield
    finally:
        for owner in owners:
            owner.enable_input_require_grads()


@contextlib.contextmanager
def gradients_enabled() -> Iterator[None]:
    """Autograd on, even inside Lightning's ``inference_mode`` validation/test loops."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _fresh(t: torch.Tensor | None) -> torch.Tensor | None:
    # Inference tensors (created under inference_mode) cannot enter autograd; a clone outside it can.
    return None if t is None else t.clone()


class _ResponseLogits:
    """``v (B, N, D) -> logits (B, R, V)`` at the response positions of a fixed prompt (image spliced in)."""

    def __init__(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        response_mask: torch.Tensor,
    ) -> None:
        counts = response_mask.sum(dim=1)
        if not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
            raise ValueError(
                f"every row needs the same positive number of response positions, got {counts.tolist()}"
            )
        self.model, self.input_ids, self.attention_mask = model, input_ids, attention_mask
        self.rows = response_mask.nonzero(as_tuple=True)[1].view(input_ids.shape[0], -1)  # (B, R)

    def __call__(self, vision: torch.Tensor) -> torch.Tensor:
        embedded = self.model.embed_inputs(
            self.input_ids, attention_mask=self.attention_mask, vision_token_override=vision
        )
        hidden = self.model.hidden_states(
            embedded.inputs_embeds, embedded.attention_mask, embedded.position_ids
        )
        seq = embedded.token_positions.gather(1, self.rows)  # (B, R) sequence positions
        picked = hidden.gather(1, seq[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.model.lm_head(picked)


def _rademacher(shape: tuple[int, ...], generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    bits = torch.randint(
        0, 2, shape, generator=generator, device="cpu" if generator is None else generator.device
    )
    return bits.to(device=device, dtype=dtype) * 2 - 1


def _chunks(total: int, size: int | None) -> list[slice]:
    size = total if not size or size <= 0 else size
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def vision_token_saliency(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    vision_embeds: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    num_probes: int = 4,
    estimator: str = "vjp",
    generator: torch.Generator | None = None,
    probe_chunk: int | None = None,
) -> torch.Tensor:
    """DiSP saliency ``s_i = sum_r tr(J_{r,i}^T F_r J_{r,i})`` of every vision token, shape (B, N).

    Args:
        model: a :class:`model_families.mdlm.LladaVModel` (or a module with the same interface).
        input_ids: (B, L) the first generation step: prompt (with the image placeholder) + mask tokens.
        attention_mask: (B, L), 0 on left padding.
        pixel_values / vision_embeds: the images in [0, 1], or their projected embeddings (B, N, D).
        response_mask: (B, L) bool, the response positions; default: every mask token.
        num_probes: K, Hutchinson probes per sample (ignored by ``exact``).
        estimator: ``vjp`` (default), ``jvp`` or ``exact`` (see the module docstring).
        generator: source of the Rademacher probes (CPU generator, or one on the model's device).
        probe_chunk: probes (``vjp``) or token-probe pairs (``jvp``) per vmapped call; None: all at once.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"saliency estimator {estimator!r}; expected one of {ESTIMATORS}")
    if num_probes < 1 and estimator != "exact":
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    if response_mask is None:
        response_mask = input_ids == model.config.mask_token_id
    with gradients_enabled(), eager_attention(model), without_input_grad_hooks(model):
        input_ids, attention_mask = _fresh(input_ids), _fresh(attention_mask)
        with torch.no_grad():
            if vision_embeds is None:
                if pixel_values is None:
                    raise ValueError("give pixel_values or vision_embeds")
                vision_embeds = model.encode_images(_fresh(pixel_values))
        fn = _ResponseLogits(model, input_ids, attention_mask, response_mask)
        return saliency_of(fn, vision_embeds, num_probes, estimator, generator, probe_chunk)


def saliency_of(
    fn: Callable[[torch.Tensor], torch.Tensor],
    vision_embeds: torch.Tensor,
    num_probes: int = 4,
    estimator: str = "vjp",
    generator: torch.Generator | None = None,
    probe_chunk: int | None = None,
) -> torch.Tensor:
    """The family-free core of DiSP's saliency, shape (B, N): ``fn`` maps vision embeddings (B, N, D) to the
    logits (B, R, V) of the output positions it scores (a pure function, ``torch.func``-safe: no in-place
    ``requires_grad_``, no data-dependent Python branching on its input), ``vision_embeds`` are the image's
    projected tokens. The family makes ``fn`` (:class:`defenses.disp.family.DiSPFamily`) and runs it with the
    attention ``torch.func`` can transform (eager)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"saliency estimator {estimator!r}; expected one of {ESTIMATORS}")
    if num_probes < 1 and estimator != "exact":
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    with gradients_enabled():
        vision = _fresh(vision_embeds).detach()
        if estimator == "vjp":
            scores = _saliency_vjp(fn, vision, num_probes, generator, probe_chunk)
        elif estimator == "jvp":
            scores = _saliency_jvp(fn, vision, num_probes, generator, probe_chunk)
        else:
            scores = _saliency_exact(fn, vision)
    return scores.detach()


def _fisher_sqrt_probe(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``w = sqrt(p) * u - p (sqrt(p) . u)`` over the last axis: for Rademacher ``u``, ``E[w w^T] = diag(p) - p p^T``."""
    root = p.sqrt()
    return root * u - p * (root * u).sum(dim=-1, keepdim=True)


def _saliency_vjp(fn, vision, num_probes, generator, probe_chunk) -> torch.Tensor:
    logits, pullback = vjp(fn, vision)
    p = torch.softmax(logits.detach().float(), dim=-1)  # (B, R, V)
    total = torch.zeros(vision.shape[:2], dtype=torch.float32, device=vision.device)
    for part in _chunks(num_probes, probe_chunk):
        count = part.stop - part.start
        u = _rademacher((count, *p.shape), generator, p.device, p.dtype)
        w = _fisher_sqrt_probe(p, u).to(logits.dtype)
        grads = vmap(pullback)(w)[0] if count > 1 else pullback(w[0])[0][None]
        total += grads.float().pow(2).sum(dim=-1).sum(dim=0)
    return total / num_probes


def _quadratic_fisher(p: torch.Tensor, jz: torch.Tensor) -> torch.Tensor:
    """``sum_r (Jz)^T F_r (Jz) = sum_r [sum_v p (Jz)^2 - (sum_v p Jz)^2]`` over the last two axes."""
    jz = jz.float()
    return (p * jz.pow(2)).sum(-1).sum(-1) - (p * jz).sum(-1).pow(2).sum(-1)


def _saliency_jvp(fn, vision, num_probes, generator, probe_chunk) -> torch.Tensor:
    batch, tokens, width = vision.shape
    with torch.no_grad():
        p = torch.softmax(fn(vision).float(), dim=-1)
    z = _rademacher((tokens, num_probes, batch, width), generator, vision.device, vision.dtype)
    token_of = torch.arange(tokens, device=vision.device).repeat_interleave(
        num_probes
    )  # pairs (token, probe)
    z = z.reshape(tokens * num_probes, batch, width)

    def directional(token: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        onehot = (torch.arange(tokens, device=vision.device) == token).to(vision.dtype)
        tangent = onehot[None, :, None] * direction[:, None, :]  # (B, N, D), nonzero on one token
        return _quadratic_fisher(p, jvp(fn, (vision,), (tangent,))[1])  # (B,)

    values = []
    for part in _chunks(tokens * num_probes, probe_chunk):
        values.append(vmap(directional)(token_of[part], z[part]))
    q = torch.cat(values).reshape(tokens, num_probes, batch)  # (N, K, B)
    return q.mean(dim=1).T.contiguous()


def _saliency_exact(fn, vision) -> torch.Tensor:
    out = []
    with torch.no_grad():
        p_all = torch.softmax(fn(vision).float(), dim=-1)
    for b in range(vision.shape[0]):

        def single(v_b, b=b):
            full = torch.cat([vision[:b], v_b[None], vision[b + 1 :]])
            return fn(full)[b]

        jac = jacrev(single)(vision[b]).float()  # (R, V, N, D)
        p = p_all[b][..., None, None]  # (R, V, 1, 1)
        first = (p * jac.pow(2)).sum(dim=1).sum(dim=-1)  # (R, N)
        second = (p * jac).sum(dim=1).pow(2).sum(dim=-1)  # (R, N)
        out.append((first - second).sum(dim=0))
    return torch.stack(out)


def attention_saliency(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ablation score: attention mass from the response positions to each vision token at the first step,
    averaged over layers and heads and summed over response positions, shape (B, N)."""
    if response_mask is None:
        response_mask = input_ids == model.config.mask_token_id
    from model_families.mdlm.modeling import bidirectional_attention_mask

    with torch.no_grad(), eager_attention(model):
        embedded = model.embed_inputs(input_ids, pixel_values, attention_mask)
        mask_4d = bidirectional_attention_mask(embedded.attention_mask, embedded.inputs_embeds.dtype)
        out = model.language_model(
            inputs_embeds=embedded.inputs_embeds,
            attention_mask=mask_4d,
            position_ids=embedded.position_ids,
            use_cache=False,
            output_attentions=True,
        )
        attentions = getattr(out, "attentions", None)
        if not attentions:
            raise RuntimeError(
                "the language model returned no attention weights (output_attentions unsupported)"
            )
        mean = torch.stack([a.float().mean(dim=1) for a in attentions]).mean(dim=0)  # (B, T, T)
        rows = response_mask.nonzero(as_tuple=True)[1].view(input_ids.shape[0], -1)
        seq = embedded.token_positions.gather(1, rows)  # (B, R)
        from_response = mean.gather(1, seq[..., None].expand(-1, -1, mean.shape[-1])).sum(dim=1)  # (B, T)
        return from_response.gather(1, embedded.vision_positions)
