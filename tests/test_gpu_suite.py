"""The GPU suite (bench/gpu_suite.py) runs on a CPU with tiny shapes, so it cannot rot without a GPU; its FLOP
counts match hand formulas; the real sizes run on CUDA only (``-m gpu``)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_suite.py"
ROWS = [
    "copy",
    "trigger/badnet",
    "trigger/blended",
    "trigger/sig",
    "trigger/wanet",
    "trigger/low_frequency",
    "clip/rn50",
    "clip/vit_b_32",
    "llada/generate_none",
    "llada/generate_prefix",
    "llada/generate_dual",
    "llada/sft",
    "metric/tma",
    "metric/cti",
    "metric/asr",
]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_suite", module)
    spec.loader.exec_module(module)
    return module


suite = _load()


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite") / "report.json"
    report = suite.main(["--device", "cpu", "--sizes", "tiny", "--peak-tflops", "1.0", "--out", str(out)])
    return report, out


@pytest.fixture(scope="module")
def no_peak_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite") / "report.json"
    return suite.main(["--device", "cpu", "--sizes", "tiny", "--out", str(out)])


def _rows(report) -> dict[str, dict]:
    return {row["id"]: row for row in report["rows"]}


def test_tiny_suite_on_cpu_reports_every_row_in_the_table_and_the_json(tiny_report) -> None:
    report, out = tiny_report
    assert [row["id"] for row in report["rows"]] == ROWS == list(suite.ROW_IDS)
    assert json.loads(out.read_text())["rows"] == report["rows"]  # the file holds what was measured
    for row_id in ROWS:
        assert f"| {row_id} |" in report["table"]
    for row in report["rows"]:
        assert row["status"] == "ok", row
        assert row["rate"] > 0
    assert report["exit_code"] == 0


def test_trigger_rows_compare_with_the_copy_of_the_same_batch(tiny_report) -> None:
    rows = _rows(tiny_report[0])
    copy = rows["copy"]
    assert copy["ratio"] == 1.0 and copy["achieved_unit"] == "GB/s"
    batch_bytes = 4 * 3 * 32 * 32 * 4  # the tiny batch, float32
    for name in suite.TRIGGERS:
        row = rows[f"trigger/{name}"]
        # achieved GB/s = 2 x batch bytes (read + write) x (img/s / batch), ratio = its share of the copy's
        assert row["achieved"] == pytest.approx(2 * batch_bytes * row["rate"] / 4 / 1e9)
        assert row["ratio"] == pytest.approx(row["achieved"] / copy["achieved"])


def test_model_rows_have_positive_flops_and_mfu_against_the_given_peak(tiny_report) -> None:
    rows = _rows(tiny_report[0])
    for row_id in ("clip/rn50", "clip/vit_b_32", "llada/sft"):
        row = rows[row_id]
        assert row["flops_per_item"] > 0
        assert row["achieved_unit"] == "TFLOP/s"
        assert row["ratio"] == pytest.approx(row["achieved"] / 1.0)  # --peak-tflops 1.0
        assert row["ratio_of"].startswith("MFU")


def test_flop_counter_counts_a_linear_layer_as_two_in_out_batch_forward_and_three_times_that_with_backward() -> (
    None
):
    batch, fan_in, fan_out = 5, 7, 3
    layer = nn.Linear(fan_in, fan_out)
    x = torch.randn(batch, fan_in)
    _, forward = suite.count_flops(lambda: layer(x))
    assert forward == 2 * batch * fan_in * fan_out
    x.requires_grad_(True)
    _, step = suite.count_flops(lambda: layer(x).sum().backward())
    assert step == 6 * batch * fan_in * fan_out  # backward: input grad and weight grad, each as the forward


def test_flop_counter_counts_attention_on_the_cpu_as_on_cuda() -> None:
    """The CPU flash kernel is not in FlopCounterMode's table; the suite counts it with the CUDA formula."""
    batch, heads, length, dim = 2, 3, 5, 4
    q = torch.randn(batch, heads, length, dim)
    _, flops = suite.count_flops(lambda: nn.functional.scaled_dot_product_attention(q, q, q))
    assert flops == 2 * (2 * batch * heads * length * length * dim)  # Q K^T and A V


def test_clip_step_flops_are_three_forwards_of_the_model(no_peak_report) -> None:
    """A training step (forward, backward) costs about 3 forwards; the image input has no gradient, so the
    first convolution's backward is one forward, not two: between 2.5 and 3 forwards."""
    from model_families.clip.factory import create_clip

    rows = _rows(no_peak_report)
    torch.manual_seed(0)
    for row_id, arch in suite.SIZES["tiny"].clip_models:
        bundle = create_clip(arch)
        batch, size = suite.SIZES["tiny"].clip_batch, bundle.image_size
        tokens = bundle.tokenizer(["a photo"] * batch)
        images = torch.rand(batch, 3, size, size)
        with torch.no_grad():
            _, forward = suite.count_flops(lambda b=bundle, i=images, t=tokens: b.model(b.normalize(i), t))
        per_sample = rows[f"clip/{row_id}"]["flops_per_item"]
        assert 2.5 * forward / batch <= per_sample <= 3.0 * forward / batch, (
            arch,
            per_sample,
            forward / batch,
        )


