"""He et al. 2016's five activation placements (Fig. 4) on the ``resnet`` and ``mlp`` families: each block against
its equation, the default build unchanged, gradients, errors, plain twins, lesions and parameter counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reslab
from reslab.diagnostics.recorder import record
from reslab.models.blocks import PLACEMENTS, PREACT

FAMILIES = {"resnet8": dict(width=4, input_shape=(3, 8, 8)), "mlp8": dict(width=8, input_shape=(12,))}
SIZES = {**FAMILIES, "preact_resnet8": FAMILIES["resnet8"], "preact_mlp8": FAMILIES["mlp8"]}
relu = torch.relu


def build(name: str, placement: str | None, residual: str = "identity", seed: int = 0, **kw) -> reslab.ResidualNet:
    torch.manual_seed(seed)
    opts = {**SIZES[name], **kw, **({} if placement is None else {"placement": placement})}
    return reslab.create_model(name, residual, num_classes=5, **opts)


def randomise_norms_(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters, so eval mode tests them."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g, dtype=m.running_mean.dtype))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g, dtype=m.running_var.dtype))
            with torch.no_grad():
                m.weight.copy_(1 + 0.5 * torch.randn(n, generator=g))
                m.bias.copy_(0.5 * torch.randn(n, generator=g))


def unit(placement: str, model: reslab.ResidualNet, i: int, x: torch.Tensor, skip: bool = True) -> torch.Tensor:
    """Block ``i`` by hand from its modules (He et al. 2016, Fig. 4 (a)-(e)); ``skip=False``: the plain twin."""
    b, scheme = model.trunk.branches[i], model.trunk.scheme
    w1, w2, n1, n2 = b.layer1, b.layer2, b.norm1, b.norm2
    s = scheme.shortcut(i, x) if skip else 0
    if placement == "original":
        return relu(s + n2(w2(relu(n1(w1(x))))))
    if placement == "bn_after_add":
        return relu(scheme.post_bns[i](s + w2(relu(n1(w1(x))))))
    if placement == "relu_before_add":
        return s + relu(n2(w2(relu(n1(w1(x))))))
    if placement == "relu_only_preact":
        return s + n2(w2(relu(n1(w1(relu(x))))))
    return s + w2(relu(n2(w1(relu(n1(x))))))  # full_preact


def streams(model: reslab.ResidualNet, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    with record(model, names=("resid_pre", "resid_post")) as rec:
        model(x)
    return rec.get("resid_pre"), rec.get("resid_post")


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("residual", ["identity", "plain"])
def test_each_block_is_its_placements_equation(name, placement, residual):
    model = build(name, placement, residual).double()
    randomise_norms_(model)
    model.eval()
    x = torch.randn(3, *FAMILIES[name]["input_shape"], dtype=torch.float64)
    pre, post = streams(model, x)
    for i in range(2):  # resnet8: block 1 changes shape (stride 2, option A); mlp8: two ordinary blocks
        want = unit(placement, model, i, pre[i], skip=residual == "identity")
        torch.testing.assert_close(post[i], want, rtol=1e-6, atol=1e-6)
    assert model.trunk.scheme.post_op == {"original": "relu", "bn_after_add": "bn_relu"}.get(placement, "none")


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("name", FAMILIES)
def test_stem_and_head_follow_the_placement(name, placement):
    model = build(name, placement)
    preact = placement in PREACT
    norms = (nn.BatchNorm1d, nn.BatchNorm2d)
    assert any(isinstance(m, norms) for m in model.stem.modules()) != preact
    head = list(model.head.modules())
    assert any(isinstance(m, norms) for m in head) == preact
    scheme = model.trunk.scheme
    assert (scheme.post_bns is not None) == (placement == "bn_after_add")
    assert all(isinstance(b.norm2, nn.Identity) == (placement == "bn_after_add") for b in model.trunk.branches)


@pytest.mark.parametrize("name,pre", [("resnet8", "preact_resnet8"), ("mlp8", "preact_mlp8")])
def test_the_default_builds_the_old_model_and_full_preact_is_the_preact_family(name, pre):
    x = torch.randn(4, *FAMILIES[name]["input_shape"])
    default, original = build(name, None), build(name, "original")
    assert "placement" not in default.config and original.config["placement"] == "original"
    for a, b in ((default, original), (build(pre, None), build(name, "full_preact"))):
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert torch.equal(a.train()(x), b.train()(x)) and torch.equal(a.eval()(x), b.eval()(x))
    # the same draws from the global generator: what is built after the model is the same too
    build(name, None)
    after_default = torch.rand(3)
    build(name, "original")
    assert torch.equal(after_default, torch.rand(3))
    # the original unit's modules and parameter names, as before placements existed
    b = default.trunk.branches[0]
    assert [n for n, _ in b.named_children()] == ["layer1", "layer2", "norm1", "norm2"]
    assert default.trunk.scheme.post_op == "relu" and default.trunk.scheme.post_bns is None
    assert not any("post_bns" in k for k in default.state_dict())
    # the plain twin of the default keeps no placement key either
    assert "placement" not in reslab.plain_twin(default).config


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("name", FAMILIES)
def test_every_parameter_gets_a_gradient(name, placement):
    model = build(name, placement).train()
    x = torch.randn(6, *FAMILIES[name]["input_shape"])
    nn.functional.cross_entropy(model(x), torch.arange(6) % 5).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("name", FAMILIES)
def test_plain_twin_lesion_and_zero_init_for_each_placement(name, placement):
    model = build(name, placement)
    twin = reslab.plain_twin(model)
    assert twin.config["placement"] == placement and twin.trunk.scheme.post_op == model.trunk.scheme.post_op
    x = torch.randn(4, *FAMILIES[name]["input_shape"])
    assert torch.isfinite(twin.train()(x)).all()
    # a lesioned block leaves its skip path alone, without the post op (as for the original unit's ReLU)
    model.eval().trunk.set_lesion({0})
    pre, post = streams(model, x)
    torch.testing.assert_close(post[0], model.trunk.scheme.shortcut(0, pre[0]))
    # zero_init_last zeroes what each branch writes
    zero = build(name, placement, zero_init_last=True).train()
    with record(zero, names=("branch_out",)) as rec:
        zero(x)
    assert all(float(t.abs().max()) == 0 for t in rec.get("branch_out"))


@pytest.mark.parametrize("bad,match", [
    (("preact", {}), "original, bn_after_add, relu_before_add, relu_only_preact, full_preact"),
    (("bn_after_add", {"norm": "ln"}), "needs norm='bn'"),
    (("bn_after_add", {"norm": "none"}), "needs norm='bn'"),
])
@pytest.mark.parametrize("name", FAMILIES)
def test_unknown_or_meaningless_placements_are_refused_in_one_line(name, bad, match):
    with pytest.raises(ValueError, match=match) as e:
        build(name, bad[0], **bad[1])
    assert "\n" not in str(e.value)


def test_preact_families_take_no_placement_and_bn_relu_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="placement"):
        reslab.create_model("preact_resnet8", width=4, input_shape=(3, 8, 8), placement="original")
    model = build("mlp8", "bn_after_add")
    with pytest.raises(ValueError, match="not a sum of components"):
        model.trunk.scheme.decompose(torch.zeros(2, 8), [torch.zeros(2, 8)] * 3, [None] * 4)
    # a scheme that applies its post op outside finish() (hyper-connections, AttnRes) cannot take a BN per branch:
    # refused when the model is built, in one line
    for residual in ("hc", "mhc", "attnres", "block_attnres"):
        with pytest.raises(ValueError, match="bn_relu") as e:
            build("mlp8", "bn_after_add", residual=residual)
        assert "\n" not in str(e.value)


def test_parameter_counts_are_he_et_als_and_bn_after_add_keeps_the_branch_bns_in_the_scheme():
    counts = {p: sum(t.numel() for t in reslab.create_model("resnet20", placement=p).parameters())
              for p in PLACEMENTS}
    assert counts["original"] == 269_722  # He et al. 2015, Table 6: ResNet-20 0.27M
    assert counts["bn_after_add"] == counts["relu_before_add"] == counts["full_preact"] == counts["original"]
    assert counts["relu_only_preact"] == counts["original"] + 6 * 16  # its head BN less the stem's
    model = reslab.create_model("resnet20", placement="bn_after_add")
    bns = model.trunk.scheme.post_bns
    assert len(bns) == 9 and [bn.num_features for bn in bns] == [s.out_dim for s in model.trunk.scheme.specs]
    assert all(isinstance(bn, nn.BatchNorm2d) for bn in bns)
    assert isinstance(build("mlp8", "bn_after_add").trunk.scheme.post_bns[0], nn.BatchNorm1d)
