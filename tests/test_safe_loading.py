"""Loading a model file never runs code, and a broken one is an error naming it (issue 16, items 1, 7, 11).

A checkpoint whose pickle payload would create a marker file is offered to every entry point that takes a
model path (``model.init_from``, ``model.victim``, ``model.checkpoint``, ``evaluate.py --checkpoint``,
``--ckpt_path``, the MDLM loader): each refuses it with an error naming the file, and the marker never
appears. A scan of the source tree keeps unsafe loads, ``trust_remote_code`` and downloads out.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from attacks.hashing import file_sha256
from attacks.io import atomic_write_json, process_umask
from defenses.victim import load_victim
from lightning_modules.clip_finetune import CLIPFineTuning
from mmbackdoor_cli.evaluate import evaluate_checkpoint
from mmbackdoor_cli.evaluate import main as evaluate_main
from mmbackdoor_cli.pipeline import train
from model_families.clip import create_clip, load_clip_export, load_clip_weights, save_clip_export
from model_families.loading import UnsafeCheckpointError, WeightsMismatchError
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/clip_shapes_badnet.yaml"
TINY_DATA = ["--data.init_args.batch_size=16", "--data.init_args.poison_rate=0.1"]


class _TouchOnLoad:
    """Unpickling this object creates ``marker``: stands in for any code a malicious file would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _malicious(path: Path, marker: Path) -> Path:
    """A Lightning-shaped checkpoint of a real tiny CLIP (state dict + model_name) carrying the payload."""
    state = {f"model.{k}": v for k, v in create_clip("tiny-rn-shapes").model.state_dict().items()}
    payload = {
        "state_dict": state,
        "hyper_parameters": {"model_name": "tiny-rn-shapes"},
        "x": _TouchOnLoad(marker),
    }
    torch.save(payload, path)
    return path


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "code_ran"
    return _malicious(tmp_path / "evil.ckpt", marker), marker


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real fit of the tiny CLIP (2 steps): its Lightning checkpoint, export and `latest_export` link."""
    root = tmp_path_factory.mktemp("runs") / "clean"
    run = train(
        CONFIG,
        *tiny_overrides(root, train_size=32, val_size=16, test_size=16),
        *TINY_DATA,
        "--model.init_args.init_from=null",
    )
    return root, run


def test_the_payload_runs_when_fully_unpickled(evil):
    # the control: the file really is dangerous, so the tests below can fail
    path, marker = evil
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_load_clip_weights_refuses_a_pickle_payload_and_names_the_file(evil):
    path, marker = evil
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt.*refusing to load"):
        load_clip_weights(create_clip("tiny-rn-shapes").model, path)
    assert not marker.exists()


def test_init_from_refuses_a_pickle_payload(evil):
    path, marker = evil
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt \(model\.init_from\)"):
        CLIPFineTuning(init_from=str(path))
    assert not marker.exists()


def test_victim_refuses_a_pickle_payload_as_ckpt_and_as_plain_file(evil, tmp_path):
    path, marker = evil
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt \(model\.victim\)"):
        load_victim(str(path))
    plain = path.rename(tmp_path / "evil.pt")  # any other file goes through open_clip (model.checkpoint)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt \(model\.checkpoint\)"):
        load_victim(str(plain), model_name="tiny-rn-shapes")
    assert not marker.exists()


def test_create_clip_checkpoint_refuses_a_pickle_payload(evil):
    path, marker = evil
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt \(model\.checkpoint\)"):
        create_clip("tiny-rn-shapes", checkpoint=str(path))
    assert not marker.exists()


def test_evaluate_checkpoint_refuses_a_pickle_payload(evil, tmp_path):
    path, marker = evil
    # jsonargparse wraps the module's error in its own ValueError; the message is kept
    refused = r"evil\.ckpt \(model\.init_from\): refusing to load"
    with pytest.raises(ValueError, match=refused):
        evaluate_checkpoint(CONFIG, str(path), root=str(tmp_path / "eval"))
    with pytest.raises(ValueError, match=refused):
        evaluate_main(["--config", CONFIG, "--checkpoint", f"x={path}", "--output", str(tmp_path / "o.json")])
    assert not marker.exists()


def test_resume_from_a_pickle_payload_never_runs_it(evil, tmp_path):
    path, marker = evil
    with pytest.raises(Exception, match=r"Weights only load failed|refusing"):
        train(
            CONFIG,
            *tiny_overrides(tmp_path / "resume", train_size=32, val_size=16, test_size=16),
            *TINY_DATA,
            "--model.init_args.init_from=null",
            f"--ckpt_path={path}",
        )
    assert not marker.exists()


def test_mdlm_loader_never_unpickles(evil, tmp_path):
    from lightning_modules.mdlm_finetune import MDLMFineTuning
    from model_families.mdlm.config import LladaVConfig

    path, marker = evil
    with pytest.raises(ValueError, match=r"not a Lightning"):
        MDLMFineTuning(init_from=str(path))
    snapshot = tmp_path / "snapshot"  # a folder holding only a pickled weights file: never read
    snapshot.mkdir()
    (snapshot / "pytorch_model.bin").write_bytes(path.read_bytes())
    (snapshot / "config.json").write_text(json.dumps(LladaVConfig.tiny().to_json_dict()))
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors\.index\.json or model\.safetensors"):
        MDLMFineTuning(init_from=str(snapshot))
    assert not marker.exists()


def test_a_lightning_checkpoint_of_this_project_loads_weights_only(tiny_run):
    _, run = tiny_run
    ckpt = run.run_dir / "checkpoints" / "last.ckpt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(ckpt) == []
    model = create_clip("tiny-rn-shapes").model
    load_clip_weights(model, ckpt)
    exported = load_clip_export(run.export).model.state_dict()
    assert all(torch.equal(v, exported[k]) for k, v in model.state_dict().items())
    victim = load_victim(str(ckpt))  # the architecture comes from the checkpoint's hyperparameters
    assert all(torch.equal(v, exported[k]) for k, v in victim.model.state_dict().items())


# ------------------------------------------------------------------------------ broken files (item 7)
@pytest.fixture
def export(tmp_path):
    return save_clip_export(create_clip("tiny-rn-shapes"), tmp_path / "export")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_broken_model_safetensors_is_named(export, damage):
    weights = export / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 64)
    with pytest.raises(ValueError, match=r"export/model\.safetensors is not a valid safetensors file"):
        load_clip_export(export)


def test_invalid_json_in_mmbackdoor_json_is_named(export):
    (export / "mmbackdoor.json").write_text('{"family": "clip",')
    with pytest.raises(ValueError, match=r"export/mmbackdoor\.json is not valid JSON"):
        load_clip_export(export)


def test_a_missing_key_in_mmbackdoor_json_is_named(export):
    meta = json.loads((export / "mmbackdoor.json").read_text())
    del meta["image_mean"]
    (export / "mmbackdoor.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"export/mmbackdoor\.json: missing key 'image_mean'"):
        load_clip_export(export)


def test_a_missing_mmbackdoor_json_is_named(export):
    (export / "mmbackdoor.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"export/mmbackdoor\.json is missing"):
        load_clip_export(export)


def test_weights_of_another_architecture_list_the_keys(export):
    meta = json.loads((export / "mmbackdoor.json").read_text())
    meta["model_name"] = "tiny-vit-shapes"  # the recorded architecture no longer matches the weights
    (export / "mmbackdoor.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsMismatchError) as error:
        load_clip_export(export)
    message = str(error.value)
    assert "model.safetensors" in message and "mmbackdoor.json is model_name='tiny-vit-shapes'" in message
    assert "missing: visual.conv1.weight" in message or "missing: visual." in message
    assert "unexpected: visual." in message


def test_mis_shaped_weights_list_both_shapes(export):
    state = create_clip("tiny-rn-shapes").model.state_dict()
    state["token_embedding.weight"] = torch.zeros(10, 64)
    save_file({k: v.contiguous() for k, v in state.items()}, str(export / "model.safetensors"))
    with pytest.raises(
        WeightsMismatchError, match=r"token_embedding\.weight: file \(10, 64\) vs model \(49408, 64\)"
    ):
        load_clip_export(export)


# ------------------------------------------------------------------------------ MDLM snapshots (item 7)
@pytest.fixture(scope="module")
def mdlm_snapshot(tmp_path_factory):
    from model_families.mdlm.checkpoint import save_snapshot
    from model_families.mdlm.config import LladaVConfig
    from model_families.mdlm.modeling import LladaVModel

    torch.manual_seed(0)
    return save_snapshot(LladaVModel(LladaVConfig.tiny()), tmp_path_factory.mktemp("mdlm") / "snap")


@pytest.fixture
def snapshot_copy(mdlm_snapshot, tmp_path):
    import shutil

    return Path(shutil.copytree(mdlm_snapshot, tmp_path / "snap"))


def test_a_garbage_snapshot_shard_is_named(snapshot_copy):
    from model_families.mdlm.checkpoint import load_snapshot

    shard = sorted(snapshot_copy.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{shard.name} is not a valid safetensors file"):
        load_snapshot(snapshot_copy)


def test_invalid_or_incomplete_snapshot_config_is_named(snapshot_copy):
    from model_families.mdlm.checkpoint import load_snapshot

    config = snapshot_copy / "config.json"
    good = json.loads(config.read_text())
    config.write_text("{not json")
    with pytest.raises(ValueError, match=r"snap/config\.json is not valid JSON"):
        load_snapshot(snapshot_copy)
    config.write_text(json.dumps({k: v for k, v in good.items() if k != "hidden_size"}))
    with pytest.raises(ValueError, match=r"snap/config\.json: .*hidden_size"):
        load_snapshot(snapshot_copy)
    index = snapshot_copy / "model.safetensors.index.json"
    config.write_text(json.dumps(good))
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: missing key 'weight_map'"):
        load_snapshot(snapshot_copy)


def test_a_snapshot_config_that_does_not_fit_its_weights_lists_both_shapes(snapshot_copy):
    from model_families.mdlm.checkpoint import SnapshotError, load_snapshot

    config = snapshot_copy / "config.json"
    data = json.loads(config.read_text())
    data["intermediate_size"] = data["intermediate_size"] * 2
    config.write_text(json.dumps(data))
    with pytest.raises(SnapshotError) as error:
        load_snapshot(snapshot_copy)
    message = str(error.value)
    assert str(snapshot_copy) in message and "config.json" in message
    assert "mlp.gate_proj.weight: " in message and "!= expected" in message


# ------------------------------------------------------------------------------ provenance and modes (item 11)
def test_export_records_where_its_init_weights_came_from_even_after_the_link_moves(tiny_run, tmp_path):
    root, run = tiny_run
    link = root / "latest_export"
    assert link.is_symlink()
    weights = run.export / "model.safetensors"
    module = CLIPFineTuning(init_from=str(link))
    other = save_clip_export(create_clip("tiny-rn-shapes"), tmp_path / "later_run_export")
    moved = tmp_path / "latest_export"
    moved.symlink_to(other)
    os.replace(moved, link)  # a later run now owns `latest_export`
    meta = json.loads((module.export(tmp_path / "export") / "mmbackdoor.json").read_text())
    assert meta["inputs"] == {
        "model.init_from": {
            "path": str(link),
            "resolved": os.path.realpath(run.export),
            "sha256": file_sha256(weights),
        }
    }
    assert meta["inputs"]["model.init_from"]["sha256"] != file_sha256(other / "model.safetensors")


@pytest.mark.parametrize(
    "defense",
    [
        "lightning_modules.cleanclip:CleanCLIPFineTuning",
        "lightning_modules.par:PARFineTuning",
        "lightning_modules.invertune:InverTuneModule",
    ],
)
def test_defense_exports_record_the_victim(tiny_run, tmp_path, defense):
    import importlib

    module_name, class_name = defense.split(":")
    defense_class = getattr(importlib.import_module(module_name), class_name)
    _, run = tiny_run
    ckpt = run.run_dir / "checkpoints" / "last.ckpt"
    module = defense_class(victim=str(ckpt))
    meta = json.loads((module.export(tmp_path / "export") / "mmbackdoor.json").read_text())
    assert meta["inputs"] == {
        "model.victim": {"path": str(ckpt), "resolved": os.path.realpath(ckpt), "sha256": file_sha256(ckpt)}
    }


def test_mdlm_export_records_its_snapshot(mdlm_snapshot, tmp_path):
    from lightning_modules.mdlm_finetune import MDLMFineTuning
    from model_families.mdlm.tokenizer import load_embedded_tokenizer

    snapshot = tmp_path / "snap"
    import shutil

    shutil.copytree(mdlm_snapshot, snapshot)
    load_embedded_tokenizer().save_pretrained(str(snapshot))
    link = tmp_path / "latest_export"
    link.symlink_to(snapshot)
    module = MDLMFineTuning(init_from=str(link))
    meta = json.loads((module.export(tmp_path / "export") / "mmbackdoor_export.json").read_text())
    record = meta["inputs"]["model.init_from"]
    shards = sorted(snapshot.glob("*.safetensors"))
    assert record["path"] == str(link) and record["resolved"] == os.path.realpath(snapshot)
    expected = {p.name: file_sha256(p) for p in shards}
    assert record.get("files", {shards[0].name: record["sha256"]}) == expected


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    process_umask.cache_clear()
    yield
    os.umask(previous)
    process_umask.cache_clear()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_exports_and_manifests_get_ordinary_file_modes(tmp_path, umask_022):
    export = save_clip_export(create_clip("tiny-rn-shapes"), tmp_path / "export")
    assert _mode(export) == 0o755
    assert {p.name: _mode(p) for p in export.iterdir()} == {
        "model.safetensors": 0o644,
        "mmbackdoor.json": 0o644,
    }
    assert _mode(atomic_write_json(tmp_path / "manifest.json", {"a": 1})) == 0o644


def test_file_modes_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    process_umask.cache_clear()
    try:
        export = save_clip_export(create_clip("tiny-rn-shapes"), tmp_path / "export")
        manifest = atomic_write_json(tmp_path / "manifest.json", {"a": 1})
    finally:
        os.umask(previous)
        process_umask.cache_clear()
    assert _mode(export) == 0o750 and _mode(export / "model.safetensors") == 0o640
    assert _mode(manifest) == 0o640


# ------------------------------------------------------------------------------ the source scan (item 1)
DOWNLOADS = {
    "hf_hub_download",
    "snapshot_download",
    "urlopen",
    "urlretrieve",
    "load_state_dict_from_url",
    "download_url_to_file",
}
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib"}
HTTP_MODULES = {"requests", "httpx", "urllib3"}


def _name(node: ast.AST) -> str:
    """Dotted name of a call's function (``torch.serialization.load``), '' when not a plain name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    return ""


