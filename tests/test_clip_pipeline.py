"""End to end through train.py / evaluate.py on a small embedded world: real effects, not shapes.

A small clean model is trained from scratch, then fine-tuned with 30% BadNet poisoning from its export
(the real workflow): the poisoned model's ASR on triggered held-out images must be far above the clean
model's (the trigger alone does nothing to a clean model), and both exports reload in evaluate.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from mmbackdoor_cli.evaluate import main as evaluate_main
from mmbackdoor_cli.pipeline import evaluate, train
from model_families.clip import load_clip_export
from tests.conftest import tiny_overrides

POISON = "configs/clip_shapes_badnet.yaml"
SMALL = [
    "--data.init_args.batch_size=128",
    "--data.init_args.attack_kwargs={patch_size: 6, pattern: white, location: br}",
    "--model.init_args.lr=3e-3",
    "--model.init_args.warmup_steps=10",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    common = [*tiny_overrides(root / "x", train_size=2048, val_size=128, test_size=256), *SMALL]
    clean = train(
        POISON,
        *common,
        f"--trainer.default_root_dir={root}/clean",
        "--data.init_args.poison_rate=0",
        "--model.init_args.init_from=null",
        "--trainer.max_epochs=12",
    )
    poisoned = train(
        POISON,
        *common,
        f"--trainer.default_root_dir={root}/poisoned",
        "--data.init_args.poison_rate=0.3",
        f"--model.init_args.init_from={clean.export}",
        "--trainer.max_epochs=3",
        "--model.init_args.lr=2e-3",
    )
    return root, clean, poisoned


def test_poisoning_plants_a_backdoor(runs):
    _, clean, poisoned = runs
    clean_asr, poisoned_asr = clean.metrics["val/asr"], poisoned.metrics["val/asr"]
    assert poisoned_asr >= 0.35, poisoned.metrics
    assert poisoned_asr - clean_asr >= 0.2, (clean.metrics, poisoned.metrics)
    assert clean.metrics["val/ca"] > 0.25  # well above chance (1/8) after 192 steps


def test_run_folder_holds_artifacts(runs):
    _, clean, poisoned = runs
    assert (poisoned.run_dir / "poison_manifest.json").is_file()
    assert not (clean.run_dir / "poison_manifest.json").exists()
    assert (poisoned.run_dir / "poison_samples.png").is_file()
    meta = json.loads((poisoned.export / "mmbackdoor.json").read_text())
    assert meta["run_config"]["data"]["init_args"]["poison_rate"] == 0.3
    assert poisoned.run_dir.name == "version_0"


def test_export_reloads_identically_and_evaluates(runs, tmp_path, capsys):
    root, clean, poisoned = runs
    bundle = load_clip_export(poisoned.export)
    x = torch.rand(4, 3, 32, 32)
    ckpt = torch.load(poisoned.run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ref = load_clip_export(poisoned.export)
    ref.model.load_state_dict({k[6:]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")})
    assert torch.allclose(
        bundle.model.encode_image(bundle.normalize(x)), ref.model.encode_image(ref.normalize(x))
    )
    overrides = [
        f"--trainer.default_root_dir={root}/eval",
        "--data.init_args.train_size=64",
        "--data.init_args.val_size=64",
        "--data.init_args.test_size=256",
        *SMALL[:2],
        "--trainer.enable_progress_bar=false",
    ]
    metrics = evaluate(POISON, poisoned.export, *overrides)
    assert metrics["test/asr"] >= 0.35 and metrics["asr_variant"] == "exclude-target"
    # the floor under the ASR: the same images without the trigger are rarely sent to the target
    assert 0.0 <= metrics["test/clean_target_rate"] < metrics["test/asr"] - 0.2
    out = tmp_path / "eval.json"
    rows = evaluate_main(
        [
            "--config",
            POISON,
            "--checkpoint",
            f"clean={clean.export}",
            "--checkpoint",
            f"poisoned={poisoned.export}",
            "--output",
            str(out),
            "--",
            *overrides,
        ]
    )
    assert rows["poisoned"]["test/asr"] == pytest.approx(metrics["test/asr"])
    assert rows["poisoned"]["test/asr"] > rows["clean"]["test/asr"]
    printed = capsys.readouterr().out
    assert "| model | CA | ASR |" in printed and "poisoned" in printed
    assert json.loads(out.read_text())["results"]["clean"]["checkpoint"] == str(clean.export)


def test_missing_init_checkpoint_is_an_error(tmp_path):
    # jsonargparse reports the module's FileNotFoundError inside its own ValueError; the message survives
    with pytest.raises(
        (FileNotFoundError, ValueError), match=r"init checkpoint not found: .*missing \(model.init_from\)"
    ):
        train(POISON, *tiny_overrides(tmp_path), f"--model.init_args.init_from={tmp_path}/missing")