def test_llada_sft_flops_equal_the_hand_count_of_the_architecture(tiny_report) -> None:
    """Per step: 3 x the forward matmuls (weights and inputs get gradients) of the SigLIP layers kept, the
    projector, the bidirectional LM over every position and the head over the text positions; the patch
    convolution's forward and weight gradient (the pixels need none); attention 4 P^2 D per layer and
    sequence forward and 2.5 times that backward (the scores are recomputed)."""
    sizes = suite.SIZES["tiny"]
    config = suite.llada_config(sizes)
    v, t = config.vision, config.text
    batch, text = sizes.sft_batch, 1 + sizes.prompt_tokens + sizes.response_tokens
    n, positions = config.num_vision_tokens, text - 1 + config.num_image_positions
    dv, iv = v["hidden_size"], v["intermediate_size"]
    d, i, vocab = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    patch = 2 * batch * n * 3 * v["patch_size"] ** 2 * dv
    tower = config.vision_layers_kept * 2 * batch * n * (4 * dv * dv + 2 * dv * iv)
    projector = 2 * batch * n * (dv * d + d * d)
    lm = t["num_hidden_layers"] * 2 * batch * positions * (4 * d * d + 3 * d * i)
    head = 2 * batch * text * d * vocab
    attention = (
        config.vision_layers_kept * 4 * batch * n * n * dv
        + t["num_hidden_layers"] * 4 * batch * positions**2 * d
    )
    row = _rows(tiny_report[0])["llada/sft"]
    assert row["flops_per_step"] == 2 * patch + 3 * (tower + projector + lm + head) + 7 * attention // 2
    assert row["flops_per_item"] == row["flops_per_step"] // (batch * positions)


def test_peak_rate_is_read_from_the_device_name_or_the_argument(monkeypatch) -> None:
    cuda = torch.device("cuda")
    for name, peak in (
        ("NVIDIA H200", 989.4),
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert suite.peak_bf16_tflops(cuda, None)[0] == peak, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    value, source = suite.peak_bf16_tflops(cuda, None)
    assert value is None and "Some Future GPU" in source and "--peak-tflops" in source
    assert suite.peak_bf16_tflops(cuda, 500.0) == (500.0, "--peak-tflops")
    with pytest.raises(ValueError, match="--peak-tflops must be positive"):
        suite.peak_bf16_tflops(cuda, 0.0)


def test_without_a_peak_rate_the_mfu_is_absent_and_the_note_says_why(no_peak_report) -> None:
    assert no_peak_report["peak_bf16_tflops"] is None and "--peak-tflops" in no_peak_report["peak_source"]
    row = _rows(no_peak_report)["clip/rn50"]
    assert row["ratio"] is None and "no peak rate" in row["note"] and row["achieved"] > 0


def test_a_failing_row_is_reported_with_its_error_and_fails_the_run(monkeypatch, tmp_path) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(suite, "masked_diffusion_loss", broken)
    report = suite.main(["--device", "cpu", "--sizes", "tiny", "--out", str(tmp_path / "r.json")])
    row = _rows(report)["llada/sft"]
    assert (
        row["status"] == "error" and "CUDA out of memory (simulated)" in row["note"] and row["rate"] is None
    )
    assert report["exit_code"] == 1
    assert _rows(report)["metric/asr"]["status"] == "ok"  # the rows after it still ran


def test_rows_past_the_budget_are_skipped_and_fail_the_run(tmp_path, capsys) -> None:
    report = suite.main(
        ["--device", "cpu", "--sizes", "tiny", "--budget-s", "0", "--out", str(tmp_path / "r.json")]
    )
    assert {row["status"] for row in report["rows"]} == {"skipped"}
    assert "--budget-s 0 spent" in report["rows"][0]["note"]
    assert report["exit_code"] == 1
    printed = capsys.readouterr().out
    for row_id in ROWS:  # the table on stdout names every row, measured or not
        assert f"| {row_id} |" in printed and f"| {row_id} |" in report["table"]
    assert "not measured: copy, trigger/badnet" in printed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_sizes_on_cuda_measure_every_row_within_eight_minutes(tmp_path) -> None:
    report = suite.main(["--device", "cuda", "--sizes", "real", "--out", str(tmp_path / "gpu_suite.json")])
    assert report["exit_code"] == 0, report["table"]
    assert report["elapsed_s"] < 8 * 60
    rows = _rows(report)
    for name in suite.TRIGGERS:
        assert (
            0 < rows[f"trigger/{name}"]["ratio"] <= 1.5
        )  # a trigger reads and writes the batch at least once
    for row_id in ("clip/rn50", "clip/vit_b_32", "llada/sft"):
        if report["peak_bf16_tflops"] is not None:
            assert 0 < rows[row_id]["ratio"] < 1, rows[row_id]  # MFU
    assert rows["llada/generate_prefix"]["ratio"] > 1  # cached generation is faster than none
