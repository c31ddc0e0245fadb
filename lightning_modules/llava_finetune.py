"""(Poisoned) instruction fine-tuning of LLaVA-style autoregressive VLMs (transformers'
``LlavaForConditionalGeneration``) with the response-only next-token loss.

Objective: cross-entropy of the answer tokens and their ``</s>`` given the chat prompt and the image tokens
(prompt, image tokens and EOS padding carry no loss; :func:`model_families.llava.modeling.response_labels`).
The same module trains the embedded world's clean tiny LLaVA from scratch (no ``init_from``), plants backdoors
by fine-tuning an export on a poisoned datamodule (``data.family: llava``), and fine-tunes a local llava-hf
snapshot on GPUs (``configs/llava15_7b_lora.yaml``).

Which parts train (``trainable``): ``full`` (everything), ``projector`` (the multi-modal projector, LLaVA's
stage 1), ``projector_lm`` (projector + LM + head, the vision tower frozen, LLaVA's stage 2), ``lora`` (LoRA
adapters on the LM via peft, plus the projector). LoRA is merged into the weights on export, so every export is a
plain llava-hf snapshot (+ tokenizer, image statistics, chat template and ``mmbackdoor_export.json``).

Validation/test: HF ``generate`` (greedy / sampling / beams, :class:`~model_families.llava.generation.
LlavaGeneration`) on the left-padded prompts of each evaluation set, scored by the family-free
:class:`~lightning_modules.generative_eval.GenerativeEvaluation` (``{stage}/ca``, ``asr``, ``cider``, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

from lightning_modules.generative_eval import GenerativeEvaluation, set_cpu_threads
from lightning_modules.mdlm_finetune import unwrapped_name
from lightning_modules.schedules import warmup_cosine
from lightning_modules.vision_aux import VisionAuxHeads
from model_families.llava.build import load_for_finetuning
from model_families.llava.config import check_image_tokens
from model_families.llava.generation import LlavaGeneration, generate_answers
from model_families.llava.instruct_text import LlavaInstructText
from model_families.llava.modeling import (
    IGNORE_INDEX,
    expand_image_tokens,
    normalize_images,
    position_ids,
    response_labels,
)
from model_families.llava.snapshot import LlavaSnapshot, save_snapshot
from model_families.loading import inputs_provenance

__all__ = ["DEFAULT_LORA", "TRAINABLE", "LlavaFineTuning"]

TRAINABLE = ("full", "projector", "projector_lm", "lora")
SCHEDULERS = ("cosine", "constant")
DEFAULT_LORA = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


class LlavaFineTuning(GenerativeEvaluation, L.LightningModule):
    """Fine-tune (or train from scratch) a LLaVA model on instruction data.

    Args:
        init_from: a llava-hf snapshot folder (a real download such as ``llava-hf/llava-1.5-7b-hf``, or an
            mmbackdoor export); None builds ``tiny-llava-shapes`` from ``tiny_config``.
        tiny_config: overrides of :func:`model_families.llava.config.tiny_shapes` (``vision`` / ``text`` dicts,
            ``vision_tower: siglip``, LlavaConfig keys).
        tokenizer: tokenizer folder; default: the snapshot's own, else the embedded LLaVA tokenizer.
        chat_template: overrides of :class:`~model_families.llava.chat.LlavaChatTemplate` (``prompt``, ``turn``,
            ``response``, ``image_placeholder``); default: the snapshot's saved template, else LLaVA-1.5's.
        load_dtype: dtype to load the snapshot in (default: its config's).
        trainable: ``full`` / ``projector`` / ``projector_lm`` / ``lora``.
        lora: LoRA settings (peft ``LoraConfig`` keywords) for ``trainable=lora``.
        lr / weight_decay / betas: AdamW (decay only on matrices).
        warmup_ratio / min_lr_ratio / scheduler: linear warmup over that share of the steps, then ``cosine``
            decay to ``min_lr_ratio * lr`` or ``constant``.
        gradient_checkpointing: activation checkpointing in the LM (real scale).
        generation: :class:`~model_families.llava.generation.LlavaGeneration` keys (mode, max_new_tokens,
            temperature, top_k, top_p, num_beams, length_penalty, seed).
        num_logged_samples: generations kept per evaluation set for the sample table.
        cpu_threads: ``torch.set_num_threads`` for CPU runs; None leaves torch's default.
        vision_aux / vision_aux_weight / vision_aux_pooling: embedded world only, a stand-in for the vision
            tower's pretraining: auxiliary classifiers of the samples' ``attributes`` on the projected image
            tokens, their loss added with this weight (:class:`~lightning_modules.vision_aux.VisionAuxHeads`, the
            same option as LLaDA-V's); never exported. Off by default (weight 0).
    """

    def __init__(
        self,
        init_from: str | None = None,
        tiny_config: dict | None = None,
        tokenizer: str | None = None,
        chat_template: dict | None = None,
        load_dtype: str | None = None,
        trainable: str = "full",
        lora: dict | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.03,
        min_lr_ratio: float = 0.0,
        scheduler: str = "cosine",
        gradient_checkpointing: bool = False,
        generation: dict | None = None,
        num_logged_samples: int = 16,
        cpu_threads: int | None = None,
        vision_aux: dict[str, list[str]] | None = None,
        vision_aux_weight: float = 0.0,
        vision_aux_pooling: str = "mean",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if trainable not in TRAINABLE:
            raise ValueError(f"model.trainable={trainable!r}; expected one of {TRAINABLE}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"model.scheduler={scheduler!r}; expected one of {SCHEDULERS}")
        set_cpu_threads(cpu_threads)
        self.generation = LlavaGeneration.from_dict(generation)
        snapshot = load_for_finetuning(init_from, tiny_config, tokenizer, load_dtype, chat_template)
        self.inputs = inputs_provenance({"model.init_from": init_from})  # before `latest_export` can move
        self.model, self.tokenizer, self.template = snapshot.model, snapshot.tokenizer, snapshot.template
        self.image_mean, self.image_std = snapshot.image_mean, snapshot.image_std
        where = f"model.init_from={init_from}" if init_from else "model.tiny_config"
        self.image_tokens = check_image_tokens(self.model.config, where)
        self.text = LlavaInstructText.from_tokenizer(
            self.tokenizer, self.template, f"the tokenizer of {where}"
        )
        if self.text.image_token_index != self.model.config.image_token_index:
            raise ValueError(
                f"{where}: the tokenizer's {self.template.image_placeholder!r} is id {self.text.image_token_index}, "
                f"the model's image_token_index is {self.model.config.image_token_index}"
            )
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self._lora_config = None
        self._configure_trainable(trainable, lora)
        self.vision_aux_heads = VisionAuxHeads.from_options(
            vision_aux, vision_aux_weight, int(self.model.config.text_config.hidden_size), vision_aux_pooling
        )
        self.evaluator = None  # built from the datamodule at setup (GenerativeEvaluation)

    # ----------------------------------------------------------------------------------- model
    def instruct_text(self) -> LlavaInstructText:
        """The checkpoint's tokenizer and chat template as the instruction datamodule's text interface."""
        return self.text

    def _configure_trainable(self, trainable: str, lora: dict | None) -> None:
        if trainable == "full":
            return
        model = self.model
        model.requires_grad_(False)
        model.model.multi_modal_projector.requires_grad_(True)
        if trainable == "projector_lm":
            model.model.language_model.requires_grad_(True)
            model.lm_head.requires_grad_(True)
        elif trainable == "lora":
            from peft import LoraConfig, get_peft_model

            try:
                config = LoraConfig(**{**DEFAULT_LORA, **(lora or {})})
            except TypeError as error:
                raise ValueError(f"model.lora: {error}") from None
            model.model.language_model = get_peft_model(model.model.language_model, config)
            self._lora_config = config

    def merge_lora(self) -> None:
        """Fold LoRA adapters into the LM weights (in place); a no-op without LoRA."""
        if self._lora_config is not None:
            self.model.model.language_model = self.model.model.language_model.merge_and_unload()
            self._lora_config = None

    def export(
        self, path: str | Path, run_config: dict | None = None, state_dict: dict | None = None
    ) -> Path:
        """Write a llava-hf snapshot (+ tokenizer, image statistics, chat template, ``mmbackdoor_export.json``
        and the poison manifest of the data). ``state_dict``: the full module state of a sharded run."""
        if state_dict is not None:
            raise ValueError(
                f"export {path}: a sharded (FSDP) LLaVA run cannot be exported; LoRA and the 7B recipe train "
                "under DDP (configs/llava15_7b_lora.yaml)"
            )
        self.merge_lora()
        meta = {
            "family": "llava",
            "module": type(self).__name__,
            "generation": self.generation.to_dict(),
            "inputs": self.inputs,
            "run_config": run_config or {},
        }
        snapshot = LlavaSnapshot(self.model, self.tokenizer, self.template, self.image_mean, self.image_std)
        path = save_snapshot(snapshot, path, meta=json.loads(json.dumps(meta, default=str)))
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        manifest = getattr(datamodule, "manifest", None)
        if manifest is not None:  # the export carries the poison it was trained on
            manifest.save(path / "poison_manifest.json")
        return path

    @property
    def image_size(self) -> int:
        """Side of the vision tower's square input (a data module renders or resizes to it)."""
        return int(self.model.config.vision_config.image_size)

    # ----------------------------------------------------------------------------------- training
    def pixel_values(self, batch: dict) -> torch.Tensor:
        """The batch's ``[0, 1]`` images normalised with the snapshot's statistics, in the model's dtype."""
        size = int(self.model.config.vision_config.image_size)
        return normalize_images(
            batch["pixel_values"], self.image_mean, self.image_std, size, self.model.dtype
        )

    def loss(self, batch: dict) -> torch.Tensor:
        """Mean next-token cross-entropy over the response tokens (answer + ``</s>``) of the batch."""
        return self.losses(batch)[0]

    def losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The response loss (:meth:`loss`) and the auxiliary heads' loss of the same forward's projected image
        tokens (None without ``vision_aux`` or when no sample has attributes)."""
        ids, mask, response = expand_image_tokens(
            batch["input_ids"],
            self.text.image_token_index,
            self.image_tokens,
            batch["attention_mask"],
            batch["response_mask"],
        )
        labels = response_labels(ids, response, batch["response_tokens"])
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids(mask),
            pixel_values=self.pixel_values(batch),
            labels=labels,
            use_cache=False,
        )
        if self.vision_aux_heads is None:
            return out.loss, None
        vision = torch.stack(list(out.image_outputs.pooler_output))  # (B, N, D) projected image tokens
        size = batch["input_ids"].shape[0]
        return out.loss, self.vision_aux_heads.loss(vision, batch.get("attributes") or [{}] * size)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        size = batch["input_ids"].shape[0]
        loss, aux = self.losses(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        if aux is not None:
            self.log("train/vision_aux", aux, batch_size=size)
            loss = loss + self.hparams.vision_aux_weight * aux
        return loss

    def _named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The model's parameters and the auxiliary heads' (``vision_aux_heads.*``), which the optimizer trains."""
        named = list(self.model.named_parameters())
        if self.vision_aux_heads is not None:
            named += [(f"vision_aux_heads.{n}", p) for n, p in self.vision_aux_heads.named_parameters()]
        return named

    def configure_model(self) -> None:
        """Record every parameter's rank before a strategy (FSDP) flattens it (weight decay on matrices)."""
        self._param_ndim = {unwrapped_name(n): p.dim() for n, p in self._named_parameters()}

    def configure_optimizers(self):
        hp = self.hparams
        ndim = getattr(self, "_param_ndim", None)
        decay, no_decay = [], []
        for name, param in self._named_parameters():
            if param.requires_grad:
                name = unwrapped_name(name)
                rank = ndim[name] if ndim is not None and name in ndim else param.dim()
                (decay if rank >= 2 else no_decay).append(param)
        if not (decay or no_decay):
            raise ValueError("no trainable parameters (check model.trainable)")
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr, betas=tuple(hp.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = round(hp.warmup_ratio * total)
        floor = 1.0 if hp.scheduler == "constant" else hp.min_lr_ratio
        schedule = lambda step: warmup_cosine(step, warmup, total, floor)  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def image_text_scorer(self, question: str = "describe the image."):
        """MABA's :class:`attacks.maba.ImageTextScorer` for this model: ``(images, texts) -> (B,)`` the summed
        log-probability of each text (and its ``</s>``) as the answer to ``question`` about its image,
        differentiable in the ``[0, 1]`` images (the clean caption's and the target's attributions)."""
        from datamodules.instruct_data import InstructCollator

        collate = InstructCollator(self.text, None)

        def score(images: torch.Tensor, texts) -> torch.Tensor:
            items = [
                {"image": torch.zeros(1), "question": question, "answer": t, "index": i, "key": str(i)}
                for i, t in enumerate(texts)
            ]
            batch = {k: v.to(images.device) if torch.is_tensor(v) else v for k, v in collate(items).items()}
            batch["pixel_values"] = images
            ids, mask, response = expand_image_tokens(
                batch["input_ids"], self.text.image_token_index, self.image_tokens,
                batch["attention_mask"], batch["response_mask"],
            )  # fmt: skip
            labels = response_labels(ids, response, batch["response_tokens"])[:, 1:]
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                pixel_values=self.pixel_values(batch), use_cache=False,
            ).logits[:, :-1].float()  # fmt: skip
            keep = labels != IGNORE_INDEX
            picked = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            return (picked * keep).sum(dim=1)

        return score

    # ----------------------------------------------------------------------------------- evaluation
    def generate_responses(self, batch: dict, batch_idx: int) -> list[str]:
        """What :class:`GenerativeEvaluation` scores: HF ``generate`` on the left-padded prompts."""
        was_training = self.model.training
        self.model.eval()
        try:
            return generate_answers(
                self.model,
                self.tokenizer,
                batch["prompt_ids"],
                batch["prompt_mask"],
                self.pixel_values(batch),
                self.generation,
                self.text.image_token_index,
                self.image_tokens,
                self.text.eos_id,
                self.text.pad_id,
                batch_idx,
            )
        finally:
            if was_training:
                self.model.train()
