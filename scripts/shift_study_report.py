"""Rows, heat map and W&B run of ``scripts/domain_shift_study.py``: one row per attack and shift from the
evaluator's values (``asr``, ``asr@<s>``, ``asr_g@<s>``, ``cider@<s>``, ...; :mod:`evaluation.generative`)."""

from __future__ import annotations

import math
from pathlib import Path

from metrics.functional.attack_success_rate_generalisation import attack_success_rate_generalisation

COLUMNS_MD = [
    ("attack", "attack"),
    ("base", "MABA on"),
    ("shift", "shift"),
    ("ks", "KS"),
    ("asr_src", "ASR src"),
    ("asr_tgt", "ASR tgt"),
    ("asr_g", "ASR-G"),
    ("ca", "clean acc"),
    ("cider", "CIDEr"),
    ("bleu4", "BLEU-4"),
    ("rougeL", "ROUGE-L"),
    ("clean_model_cider", "clean model CIDEr"),
    ("cider_rel", "CIDEr / clean"),
    ("paper", "paper ASR-G Expr. / Real."),
]
# Table 1 of the paper: ASR-G at 5 % under its two image-style shifts (Expressionism / Realism); MABA's rows are
# reported there as mean ASR-G only (BadNets 0.318 -> 0.682, DualKey 0.638 -> 0.834)
PAPER = {
    "blended": "0.99 / 0.98", "dual_key": "1.00 / 0.54", "low_frequency": "0.73 / 0.01",
    "input_aware": "0.39 / 0.16", "badnet": "0.11 / 0.18", "wanet": "0.01 / 0.01",
    "maba": "mean 0.682", "maba_dual_key": "mean 0.834",
}  # fmt: skip
SCORES = ("ca", "cider", "bleu4", "rougeL")


def _value(metrics: dict, key: str, attack: str) -> float:
    if key not in metrics:
        raise KeyError(
            f"{attack}: the measurement gave no {key!r} (keys: {sorted(metrics)}); is the shift in "
            "data.eval_shifts and the attack's target set?"
        )
    return float(metrics[key])


def _at(key: str, shift: str) -> str:
    return key if shift == "none" else f"{key}@{shift}"


def shift_rows(
    attack: str,
    base: str | None,
    metrics: dict[str, float],
    clean: dict[str, float],
    ks: dict[str, float],
    shifts: list[str],
) -> list[dict]:
    """Rows ``none`` + ``shifts`` of one poisoned model: ASR in the source and target domain, ASR-G (the
    evaluator's ``asr_g@<s>``; for ``none`` the formula on ASR_src against itself), the shift's KS and the
    clean-input scores in the target domain, beside the clean model's CIDEr there. ASR-G is NaN, with the
    reason under ``invalid``, when the backdoor fired in neither domain (0/0)."""
    rows = []
    asr_src = _value(metrics, "asr", attack)
    for shift in ["none", *shifts]:
        asr_tgt = _value(metrics, _at("asr", shift), attack)
        row: dict = {"attack": attack, "base": base or "-", "shift": shift, "asr_src": asr_src}
        row["paper"] = PAPER.get(attack, "-")
        row["asr_tgt"] = asr_tgt
        row["ks"] = 0.0 if shift == "none" else float(ks[shift])
        if max(asr_src, asr_tgt) == 0:
            row["asr_g"] = math.nan
            row["invalid"] = {"asr_g": "ASR is 0 in both domains: ASR-G is 0/0"}
        elif shift == "none":
            row["asr_g"] = float(attack_success_rate_generalisation(asr_src, asr_tgt))
        else:
            row["asr_g"] = _value(metrics, f"asr_g@{shift}", attack)
        for key in SCORES:
            if _at(key, shift) in metrics:  # caption scores exist only with a caption task
                row[key] = float(metrics[_at(key, shift)])
        if _at("cider", shift) in clean:
            row["clean_model_cider"] = float(clean[_at("cider", shift)])
            if "cider" in row and row["clean_model_cider"] > 0:
                row["cider_rel"] = row["cider"] / row["clean_model_cider"]
        rows.append(row)
    return rows


def heat_map(rows: list[dict], shifts: list[str], path: Path) -> None:
    """ASR-G and ASR_tgt of every attack (rows) under every shift (columns), annotated; NaN cells grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    columns = ["none", *shifts]
    fig, axes = plt.subplots(1, 2, figsize=(3 + 2.2 * len(columns), 1.2 + 0.45 * len(attacks)))
    for ax, (key, title) in zip(axes, (("asr_g", "ASR-G"), ("asr_tgt", "ASR in the target domain"))):
        grid = np.full((len(attacks), len(columns)), np.nan)
        for r in rows:
            grid[attacks.index(r["attack"]), columns.index(r["shift"])] = r[key]
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
        ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto")
        for i in range(len(attacks)):
            for j in range(len(columns)):
                text = "nan" if np.isnan(grid[i, j]) else f"{grid[i, j]:.2f}"
                dark = np.isnan(grid[i, j]) or grid[i, j] > 0.6  # light cells (yellow, grey) get black text
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black" if dark else "white")
        ax.set_xticks(range(len(columns)), columns, fontsize=8)
        ax.set_yticks(range(len(attacks)), attacks, fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def log_to_wandb(rows: list[dict], out: Path, group: str) -> None:
    """The study's table and heat map as one W&B run of the invocation's group."""
    import os

    import wandb

    mode = os.environ.get("WANDB_MODE", "offline")  # offline unless W&B is configured, as train.py's logger
    run = wandb.init(project="mmbackdoor", group=group, name="domain_shift_study", dir=str(out), mode=mode)
    keys = [k for k, _ in COLUMNS_MD]
    run.log(
        {
            "study/table": wandb.Table(columns=keys, data=[[r.get(k) for k in keys] for r in rows]),
            "study/asr_g": wandb.Image(str(out / "asr_g.png")),
        }
    )
    run.finish()
