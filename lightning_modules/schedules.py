"""Learning-rate multipliers for ``LambdaLR`` (step -> factor of the base learning rate)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup_steps``, then cosine decay to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_stable_decay(
    step: int, warmup_steps: int, total_steps: int, decay_steps: int, min_ratio: float = 0.0
) -> float:
    """LR multiplier (WSD): linear warmup, constant, then a cosine cool-down over the last ``decay_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    start = total_steps - decay_steps
    if step < start or decay_steps <= 0:
        return 1.0
    progress = min(1.0, (step - start) / max(1, decay_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
