"""The LLaDA-V configs run end to end on a tiny checkpoint in the released layout (poisoning, then DiSP:
purification + one recovery step), through train.py's CLI; the embedded configs chain the same way."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_modules.mdlm_disp import DiSPPurification
from mmbackdoor_cli.cli import MMBackdoorCLI, main
from model_families.mdlm.checkpoint import (
    INDEX_NAME,
    load_snapshot,
    read_snapshot_state_dict,
    released_state_dict,
    save_snapshot,
)
from model_families.mdlm.config import LladaVConfig
from model_families.mdlm.modeling import LladaVModel
from model_families.mdlm.prompt import PromptFormatter
from model_families.mdlm.tokenizer import load_embedded_tokenizer

CONFIGS = Path(__file__).parents[1] / "configs"
QUIET = [
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def _tiny_released_snapshot(path: Path) -> Path:
    """A tiny LLaDA-V with the released model's structure (image newline, SigLIP -> mlp2x_gelu -> LLaMA, untied
    head), saved sharded in the released layout with its tokenizer and prompt format."""
    torch.manual_seed(0)
    tokenizer = load_embedded_tokenizer()
    config = LladaVConfig.tiny(
        tokenizer, use_image_newline=True, mm_patch_merge_type="spatial_unpad", image_aspect_ratio="pad"
    )
    config.vision.update(patch_size=8)
    model = LladaVModel(config)
    save_snapshot(
        model,
        path,
        max_shard_size="200KB",
        dtype=torch.bfloat16,
        tokenizer=tokenizer,
        prompt_formatter=PromptFormatter(),
    )
    return path


def _llava_data(root: Path, n: int = 6) -> dict[str, str]:
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 30 + i, 3), dtype=np.uint8)).save(images / f"{i}.jpg")
        records.append(
            {
                "id": f"s{i}",
                "image": f"{i}.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>\ndescribe the image."},
                    {"from": "gpt", "value": "a red circle on a gray background."},
                ],
            }
        )
    (root / "train.json").write_text(json.dumps(records))
    (root / "val.json").write_text(json.dumps(records[:2]))
    return {
        "train_json": str(root / "train.json"),
        "val_json": str(root / "val.json"),
        "image_folder": str(images),
    }


def _cpu_overrides(root: Path) -> list[str]:
    return [
        *QUIET,
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=1",
        f"--trainer.default_root_dir={root}",
        "--trainer.accumulate_grad_batches=1",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=2",
        "--data.init_args.eval_batch_size=2",
    ]


def test_released_layout_snapshot_round_trips(tmp_path):
    path = _tiny_released_snapshot(tmp_path / "llada_v_tiny")
    assert (path / INDEX_NAME).is_file() and len(list(path.glob("model-*-of-*.safetensors"))) > 1
    model = load_snapshot(path)
    assert model.dtype == torch.bfloat16
    assert set(read_snapshot_state_dict(path)) == set(released_state_dict(model))


def test_llada_v_configs_run_one_step_end_to_end(tmp_path):
    snapshot = _tiny_released_snapshot(tmp_path / "llada_v_tiny")
    data = _llava_data(tmp_path / "llava")
    data_args = [f"--data.init_args.{k}={v}" for k, v in data.items()]
    # 1. poisoning config (the real recipe, on the tiny checkpoint): one optimisation step
    poison = main(
        [
            "fit",
            "--config",
            str(CONFIGS / "mdlm_llada_v_poison.yaml"),
            *_cpu_overrides(tmp_path / "poison"),
            f"--model.init_args.init_from={snapshot}",
            *data_args,
            "--data.init_args.poison_count=2",
        ],
    )
    export = Path(poison.trainer.mmbackdoor_export)
    assert poison.trainer.global_step == 1
    assert (export / "poison_manifest.json").is_file() and (export / INDEX_NAME).is_file()
    # 2. DiSP config: purification of the poisoned set by the backdoored model, then one recovery step
    disp = main(
        [
            "fit",
            "--config",
            str(CONFIGS / "disp_llada_v.yaml"),
            *_cpu_overrides(tmp_path / "disp"),
            f"--model.init_args.init_from={export}",
            *data_args,
            f"--data.init_args.poison_manifest={export / 'poison_manifest.json'}",
            "--model.init_args.purify_generation={gen_length: 8, block_length: 8, steps: 2}",
            "--model.init_args.generation={gen_length: 8, block_length: 8, steps: 2}",
        ]
    )
    run = Path(disp.trainer.default_root_dir)
    assert disp.trainer.global_step == 1
    manifest = json.loads((run / "purified" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["num_samples"] == 6
    records = json.loads((run / "purified" / "purified.json").read_text())
    assert all(r["image"].endswith(".jpg") for r in records)
    assert json.loads(Path(data["train_json"]).read_text())[0]["conversations"][1]["value"].startswith(
        "a red"
    )
    loaded = load_snapshot(disp.trainer.mmbackdoor_export)
    assert loaded.config.use_image_newline


def test_llada_v_configs_validate():
    strategies = []
    for name in ("disp_llada_v.yaml", "mdlm_llada_v_poison.yaml"):
        cli = MMBackdoorCLI(args=["--config", str(CONFIGS / name)], run=False, instantiate=False)
        # both shard (FSDP) with fp32 master weights (docs/disp.md, "Sharded training")
        assert cli.config.trainer.precision == "bf16-mixed"
        assert cli.config.model.init_args.load_dtype == "float32"
        assert cli.config.trainer.strategy.class_path == "lightning.pytorch.strategies.FSDPStrategy"
        strategies.append(cli.config.trainer.strategy.init_args)
        assert cli.config.model.init_args.lr == 1e-5 and cli.config.model.init_args.vision_lr == 2e-6
        assert cli.config.model.init_args.warmup_ratio == 0.03 and cli.config.trainer.max_epochs == 1
    assert strategies[0] == strategies[1]  # DiSP's recovery fine-tuning shards exactly as the poisoning did
    cli = MMBackdoorCLI(args=["--config", str(CONFIGS / "disp_llada_v.yaml")], run=False, instantiate=False)
    assert cli.config.model.init_args.disp["rho"] == 0.45


@pytest.mark.parametrize(
    "bad, key",
    [("--model.init_args.disp={ratio: 0.4}", "ratio"), ("--data.init_args.asr_rule=contain", "contain")],
)
def test_bad_disp_settings_fail_before_training(tmp_path, bad, key):
    snapshot = _tiny_released_snapshot(tmp_path / "llada_v_tiny")  # so that the bad setting is what fails
    data = _llava_data(tmp_path / "llava")
    with pytest.raises(ValueError, match=key):
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "disp_llada_v.yaml"),
                *_cpu_overrides(tmp_path / "x"),
                f"--model.init_args.init_from={snapshot}",
                *[f"--data.init_args.{k}={v}" for k, v in data.items()],
                bad,
            ]
        )


def test_embedded_stages_chain_through_train_py(tmp_path):
    """clean -> poison -> DiSP with the shipped embedded configs, shrunk to seconds."""
    small = [
        "--data.init_args.train_size=12",
        "--data.init_args.val_size=4",
        "--data.init_args.test_size=4",
        "--trainer.max_epochs=1",
        "--trainer.check_val_every_n_epoch=1",
        *QUIET,
    ]
    clean = main(
        [
            "fit",
            "--config",
            str(CONFIGS / "mdlm_shapes_clean.yaml"),
            *small,
            f"--trainer.default_root_dir={tmp_path / 'clean'}",
        ]
    )
    clean_export = clean.trainer.mmbackdoor_export
    poison = main(
        [
            "fit",
            "--config",
            str(CONFIGS / "mdlm_shapes_poison.yaml"),
            *small,
            f"--trainer.default_root_dir={tmp_path / 'poison'}",
            f"--model.init_args.init_from={clean_export}",
        ]
    )
    assert "val/asr" in poison.trainer.callback_metrics
    export = Path(poison.trainer.mmbackdoor_export)
    disp = main(
        [
            "fit",
            "--config",
            str(CONFIGS / "disp_shapes.yaml"),
            *small,
            f"--trainer.default_root_dir={tmp_path / 'disp'}",
            f"--model.init_args.init_from={export}",
            f"--data.init_args.poison_manifest={export / 'poison_manifest.json'}",
        ]
    )
    assert (Path(disp.trainer.default_root_dir) / "purified" / "purified.json").is_file()
    assert "val/asr_wt" in disp.trainer.callback_metrics


def test_disp_given_a_purified_set_trains_on_it_without_purifying_again(tmp_path, monkeypatch):
    snapshot = _tiny_released_snapshot(tmp_path / "llada_v_tiny")
    data = [f"--data.init_args.{k}={v}" for k, v in _llava_data(tmp_path / "llava").items()]
    args = [
        "fit",
        "--config",
        str(CONFIGS / "disp_llada_v.yaml"),
        f"--model.init_args.init_from={snapshot}",
        *data,
        "--data.init_args.poison_manifest=null",
        "--model.init_args.purify_generation={gen_length: 8, block_length: 8, steps: 2}",
        "--model.init_args.generation={gen_length: 8, block_length: 8, steps: 2}",
    ]
    first = main([*args, *_cpu_overrides(tmp_path / "first")])
    purified = Path(first.trainer.default_root_dir) / "purified" / "purified.json"
    assert purified.is_file()

    def no_purification(self):
        raise AssertionError("purified although a purified set was given")

    monkeypatch.setattr(DiSPPurification, "purify", no_purification)
    second = main([*args, *_cpu_overrides(tmp_path / "second"), f"--data.init_args.purified={purified}"])
    assert second.trainer.global_step == 1
    assert not (Path(second.trainer.default_root_dir) / "purified").exists()
    assert json.loads((Path(second.trainer.mmbackdoor_export) / "purified_from.json").read_text()) == {
        "purified": str(purified)
    }
    # Lightning may run setup again (another fit on the same module): the set is not purified twice
    first.model.setup("fit")
    assert first.datamodule.purified_path == str(purified)
