"""Sharded training: the real-scale poisoning config's FSDP strategy (full sharding, one FSDP unit per decoder /
SigLIP encoder layer, activation checkpointing) runs on a tiny LLaDA-V in the released layout with 2 processes on
CPU, and its export (gathered from the shards) loads with the normal loader and equals the same training under
DDP. The DiSP config (same strategy) purifies before the model is sharded, both ranks taking their chunks, into
the same purified set as a single process, then fine-tunes sharded.

Lightning refuses ``accelerator=cpu`` for ``FSDPStrategy`` itself (``type(strategy) is FSDPStrategy``) and passes
``device_id=None`` on CPU, which torch's FSDP reads as "find an accelerator"; torch's FSDP runs on CPU (gloo) once
it is told ``device_id=cpu``. :class:`CPUFSDPStrategy` does exactly that and nothing else, so the tests run
Lightning's strategy unchanged otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.fsdp as torch_fsdp
import yaml
from lightning.pytorch.strategies import FSDPStrategy

from model_families.mdlm.checkpoint import load_snapshot
from tests.test_disp_config import _llava_data, _tiny_released_snapshot

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "mdlm_llada_v_poison.yaml"
DISP_CONFIG = ROOT / "configs" / "disp_llada_v.yaml"
POISON = ["--data.init_args.poison_count=2"]
# DiSP from the tiny snapshot on the clean set (the mechanics do not need a backdoor): 3 chunks of 2 samples, so
# both ranks purify; a short sampler
DISP = [
    "--data.init_args.poison_manifest=null",
    "--model.init_args.purify_batch_size=2",
    "--model.init_args.purify_chunk_size=2",
    "--model.init_args.purify_generation={gen_length: 8, block_length: 8, steps: 2}",
    "--model.init_args.generation={gen_length: 8, block_length: 8, steps: 2}",
]


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` with ``device_id=cpu`` given to torch's FSDP (tests only, see the module doc)."""

    def _setup_model(self, model):
        original = torch_fsdp.FullyShardedDataParallel

        class OnCPU(original):
            def __init__(self, *args, device_id=None, **kwargs):
                super().__init__(*args, device_id=device_id or torch.device("cpu"), **kwargs)

        torch_fsdp.FullyShardedDataParallel = OnCPU
        try:
            return super()._setup_model(model)
        finally:
            torch_fsdp.FullyShardedDataParallel = original


def shipped_strategy() -> dict:
    return yaml.safe_load(CONFIG.read_text())["trainer"]["strategy"]


