"""The DDPM UNet: parameter counts of the paper's models, shapes, numerics of its parts, option checks."""

import math

import pytest
import torch
import torch.nn.functional as F

from memgen.config import ModelOptions
from memgen.errors import MemgenError
from memgen.unet import (AttentionBlock, Downsample, UNet, build_unet, count_parameters, num_groups_for,
                         timestep_embedding)

# (config, exact count of this implementation, count reported for the paper's model in millions)
PAPER_MODELS = [
    (dict(image_size=28, in_channels=1, dim_mults=(1, 2, 2), dropout=0.1), 24_515_585, 24.5),
    (dict(image_size=32, in_channels=3, dim_mults=(1, 2, 2, 2), dropout=0.1), 35_746_307, 35.7),
    (dict(image_size=64, in_channels=3, dim_mults=(1, 1, 2, 2, 4, 4), dropout=0.0), 109_733_379, 109.7),
]


@pytest.mark.parametrize("config, exact, millions", PAPER_MODELS)
def test_parameter_count_of_paper_models(config, exact, millions):
    with torch.device("meta"):
        unet = UNet(dim=128, attn_resolutions=(16,), num_res_blocks=2, **config)
    count = count_parameters(unet)

    assert count == exact
    assert round(count / 1e6, 1) == millions


@pytest.mark.parametrize("image_size, dim_mults", [(8, (1, 2)), (16, (1, 2, 2)), (28, (1, 2, 2)),
                                                   (32, (1, 2, 2, 2)), (64, (1, 1, 2, 2))])
