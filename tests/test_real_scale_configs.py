"""The real-scale CLIP configs (OpenAI RN50 / ViT-B-32 on a CC3M-style CSV with ImageNet-style zero-shot
evaluation) run one training step and one validation step on random-weight architectures over a tiny
generated data set. Marked slow: 224 px RN50/ViT-B-32 steps take a while on a 2-core CPU."""

from __future__ import annotations

import pytest

from mmbackdoor_cli.pipeline import train
from tests.test_real_formats import make_world


@pytest.mark.slow
@pytest.mark.parametrize(
    "config", ["configs/clip_rn50_cc3m_badnet.yaml", "configs/clip_vitb32_cc3m_badnet.yaml"]
)
def test_real_scale_config_runs_one_step(tmp_path, config):
    paths = make_world(tmp_path / "data")
    run = train(
        config,
        "--model.init_args.pretrained=null",  # random weights: no download
        "--trainer.logger=false",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.precision=32",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}/runs",
        f"--data.init_args.train_csv={paths['train_csv']}",
        f"--data.init_args.val_folder={paths['val_folder']}",
        f"--data.init_args.class_names_file={paths['class_names_file']}",
        f"--data.init_args.class_map_file={paths['class_map_file']}",
        "--data.init_args.batch_size=4",
        "--data.init_args.eval_batch_size=4",
        "--data.init_args.num_workers=0",
        "--data.init_args.poison_count=2",
    )
    assert run.metrics["train/loss"] > 0
    assert 0.0 <= run.metrics["val/ca"] <= 1.0 and "val/asr" in run.metrics
    assert (run.export / "model.safetensors").is_file()
    assert (run.run_dir / "poison_manifest.json").is_file()
