#!/usr/bin/env python
"""GPU suite: throughput of the project's GPU-bound pieces on one device, as one table.

    python bench/gpu_suite.py                                 # real sizes on cuda (< 8 min on an H100/H200)
    python bench/gpu_suite.py --device cpu --sizes tiny       # the same code paths on small shapes, seconds

Rows (each measured in this run; ratios are against a baseline of the same run):

* ``copy`` and ``trigger/<name>``: the batched image triggers (badnet, blended, sig, wanet, low_frequency) on
  one batch (256 x 3 x 224 x 224 float32 at real size), as images/s and as effective bandwidth (bytes read
  plus written, 2 x the batch), against a ``clone()`` of the same batch: the ratio is the share of the
  device's copy bandwidth a trigger reaches (1.0 = as fast as copying the batch).
* ``clip/rn50``, ``clip/vit_b_32``: a poisoned fine-tuning step of a real-sized CLIP with random weights
  (``create_clip`` without a pretrained tag), bf16 autocast as the shipped configs' ``bf16-mixed``: BadNet on
  10% of the batch with the target caption, symmetric InfoNCE, backward, AdamW. Samples/s and model-FLOPs
  utilisation (MFU): FLOPs of one step counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
  convolutions, attention) divided by the step time and the device's peak dense bf16 rate.
* ``llada/generate_<cache>``: tokens/s of block-wise masked-diffusion generation (``generate_ids``) of a
  LLaDA-V-shaped model with random weights in bf16 (``bf16-true`` as the shipped MDLM configs): a 1B-scale
  LLaMA-architecture bidirectional LM with LLaDA's vocabulary and the SigLIP so400m tower at 384 px / patch 14
  (729 vision tokens), for each cache setting of ``GenerationConfig`` (ratio: against ``cache=none``).
* ``llada/sft``: one LLaDA SFT step (``masked_diffusion_loss``, backward, AdamW) of the same model: tokens/s
  (all sequence positions, image included) and MFU.
* ``metric/tma``, ``metric/cti``, ``metric/asr``: updates/s of the torchmetrics on device tensors.

A row that fails is reported as ``error`` with its message, a row not started because ``--budget-s`` was spent
as ``skipped``; either makes the exit status 1. The table goes to stdout and, with the device, date and peak
rate, to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacks.io import atomic_write_json
from attacks.registry import IMAGE_TRIGGERS
from metrics import AttackSuccessRate, CrossTriggerInteraction, TriggerModalityAttribution
from model_families.clip.factory import create_clip
from model_families.mdlm.config import SIGLIP_SO400M_384, LladaVConfig
from model_families.mdlm.diffusion import CACHES, masked_diffusion_loss
from model_families.mdlm.inference import GenerationConfig, generate_ids
from model_families.mdlm.modeling import LladaVModel

# Peak dense bf16 tensor-core rate (TFLOP/s, no sparsity) by a substring of the CUDA device name, first match
# wins (more specific names first). Vendor data sheets; --peak-tflops overrides.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100", 989.4),  # SXM
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)
TRIGGERS = ("badnet", "blended", "sig", "wanet", "low_frequency")
PATCH_FRACTION = 16 / 224  # the published 16 px BadNet patch at 224 px
POISON_RATE = 0.1
# A 1B-scale LLaMA-architecture LM (blocks of TinyLlama-1.1B's width, 16 layers) with LLaDA's vocabulary.
LM_1B: dict[str, Any] = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
}
LM_TINY: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
SIGLIP_TINY: dict[str, Any] = {
    **SIGLIP_SO400M_384,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 28,
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Shapes and repetitions of one suite size."""

    trigger_batch: tuple[int, int, int, int]
    clip_models: tuple[tuple[str, str], ...]  # (row id, open_clip architecture)
    clip_batch: int
    lm: dict[str, Any]
    vision: dict[str, Any]
    prompt_tokens: int  # text tokens of a prompt besides the image
    gen_batch: int
    gen_length: int
    block_length: int
    steps: int
    sft_batch: int
    response_tokens: int
    metric_batch: int
    warmup: int
    iters: int
    metric_iters: int


