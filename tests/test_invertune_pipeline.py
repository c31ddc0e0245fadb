"""InverTune as a plain pipeline: another tower supplies its own anatomy, the benchmark uses only public
names, and the config keys build the same tuner settings as before."""

from __future__ import annotations

import ast
from pathlib import Path

import torch
from torch import nn

from defenses.invertune import ActivationTuner, TuneConfig, TuneSettings

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = (
    "attacks",
    "callbacks",
    "datamodules",
    "defenses",
    "lightning_modules",
    "metrics",
    "model_families",
)


class TwoBlockTower(nn.Module):
    """A non-open_clip image tower: two residual linear blocks over 4 features."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        h = x.mean(dim=(2, 3)).repeat(1, 2)[:, :4]
        for block in self.blocks:
            h = h + block(h)
        return h


class TwoBlockAnatomy:
    def image_tower(self, model):
        return model, ""

    def candidate_layers(self, model):
        return {f"blocks.{i}": block for i, block in enumerate(model.blocks)}

    def seq_first_layers(self, model):
        return set()

    def residual_writers(self, model, layer_name, writers="last"):
        return [(layer_name, model.get_submodule(layer_name))]


def test_a_tower_with_its_own_anatomy_is_tuned_only_in_its_writers_rows() -> None:
    model = TwoBlockTower()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.rand(16, 3, 4, 4)
    trigger = lambda images: images.clamp_min(0.9)  # noqa: E731 - a tiny stand-in trigger
    tuner = ActivationTuner(
        model, nn.Identity(), anatomy=TwoBlockAnatomy(), num_layers=1, iterations=3, lr=0.1
    )
    result = tuner.fit(x, trigger)
    layer = result.selected_layers[0]
    assert layer in ("blocks.0", "blocks.1")
    assert set(result.parameter_masks) == {f"{layer}.weight", f"{layer}.bias"}
    rows = result.neurons[layer].channel_mask
    after = dict(model.named_parameters())
    for name, old in before.items():
        if name.startswith(layer) and result.best_iteration > 0:
            assert torch.equal(after[name][~rows], old[~rows]), name  # unselected rows stay
        elif not name.startswith(layer):
            assert torch.equal(after[name], old), name  # the other block is never touched
    assert result.best_iteration > 0, "the tuned state must be kept for this test to be meaningful"
    assert not torch.equal(after[f"{layer}.weight"], before[f"{layer}.weight"])


def test_the_benchmark_imports_no_private_names_from_the_project() -> None:
    for path in (ROOT / "bench").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PROJECT_PACKAGES:
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                assert not private, f"{path.name} imports private {private} from {node.module}"


def test_the_model_keys_build_the_tuner_settings_and_an_unknown_setting_is_named() -> None:
    config = TuneConfig.from_config(
        {"lr": 5e-3, "granularity": "element", "tuning_batch_size": 32, "victim": "x"}
    )
    assert config.settings == TuneSettings(lr=5e-3, granularity="element")
    assert config.tuning_batch_size == 32
    try:
        ActivationTuner(TwoBlockTower(), nn.Identity(), learning_rate=1.0)
    except TypeError as error:
        assert "learning_rate" in str(error) and "TuneSettings" in str(error)
    else:
        raise AssertionError("an unknown tuner setting must be an error")