def _keyword_is(call: ast.Call, key: str, value) -> bool:
    return any(
        k.arg == key and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords
    )


def unsafe_calls(source: str) -> list[tuple[int, str]]:
    """(line, why) for each call in ``source`` that could unpickle, trust remote code or download."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            for alias in node.names:
                if alias.name in {"load", "loads", "Unpickler"}:
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        parts = name.split(".")
        if (
            parts[-1] == "load"
            and parts[0] == "torch"
            and parts[-2] != "jit"
            and not _keyword_is(node, "weights_only", True)
        ):
            found.append((node.lineno, f"{name} without weights_only=True"))
        if parts[0] in PICKLE_MODULES and parts[-1] in {"load", "loads", "Unpickler"}:
            found.append((node.lineno, f"{name} (unpickling)"))
        if parts[-1] == "read_pickle" or (
            parts[-1] == "load" and parts[0] in {"np", "numpy"} and _keyword_is(node, "allow_pickle", True)
        ):
            found.append((node.lineno, f"{name} (unpickling)"))
        if parts[-2:] == ["jit", "load"]:
            found.append((node.lineno, f"{name} (TorchScript from a file)"))
        if any(
            k.arg == "trust_remote_code"
            and not (isinstance(k.value, ast.Constant) and k.value.value is False)
            for k in node.keywords
        ):
            found.append((node.lineno, f"{name}(trust_remote_code=...)"))
        if parts[-1] in DOWNLOADS or parts[0] in HTTP_MODULES or name.startswith("urllib.request"):
            found.append((node.lineno, f"{name} (network)"))
        if parts[-1] == "from_pretrained" and not _keyword_is(node, "local_files_only", True):
            found.append((node.lineno, f"{name} without local_files_only=True (may download)"))
        if name in {"torch.hub.load", "hub.load"}:
            found.append((node.lineno, f"{name} (network, code)"))
    return found


def _source_files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in {"__pycache__", "runs"})
        for file in sorted(files):
            path = Path(folder) / file
            if file.endswith(".py") and path != Path(__file__).resolve():
                yield path


@pytest.mark.parametrize(
    "bad",
    [
        "torch.load(p)",
        "torch.load(p, weights_only=False)",
        "pickle.loads(b)",
        "from pickle import load",
        "AutoModel.from_pretrained(p, trust_remote_code=True, local_files_only=True)",
        "AutoTokenizer.from_pretrained(p)",
        "hf_hub_download('org/x', 'f')",
        "urllib.request.urlopen(u)",
        "requests.get(u)",
    ],
)
def test_the_scan_finds_what_it_forbids(bad):
    assert unsafe_calls(bad)


def test_no_unsafe_load_remote_code_or_download_in_the_source_tree():
    files = list(_source_files())
    assert len(files) > 50 and ROOT / "model_families" / "loading.py" in files
    found = [
        f"{p.relative_to(ROOT)}:{line}: {why}" for p in files for line, why in unsafe_calls(p.read_text())
    ]
    assert not found, "\n".join(found)


def test_snapshot_files_get_ordinary_modes(tmp_path, umask_022):
    from model_families.mdlm.checkpoint import save_snapshot
    from model_families.mdlm.config import LladaVConfig
    from model_families.mdlm.modeling import LladaVModel

    snapshot = save_snapshot(LladaVModel(LladaVConfig.tiny()), tmp_path / "snap", max_shard_size="100KB")
    assert _mode(snapshot) == 0o755
    modes = {p.name: _mode(p) for p in snapshot.iterdir()}
    assert len(modes) > 3 and set(modes.values()) == {0o644}, modes
