"""Admin: Post-LN with a per-dimension weight on each skip path, set from a profiling pass at initialisation.

Liu, Liu, Gao, Chen & Han 2020, "Understanding the Difficulty of Training Transformers" (arXiv 2004.08249), section 5
("Adaptive Model Initialization"), eq. (5)::

    x_i = N_i(b_i),    b_i = omega_i * x_{i-1} + F_i(x_{i-1})

``N_i`` the post norm of branch ``i``, ``omega_i in R^d`` (elementwise ``*``) a learnable vector per branch (each
attention and each MLP sublayer is a branch). Post-LN (``postln``) is ``omega_i = 1``. The paper sets
``omega_i = sqrt(sum_{j<i} Var[F_j(x_{j-1})])`` from the branch output variances of a profiling forward pass at
initialisation (its first batch). The rule run here is the authors' code (Transformer-Clinic, ``--init-type
adaptive-profiling``), which makes the sum exact as a recurrence along the profiling pass::

    omega_1 = 1,    omega_{i+1} = sqrt(Var[omega_i * x_{i-1}] + Var[F_i(x_{i-1})])

``Var`` over every element of the batch (population variance), each ``omega_i`` set before branch ``i`` is combined,
so later branches see the re-weighted stream. With ``Var[x_{i-1}] = 1`` after each norm this is the paper's sum,
counting the stem output as ``F_0`` (``omega_i^2 = Var[x_0] + sum_{1<=j<i} Var[F_j]`` for ``i >= 2``, up to the
norm's eps). The ``omega`` grow with depth, so the stream leans on its skip path and the output change under a
parameter update is ``O(log n)`` instead of Post-LN's ``O(n)`` (the paper's Theorem).

Profiling is explicit: :meth:`Admin.profile` (``scheme.profile(model, batch)``), run once before training, as the
authors' code runs a profiling stage before training; ``reslab train`` runs it on a fresh run's first batch of training
inputs (the training loop's ``init_from_batch`` hook), the same batch on every rank. It runs ``model`` on ``batch`` in
training mode (as the paper profiles its first training batch) under ``no_grad``, restores every buffer (BatchNorm
statistics) and the modules' modes afterwards, and forks the random number generators, so the omegas are its only effect
and the run that follows draws the same numbers as without it; the same weights and batch (and, with dropout, the same
RNG state) give the same omegas. It profiles the whole trunk in depth order, whatever lesion or block order is set. Why
not the first training forward (a lazy init): the profiling forward would change parameters inside a training step
(autograd, ``torch.compile``), and under DDP each rank would profile its own shard and the replicas would differ.

Before :meth:`~Admin.profile` the omegas are 1: the model is Post-LN (the paper's profiling network), and a forward
in training mode warns that it has not been profiled. ``Admin.profiled`` says whether it has been; it is saved in the
state dict (a 0-dim bool buffer ``profiled_flag``, a tensor as every entry of a reslab checkpoint) with the omegas, so
a profiled model loads as profiled and an unprofiled one as unprofiled.

Closed-form omegas (``init``), the ``admin-torch`` package's ``calculate_init`` (v0.1.0; no profiling), with ``N`` the
number of branches: ``"O(logn)"``: ``omega = sqrt((N + 1) / ln(N + 1) - 1)`` on every branch (the package's default),
``"O(n)"``: ``omega = 1`` (Post-LN), ``"O(1)"``: ``omega = sqrt(N)``; or a number.

Lesion (``skip``): ``omega_i * x_{i-1}``, without the norm (as for ``deepnorm``). No decomposition (post norm).
Admin needs feature streams of one width (transformers, MLPs): only the ``post`` norm placement, no shortcut.

Args:
    init: ``"profile"`` (the paper: omegas from :meth:`Admin.profile`), ``"O(logn)"``, ``"O(n)"``, ``"O(1)"`` or a
        positive number.
    learnable: train the omegas (default, as the authors' code) or keep them as buffers.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from reslab.branch import BranchSpec
from reslab.evaluation import preserved
from reslab.residuals.base import AdditiveScheme, Capabilities, Tap, register_residual

#: closed-form ``init`` names (admin-torch's ``output_change_scale``)
CLOSED_FORMS = ("O(logn)", "O(n)", "O(1)")


def closed_form_omega(branches: int, scale: str) -> float:
    """admin-torch's ``calculate_init``: the omega of every branch for the output change ``scale`` of a net of
    ``branches`` residual branches."""
    n = branches
    if scale == "O(logn)":
        return math.sqrt((n + 1) / math.log(n + 1) - 1)
    if scale == "O(n)":
        return 1.0
    if scale == "O(1)":
        return math.sqrt(n)
    raise ValueError(f"admin: unknown output change scale {scale!r}; expected one of {', '.join(CLOSED_FORMS)}")


class _Captured(Exception):
    """Raised by :meth:`Admin.profile`'s hook to stop the model once the trunk input is known."""

    def __init__(self, x0: Tensor) -> None:
        super().__init__()
        self.x0 = x0


def _variance(t: Tensor) -> float:
    """Population variance over every element, in float64."""
    return float(t.detach().double().var(correction=0))


