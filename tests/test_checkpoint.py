"""Checkpoint loading: native round trip, truncated files, foreign files, other architectures."""


import pytest
import torch

from memgen.checkpoint import load_model, read_checkpoint, save_checkpoint, save_ideal_checkpoint
from memgen.config import DataOptions, ModelOptions, TrainOptions
from memgen.errors import MemgenError
from memgen.unet import build_unet

MODEL = ModelOptions(image_size=8, in_channels=1, dim=16, dim_mults=(1, 2), attn_resolutions=(4,),
                     num_res_blocks=1, dropout=0.0)


def write_native(path, model=MODEL):
    torch.manual_seed(0)
    network = build_unet(model)
    options = {"data": DataOptions(data_name="npz"), "train": TrainOptions(train_size=12, timesteps=50),
               "model": model}
    save_checkpoint(path, options, network.state_dict(), network.state_dict(), None, 7, None)
    return network


def test_native_round_trip(tmp_path):
    network = write_native(tmp_path / "12.pt")
    loaded = load_model(tmp_path / "12.pt")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0, 49])
    with torch.no_grad():
        assert torch.equal(loaded.network(x, t), network.eval()(x, t))
    assert loaded.train_size == 12
    assert loaded.iteration == 7
    assert loaded.kind == "memgen-unet"
    assert loaded.image_shape == (1, 8, 8)
    assert loaded.schedule.timesteps == 50


def test_truncated_checkpoint_rejected(tmp_path):
    write_native(tmp_path / "12.pt")
    content = (tmp_path / "12.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(content[: len(content) // 2])
    with pytest.raises(MemgenError, match="truncated"):
        read_checkpoint(tmp_path / "cut.pt")


def test_foreign_file_rejected(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(MemgenError, match="not a memgen checkpoint"):
        read_checkpoint(tmp_path / "other.pt")


def test_missing_checkpoint_named(tmp_path):
    with pytest.raises(MemgenError, match="checkpoint not found: '.*absent.pt'"):
        read_checkpoint(tmp_path / "absent.pt")


class Planted:
    def __reduce__(self):
        return (exec, ("open('PLANTED_MARKER', 'w').write('ran')",))


def test_planted_pickle_does_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": "memgen-unet", "payload": Planted()}, tmp_path / "evil.pt")
    with pytest.raises(MemgenError, match="evil.pt.*(rejected|not loaded)"):
        read_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "PLANTED_MARKER").exists()


def test_other_architecture_rejected(tmp_path):
    network = build_unet(ModelOptions(**{**MODEL.__dict__, "dim": 32}))
    options = {"data": DataOptions(data_name="npz"), "train": TrainOptions(train_size=12), "model": MODEL}
    save_checkpoint(tmp_path / "12.pt", options, network.state_dict(), network.state_dict(), None, 1, None)
    with pytest.raises(MemgenError, match="another architecture"):
        load_model(tmp_path / "12.pt")


def test_ideal_checkpoint_loads_training_images(tiny_npz_dataset, tmp_path):
    options = {"data": DataOptions(data_name="npz", data_path=str(tiny_npz_dataset)),
               "train": TrainOptions(train_size=3, timesteps=50), "model": ModelOptions(image_size=8)}
    save_ideal_checkpoint(tmp_path / "3.pt", options)
    loaded = load_model(tmp_path / "3.pt")
    assert loaded.kind == "memgen-ideal"
    assert loaded.prediction_type == "sample"
    assert loaded.train_size == 3
    x0 = loaded.network.train_flat[1].reshape(1, 1, 8, 8).float()
    with torch.no_grad():
        prediction = loaded.network(x0 * loaded.schedule.alphas_cumprod[0].sqrt().float(), torch.tensor([0]))
    torch.testing.assert_close(prediction, x0, atol=1e-5, rtol=0)
