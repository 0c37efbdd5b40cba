"""The optional fetch helper for released checkpoints, against a stand-in hub client."""

import sys
import types

import pytest
import torch

from memgen.errors import MemgenError
from memgen.release import FetchOptions, fetch, released_checkpoints

LISTING = ["README.md", "fashionmnist/16.pt", "fashionmnist/1024.pt", "fashionmnist/notes.pt",
           "cifar10/64/16.pt", "cifar10/64/2.pt"]


def test_listing_filtered_by_folder():
    assert released_checkpoints(LISTING, "fashionmnist") == {16: "fashionmnist/16.pt",
                                                              1024: "fashionmnist/1024.pt"}
    assert released_checkpoints(LISTING, "cifar10/64/") == {2: "cifar10/64/2.pt", 16: "cifar10/64/16.pt"}


def test_same_k_in_two_folders_rejected():
    with pytest.raises(MemgenError, match="both have K = 16; pass --folder"):
        released_checkpoints(LISTING)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    downloads = []

    def hf_hub_download(repo_id, filename, revision=None):
        downloads.append(filename)
        path = tmp_path / "hub" / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"name": filename}, path)
        return str(path)

    module = types.SimpleNamespace(list_repo_files=lambda repo_id, revision=None: LISTING,
                                   hf_hub_download=hf_hub_download)
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)
    return downloads


def test_fetch_requested_sizes(fake_hub, tmp_path):
    options = FetchOptions(repo_id="owner/models", folder="fashionmnist", train_sizes=(16,),
                           result_path=str(tmp_path / "out"))
    fetched = fetch(options)
    assert list(fetched) == [16]
    assert torch.load(fetched[16], weights_only=True) == {"name": "fashionmnist/16.pt"}
    assert fake_hub == ["fashionmnist/16.pt"]
    fetch(options)
    assert fake_hub == ["fashionmnist/16.pt"]


def test_fetch_unknown_size(fake_hub, tmp_path):
    options = FetchOptions(repo_id="owner/models", folder="fashionmnist", train_sizes=(32,),
                           result_path=str(tmp_path / "out"))
    with pytest.raises(MemgenError, match=r"K = \[32\] is not in 'owner/models'"):
        fetch(options)


def test_missing_client_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(MemgenError, match="pip install huggingface_hub"):
        fetch(FetchOptions(repo_id="owner/models"))