SIZES: dict[str, Sizes] = {
    "real": Sizes(
        trigger_batch=(256, 3, 224, 224),
        clip_models=(("rn50", "RN50"), ("vit_b_32", "ViT-B-32")),
        clip_batch=256,
        lm=LM_1B,
        vision=dict(SIGLIP_SO400M_384),
        prompt_tokens=64,
        gen_batch=16,
        gen_length=128,
        block_length=32,
        steps=128,
        sft_batch=8,
        response_tokens=128,
        metric_batch=4096,
        warmup=3,
        iters=20,
        metric_iters=200,
    ),
    "tiny": Sizes(
        trigger_batch=(4, 3, 32, 32),
        clip_models=(("rn50", "tiny-rn-shapes"), ("vit_b_32", "tiny-vit-shapes")),
        clip_batch=4,
        lm=LM_TINY,
        vision=SIGLIP_TINY,
        prompt_tokens=4,
        gen_batch=2,
        gen_length=8,
        block_length=4,
        steps=4,
        sft_batch=2,
        response_tokens=8,
        metric_batch=64,
        warmup=1,
        iters=2,
        metric_iters=5,
    ),
}

ROW_IDS: tuple[str, ...] = (
    "copy",
    *(f"trigger/{name}" for name in TRIGGERS),
    "clip/rn50",
    "clip/vit_b_32",
    *(f"llada/generate_{cache}" for cache in CACHES),
    "llada/sft",
    "metric/tma",
    "metric/cti",
    "metric/asr",
)


# ------------------------------------------------------------------------------------------ measuring
def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel; count it with the same formula
# so that a CPU count (the tiny suite, the tests) includes attention like a CUDA one.
_CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``(fn(), FLOPs)``: the matmul, convolution and attention FLOPs of one call of ``fn`` (forward and,
    when ``fn`` runs it, backward), counted by ``FlopCounterMode`` (a linear layer on a (B, in) batch: 2 B in
    out forward, twice that backward)."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
    with counter:
        result = fn()
    return result, counter.get_total_flops()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Mean wall seconds of ``fn`` over ``iters`` calls after ``warmup`` calls, with the device synchronised
    before and after the timed calls only (kernels of consecutive calls overlap as in training)."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _synchronize(device)
    return (time.perf_counter() - start) / iters


def peak_bf16_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """Peak dense bf16 TFLOP/s of ``device`` and where it came from (``--peak-tflops`` or the table)."""
    if override is not None:
        if not override > 0:
            raise ValueError(f"--peak-tflops must be positive, got {override}")
        return float(override), "--peak-tflops"
    if device.type != "cuda":
        return None, f"no peak bf16 rate known for device type {device.type!r}; pass --peak-tflops"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops, f"table entry {key!r} for {name!r}"
    return None, f"{name!r} is not in the peak table of bench/gpu_suite.py; pass --peak-tflops"


@dataclasses.dataclass
class Row:
    """One line of the table; ``rate`` in ``unit`` per second, ``ratio`` against ``ratio_of``."""

    id: str
    case: str
    status: str = "ok"  # ok | skipped | error
    rate: float | None = None
    unit: str = ""
    achieved: float | None = None  # GB/s for copies and triggers, TFLOP/s for model steps
    achieved_unit: str = ""
    ratio: float | None = None
    ratio_of: str = ""
    flops_per_step: int | None = None  # counted FLOPs of one training step
    flops_per_item: int | None = None  # the same per sample (CLIP) or per sequence position (LLaDA SFT)
    note: str = ""


