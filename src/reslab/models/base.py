"""The model registry and the one network class every family builds.

A family builds only a stem, branches (with their :class:`BranchSpec`) and a head; :func:`create_model`
adds the residual scheme and the shared trunk. Names follow timm's style: ``resnet56``, ``preact_resnet110``,
``mlp20``, or the family name with ``depth=``. Every family whose branches are combined by adding has an automatic
plain twin (``residual="plain"``, or :func:`plain_twin`); a family built for one rule names it
(:attr:`Family.residuals`: DenseNet concatenates, so it has no skip path to remove and no plain twin).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor, nn

from reslab.branch import ROLE_NAMES, BranchSpec
from reslab.residuals.base import create_residual, residual_class
from reslab.trunk import Trunk


@dataclass
class FamilyParts:
    """What a family builder returns."""

    stem: nn.Module
    branches: list[nn.Module]
    specs: list[BranchSpec]
    head: nn.Module
    post: str | None = None
    norm: str | None = None  # the family's norm placement for schemes that leave it open (gpt: "pre")


@dataclass(frozen=True)
class Family:
    """A registered model family."""

    name: str
    build: Callable[..., FamilyParts]
    depths: tuple[int, ...]
    depth_rule: str
    check_depth: Callable[[int], bool]
    default_input_shape: tuple[int, ...]
    paper: str
    description: str
    inputs: str = "features"  # what the stem reads: "features" (real-valued) or "tokens" (int64 ids)
    recipe: dict[str, Any] = field(default_factory=dict)  # default training options of `reslab train`
    residuals: tuple[str, ...] = ()  # the only schemes its branches work with, the first the default; () = any


class ResidualNet(nn.Module):
    """``head(trunk(stem(x)))``: the network every family builds.

    Attributes:
        trunk: the shared :class:`~reslab.trunk.Trunk` (branches + residual scheme).
        config: the keyword arguments of :func:`create_model` that rebuild this model.
    """

    def __init__(self, stem: nn.Module, trunk: Trunk, head: nn.Module, config: dict[str, Any]) -> None:
        super().__init__()
        self.stem, self.trunk, self.head = stem, trunk, head
        self.config = config

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(self.stem(x)))


_FAMILIES: dict[str, Family] = {}


def register_family(name: str, *, depths: tuple[int, ...], depth_rule: str, check_depth: Callable[[int], bool],
                    default_input_shape: tuple[int, ...], paper: str, description: str, inputs: str = "features",
                    recipe: dict[str, Any] | None = None, residuals: tuple[str, ...] = ()
                    ) -> Callable[[Callable[..., FamilyParts]], Callable[..., FamilyParts]]:
    """Decorator: register a family builder ``build(depth, num_classes, input_shape, **kw) -> FamilyParts``.

    ``inputs`` is what the family's stem reads: ``"features"`` (real-valued vectors or images) or ``"tokens"``
    (int64 token ids), matched against :attr:`reslab.data.Dataset.inputs` before training. ``recipe`` holds
    the family's default training options (:class:`reslab.train.TrainConfig` fields) for ``reslab train``.
    ``residuals`` names the only schemes a family's branches are built for (DenseNet's read the concatenation that
    ``concat`` hands them), the first being :func:`create_model`'s default; empty: every scheme, default
    ``identity``.
    """
    if inputs not in ("features", "tokens"):
        raise ValueError(f"family inputs must be 'features' or 'tokens', got {inputs!r}")

    def deco(build: Callable[..., FamilyParts]) -> Callable[..., FamilyParts]:
        _FAMILIES[name] = Family(name, build, depths, depth_rule, check_depth, default_input_shape, paper,
                                 description, inputs, dict(recipe or {}), tuple(residuals))
        return build

    return deco


def list_families() -> list[Family]:
    return [_FAMILIES[k] for k in sorted(_FAMILIES)]


def list_models() -> list[str]:
    """Canonical model names (any valid depth also works, e.g. ``resnet38``)."""
    return [f"{f.name}{d}" for f in list_families() for d in f.depths]


def parse_model_name(name: str, depth: int | None = None) -> tuple[Family, int]:
    """Split ``resnet56`` into its family and depth; check the depth against the family's rule."""
    fam_name, d = name, depth
    if name not in _FAMILIES:
        m = re.fullmatch(r"([a-z_]+?)(\d+)", name)
        if m is None or m.group(1) not in _FAMILIES:
            raise ValueError(f"unknown model {name!r}; known families: {', '.join(sorted(_FAMILIES))} "
                             f"(e.g. {', '.join(list_models()[:3])})")
        fam_name, d = m.group(1), int(m.group(2))
        if depth is not None and depth != d:
            raise ValueError(f"model {name!r} has depth {d}, but depth={depth} was given")
    fam = _FAMILIES[fam_name]
    if d is None:
        raise ValueError(f"model family {fam_name!r} needs a depth, e.g. {fam_name}{fam.depths[0]}")
    if not fam.check_depth(d):
        raise ValueError(f"{fam_name} depth {d} is invalid: depth must be {fam.depth_rule}")
    return fam, d