def test_forward_shape_small_models(image_size, dim_mults):
    torch.manual_seed(0)
    unet = UNet(image_size, in_channels=3, dim=16, dim_mults=dim_mults, attn_resolutions=(image_size // 2,),
                num_res_blocks=1).eval()
    x = torch.randn(2, 3, image_size, image_size)
    t = torch.tensor([0, 999])

    with torch.no_grad():
        output = unet(x, t)

    assert output.shape == x.shape
    assert output.dtype == torch.float32
    assert torch.isfinite(output).all()


def test_attention_placement_28x28():
    with torch.device("meta"):
        unet = UNet(28, dim=16, dim_mults=(1, 2, 2), attn_resolutions=(16,))

    # Resolutions 28, 14 and 7: no level is at 16, so only the middle block attends.
    assert all(len(level.attentions) == 0 for level in unet.down)
    assert all(len(level.attentions) == 0 for level in unet.up)
    assert isinstance(unet.mid.attention, AttentionBlock)


def test_attention_blocks_follow_each_residual_block():
    with torch.device("meta"):
        unet = UNet(16, dim=16, dim_mults=(1, 2), attn_resolutions=(8,), num_res_blocks=2)

    assert len(unet.down[0].attentions) == 0
    assert len(unet.down[1].attentions) == 2
    assert len(unet.up[0].attentions) == 0
    assert len(unet.up[1].attentions) == 3


@pytest.mark.parametrize("image_size, dim_mults", [(30, (1, 2, 2)), (28, (1, 2, 2, 2)), (20, (1, 1, 1, 1))])
def test_image_size_not_divisible_raises(image_size, dim_mults):
    with pytest.raises(MemgenError) as error:
        UNet(image_size, dim=16, dim_mults=dim_mults)

    factor = 2 ** (len(dim_mults) - 1)
    assert f"image_size {image_size}" in str(error.value)
    assert f"multiple of {factor}" in str(error.value)


@pytest.mark.parametrize("options", [dict(dim=0), dict(dim=2), dict(dim_mults=()), dict(dim_mults=(1, 0)),
                                     dict(num_res_blocks=0), dict(dropout=1.0), dict(attn_resolutions=(-4,))])
def test_invalid_options_raise(options):
    with pytest.raises(MemgenError):
        UNet(16, **{"dim": 16, "dim_mults": (1, 2), **options})


@pytest.mark.parametrize("channels, groups", [(256, 32), (128, 32), (96, 32), (48, 24), (40, 20), (16, 16),
                                              (24, 24), (7, 7), (66, 22)])
def test_group_count_divides_channels(channels, groups):
    assert num_groups_for(channels) == groups


def test_small_dim_group_norms_divide():
    unet = UNet(16, dim=20, dim_mults=(1, 3), num_res_blocks=1)
    norms = [module for module in unet.modules() if isinstance(module, torch.nn.GroupNorm)]

    assert len(norms) > 0
    for norm in norms:
        assert norm.num_channels % norm.num_groups == 0
        assert norm.num_groups == num_groups_for(norm.num_channels)
        assert norm.eps == 1e-6


def test_timestep_embedding_known_values():
    # dim 4: two frequencies, 1 and exp(-log(10000) * 1 / 1) = 1e-4; sines first.
    embedding = timestep_embedding(torch.tensor([0, 1, 500]), 4)
    expected = torch.tensor([
        [0.0, 0.0, 1.0, 1.0],
        [math.sin(1.0), math.sin(1e-4), math.cos(1.0), math.cos(1e-4)],
        [math.sin(500.0), math.sin(0.05), math.cos(500.0), math.cos(0.05)],
    ])

    torch.testing.assert_close(embedding, expected, rtol=0, atol=1e-5)


def test_attention_block_matches_explicit_softmax():
    torch.manual_seed(1)
    block = AttentionBlock(32)
    x = torch.randn(2, 32, 4, 4)

    def weight(layer):
        return layer.weight[:, :, 0, 0]

    h = block.norm(x).flatten(2)  # (B, C, N)
    q = torch.einsum("oc,bcn->bon", weight(block.q), h) + block.q.bias[None, :, None]
    k = torch.einsum("oc,bcn->bon", weight(block.k), h) + block.k.bias[None, :, None]
    v = torch.einsum("oc,bcn->bon", weight(block.v), h) + block.v.bias[None, :, None]
    attention = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(32), dim=-1)
    mixed = torch.einsum("bij,bcj->bci", attention, v)
    expected = x + (torch.einsum("oc,bcn->bon", weight(block.proj_out), mixed)
                    + block.proj_out.bias[None, :, None]).reshape(x.shape)

    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_downsample_pads_right_and_bottom():
    torch.manual_seed(2)
    layer = Downsample(3)
    x = torch.randn(1, 3, 8, 8)

    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), layer.conv.weight, layer.conv.bias, stride=2)

    assert layer(x).shape == (1, 3, 4, 4)
    torch.testing.assert_close(layer(x), expected)


def test_build_unet_from_dataclass_and_dict():
    options = ModelOptions(image_size=8, in_channels=1, dim=16, dim_mults=(1, 2), attn_resolutions=(4,),
                           num_res_blocks=1, dropout=0.0)
    from_dataclass = build_unet(options)
    from_dict = build_unet({"image_size": 8, "in_channels": 1, "dim": 16, "dim_mults": [1, 2],
                            "attn_resolutions": [4], "num_res_blocks": 1, "dropout": 0.0})
    direct = UNet(8, in_channels=1, dim=16, dim_mults=(1, 2), attn_resolutions=(4,), num_res_blocks=1,
                  dropout=0.0)

    assert count_parameters(from_dataclass) == count_parameters(direct)
    assert count_parameters(from_dict) == count_parameters(direct)
    assert list(from_dict.state_dict()) == list(direct.state_dict())


def test_build_unet_without_image_size_raises():
    with pytest.raises(MemgenError, match="image_size"):
        build_unet({"dim": 16})


def test_dropout_only_in_train_mode():
    torch.manual_seed(3)
    unet = UNet(8, dim=16, dim_mults=(1, 2), num_res_blocks=1, dropout=0.5)
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([3, 700])

    unet.eval()
    with torch.no_grad():
        first, second = unet(x, t), unet(x, t)
    torch.testing.assert_close(first, second, rtol=0, atol=0)

    unet.train()
    with torch.no_grad():
        noisy = unet(x, t)
    assert not torch.allclose(noisy, first)