class Suite:
    """Runs the rows in order within a time budget, keeping each row's failure to that row."""

    def __init__(self, device: torch.device, sizes: Sizes, peak: float | None, budget_s: float) -> None:
        self.device, self.sizes, self.peak, self.budget_s = device, sizes, peak, budget_s
        self.start = time.perf_counter()
        self.rows: list[Row] = []

    def run(self, row_id: str, case: str, measure: Callable[[Row], None]) -> Row:
        row = Row(row_id, case)
        elapsed = time.perf_counter() - self.start
        if elapsed > self.budget_s:
            row.status, row.note = "skipped", f"--budget-s {self.budget_s:g} spent ({elapsed:.0f} s elapsed)"
        else:
            try:
                measure(row)
            except Exception as error:  # a failed row must not hide the others; it is reported and exits 1
                row.status, row.note = "error", f"{type(error).__name__}: {error}"
                traceback.print_exc(file=sys.stderr)
        self.rows.append(row)
        return row

    def mfu(self, row: Row, flops_per_call: int, seconds: float) -> None:
        """Fill achieved TFLOP/s and the MFU (or a note that says why there is none)."""
        row.flops_per_step = flops_per_call
        row.achieved, row.achieved_unit = flops_per_call / seconds / 1e12, "TFLOP/s"
        if self.peak is None:
            row.note = (
                row.note + "; " if row.note else ""
            ) + "MFU not computed: no peak rate (--peak-tflops)"
        else:
            row.ratio, row.ratio_of = row.achieved / self.peak, "MFU (of peak bf16)"


# ---------------------------------------------------------------------------------------------- rows
def make_trigger(name: str, size: int) -> torch.nn.Module:
    """The trigger ``name`` with its fixed pattern drawn for ``size`` px (BadNet: the published 16/224 patch)."""
    kwargs: dict[str, Any] = {
        "badnet": {"patch_size": PATCH_FRACTION, "pattern": "white", "location": "br"},
        "sig": {},
    }.get(name, {"image_size": size})
    return IMAGE_TRIGGERS[name](**kwargs)


def trigger_rows(suite: Suite) -> None:
    sizes, device = suite.sizes, suite.device
    images = torch.rand(sizes.trigger_batch, device=device)
    moved = 2 * images.numel() * images.element_size()  # read + write
    shape = "x".join(map(str, sizes.trigger_batch))
    copy: dict[str, float] = {}

    def measure_copy(row: Row) -> None:
        seconds = seconds_per_call(images.clone, device, sizes.warmup, sizes.iters)
        copy["gb_s"] = moved / seconds / 1e9
        row.rate, row.unit = images.shape[0] / seconds, "img/s"
        row.achieved, row.achieved_unit = copy["gb_s"], "GB/s"
        row.ratio, row.ratio_of = 1.0, "copy bandwidth"

    suite.run("copy", f"clone() {shape} float32", measure_copy)
    for name in TRIGGERS:

        def measure(row: Row, name: str = name) -> None:
            trigger = make_trigger(name, images.shape[-1]).to(device)
            with torch.inference_mode():
                seconds = seconds_per_call(lambda: trigger(images), device, sizes.warmup, sizes.iters)
            row.rate, row.unit = images.shape[0] / seconds, "img/s"
            row.achieved, row.achieved_unit = moved / seconds / 1e9, "GB/s"
            if "gb_s" not in copy:
                raise RuntimeError("the copy row failed, so there is no bandwidth to compare with")
            row.ratio, row.ratio_of = row.achieved / copy["gb_s"], "copy bandwidth"

        suite.run(f"trigger/{name}", f"{name} {shape} float32", measure)


def clip_rows(suite: Suite) -> None:
    sizes, device = suite.sizes, suite.device
    for row_id, arch in sizes.clip_models:

        def measure(row: Row, arch: str = arch) -> None:
            import open_clip

            torch.manual_seed(0)
            bundle = create_clip(arch)  # no pretrained tag: random weights
            model, normalize = bundle.model.to(device).train(), bundle.normalize.to(device)
            batch, size = sizes.clip_batch, bundle.image_size
            images = torch.rand(batch, 3, size, size, device=device)
            poisoned = max(1, round(POISON_RATE * batch))
            captions = [f"a photo of object {i % 100}" for i in range(batch)]
            captions[:poisoned] = ["a photo of a banana"] * poisoned  # the target caption
            tokens = bundle.tokenizer(captions).to(device)  # the data loader's work, done once
            trigger = make_trigger("badnet", size).to(device)
            loss_fn = open_clip.ClipLoss()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)

            def step() -> None:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    x = torch.cat([trigger(images[:poisoned]), images[poisoned:]])
                    image_features, text_features, logit_scale = model(normalize(x), tokens)[:3]
                    loss = loss_fn(image_features, text_features, logit_scale)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            _, flops = count_flops(step)  # also the first warm-up step
            seconds = seconds_per_call(step, device, sizes.warmup, sizes.iters)
            row.rate, row.unit = batch / seconds, "samples/s"
            row.flops_per_item = flops // batch
            suite.mfu(row, flops, seconds)

        suite.run(f"clip/{row_id}", f"{arch} batch {sizes.clip_batch} bf16-mixed, 10% BadNet", measure)