def create_model(name: str, residual: str | None = None, shortcut: str | None = None, *,
                 depth: int | None = None, num_classes: int = 10, input_shape: tuple[int, ...] | None = None,
                 zero_init_last: bool = False, residual_kwargs: dict[str, Any] | None = None,
                 **family_kwargs: Any) -> ResidualNet:
    """Build a model of a registered family with any compatible residual scheme.

    Args:
        name: ``resnet56``-style name, or a family name together with ``depth``.
        residual: registered residual scheme (``plain`` gives the plain twin); ``None``: the family's default
            (``identity``, or the scheme the family is built for: ``concat`` for DenseNet).
        shortcut: shortcut option A/B/C/D for schemes that use one (default A).
        num_classes: classifier outputs.
        input_shape: shape of one input sample, e.g. ``(3, 32, 32)`` or ``(40,)``.
        zero_init_last: zero the last norm (or layer) of each residual branch (Goyal et al. 2017).
            Refused for the plain twin, where it would cut the signal.
        residual_kwargs: extra arguments of the scheme (e.g. ``{"gate_bias": -3}``).
        **family_kwargs: family options (``width``, ``norm``, ...).

    Raises:
        ValueError: unknown names, invalid depth, non-positive sizes or an incompatible combination.
    """
    fam, d = parse_model_name(name, depth)
    if residual is None:
        residual = fam.residuals[0] if fam.residuals else "identity"
    caps = residual_class(residual).capabilities  # unknown scheme names fail before anything is built
    if fam.residuals and residual not in fam.residuals:
        raise ValueError(f"the {fam.name} family works only with residual={' / '.join(map(repr, fam.residuals))}, "
                         f"not {residual!r}: its branches are built for that rule (no additive skip path, so no "
                         "plain twin either)")
    if caps.family_only and residual not in fam.residuals:
        built = [f.name for f in list_families() if residual in f.residuals]
        raise ValueError(f"residual scheme {residual!r} runs only on the families built for it "
                         f"({', '.join(built) or 'none'}), not on {fam.name}")
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    shape = tuple(fam.default_input_shape if input_shape is None else input_shape)
    if any(int(s) <= 0 for s in shape):
        raise ValueError(f"input_shape must be positive, got {shape}")
    if zero_init_last and residual == "plain":
        raise ValueError("zero_init_last has no meaning for a plain net: it would zero every layer's output")
    try:
        parts = fam.build(d, num_classes=num_classes, input_shape=shape, **family_kwargs)
    except TypeError as e:
        raise ValueError(f"model family {fam.name!r}: {e}") from None
    kwargs = dict(residual_kwargs or {})
    kwargs.setdefault("post", parts.post)
    if parts.norm is not None and residual_class(residual).default_norm is None:
        kwargs.setdefault("norm", parts.norm)
    if shortcut is not None:
        kwargs["shortcut"] = shortcut
    missing = [r for r in caps.needs_roles if all(s.role != r for s in parts.specs)]
    if missing:
        raise ValueError(f"residual scheme {residual!r} needs {ROLE_NAMES[missing[0]]} (branches of role "
                         f"{missing[0]!r}); {fam.name}{d} has none")
    scheme = create_residual(residual, parts.specs, **kwargs)
    if shortcut is not None and not any(s.changes_shape for s in parts.specs):
        raise ValueError(f"shortcut option {shortcut!r} has no effect on {fam.name}{d}: none of its branches "
                         f"changes shape (shortcuts apply where a ResNet stage changes width or stride)")
    scheme.bind(parts.branches)
    if zero_init_last:
        for b in parts.branches:
            b.zero_init_last_()
    config = dict(name=f"{fam.name}{d}", residual=residual, shortcut=shortcut, num_classes=num_classes,
                  input_shape=shape, zero_init_last=zero_init_last, residual_kwargs=dict(residual_kwargs or {}),
                  **family_kwargs)
    return ResidualNet(parts.stem, Trunk(parts.branches, scheme), parts.head, config)


def init_from_batch(model: nn.Module, x: Tensor) -> None:
    """Data-dependent initialisation: every module of ``model`` that defines ``init_from_batch(model, x)`` gets it
    with the batch ``x`` (Admin's profiling pass). The training loop runs it once on a fresh run's first batch, and
    every measurement "at initialisation" should too."""
    for m in list(model.modules()):
        if callable(getattr(m, "init_from_batch", None)):
            m.init_from_batch(model, x)


def plain_twin(model: ResidualNet) -> ResidualNet:
    """The same architecture with ``residual="plain"``: identical branches, no skip path.

    Raises:
        ValueError: the family works only with a non-additive rule (DenseNet), so it has no plain twin.
    """
    cfg = dict(model.config)
    cfg.update(residual="plain", shortcut=None, residual_kwargs={}, zero_init_last=False)
    return create_model(**cfg)


def init_weights(module: nn.Module, skip: tuple[nn.Module, ...] = ()) -> None:
    """He-normal init for conv and linear layers that feed a ReLU; norms start at scale 1, shift 0."""
    for m in module.modules():
        if any(m is s for s in skip):
            continue
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in",
                                    nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


__all__ = ["Family", "FamilyParts", "ResidualNet", "create_model", "init_weights", "list_families",
           "list_models", "parse_model_name", "plain_twin", "register_family"]