def test_poisoning_config_shards_with_fsdp_and_fp32_master_weights():
    spec = shipped_strategy()
    assert spec["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=FSDPStrategy)
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": spec})).strategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer, SiglipEncoderLayer}
    checkpointed = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes
    assert checkpointed == {LlamaDecoderLayer}
    assert str(strategy.sharding_strategy) == "ShardingStrategy.FULL_SHARD"
    assert strategy.kwargs["use_orig_params"]  # frozen parts (trainable: projector / lora) need it
    config = yaml.safe_load(CONFIG.read_text())
    # bf16-mixed keeps the module's dtype as the sharded master copy: it must be loaded in float32
    assert config["trainer"]["precision"] == "bf16-mixed"
    assert config["model"]["init_args"]["load_dtype"] == "float32"


def fit(
    tmp_path: Path,
    name: str,
    strategy: str,
    snapshot: Path,
    data: dict,
    extra: list[str],
    config: Path = CONFIG,
    devices: int = 2,
) -> Path:
    """CPU fit (2 processes) of a real-scale config on the tiny snapshot; returns the export folder."""
    root = tmp_path / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("LOCAL_RANK", None)
    env.pop("MMBACKDOOR_RUN_DIR", None)
    args = [
        str(ROOT / "train.py"),
        "--config",
        str(config),
        f"--trainer.strategy={strategy}",
        "--trainer.accelerator=cpu",
        f"--trainer.devices={devices}",
        "--trainer.precision=32-true",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.callbacks=[]",
        "--trainer.max_steps=3",
        "--trainer.max_epochs=3",
        "--trainer.accumulate_grad_batches=1",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={root}",
        f"--model.init_args.init_from={snapshot}",
        "--model.init_args.lr=1e-3",
        "--model.init_args.weight_decay=1.0",  # large: the decay groups must survive sharding
        "--model.init_args.warmup_ratio=0.0",
        "--model.init_args.scheduler=constant",
        *[f"--data.init_args.{k}={v}" for k, v in data.items()],
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=2",
        *extra,
    ]
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "latest_export"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    return tmp, _tiny_released_snapshot(tmp / "llada_v_tiny"), _llava_data(tmp / "llava")


def fsdp_strategy() -> str:
    spec = shipped_strategy()
    return json.dumps({"class_path": "tests.test_fsdp.CPUFSDPStrategy", "init_args": spec["init_args"]})


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


@pytest.mark.parametrize(
    "trainable",
    ["full", pytest.param("lora", marks=pytest.mark.slow), pytest.param("projector", marks=pytest.mark.slow)],
)
def test_fsdp_export_loads_and_equals_ddp_training(world, trainable):
    tmp, snapshot, data = world
    extra = [*POISON, f"--model.init_args.trainable={trainable}"]
    if trainable == "lora":
        extra.append("--model.init_args.lora={r: 4, lora_alpha: 8, lora_dropout: 0.0}")
    sharded = load_snapshot(fit(tmp, f"fsdp_{trainable}", fsdp_strategy(), snapshot, data, extra))
    plain = load_snapshot(
        fit(tmp, f"ddp_{trainable}", "ddp_find_unused_parameters_true", snapshot, data, extra)
    )
    init = load_snapshot(snapshot, dtype=torch.float32)
    assert sharded.dtype == torch.float32  # load_dtype float32: the fp32 master weights are exported
    assert all(torch.isfinite(t).all() for t in sharded.state_dict().values())
    moved = max_difference(sharded, init)
    assert moved > 1e-3, moved  # it trained
    assert max_difference(sharded, plain) < 2e-4, (max_difference(sharded, plain), moved)


def test_disp_config_shards_like_the_poisoning_config():
    disp, poison = (yaml.safe_load(path.read_text()) for path in (DISP_CONFIG, CONFIG))
    assert disp["trainer"]["strategy"] == poison["trainer"]["strategy"]
    assert disp["trainer"]["precision"] == poison["trainer"]["precision"] == "bf16-mixed"
    assert disp["model"]["init_args"]["load_dtype"] == "float32"
    # the strategy checkpoints the decoder layers; the module's own checkpointing on top would recompute twice
    assert disp["model"]["init_args"]["gradient_checkpointing"] is False


def test_disp_purifies_before_sharding_and_trains_under_fsdp(world):
    tmp, snapshot, data = world
    export = fit(tmp, "disp_fsdp", fsdp_strategy(), snapshot, data, DISP, config=DISP_CONFIG)
    purified = export.resolve().parent / "purified"  # <run>/purified, beside <run>/export
    manifest = json.loads((purified / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["num_samples"] == 6
    chunks = sorted(p.name for p in (purified / "parts").glob("chunk-*"))
    assert chunks == [
        f"chunk-{c:06d}.json" for c in range(3)
    ]  # rank 0 purifies chunks 0 and 2, rank 1 chunk 1
    # the same purified set as one process purifying everything
    single = fit(tmp, "disp_single", "auto", snapshot, data, DISP, config=DISP_CONFIG, devices=1)
    records = json.loads((purified / "purified.json").read_text())
    assert records == json.loads((single.resolve().parent / "purified" / "purified.json").read_text())
    assert json.loads((export / "purified_from.json").read_text())["purified"] == str(
        purified / "purified.json"
    )
    recovered = load_snapshot(export)
    assert recovered.dtype == torch.float32
    assert all(torch.isfinite(t).all() for t in recovered.state_dict().values())
    assert max_difference(recovered, load_snapshot(snapshot, dtype=torch.float32)) > 1e-3  # it fine-tuned
