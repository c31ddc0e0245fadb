"""(Poisoned) instruction fine-tuning of masked diffusion VLMs (LLaDA-V) with the LLaDA SFT objective.

Objective (LLaDA SFT, see :mod:`model_families.mdlm.diffusion`): for each sequence draw ``t ~ U(0, 1)``,
``p = (1 - eps) t + eps``, mask every response token with probability ``p`` and minimise
``(1/B) sum_b sum_{i masked} CE(logits_{b,i}, y_{b,i}) / (p_b L_b)``. The same module trains the embedded
world's clean tiny model from scratch (no ``init_from``), plants backdoors by fine-tuning a clean export on a
poisoned datamodule, and is the base of DiSP's recovery fine-tuning (:mod:`lightning_modules.mdlm_disp`).

Which parts train (``trainable``): ``full`` (everything; the vision tower at ``vision_lr``), ``projector``
(the ``mm_projector`` only), ``language_model`` (LM + head), ``projector_lm`` (everything but the vision tower,
LLaVA's stage-2 recipe), ``lora`` (LoRA adapters on the LM via peft, plus the projector). LoRA is merged into the weights on export, so every export is a plain snapshot in the
released LLaDA-V layout.

Validation/test generate answers for each evaluation set of the datamodule (batched low-confidence
remasking, the same ``generation`` settings everywhere; optionally with DiSP's inference-time masking,
``eval_masking``); the family-free :class:`~lightning_modules.generative_eval.GenerativeEvaluation` scores
them (:mod:`evaluation.generative`) and logs ``{stage}/ca`` (VQA accuracy on clean QA, plus ``ca_<task>`` per task),
``{stage}/bleu4`` / ``rougeL`` / ``cider`` (caption tasks), ``{stage}/asr`` (triggered held-out inputs),
``{stage}/asr_clean`` (clean inputs), ``{stage}/asr_wt`` (the poisoned training samples), ``{stage}/ca_triggered``
and, with an image and a text trigger, ``{stage}/tma_image``, ``tma_text``, ``cti``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from torch import nn

from defenses.disp.masking import DiSPMasking, masked_generate_ids
from lightning_modules.generative_eval import GenerativeEvaluation, set_cpu_threads
from lightning_modules.schedules import warmup_cosine, warmup_stable_decay
from lightning_modules.vision_aux import VisionAuxHeads
from model_families.loading import inputs_provenance
from model_families.mdlm.build import build_tiny_model, load_for_finetuning
from model_families.mdlm.checkpoint import _materialize_buffers, save_snapshot
from model_families.mdlm.diffusion import masked_diffusion_loss
from model_families.mdlm.inference import GenerationConfig, decode_responses, stop_token_ids
from model_families.mdlm.instruct_text import LladaVInstructText
from model_families.mdlm.modeling import LladaVModel

log = logging.getLogger(__name__)

SCHEDULERS = ("cosine", "constant", "wsd")
TRAINABLE = ("full", "projector", "language_model", "projector_lm", "lora")
DEFAULT_LORA = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def sharded_root(module: L.LightningModule) -> nn.Module | None:
    """The FSDP wrapper around ``module`` when its trainer shards it (``FSDPStrategy``), else None."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped = module._trainer.model if module._trainer is not None else None
    return wrapped if isinstance(wrapped, FullyShardedDataParallel) else None