@register_residual("admin", paper="Liu et al. 2020 (Admin), arXiv 2004.08249")
class Admin(AdditiveScheme):
    """``x_i = N_i(omega_i * x_{i-1} + F_i(x_{i-1}))``, ``omega_i`` from a profiling pass (or a closed form)."""

    capabilities = Capabilities(shape_change=False, uses_shortcut=False)
    default_norm = "post"
    norm_placements = ("post",)

    def __init__(self, specs: Sequence[BranchSpec], init: float | str = "profile", learnable: bool = True,
                 **kw: Any) -> None:
        super().__init__(specs, **kw)
        widths = {s.in_dim for s in self.specs}
        if len(widths) != 1:
            raise ValueError(f"residual scheme 'admin' needs branches of one width, got {sorted(widths)}")
        if isinstance(init, str):
            if init != "profile" and init not in CLOSED_FORMS:
                raise ValueError(f"admin: init must be 'profile', {', '.join(map(repr, CLOSED_FORMS))} or a "
                                 f"positive number, got {init!r}")
            value = 1.0 if init == "profile" else closed_form_omega(len(self.specs), init)
        elif isinstance(init, bool) or not isinstance(init, (int, float)) or not (math.isfinite(init) and init > 0):
            raise ValueError(f"admin: init must be 'profile', {', '.join(map(repr, CLOSED_FORMS))} or a positive "
                             f"number, got {init!r}")
        else:
            value = float(init)
        self.init, self.learnable = init, bool(learnable)
        omega = torch.full((len(self.specs), widths.pop()), value)
        self.omega: Tensor
        if self.learnable:
            self.omega = nn.Parameter(omega)
        else:
            self.register_buffer("omega", omega)
        self.register_buffer("profiled_flag", torch.tensor(init != "profile"))

    # --- the rule ----------------------------------------------------------------------------
    def skip(self, state: Tensor, i: int) -> Tensor:
        return self.omega[i] * state

    def equation(self, x: Tensor, fx: Tensor, i: int) -> Tensor:
        return self.omega[i] * x + fx  # b_i = x_{i-1} omega_i + F_i(x_{i-1}), eq. (5), before the norm

    def write(self, state: Tensor, i: int, out: Tensor, h: Tensor, tap: Tap | None = None) -> Tensor:
        if i == 0 and self.training and not self.profiled:
            warnings.warn("admin: the omegas are not profiled, so this model is Post-LN (omega = 1); call "
                          "model.trunk.scheme.profile(model, batch) before training (reslab train does)", stacklevel=2)
        return super().write(state, i, out, h, tap)

    # --- profiling ---------------------------------------------------------------------------
    @torch.no_grad()
    def profile(self, module: nn.Module, *inputs: Any) -> Tensor:
        """Set the omegas from one profiling forward pass of ``module`` on ``inputs`` (see the module docstring).

        Args:
            module: a model whose trunk runs this scheme (a :class:`~reslab.models.ResidualNet`), or the trunk.
            inputs: what ``module`` is called with (a batch).

        Returns:
            the omegas, ``(branches, d)`` (a copy).

        Raises:
            ValueError: a closed-form ``init``, or no trunk of ``module`` runs this scheme.
        """
        if self.init != "profile":
            raise ValueError(f"admin: profile() sets the omegas of init='profile'; this scheme has init={self.init!r}")
        trunks = [m for m in module.modules() if getattr(m, "scheme", None) is self and hasattr(m, "branches")]
        if len(trunks) != 1:
            raise ValueError(f"admin: profile() needs a module with one trunk running this scheme, found {len(trunks)}")
        trunk = trunks[0]
        devices = sorted({t.device.index or 0 for t in (*module.parameters(), *module.buffers())
                          if t.device.type == "cuda"})

        def capture(mod: nn.Module, args: tuple) -> None:
            raise _Captured(args[0])

        omega = None
        with torch.random.fork_rng(devices=devices), preserved(module):
            module.train()
            handle = trunk.register_forward_pre_hook(capture)
            try:
                module(*inputs)
                raise ValueError("admin: profile() ran the module without reaching its trunk")
            except _Captured as got:
                x = got.x0
            finally:
                handle.remove()
            ratio = 1.0
            for i, branch in enumerate(trunk.branches):
                h = self.read(x, i)
                out = branch(h)
                self.omega[i].fill_(ratio)
                ratio = math.sqrt(_variance(self.omega[i] * x) + _variance(out))
                x = AdditiveScheme.write(self, x, i, out, h)  # no "not profiled" warning here
            omega = self.omega.detach().clone()
        self.omega.copy_(omega)  # a buffer (learnable=False) was given back by preserved()
        self.profiled_flag.fill_(True)
        return omega.clone()

    def init_from_batch(self, model: nn.Module, x: Tensor) -> None:
        """The training loop's data-dependent initialisation (a fresh run, its first batch): :meth:`profile` unless
        the omegas are set already."""
        if not self.profiled:
            self.profile(model, x)

    @property
    def profiled(self) -> bool:
        """The omegas hold their init: at once for a closed form, after :meth:`profile` for ``init="profile"``."""
        return bool(self.profiled_flag)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, init={self.init!r}, learnable={self.learnable}, profiled={self.profiled}"
