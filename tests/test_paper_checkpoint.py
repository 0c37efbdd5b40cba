"""Checkpoints released by Pham et al. 2025: safe reading, renaming onto memgen's UNet, conversion.

`data/paper-checkpoint/16.pt` was written by the authors' model code and option classes
(random weights), and `16-expected.npz` holds the outputs of its EMA and raw networks
computed by that code on CPU, as data/paper-checkpoint/README.md describes.
"""

import argparse
import os
import pickle
import pickletools
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from memgen.errors import MemgenError
from memgen.paper_checkpoint import (convert_paper_checkpoint, is_paper_checkpoint, load_paper_checkpoint,
                                     paper_checkpoint_from_dict, read_checkpoint_file)
from memgen.unet import build_unet

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).resolve().parent / "data" / "paper-checkpoint"
CHECKPOINT = FIXTURE / "16.pt"


@pytest.fixture(scope="module")
def expected():
    with np.load(FIXTURE / "16-expected.npz", allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


@pytest.fixture(scope="module")
def loaded():
    return load_paper_checkpoint(CHECKPOINT)


def run_unet(config: dict, state: dict, expected: dict) -> np.ndarray:
    unet = build_unet(config["model"])
    unet.load_state_dict(state, strict=True)
    unet.eval()
    with torch.no_grad():
        output = unet(torch.from_numpy(expected["x"]), torch.from_numpy(expected["t"]).long())
    return output.numpy()


def test_plain_weights_only_load_rejects_fixture():
    # The released files need the option stand-ins; torch alone rejects them.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(CHECKPOINT, weights_only=True)


def test_config_from_released_file(loaded):
    config = loaded["config"]

    assert config["data"]["data_name"] == "fashionmnist"
    assert config["train"]["train_size"] == 16
    assert config["train"]["global_seed"] == 3407
    assert config["train"]["prediction_type"] == "epsilon"
    assert config["train"]["beta_schedule"] == "linear"
    assert config["train"]["timesteps"] == 1000
    assert config["train"]["clip_grad"] == 1.0
    assert config["model"] == {"image_size": 8, "in_channels": 1, "dim": 32, "dim_mults": [1, 2],
                               "attn_resolutions": [4], "num_res_blocks": 1, "dropout": 0.1}
    assert loaded["iteration"] == 3


def test_ema_output_matches_paper_code(loaded, expected):
    output = run_unet(loaded["config"], loaded["ema"], expected)

    np.testing.assert_allclose(output, expected["ema_output"], rtol=0, atol=1e-5)


def test_model_output_matches_paper_code(loaded, expected):
    output = run_unet(loaded["config"], loaded["model"], expected)

    np.testing.assert_allclose(output, expected["model_output"], rtol=0, atol=1e-5)
    # The raw and EMA weights differ, so the two checks are independent.
    assert np.abs(expected["model_output"] - expected["ema_output"]).max() > 1e-2


def test_is_paper_checkpoint_detects_format(loaded):
    raw = read_checkpoint_file(CHECKPOINT)

    assert is_paper_checkpoint(CHECKPOINT)
    assert is_paper_checkpoint(raw)
    assert not is_paper_checkpoint({"format": "memgen-unet", "ema": loaded["ema"], "model": loaded["model"]})
    assert not is_paper_checkpoint([1, 2])


class PlantedReduce:
    """An object whose unpickling calls `function(*arguments)`."""

    def __init__(self, function, *arguments):
        self.function = function
        self.arguments = arguments

    def __reduce__(self):
        return self.function, self.arguments


def planted_checkpoint(path: Path, payload) -> Path:
    """Write a released-format checkpoint whose `args` carries `payload`."""
    checkpoint = read_checkpoint_file(CHECKPOINT)
    checkpoint["args"] = argparse.Namespace(config_path=None, payload=payload)
    torch.save(checkpoint, path)
    return path


def pickle_globals(path: Path) -> set[str]:
    """List the globals a torch file's pickle refers to, without unpickling it."""
    with zipfile.ZipFile(path) as archive:
        name = next(item for item in archive.namelist() if item.endswith("data.pkl"))
        data = archive.read(name)
    return {str(argument) for opcode, argument, _ in pickletools.genops(data) if opcode.name == "GLOBAL"}


@pytest.mark.parametrize("make_payload, global_name", [
    (lambda marker: PlantedReduce(os.system, f"touch {marker}"), "system"),
    (lambda marker: PlantedReduce(exec, f"open({str(marker)!r}, 'w').close()"), "exec"),
    (lambda marker: PlantedReduce(subprocess.call, ["touch", str(marker)]), "subprocess.call"),
])
def test_planted_code_is_rejected(tmp_path, make_payload, global_name):
    marker = tmp_path / "planted-code-ran"
    path = planted_checkpoint(tmp_path / "16.pt", make_payload(marker))
    assert any(global_name.split(".")[-1] in name for name in pickle_globals(path))

    with pytest.raises(MemgenError) as error:
        load_paper_checkpoint(path)

    message = str(error.value)
    assert str(path) in message
    assert global_name.split(".")[-1] in message
    assert not marker.exists()


def test_planted_code_rejected_by_detection(tmp_path):
    marker = tmp_path / "planted-code-ran"
    path = planted_checkpoint(tmp_path / "16.pt", PlantedReduce(os.system, f"touch {marker}"))

    with pytest.raises(MemgenError, match="system"):
        is_paper_checkpoint(path)
    assert not marker.exists()


def test_missing_and_truncated_files_raise(tmp_path):
    with pytest.raises(MemgenError, match="not found"):
        load_paper_checkpoint(tmp_path / "absent.pt")

    truncated = tmp_path / "16.pt"
    truncated.write_bytes(CHECKPOINT.read_bytes()[:1000])
    with pytest.raises(MemgenError, match="not a readable torch checkpoint"):
        load_paper_checkpoint(truncated)


def test_native_file_is_not_paper_format(tmp_path):
    path = tmp_path / "native.pt"
    torch.save({"format": "memgen-unet", "model": {}, "ema": {}}, path)

    with pytest.raises(MemgenError, match="not in the format"):
        load_paper_checkpoint(path)


@pytest.fixture
def parse_utils(monkeypatch):
    """A module `parse_utils` with option classes, so that edited checkpoints pickle as released ones."""
    module = types.ModuleType("parse_utils")
    for name in ("DataOptions", "TrainOptions", "ModelOptions"):
        cls = type(name, (), {"__module__": "parse_utils"})
        setattr(module, name, cls)
    monkeypatch.setitem(sys.modules, "parse_utils", module)
    return module


def save_edited(checkpoint: dict, path: Path, parse_utils) -> Path:
    """Save `checkpoint` with its option stand-ins turned back into `parse_utils` classes."""
    args = checkpoint["args"]
    for section, name in (("data", "DataOptions"), ("train", "TrainOptions"), ("model", "ModelOptions")):
        options = getattr(parse_utils, name)()
        options.__dict__.update(vars(getattr(args, section)))
        setattr(args, section, options)
    torch.save(checkpoint, path)
    return path


def test_edited_file_still_loads(tmp_path, parse_utils, expected):
    checkpoint = read_checkpoint_file(CHECKPOINT)
    checkpoint["args"].train.train_size = 17
    path = save_edited(checkpoint, tmp_path / "17.pt", parse_utils)

    loaded = load_paper_checkpoint(path)

    assert loaded["config"]["train"]["train_size"] == 17
    np.testing.assert_allclose(run_unet(loaded["config"], loaded["ema"], expected), expected["ema_output"],
                               rtol=0, atol=1e-5)


def test_mismatched_options_raise(tmp_path, parse_utils):
    checkpoint = read_checkpoint_file(CHECKPOINT)
    checkpoint["args"].model.dim = 16
    path = save_edited(checkpoint, tmp_path / "16.pt", parse_utils)

    with pytest.raises(MemgenError, match="does not match its own options"):
        load_paper_checkpoint(path)


def test_unsupported_model_option_raises(tmp_path, parse_utils):
    checkpoint = read_checkpoint_file(CHECKPOINT)
    checkpoint["args"].model.scale_by_sigma = True
    path = save_edited(checkpoint, tmp_path / "16.pt", parse_utils)

    with pytest.raises(MemgenError, match="scale_by_sigma"):
        load_paper_checkpoint(path)


def test_converted_checkpoint_reproduces_outputs(tmp_path, expected):
    destination = tmp_path / "converted" / "16.pt"
    convert_paper_checkpoint(CHECKPOINT, destination)

    native = torch.load(destination, weights_only=True)

    assert set(native) == {"format", "memgen_version", "config", "model", "ema", "opt", "iteration", "rng"}
    assert native["format"] == "memgen-unet"
    assert native["iteration"] == 3
    assert native["opt"]["state"] == {}
    assert len(native["opt"]["param_groups"][0]["params"]) == len(native["model"])
    assert native["config"]["model"]["dim_mults"] == [1, 2]
    np.testing.assert_allclose(run_unet(native["config"], native["ema"], expected), expected["ema_output"],
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(run_unet(native["config"], native["model"], expected), expected["model_output"],
                               rtol=0, atol=1e-5)
    assert [path.name for path in destination.parent.iterdir()] == ["16.pt"]


def test_optimizer_state_follows_parameters():
    # Give every parameter an Adam state equal to its own value (and its square), so after
    # re-indexing each memgen parameter must find exactly its own value there.
    checkpoint = read_checkpoint_file(CHECKPOINT)
    paper_parameters = [tensor for key, tensor in checkpoint["model"].items()]
    checkpoint["opt"]["state"] = {
        index: {"step": torch.tensor(7.0), "exp_avg": tensor.clone(), "exp_avg_sq": tensor * tensor}
        for index, tensor in enumerate(paper_parameters)
    }
    converted = paper_checkpoint_from_dict(checkpoint, CHECKPOINT)

    unet = build_unet(converted["config"]["model"])
    unet.load_state_dict(converted["model"])
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-4)
    optimizer.load_state_dict(converted["opt"])

    for name, parameter in unet.named_parameters():
        state = optimizer.state[parameter]
        assert torch.equal(state["exp_avg"], parameter.detach()), name
        assert torch.equal(state["exp_avg_sq"], parameter.detach() ** 2), name
        assert state["step"].item() == 7.0, name
    assert optimizer.param_groups[0]["lr"] == 1e-4
    assert len(optimizer.param_groups[0]["params"]) == len(paper_parameters)


def test_convert_keeps_existing_file(tmp_path):
    destination = tmp_path / "16.pt"
    destination.write_bytes(b"older result")

    convert_paper_checkpoint(CHECKPOINT, destination)
    assert destination.read_bytes() == b"older result"

    convert_paper_checkpoint(CHECKPOINT, destination, overwrite=True)
    assert torch.load(destination, weights_only=True)["format"] == "memgen-unet"


def test_convert_script(tmp_path):
    source = tmp_path / "16.pt"
    shutil.copyfile(CHECKPOINT, source)
    destination = tmp_path / "native" / "16.pt"

    done = subprocess.run([sys.executable, str(REPO / "convert_checkpoint.py"), "--src", str(source),
                           "--dst", str(destination)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert torch.load(destination, weights_only=True)["format"] == "memgen-unet"

    failed = subprocess.run([sys.executable, str(REPO / "convert_checkpoint.py"), "--src",
                             str(tmp_path / "absent.pt"), "--dst", str(destination), "--overwrite"],
                            cwd=REPO, capture_output=True, text=True)
    assert failed.returncode == 2
    assert "not found" in failed.stderr
