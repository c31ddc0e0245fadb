"""Sharded training: the real-scale poisoning config's FSDP strategy (full sharding, one FSDP unit per decoder /
SigLIP encoder layer, activation checkpointing) runs on a tiny LLaDA-V in the released layout with 2 processes on
CPU, and its export (gathered from the shards) loads with the normal loader and equals the same training under
DDP.

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


def fit(tmp_path: Path, name: str, strategy: str, snapshot: Path, data: dict, extra: list[str]) -> Path:
    """2-process CPU fit of the real poisoning config on the tiny snapshot; returns the export folder."""
    root = tmp_path / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("LOCAL_RANK", None)
    env.pop("MMBACKDOOR_RUN_DIR", None)
    args = [
        str(ROOT / "train.py"),
        "--config",
        str(CONFIG),
        f"--trainer.strategy={strategy}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
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
        "--data.init_args.poison_count=2",
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
    extra = [f"--model.init_args.trainable={trainable}"]
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