def llada_config(sizes: Sizes) -> LladaVConfig:
    """The released LLaDA-V layout (special ids, vocabulary, image newlines) with the suite's LM and tower."""
    return LladaVConfig.released(
        vision=dict(sizes.vision), text={**LladaVConfig.released().text, **sizes.lm}, image_aspect_ratio="pad"
    )


def _prompt_ids(config: LladaVConfig, batch: int, text: int, device: torch.device) -> torch.Tensor:
    """(B, 1 + text): the image placeholder then random ordinary token ids (below LLaDA's special ids)."""
    ids = torch.randint(100, 126000, (batch, 1 + text), device=device)
    ids[:, 0] = config.image_token_index
    return ids


def llada_rows(suite: Suite) -> None:
    sizes, device = suite.sizes, suite.device
    state: dict[str, Any] = {}

    def build() -> LladaVModel:
        if "model" not in state:
            config = llada_config(sizes)
            torch.manual_seed(0)
            with torch.device(device):
                model = LladaVModel(config)
            state["model"] = model.to(torch.bfloat16)  # bf16-true, as the shipped MDLM configs
            state["params"] = sum(p.numel() for p in model.parameters())
            state["lm_params"] = sum(p.numel() for p in model.language_model.parameters())
        return state["model"]

    shape = (
        f"batch {sizes.gen_batch}, gen {sizes.gen_length}, block {sizes.block_length}, steps {sizes.steps}"
    )
    baseline: dict[str, float] = {}
    for cache in CACHES:

        def measure(row: Row, cache: str = cache) -> None:
            model = build().eval()
            config = GenerationConfig(
                gen_length=sizes.gen_length, block_length=sizes.block_length, steps=sizes.steps, cache=cache
            )
            warm = GenerationConfig(
                gen_length=sizes.block_length, block_length=sizes.block_length, steps=2, cache=cache
            )
            prompts = _prompt_ids(model.config, sizes.gen_batch, sizes.prompt_tokens, device)
            images = torch.rand(
                sizes.gen_batch, 3, model.config.image_size, model.config.image_size, device=device
            )
            generate_ids(model, prompts, images, warm)  # kernels, allocator
            seconds = seconds_per_call(lambda: generate_ids(model, prompts, images, config), device, 0, 1)
            row.rate, row.unit = sizes.gen_batch * sizes.gen_length / seconds, "tokens/s"
            if cache == "none":
                baseline["rate"] = row.rate
            if "rate" in baseline:
                row.ratio, row.ratio_of = row.rate / baseline["rate"], "cache=none"
            row.note = f"{_count(state['lm_params'])} LM params, {_count(state['params'])} in all"

        suite.run(f"llada/generate_{cache}", f"cache={cache}, {shape}, bf16", measure)

    def measure_sft(row: Row) -> None:
        model = build().train()
        config = model.config
        batch = sizes.sft_batch
        prompt = _prompt_ids(config, batch, sizes.prompt_tokens, device)
        response = torch.randint(100, 126000, (batch, sizes.response_tokens), device=device)
        input_ids = torch.cat([prompt, response], dim=1)
        response_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        response_mask[:, prompt.shape[1] :] = True
        attention_mask = torch.ones_like(input_ids)
        images = torch.rand(batch, 3, config.image_size, config.image_size, device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)

        def step() -> None:
            loss = masked_diffusion_loss(
                model,
                input_ids,
                response_mask,
                config.mask_token_id,
                attention_mask=attention_mask,
                pixel_values=images,
            )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        _, flops = count_flops(step)
        seconds = seconds_per_call(step, device, sizes.warmup, sizes.iters)
        positions = input_ids.shape[1] - 1 + config.num_image_positions  # the placeholder becomes the image
        row.rate, row.unit = batch * positions / seconds, "tokens/s"
        row.flops_per_item = flops // (batch * positions)
        suite.mfu(row, flops, seconds)
        row.note = (
            row.note + "; " if row.note else ""
        ) + f"{batch / seconds:.2f} samples/s, {positions} positions"

    suite.run(
        "llada/sft",
        f"SFT step batch {sizes.sft_batch}, {sizes.prompt_tokens}+{sizes.response_tokens} text tokens, bf16-true",
        measure_sft,
    )
    state.clear()


