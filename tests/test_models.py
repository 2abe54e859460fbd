"""Model families: Table 6 parameter counts, depth rules, zero-init of the last norm, family options."""

from __future__ import annotations

import pytest
import torch

import reslab
from reslab.models import parse_model_name

from conftest import tiny_input, tiny_model

# He et al. 2015, Table 6 (option A), to the printed precision.
TABLE6 = {20: "0.27M", 32: "0.46M", 44: "0.66M", 56: "0.85M", 110: "1.7M"}


def _count(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("depth,printed", TABLE6.items())
def test_cifar_resnet_parameter_counts_match_table6(depth, printed):
    m = reslab.create_model(f"resnet{depth}", "identity", "A")
    n = _count(m)
    decimals = len(printed.rstrip("M").split(".")[1])
    assert f"{n / 1e6:.{decimals}f}M" == printed
    assert _count(reslab.plain_twin(m)) == n


def test_resnet_structure():
    m = reslab.create_model("resnet56")
    assert len(m.trunk) == 27  # 3 stages x 9 blocks
    strides = [s.stride for s in m.trunk.scheme.specs]
    assert [i for i, s in enumerate(strides) if s == 2] == [9, 18]
    assert [s.out_dim for s in m.trunk.scheme.specs][::9] == [16, 32, 64]
    y = m(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet58", "resnet7", "preact_resnet21", "mlp7", "mlp2"])
def test_invalid_depths(name):
    with pytest.raises(ValueError, match="invalid"):
        reslab.create_model(name)


def test_any_valid_depth_and_family_name():
    fam, d = parse_model_name("resnet", 38)
    assert (fam.name, d) == ("resnet", 38)
    assert len(reslab.create_model("resnet", depth=38, input_shape=(1, 8, 8), width=4).trunk) == 18
    assert len(reslab.create_model("mlp10", input_shape=(5,), width=4).trunk) == 4
    with pytest.raises(ValueError, match="needs a depth"):
        reslab.create_model("resnet")
    with pytest.raises(ValueError, match="depth=20 was given"):
        reslab.create_model("resnet56", depth=20)


@pytest.mark.parametrize("family", ["resnet8", "preact_resnet8", "mlp8", "preact_mlp8"])
def test_zero_init_last_makes_every_block_its_skip_path(family):
    m = tiny_model(family, "identity", zero_init_last=True).eval()
    h = m.stem(tiny_input(family))
    # Post-activation blocks are relu(x + 0) = x on the (already non-negative) stream; pre-activation: x + 0.
    torch.testing.assert_close(m.trunk(h), _skip_only(m, h), rtol=0, atol=0)


def _skip_only(m, h):
    """The trunk with every branch deleted: each block leaves only its shortcut."""
    m.trunk.set_lesion(range(len(m.trunk)))
    out = m.trunk(h)
    m.trunk.set_lesion([])
    return out


def test_zero_init_last_refused_for_plain():
    with pytest.raises(ValueError, match="plain"):
        reslab.create_model("mlp8", "plain", zero_init_last=True)


def test_family_options_and_errors():
    m = reslab.create_model("mlp8", norm="ln", width=16, input_shape=(3, 4))
    assert isinstance(m.trunk.branches[0].norm1, torch.nn.LayerNorm)
    assert m(torch.randn(2, 3, 4)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown norm"):
        reslab.create_model("mlp8", norm="xx")
    with pytest.raises(ValueError, match="num_classes"):
        reslab.create_model("mlp8", num_classes=0)
    with pytest.raises(ValueError, match="unexpected keyword"):
        reslab.create_model("mlp8", widht=3)


def test_post_activation_resnet_uses_relu_after_add_and_preact_does_not():
    post = reslab.create_model("resnet20")
    pre = reslab.create_model("preact_resnet20")
    assert post.trunk.scheme.post_op == "relu"
    assert pre.trunk.scheme.post_op == "none"
    assert (post.trunk(post.stem(torch.randn(2, 3, 32, 32))) >= 0).all()
