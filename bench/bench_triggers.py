"""Throughput of the batched image triggers against a per-image PIL/NumPy loop.

The baseline is the way older toolkits (BackdoorBench and the scripts that copy it) apply a trigger
inside ``Dataset.__getitem__``: convert each image to a PIL image / uint8 array, paste or blend the
pattern with NumPy (or warp one image at a time), and convert back to a tensor. Both paths are
measured in the same run on the same images; the loop always runs on the CPU, as it does in those
toolkits.

    python bench/bench_triggers.py [--device cuda] [--batch 256] [--sizes 32 224] [--threads 1]

On the CPU both paths use ``--threads`` cores (default 1, the loop's one core), so the ratio is the
gain of batching itself rather than of extra cores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacks import SIG, BadNet, Blended, ImageTrigger, WaNet

PATCH_FRACTION = 16 / 224  # the published 16 px patch at 224 px


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div(255)


def per_image_loop(name: str, trigger: ImageTrigger, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A BackdoorBench-style per-image implementation of the same trigger."""
    if name == "badnet":
        patch = max(1, round(PATCH_FRACTION * size))
        mask = np.zeros((size, size, 1), dtype=np.uint8)
        mask[size - patch :, size - patch :] = 1
        pattern = np.full((size, size, 3), 255, dtype=np.uint8)

        def apply(img: np.ndarray) -> np.ndarray:  # AddMaskPatchTrigger
            return img * (1 - mask) + pattern * mask

    elif name == "blended":
        pattern = (trigger.pattern.permute(1, 2, 0).numpy() * 255).astype(np.float32)
        alpha = trigger.alpha

        def apply(img: np.ndarray) -> np.ndarray:  # blendedImageAttack
            return ((1 - alpha) * img.astype(np.float32) + alpha * pattern).clip(0, 255).astype(np.uint8)

    elif name == "sig":
        columns = np.arange(size, dtype=np.float32)
        signal = (trigger.delta * 255 * np.sin(2 * np.pi * trigger.frequency * columns / size))[None, :, None]

        def apply(img: np.ndarray) -> np.ndarray:  # sigTriggerAttack
            return (img.astype(np.float32) + signal).clip(0, 255).astype(np.uint8)

    elif name == "wanet":
        grid = trigger.grid.cpu()

        def apply(img: np.ndarray) -> np.ndarray:  # one image at a time through grid_sample
            tensor = _to_tensor(img)[None]
            warped = F.grid_sample(tensor, grid, align_corners=True)[0]
            return (warped.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

    else:
        raise ValueError(f"no per-image baseline for {name!r}")

    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.stack([_to_tensor(apply(np.array(_to_pil(image)))) for image in images])

    return run


def make_trigger(name: str, size: int) -> ImageTrigger:
    if name == "badnet":
        return BadNet(patch_size=max(1, round(PATCH_FRACTION * size)), pattern="white", location="br")
    if name == "blended":
        return Blended(image_size=size)
    if name == "sig":
        return SIG()
    if name == "wanet":
        return WaNet(image_size=size)
    raise ValueError(name)


def _time(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up run."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--triggers", nargs="+", default=["badnet", "blended", "sig", "wanet"])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the batched path (median)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the per-image loop uses one core, so both paths get one)",
    )
    parser.add_argument(
        "--loop-repeats", type=int, default=2, help="timed runs of the per-image loop (median)"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"device={device} batch={args.batch} torch={torch.__version__} threads={torch.get_num_threads()}")
    header = f"{'trigger':<8} {'size':>4} {'batched img/s':>14} {'per-image img/s':>16} {'ratio':>8} {'max|diff|':>9}"
    print(header)
    print("-" * len(header))
    generator = torch.Generator().manual_seed(0)
    for size in args.sizes:
        images_cpu = torch.rand(args.batch, 3, size, size, generator=generator)
        images = images_cpu.to(device)
        for name in args.triggers:
            trigger = make_trigger(name, size)
            loop = per_image_loop(name, trigger, size)  # copies the fixed pattern to the CPU first
            trigger.to(device)
            with torch.inference_mode():
                batched_s = _time(lambda: trigger(images), args.repeats, sync)  # noqa: B023
                loop_s = _time(lambda: loop(images_cpu), args.loop_repeats, lambda: None)  # noqa: B023
                # Agreement check: the loop works in uint8, so differences up to ~1/255 are expected
                # (WaNet's warp of a quantised image can differ a little more).
                diff = (trigger(images).cpu() - loop(images_cpu)).abs().max().item()
            batched_rate, loop_rate = args.batch / batched_s, args.batch / loop_s
            print(
                f"{name:<8} {size:>4} {batched_rate:>14,.0f} {loop_rate:>16,.0f} "
                f"{batched_rate / loop_rate:>7.1f}x {diff:>9.4f}"
            )


if __name__ == "__main__":
    main()