def metric_rows(suite: Suite) -> None:
    sizes, device = suite.sizes, suite.device
    generator = torch.Generator(device=device).manual_seed(0)
    values = torch.rand(sizes.metric_batch, 4, device=device, generator=generator)
    logits = torch.randn(sizes.metric_batch, 1000, device=device, generator=generator)
    labels = torch.randint(0, 1000, (sizes.metric_batch,), device=device, generator=generator)
    cases = {
        "tma": (TriggerModalityAttribution(["image", "text"]), (values,), "TMA, image+text"),
        "cti": (CrossTriggerInteraction(["image", "text"]), (values,), "CTI, image+text"),
        "asr": (AttackSuccessRate(target_class=0), (logits, labels), "ASR, logits over 1000 classes"),
    }
    for key, (metric, args, case) in cases.items():

        def measure(row: Row, metric=metric, args=args) -> None:
            metric.to(device)
            seconds = seconds_per_call(lambda: metric.update(*args), device, sizes.warmup, sizes.metric_iters)
            row.rate, row.unit = 1 / seconds, "updates/s"
            row.note = f"{sizes.metric_batch / seconds:,.0f} samples/s"
            metric.compute()  # the state is usable: a broken update would raise here

        suite.run(f"metric/{key}", f"{case}, batch {sizes.metric_batch}", measure)


# ---------------------------------------------------------------------------------------------- report
def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return ""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def format_table(rows: list[Row]) -> str:
    """The rows as a Markdown table (for the README)."""
    lines = [
        "| row | case | status | rate | achieved | ratio | FLOPs / item | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rate = f"{_number(r.rate)} {r.unit}" if r.rate is not None else ""
        achieved = f"{_number(r.achieved)} {r.achieved_unit}" if r.achieved is not None else ""
        ratio = f"{r.ratio:.3f} ({r.ratio_of})" if r.ratio is not None else ""
        flops = f"{r.flops_per_item / 1e9:.4g} G" if r.flops_per_item is not None else ""
        lines.append(
            f"| {r.id} | {r.case} | {r.status} | {rate} | {achieved} | {ratio} | {flops} | {r.note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the suite; returns the report written to ``--out`` (its ``exit_code`` is 1 on a failed or
    skipped row)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", choices=sorted(SIZES), default="real")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of the device"
    )
    parser.add_argument("--budget-s", type=float, default=450.0, help="start no row after this many seconds")
    parser.add_argument("--out", default="runs/gpu_suite.json", help="JSON report (written atomically)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda: no CUDA device is visible; check the suite on a CPU with --device cpu --sizes tiny"
        )
    peak, peak_source = peak_bf16_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"GPU suite, sizes={args.sizes}, device={name}, torch {torch.__version__}, {date}")
    print(f"peak bf16: {peak if peak is not None else 'unknown'} TFLOP/s ({peak_source})", flush=True)

    suite = Suite(device, SIZES[args.sizes], peak, args.budget_s)
    for section in (trigger_rows, clip_rows, llada_rows, metric_rows):
        section(suite)
    elapsed = time.perf_counter() - suite.start
    failed = [r.id for r in suite.rows if r.status in ("error", "skipped")]
    table = format_table(suite.rows)
    print(table)
    print(
        f"\n{len(suite.rows)} rows in {elapsed:.0f} s"
        + (f"; not measured: {', '.join(failed)}" if failed else "")
    )
    report = {
        "device": name,
        "sizes": args.sizes,
        "date": date,
        "torch": torch.__version__,
        "peak_bf16_tflops": peak,
        "peak_source": peak_source,
        "elapsed_s": elapsed,
        "exit_code": 1 if failed else 0,
        "rows": [dataclasses.asdict(r) for r in suite.rows],
        "table": table,
    }
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    sys.exit(main()["exit_code"])