def unwrapped_name(name: str) -> str:
    """A parameter name without the FSDP / activation-checkpointing wrapper segments."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


__all__ = ["DEFAULT_LORA", "SCHEDULERS", "TRAINABLE", "MDLMFineTuning", "build_tiny_model"]


class MDLMFineTuning(GenerativeEvaluation, L.LightningModule):
    """Fine-tune (or train from scratch) a LLaDA-V-style model on instruction data.

    Args:
        init_from: a snapshot directory in the released LLaDA-V layout (a real LLaDA-V download, or an
            mmbackdoor export); None builds the tiny embedded model from ``tiny_config``.
        tiny_config: overrides of :meth:`LladaVConfig.tiny` (e.g. ``{"vision": {"patch_size": 8}}``).
        tokenizer: tokenizer directory; default: the snapshot's own tokenizer, else the embedded one.
        load_dtype: dtype to load the snapshot in (default: its ``torch_dtype``).
        trainable: ``full`` / ``projector`` / ``language_model`` / ``projector_lm`` / ``lora``.
        lora: LoRA settings (peft ``LoraConfig`` keywords) for ``trainable=lora``.
        lr / vision_lr: AdamW learning rates (the vision tower uses ``vision_lr``, default ``lr``).
        weight_decay / betas: AdamW (decay only on matrices).
        warmup_ratio / min_lr_ratio / scheduler / decay_ratio: linear warmup over that share of the steps, then
            ``cosine`` decay to ``min_lr_ratio * lr``, ``constant``, or ``wsd`` (constant, then a cosine cool-down
            over the last ``decay_ratio`` of the steps).
        loss_eps: the SFT loss's minimum masking probability.
        gradient_checkpointing: activation checkpointing in the LM (real scale).
        generation: sampler settings (:class:`GenerationConfig`: gen_length, block_length, steps, ...).
        eval_masking: DiSP inference-time masking during validation/test (:class:`DiSPMasking` keys:
            rho, selection, mode, estimator, num_probes, seed); None: no masking.
        vision_token_dropout: training augmentation: each sample masks a random share in ``[0, this]`` of its
            vision tokens with the mask embedding (the intervention DiSP applies at inference).
        num_logged_samples: generations kept per evaluation set for the sample table.
        cpu_threads: ``torch.set_num_threads`` for CPU runs (1 is several times faster than 2 for the tiny
            model on a shared 2-core machine); None leaves torch's default.
        vision_aux / vision_aux_weight: embedded world only, a stand-in for SigLIP's pretraining: auxiliary
            linear classifiers of the samples' ``attributes`` (e.g. ``{"shape": [circle, ...], "colour": [red,
            ...]}``) on the projected vision tokens, added to the loss with this weight
            (:class:`~lightning_modules.vision_aux.VisionAuxHeads`, shared with LLaVA). The heads are not part of
            the model and are never exported.
        vision_aux_pooling: ``mean`` (classify the mean vision token) or ``token`` (every vision token classifies
            the attributes on its own, the loss averaged over tokens): each token then carries the scene, as the
            729 contextual tokens of a pretrained SigLIP do, so masking some of them leaves the answer readable.
    """

    def __init__(
        self,
        init_from: str | None = None,
        tiny_config: dict | None = None,
        tokenizer: str | None = None,
        load_dtype: str | None = None,
        trainable: str = "full",
        lora: dict | None = None,
        lr: float = 1e-3,
        vision_lr: float | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.03,
        min_lr_ratio: float = 0.0,
        scheduler: str = "cosine",
        decay_ratio: float = 0.3,
        loss_eps: float = 1e-3,
        gradient_checkpointing: bool = False,
        generation: dict | None = None,
        eval_masking: dict | None = None,
        vision_token_dropout: float = 0.0,
        num_logged_samples: int = 16,
        cpu_threads: int | None = None,
        vision_aux: dict[str, list[str]] | None = None,
        vision_aux_weight: float = 0.0,
        vision_aux_pooling: str = "mean",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if scheduler not in SCHEDULERS:
            raise ValueError(f"model.scheduler={scheduler!r}; expected one of {SCHEDULERS}")
        if trainable not in TRAINABLE:
            raise ValueError(f"model.trainable={trainable!r}; expected one of {TRAINABLE}")
        set_cpu_threads(cpu_threads)
        if not 0.0 <= vision_token_dropout < 1.0:
            raise ValueError(f"model.vision_token_dropout must be in [0, 1), got {vision_token_dropout}")
        self.generation = GenerationConfig.from_dict(generation)
        self.eval_masking = DiSPMasking.from_dict(eval_masking) if eval_masking else None
        self.model, self.tokenizer, self.prompt_formatter = load_for_finetuning(
            init_from, tiny_config, tokenizer, load_dtype
        )
        self.inputs = inputs_provenance({"model.init_from": init_from})  # before `latest_export` can move
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self._lora_applied = False
        self._configure_trainable(trainable, lora)
        self.vision_aux_heads = VisionAuxHeads.from_options(
            vision_aux, vision_aux_weight, self.model.config.text["hidden_size"], vision_aux_pooling
        )
        self.evaluator = None  # built from the datamodule at setup (GenerativeEvaluation)

    # ----------------------------------------------------------------------------------- model
    def instruct_text(self) -> LladaVInstructText:
        """The checkpoint's tokenizer and prompt format as the instruction datamodule's text interface."""
        return LladaVInstructText.from_config(self.tokenizer, self.prompt_formatter, self.model.config)

    def _configure_trainable(self, trainable: str, lora: dict | None) -> None:
        model = self.model
        if trainable == "full":
            return
        model.requires_grad_(False)
        if trainable == "projector":
            model.mm_projector.requires_grad_(True)
            if model.image_newline is not None:
                model.image_newline.requires_grad_(True)
        elif trainable in ("language_model", "projector_lm"):
            model.language_model.requires_grad_(True)
            model.lm_head.requires_grad_(True)
            if trainable == "projector_lm":  # LLaVA's stage-2 recipe: the vision tower stays frozen
                model.mm_projector.requires_grad_(True)
                if model.image_newline is not None:
                    model.image_newline.requires_grad_(True)
        else:  # lora
            from peft import LoraConfig, get_peft_model

            settings = {**DEFAULT_LORA, **(lora or {})}
            try:
                config = LoraConfig(**settings)
            except TypeError as error:
                raise ValueError(f"model.lora: {error}") from None
            model.language_model = get_peft_model(model.language_model, config)
            model.mm_projector.requires_grad_(True)
            self._lora_applied = True
            self._lora_config = config

    def merge_lora(self) -> None:
        """Fold LoRA adapters into the LM weights (in place); a no-op without LoRA."""
        if self._lora_applied:
            self.model.language_model = self.model.language_model.merge_and_unload()
            self._lora_applied = False

    def unsharded_model(self, state_dict: dict[str, torch.Tensor]) -> LladaVModel:
        """A plain :class:`LladaVModel` holding ``state_dict``, the module's full state gathered from a sharded
        (FSDP) run (``model.*`` keys; the auxiliary heads are dropped), with LoRA folded in. Built on the meta
        device and assigned, so no second random initialisation runs."""
        weights = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
        with torch.device("meta"):
            model = LladaVModel(self.model.config)
            if self._lora_applied:
                from peft import get_peft_model

                model.language_model = get_peft_model(model.language_model, self._lora_config)
        model.load_state_dict(weights, strict=True, assign=True)
        if self._lora_applied:
            model.language_model = model.language_model.merge_and_unload()
        _materialize_buffers(model, "cpu")
        return model

    def export(
        self,
        path: str | Path,
        run_config: dict | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write a snapshot in the released LLaDA-V layout (+ tokenizer, prompt format and run config).

        ``state_dict``: the full module state gathered from a sharded run (see :class:`~callbacks.export.
        ExportOnFitEnd`); the snapshot is then written from it instead of from the (sharded) ``self.model``.
        """
        if state_dict is None:
            self.merge_lora()
            model = self.model
        else:
            model = self.unsharded_model(state_dict)
        path = save_snapshot(model, path, tokenizer=self.tokenizer, prompt_formatter=self.prompt_formatter)
        meta = {
            "family": "mdlm",
            "module": type(self).__name__,
            "generation": self.generation.to_dict(),
            "inputs": self.inputs,
            "run_config": run_config or {},
        }
        from attacks import atomic_write_json

        atomic_write_json(path / "mmbackdoor_export.json", json.loads(json.dumps(meta, default=str)))
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        manifest = getattr(datamodule, "manifest", None)
        if manifest is not None:  # the export carries the poison it was trained on (for DiSP / evaluation)
            manifest.save(path / "poison_manifest.json")
        purified = getattr(datamodule, "purified_path", None)
        if purified:
            atomic_write_json(path / "purified_from.json", {"purified": str(purified)})
        return path

    # ----------------------------------------------------------------------------------- training
    def _vision_dropout(self, batch: dict) -> dict:
        """Each sample masks a random share ``r ~ U(0, vision_token_dropout)`` of its vision tokens (mask embedding),
        so the model has seen masked vision tokens before DiSP masks some at inference."""
        rate = self.hparams.vision_token_dropout
        if rate <= 0:
            return {}
        size, count = batch["input_ids"].shape[0], self.model.config.num_vision_tokens
        share = torch.rand(size, 1, device=self.device) * rate
        return {"vision_token_mask": torch.rand(size, count, device=self.device) < share}

    def vision_aux_loss(self, vision: torch.Tensor, attributes: list[dict]) -> torch.Tensor | None:
        """The auxiliary heads' loss of the ``(B, N, D)`` projected vision tokens (:meth:`VisionAuxHeads.loss`)."""
        return self.vision_aux_heads.loss(vision, attributes)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        size = batch["input_ids"].shape[0]
        images = {"pixel_values": batch["pixel_values"]}
        aux = None
        if self.vision_aux_heads is not None:
            vision = self.model.encode_images(batch["pixel_values"])  # encoded once, shared by both losses
            images = {"vision_token_override": vision}
            aux = self.vision_aux_loss(vision, batch.get("attributes") or [{}] * size)
        loss = masked_diffusion_loss(
            self.model,
            batch["input_ids"],
            batch["response_mask"],
            self.model.config.mask_token_id,
            eps=self.hparams.loss_eps,
            attention_mask=batch["attention_mask"],
            **images,
            **self._vision_dropout(batch),
        )
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        if aux is not None:
            self.log("train/vision_aux", aux, batch_size=size)
            loss = loss + self.hparams.vision_aux_weight * aux
        return loss

    def configure_model(self) -> None:
        """Record every parameter's rank before a strategy wraps the model: under FSDP (``use_orig_params``) the
        parameters become flat 1-D shard views, and :meth:`configure_optimizers` still has to tell matrices
        (weight decay) from vectors."""
        named = list(self.model.named_parameters())
        if self.vision_aux_heads is not None:
            named += [(f"vision_aux_heads.{n}", p) for n, p in self.vision_aux_heads.named_parameters()]
        self._param_ndim = {unwrapped_name(n): p.dim() for n, p in named}

    def configure_optimizers(self):
        vision, decay, no_decay = [], [], []
        named = list(self.model.named_parameters())
        if self.vision_aux_heads is not None:
            named += [(f"vision_aux_heads.{n}", p) for n, p in self.vision_aux_heads.named_parameters()]
        ndim = getattr(self, "_param_ndim", None)  # recorded by configure_model, before any sharding
        for name, param in named:
            if not param.requires_grad:
                continue
            name = unwrapped_name(name)
            if name.startswith("vision_tower."):
                vision.append(param)
            elif (ndim[name] if ndim is not None else param.dim()) >= 2:
                decay.append(param)
            else:
                no_decay.append(param)
        if not (vision or decay or no_decay):
            raise ValueError("no trainable parameters (check model.trainable)")
        hp = self.hparams
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay, "lr": hp.lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": hp.lr},
            {"params": vision, "weight_decay": hp.weight_decay, "lr": hp.vision_lr or hp.lr},
        ]
        groups = [g for g in groups if g["params"]]
        optimizer = torch.optim.AdamW(groups, betas=tuple(hp.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = round(hp.warmup_ratio * total)
        if hp.scheduler == "wsd":
            decay = round(hp.decay_ratio * total)
            schedule = lambda step: warmup_stable_decay(step, warmup, total, decay, hp.min_lr_ratio)  # noqa: E731
        else:
            floor = 1.0 if hp.scheduler == "constant" else hp.min_lr_ratio
            schedule = lambda step: warmup_cosine(step, warmup, total, floor)  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Norm clipping under FSDP goes through the root wrapper's ``clip_grad_norm_`` (the norm over all shards;
        Lightning's FSDP precision refuses ``trainer.gradient_clip_val`` otherwise); any other strategy clips as
        Lightning does."""
        sharded = sharded_root(self)
        if sharded is None or not gradient_clip_val or gradient_clip_algorithm not in (None, "norm"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        sharded.clip_grad_norm_(gradient_clip_val)

    # ----------------------------------------------------------------------------------- evaluation
    def generate_batch(self, batch: dict, masking: DiSPMasking | None = None, batch_idx: int = 0):
        """Decoded responses (and the masked tokens, or None) for an evaluation batch."""
        generator = None
        if masking is not None:
            generator = torch.Generator().manual_seed(masking.seed * 1_000_003 + batch_idx)
        ids, selected = masked_generate_ids(
            self.model,
            batch["prompt_ids"],
            batch["pixel_values"],
            self.generation,
            masking,
            batch["prompt_mask"],
            generator,
        )
        return decode_responses(self.tokenizer, ids, stop_token_ids(self.model)), selected

    def generate_responses(self, batch: dict, batch_idx: int) -> list[str]:
        """What :class:`GenerativeEvaluation` scores: the sampler's answers (with ``eval_masking``, if set)."""
        was_training = self.model.training
        self.model.eval()
        responses, _ = self.generate_batch(batch, self.eval_masking, batch_idx)
        if was_training:
            self.model.train()
        return responses
