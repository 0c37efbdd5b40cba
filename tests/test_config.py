"""Option parsing: YAML sections as defaults, flags override, bad keys and types are named."""

import pytest

from memgen.config import TRAINING_SECTIONS, from_plain, parse_sections, to_plain
from memgen.errors import MemgenError

from conftest import REPO


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_flags_override_yaml(tmp_path):
    path = write(tmp_path, "train:\n  train_size: 16\n  iterations: 10\nmodel:\n  dim: 32\n")
    options = parse_sections(TRAINING_SECTIONS, ["--config_path", path, "--train-size", "16000",
                                                 "--dim", "128", "--centercrop", "False"])
    assert options["train"].train_size == 16000
    assert options["train"].iterations == 10
    assert options["model"].dim == 128
    assert options["train"].centercrop is False


def test_underscore_and_dash_flags(tmp_path):
    options = parse_sections(TRAINING_SECTIONS, ["--train_size", "7", "--dim-mults", "1", "2", "4"])
    assert options["train"].train_size == 7
    assert options["model"].dim_mults == (1, 2, 4)


def test_unknown_key_named(tmp_path):
    path = write(tmp_path, "train:\n  trian_size: 16\n")
    with pytest.raises(MemgenError, match="unknown key 'train.trian_size'"):
        parse_sections(TRAINING_SECTIONS, ["--config_path", path])


def test_unknown_section_named(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.1\n")
    with pytest.raises(MemgenError, match="unknown section 'optim'"):
        parse_sections(TRAINING_SECTIONS, ["--config_path", path])


@pytest.mark.parametrize("text, key", [
    ("train:\n  train_size: many\n", "train.train_size"),
    ("train:\n  lr: fast\n", "train.lr"),
    ("train:\n  centercrop: 1\n", "train.centercrop"),
    ("model:\n  dim_mults: [1, two]\n", "model.dim_mults"),
])
def test_wrong_type_named(tmp_path, text, key):
    with pytest.raises(MemgenError, match=f"'{key}' must be"):
        parse_sections(TRAINING_SECTIONS, ["--config_path", write(tmp_path, text)])


def test_missing_config_file(tmp_path):
    with pytest.raises(MemgenError, match="config file not found"):
        parse_sections(TRAINING_SECTIONS, ["--config_path", str(tmp_path / "absent.yaml")])


@pytest.mark.parametrize("name", ["fashionmnist", "mnist", "cifar10", "church", "fashionmnist-cpu",
                                  "quickstart"])
def test_shipped_configs_parse(name):
    path = REPO / "configs" / f"{name}.yaml"
    if not path.exists():
        pytest.skip(f"{path.name} not present")
    if name == "quickstart":
        return  # the pipeline config has its own sections, tested with the pipeline
    options = parse_sections(TRAINING_SECTIONS, ["--config_path", str(path)])
    assert options["train"].global_seed == 3407


def test_paper_values_cifar10():
    options = parse_sections(TRAINING_SECTIONS, ["--config_path", str(REPO / "configs" / "cifar10.yaml")])
    assert options["model"].dim_mults == (1, 2, 2, 2)
    assert options["model"].attn_resolutions == (16,)
    assert options["train"].iterations == 500_000
    assert options["train"].ema_decay == 0.9999


def test_plain_round_trip():
    options = parse_sections(TRAINING_SECTIONS, ["--dim-mults", "1", "2"])
    plain = to_plain(options)
    assert plain["model"]["dim_mults"] == [1, 2]
    assert from_plain(plain) == options
