"""The generation benchmark: its re-implementation of LLaDA's ``generate`` equals the project's sampler with
``cache: none`` token for token, and its quick mode prints every setting (no timings are asserted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from bench.mdlm_common import collated_batch, load_module, shapes_data
from model_families.mdlm.inference import GenerationConfig, generate_ids, suppressed_token_ids

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_generation.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_generation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load()


@pytest.fixture(scope="module")
def tiny_batch():
    module = load_module(None, "cpu")
    return module.model, collated_batch(shapes_data(6), 6, "cpu")


@pytest.mark.parametrize(
    ("temperature", "remasking"), [(0.0, "low_confidence"), (0.8, "low_confidence"), (0.8, "random")]
)
def test_official_reimplementation_equals_project_none_token_for_token(
    bench, tiny_batch, temperature, remasking
):
    # Left-padded prompts with images, two blocks, the global RNG seeded alike for the sampled settings.
    model, batch = tiny_batch
    prompts, images, masks = batch["prompt_ids"], batch["pixel_values"], batch["prompt_mask"]
    assert bool((masks == 0).any()), "the batch should have padded prompts"
    config = GenerationConfig(
        gen_length=16, block_length=8, steps=6, temperature=temperature, remasking=remasking
    )
    torch.manual_seed(3)
    ours = generate_ids(model, prompts, images, config, masks)
    torch.manual_seed(3)
    official = bench.llada_generate(
        model,
        prompts,
        masks,
        model.config.mask_token_id,
        steps=6,  # 3 per block for 8 masked tokens: the remainder goes to the first steps
        gen_length=16,
        block_length=8,
        temperature=temperature,
        remasking=remasking,
        suppress_ids=suppressed_token_ids(model.config),
        softmax_dtype=torch.float64,
        pixel_values=images,
    )
    assert torch.equal(official[:, : prompts.shape[1]], prompts)
    assert torch.equal(official[:, prompts.shape[1] :], ours)


def test_official_schedule_spreads_the_remainder_over_the_first_steps(bench):
    mask = torch.tensor([[True] * 7 + [False], [True] * 3 + [False] * 5])
    counts = bench.llada_num_transfer_tokens(mask, 3)
    assert counts.tolist() == [[3, 2, 2], [1, 1, 1]]


def test_quick_bench_prints_every_setting_and_none_reproduces_the_official_tokens(bench, capsys):
    caches = ["none", "prefix", "dual"]
    result = bench.main(["--quick", "--threads", "1"])  # every cache setting by default
    out = capsys.readouterr().out
    settings = [bench.OFFICIAL, bench.OFFICIAL_F32, bench.OFFICIAL_ONCE, *caches]
    rows = {(r["gen_length"], r["setting"]): r for r in result["generation"]}
    assert set(rows) == {(16, s) for s in settings}
    for setting in settings:
        assert f"| 16 | {setting} |" in out
    assert rows[(16, "none")]["identical"] and rows[(16, bench.OFFICIAL_ONCE)]["identical"]
    assert result["exact"] and "ERROR" not in out
    baseline = rows[(16, bench.OFFICIAL)]
    assert baseline["speedup"] == 1.0 and baseline["agreement"] == 1.0
    assert all(0.0 <= r["agreement"] <= 1.0 for r in rows.values())
    assert [r["setting"] for r in result["purification"]] == caches
    assert all(r["samples"] == 4 and r["samples_per_s"] > 0 for r in result["purification"])
    for cache in caches:
        assert f"| {cache} |" in out.split("DiSP purification")[1]


def test_bench_reports_an_exact_setting_that_differs_from_the_official_tokens(bench, capsys, monkeypatch):
    real = bench.project_ids

    def off_by_one(model, batch, config):
        ids = real(model, batch, config)
        ids[0, 0] = (ids[0, 0] + 1) % model.config.text["vocab_size"]
        return ids

    monkeypatch.setattr(bench, "project_ids", off_by_one)
    result = bench.main(["--quick", "--threads", "1", "--caches", "none", "--purify-samples", "2"])
    out = capsys.readouterr().out
    none = next(r for r in result["generation"] if r["setting"] == "none")
    assert not none["identical"] and none["agreement"] == pytest.approx(1 - 1 / (4 * 16))
    assert not result["exact"]
    assert "NOT identical" in out and "ERROR: none at gen_length 16 differs from the official tokens" in out
