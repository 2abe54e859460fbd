"""Step time and activation memory of every transformer residual scheme against Pre-LN, and against peers.

A step is forward + cross-entropy (next-token targets) + backward + SGD on a fixed batch of random tokens, GPT
family, 12 layers (24 sublayers), context 128, heads of 64, at ``--widths`` (default 256 and 512). Every net is
timed in the same process in interleaved rounds (the order rotates each round); ratios are paired per round and
summarised by their median with a 95% confidence interval.

1. **Schemes vs Pre-LN**: every registered transformer scheme, plus two references computed another way, whose
   outputs are checked equal first: Block AttnRes computed the naive way (``NaiveBlockAttnRes`` below: each site
   re-normalises and re-scores every source) beside reslab's two-phase form, and Full AttnRes as reslab computed it
   until 2026-12 (``StackedAttnRes``: stacked ``(M, n, d)`` keys and values re-made at every completion, kept by
   every read for backward). Memory: bytes of the tensors autograd saves for backward (unique storages, via
   ``torch.autograd.graph.saved_tensors_hooks``), the activation memory a training step holds at its peak; on CUDA
   also ``torch.cuda.max_memory_allocated``. Targets (issue 12): Block AttnRes step <= 1.05x Pre-LN's at d=256
   (1.10 at 512); Full AttnRes saved activations <= 1.5x Pre-LN's and its step <= its stacked reference's.
2. **reslab Pre-LN vs a hand-written nanoGPT-style stack** with identical layers (weights copied, outputs checked
   equal): the cost of the shared trunk and the scheme object (target <= 1.03).
3. **Peers** (optional: ``pip install -e '.[bench]'``): reslab's Pre-LN GPT vs ``x_transformers``'
   ``TransformerWrapper(Decoder)`` at the same size (target <= 1.0), and reslab's ``hc`` vs the
   ``hyper-connections`` package wrapping the same branches (same function at init, checked; target <= 1.0).

``--write`` replaces the ``<!-- bench_gpt -->`` section of BENCHMARKS.md. Run with ``--threads 1`` (default) on a
shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import reslab
from _timing import OtherLoad, interleaved, make_step, median_ci, n_params, wait_until_quiet, write_benchmark
from reslab.residuals.attnres import EPS, AttnRes, BlockAttnRes, key_norm
from reslab.losses import loss_fn

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench_gpt -->", "<!-- /bench_gpt -->"
VOCAB, CTX, LAYERS = 128, 128, 12
SCHEMES = ["postln", "sandwich", "deepnorm", "rezero", "layerscale", "skipinit", "scaled", "value_residual",
           "attnres", "stacked attnres", "block_attnres", "naive block_attnres", "hc", "mhc", "denseformer",
           "periln", "mixln", "lnscaling", "preln+dyt", "preln+droppath", "laurel", "laurel_pa", "resi_dual", "admin",
           "ngpt", "mudd", "frac"]
#: a scheme with options, by the name the tables give it: (scheme, residual kwargs, family kwargs)
VARIANTS = {"preln+dyt": ("preln", {"norm_type": "dyt"}, {"final_norm": "dyt"}),
            "preln+droppath": ("preln", {"drop_path": 0.1}, {})}
#: step time / Pre-LN's, per (scheme, width)
TARGETS = {("block_attnres", 256): 1.05, ("block_attnres", 512): 1.10}
#: saved activations / Pre-LN's, at every width
MEMORY_TARGETS = {"attnres": 1.5}
#: the GPT Pre-LN step measured at each width (seconds), for the machinery's share
PRELN_STEP: dict[int, float] = {}
#: step time of a scheme / its reference computation's, at every width (the same outputs, checked)
REFERENCE_TARGETS = {"attnres": ("stacked attnres", 1.0)}


class NaiveBlockAttnRes(BlockAttnRes):
    """Block AttnRes computed the naive way: at every site, stack all sources (completed block sums and the
    partial sum), RMS-normalise every key again and take one softmax. Same parameters and outputs."""

    def _aggregate(self, state, q: int, weights: bool):
        srcs = torch.stack(state.sources + (() if state.partial is None else (state.partial,)), -2)  # (..., S, d)
        a = torch.softmax(key_norm(srcs) @ self.queries[q].to(srcs.dtype), dim=-1)  # (..., S)
        return (a.unsqueeze(-1) * srcs).sum(-2), a.movedim(-1, 0).unsqueeze(-1)


class _StackedState:
    """``StackedAttnRes``'s state: stacked ``(M, n, d)`` keys/values, partial sum, phase-1 cache."""

    __slots__ = ("pos", "shape", "keys", "values", "partial", "read", "cache")

    def __init__(self, pos, shape, keys, values, partial, read, cache) -> None:
        self.pos, self.shape, self.keys, self.values = pos, shape, keys, values
        self.partial, self.read, self.cache = partial, read, cache


class StackedAttnRes(AttnRes):
    """Full AttnRes as reslab computed it until 2026-12 (the reference of the saved-activation target): every
    completion appends the new key and value to stacked ``(M, n, d)`` tensors (``torch.cat``, a new copy each
    time), one batched product per read, the partial sum merged by an online softmax. Each read keeps its stacks
    for backward: O(L^2 M d) saved activations. Same parameters and outputs as ``attnres``."""

    def _phase1(self, state, first: int, count: int):
        z = state.keys @ self.queries[first:first + count].t().to(state.keys.dtype)  # (M, n, S)
        p = torch.softmax(z, dim=1)
        o = p.transpose(1, 2).to(state.values.dtype) @ state.values
        lse = torch.logsumexp(z, dim=1) if self.block_size > 1 else None
        return p, o, lse

    def _aggregate(self, state, q: int, weights: bool):
        h, alpha = self._read(state, q)  # (M, d), (M, S)
        lead = state.shape[:-1]
        return h.reshape(state.shape), alpha.t().reshape(-1, *lead, 1)  # as reslab's scheme gives them

    def _read(self, state, q: int):
        pos, bs = state.pos, self.block_size
        if q == pos:
            block, start = pos // bs, pos // bs * bs
            if state.cache is None or state.cache[0] != block:
                count = min(start + bs, len(self.specs) + 1) - start
                state.cache = (block, start, *self._phase1(state, start, count))
            _, first, p, o, lse = state.cache
            s = q - first
        else:
            p, o, lse = self._phase1(state, q, 1)
            s = 0
        p, o = p[:, :, s], o[:, s]
        P = state.partial
        if P is None:
            return o, p
        w = self.queries[q].to(P.dtype)
        zp = (P @ w) * torch.rsqrt(torch.linalg.vecdot(P, P) / P.shape[-1] + EPS)
        sig = torch.sigmoid(zp - lse[:, s]).unsqueeze(-1)
        h = torch.lerp(o, P.to(o.dtype), sig.to(o.dtype))
        return h, torch.cat([p * (1.0 - sig), sig], dim=-1)

    def begin(self, x0: Tensor):
        v = x0.reshape(-1, 1, x0.shape[-1])
        return _StackedState(0, x0.shape, key_norm(v), v, None, x0, None)

    def _advance(self, state, partial):
        pos, keys, values, cache = state.pos + 1, state.keys, state.values, state.cache
        if pos % self.block_size == 0:
            if partial is not None:
                keys = torch.cat([keys, key_norm(partial).unsqueeze(1)], dim=1)
                values = torch.cat([values, partial.unsqueeze(1)], dim=1)
            partial, cache = None, None
        return _StackedState(pos, state.shape, keys, values, partial, state.read, cache)

    def write(self, state, i: int, out: Tensor, h: Tensor, tap=None):
        if tap is not None:
            tap("contribution", i, out)
        v = out.reshape(-1, out.shape[-1])
        return self._advance(state, v if state.partial is None else state.partial + v)

    def skip(self, state, i: int):
        return self._advance(state, state.partial)


def gpt(residual: str, d: int, **kw) -> nn.Module:
    torch.manual_seed(0)
    return reslab.create_model("gpt", residual, depth=LAYERS, num_classes=VOCAB, input_shape=(CTX,), d_model=d,
                               n_heads=d // 64, **kw)


def reference(name: str, d: int) -> nn.Module:
    """The GPT of ``name``'s scheme with the scheme computed by its reference class (same weights)."""
    cls, base = {"naive block_attnres": (NaiveBlockAttnRes, "block_attnres"),
                 "stacked attnres": (StackedAttnRes, "attnres")}[name]
    m = gpt(base, d)
    s = m.trunk.scheme
    ref = cls(s.specs, norm="pre", **({"block_size": s.block_size} if base == "block_attnres" else {}))
    ref.load_state_dict(s.state_dict())
    m.trunk.scheme = ref
    return m


class HandBlock(nn.Module):
    """nanoGPT's ``Block``: ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.attn_proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def attn(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.attn_proj(y.transpose(1, 2).reshape(b, t, c))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class HandGPT(nn.Module):
    """A nanoGPT-style decoder with the layers of reslab's ``gpt`` family (no tap code, no scheme object)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, d), nn.Embedding(CTX, d)
        self.h = nn.ModuleList(HandBlock(d, d // 64) for _ in range(LAYERS))
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, VOCAB, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe.weight[:idx.shape[1]]
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    @torch.no_grad()
    def load_from(self, m: nn.Module) -> None:
        """Copy the weights of a reslab Pre-LN ``gpt`` model, module by module."""
        self.wte.weight.copy_(m.stem.tok.weight)
        self.wpe.weight.copy_(m.stem.pos.weight)
        br, s = m.trunk.branches, m.trunk.scheme
        for i, blk in enumerate(self.h):
            att, mlp = br[2 * i], br[2 * i + 1]
            blk.c_attn.weight.copy_(att.qkv.weight)
            blk.attn_proj.weight.copy_(att.proj.weight)
            blk.c_fc.weight.copy_(mlp.fc.weight)
            blk.mlp_proj.weight.copy_(mlp.proj.weight)
            blk.ln_1.load_state_dict(s.in_norms[2 * i].state_dict())
            blk.ln_2.load_state_dict(s.in_norms[2 * i + 1].state_dict())
        self.ln_f.load_state_dict(m.head.norm.state_dict())
        self.lm_head.weight.copy_(m.head.unembed.weight)


def xtransformers_gpt(d: int) -> nn.Module:
    from x_transformers import Decoder, TransformerWrapper

    return TransformerWrapper(num_tokens=VOCAB, max_seq_len=CTX, attn_layers=Decoder(dim=d, depth=LAYERS,
                                                                                     heads=d // 64))


class PackageHC(nn.Module):
    """reslab's ``hc`` GPT rebuilt with the ``hyper-connections`` package around the very same branches and
    pre-norms (``layer_index`` = branch index, as reslab's static init)."""

    def __init__(self, m: nn.Module, streams: int = 4) -> None:
        super().__init__()
        from hyper_connections import get_init_and_expand_reduce_stream_functions

        init_hc, self.expand, self.reduce = get_init_and_expand_reduce_stream_functions(streams)
        s = m.trunk.scheme
        self.stem, self.head = m.stem, m.head
        self.blocks = nn.ModuleList(init_hc(dim=b.proj.out_features, branch=nn.Sequential(s.in_norms[i], b),
                                            layer_index=i) for i, b in enumerate(m.trunk.branches))

    def forward(self, idx: Tensor) -> Tensor:
        x = self.expand(self.stem(idx))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.reduce(x))


def saved_bytes(model: nn.Module, x: Tensor, y: Tensor) -> int:
    """Bytes of the unique storages autograd saves for backward in one training forward."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def cuda_peak(model: nn.Module, x: Tensor, y: Tensor) -> float:
    torch.cuda.reset_peak_memory_stats()
    loss_fn(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated() / 2**20


def ratios(times: dict[str, list[float]], ref: str) -> dict[str, list[float]]:
    return {k: [a / b for a, b in zip(v, times[ref])] for k, v in times.items() if k != ref}


def fmt(r: list[float]) -> str:
    lo, hi = median_ci(r)
    return f"{statistics.median(r):.3f} [{lo:.3f}-{hi:.3f}]"


def verdict(r: list[float], target: float) -> str:
    """``meets`` / ``MISSES`` by the median, and whether the confidence interval settles it."""
    lo, hi = median_ci(r)
    word = f"<= {target:.2f}: " + ("meets" if statistics.median(r) <= target else "MISSES")
    return word + ("; the CI spans the target" if lo <= target < hi else "")


def memory_verdict(ratio: float, target: float) -> str:
    return f"saved <= {target:.2f}: " + ("meets" if ratio <= target else "MISSES")


def run_width(d: int, args: argparse.Namespace, lines: list[str]) -> None:
    dev = torch.device(args.device)
    batch = args.batch * (512 // d) if args.batch_scales else args.batch
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (batch, CTX), generator=g).to(dev)
    y = torch.randint(0, VOCAB, (batch, CTX), generator=g).to(dev)
    nets: dict[str, nn.Module] = {"preln": gpt("preln", d)}
    schemes = args.schemes or SCHEMES
    for s in schemes:
        if s in VARIANTS:
            scheme, rkw, fkw = VARIANTS[s]
            nets[s] = gpt(scheme, d, residual_kwargs=rkw, **fkw)
        else:
            nets[s] = reference(s, d) if " " in s else gpt(s, d)
    checks = []
    for ref, ours in (("naive block_attnres", "block_attnres"), ("stacked attnres", "attnres")):
        if {ref, ours} <= set(nets):
            with torch.no_grad():
                diff = (nets[ref](x.cpu()) - nets[ours](x.cpu())).abs().max().item()
            assert diff < 1e-4, f"{ref} and {ours} differ by {diff}"
            checks.append(f"- {ref} (reference) vs {ours} outputs: max |diff| {diff:.1e}")
    nets = {k: v.to(dev) for k, v in nets.items()}
    mem = {k: saved_bytes(m, x, y) / 2**20 for k, m in nets.items()}
    peak = {k: cuda_peak(m, x, y) for k, m in nets.items()} if dev.type == "cuda" else {}
    steps = {k: make_step(m, x, y) for k, m in nets.items()}
    for st in steps.values():
        st()
    t0, others = time.perf_counter(), OtherLoad()
    times = interleaved(steps, args.rounds, args.steps, args.device,
                        on_round=lambda r, t: print(f"  d={d} round {r + 1}/{args.rounds}", flush=True))
    r = ratios(times, "preln")
    PRELN_STEP[d] = statistics.median(times["preln"])
    lines.append(f"\n### d={d}, 12 layers, context {CTX}, batch {batch}, {args.device}\n")
    lines += checks
    lines.append(f"- Pre-LN: median step {1e3 * statistics.median(times['preln']):.1f} ms, {n_params(nets['preln'])} "
                 f"parameters, saved activations {mem['preln']:.1f} MiB"
                 + (f", CUDA peak {peak['preln']:.0f} MiB" if peak else ""))
    lines.append(f"- {args.rounds} rounds x {args.steps} steps, {time.perf_counter() - t0:.0f} s, other processes "
                 f"{others.cores():.2f} cores\n")
    lines.append("| scheme | step time / Pre-LN [95% CI] | saved activations / Pre-LN | target |")
    lines.append("|---|---|---|---|")
    for k in schemes:
        tgt, mtgt = TARGETS.get((k, d)), MEMORY_TARGETS.get(k)
        extra = f" (CUDA peak {peak[k] / peak['preln']:.2f})" if peak else ""
        words = ([] if tgt is None else [verdict(r[k], tgt)]) + \
            ([] if mtgt is None else [memory_verdict(mem[k] / mem["preln"], mtgt)])
        lines.append(f"| {k} | {fmt(r[k])} | {mem[k] / mem['preln']:.2f}{extra} | {'; '.join(words)} |")
    for k, (ref, tgt) in REFERENCE_TARGETS.items():
        if {k, ref} <= set(times):
            rr = [p / q for p, q in zip(times[k], times[ref])]
            lines.append(f"\n- **{k} / {ref}**: step {fmt(rr)} (target {verdict(rr, tgt)}); saved activations "
                         f"{mem[k]:.1f} / {mem[ref]:.1f} MiB = {mem[k] / mem[ref]:.2f}")


class Scale(nn.Module):
    """A near-free branch, ``h * c``: what is left of a trunk step is the scheme's own work."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.full((d,), 0.5))

    def forward(self, h: Tensor) -> Tensor:
        return h * self.c


def machinery_step(residual: str, d: int, tokens: int) -> Callable[[], None]:
    """Forward + backward of the trunk of ``residual`` (24 pre-norm sublayers) with :class:`Scale` branches on
    ``tokens`` random tokens."""
    from reslab.branch import BranchSpec
    from reslab.residuals import create_residual
    from reslab.trunk import Trunk

    torch.manual_seed(0)
    specs = [BranchSpec(d, d, 1, "features", "mlp" if i % 2 else "attn") for i in range(2 * LAYERS)]
    branches = [Scale(d) for _ in specs]
    scheme = create_residual(residual, specs, **({} if residual == "preln" else {"norm": "pre"}))
    scheme.bind(branches)
    trunk, x = Trunk(branches, scheme), torch.randn(tokens, d, requires_grad=True)

    def step() -> None:
        trunk(x).square().mean().backward()

    return step


def run_machinery(d: int, args: argparse.Namespace, lines: list[str]) -> None:
    """What the depth-attention machinery costs with (almost) nothing else in the step: the trunk with
    :class:`Scale` branches, at the benchmark's tokens and at 8 tokens (where Python and the op dispatch are all
    of the cost), beside Pre-LN's trunk and as a share of the GPT Pre-LN step measured above."""
    batch = args.batch * (512 // d) if args.batch_scales else args.batch
    out = {}
    for tokens in (batch * CTX, 8):
        steps = {k: machinery_step(k, d, tokens) for k in ("preln", "block_attnres", "attnres")}
        for st in steps.values():
            st()
        times = interleaved(steps, args.rounds, 5, "cpu", clock="cpu")
        out[tokens] = {k: statistics.median(v) for k, v in times.items()}
    gpt_step = PRELN_STEP.get(d)
    lines.append(f"\n### The depth-attention machinery alone, d={d} (trunk of {2 * LAYERS} pre-norm sublayers with "
                 f"near-free branches h * c; thread CPU time, {args.rounds} rounds x 5 steps)\n")
    lines.append("| tokens | Pre-LN trunk (ms) | block_attnres trunk (ms) | attnres trunk (ms) "
                 "| block_attnres - Pre-LN "
                 "(ms) | as a share of the GPT Pre-LN step |")
    lines.append("|---|---|---|---|---|---|")
    for tokens, t in out.items():
        extra = t["block_attnres"] - t["preln"]
        share = f"{extra / gpt_step:.1%}" if gpt_step else "-"
        lines.append(f"| {tokens} | {1e3 * t['preln']:.1f} | {1e3 * t['block_attnres']:.1f} | {1e3 * t['attnres']:.1f} "
                     f"| {1e3 * extra:.1f} | {share} |")


def run_reference(d: int, args: argparse.Namespace, lines: list[str]) -> None:
    dev = torch.device(args.device)
    batch = args.batch * (512 // d) if args.batch_scales else args.batch
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (batch, CTX), generator=g)
    y = torch.randint(0, VOCAB, (batch, CTX), generator=g)
    ours = gpt("preln", d)
    hand = HandGPT(d)
    hand.load_from(ours)
    with torch.no_grad():
        diff = (ours(x) - hand(x)).abs().max().item()
    assert diff < 1e-5, f"hand-written GPT differs from reslab's by {diff}"
    nets: dict[str, nn.Module] = {"reslab preln": ours, "hand-written": hand}
    notes = [f"- hand-written nanoGPT-style stack: outputs equal (max |diff| {diff:.1e}), "
             f"{n_params(hand)} vs {n_params(ours)} parameters"]
    try:
        xt = xtransformers_gpt(d)
        nets["x-transformers"] = xt
        notes.append(f"- x-transformers {_version('x_transformers')} TransformerWrapper(Decoder(dim={d}, "
                     f"depth={LAYERS}, heads={d // 64})), {n_params(xt)} parameters (its defaults: biased FF, no "
                     "weight copy)")
        hc = gpt("hc", d, residual_kwargs={"norm_type": "rmsnorm"})
        pkg = PackageHC(gpt("hc", d, residual_kwargs={"norm_type": "rmsnorm"}))
        with torch.no_grad():
            hdiff = (hc(x) - pkg(x)).abs().max().item()
        assert hdiff < 1e-5, f"hyper-connections package differs from reslab's hc at init by {hdiff}"
        nets["reslab hc"], nets["hyper-connections hc"] = hc, pkg
        notes.append(f"- hyper-connections {_version('hyper_connections')} around the same branches and pre-norms: "
                     f"outputs at init equal to reslab's hc (max |diff| {hdiff:.1e}); 4 streams, RMSNorm")
    except ImportError as e:
        notes.append(f"- peers skipped ({e}); install them with `pip install -e '.[bench]'`")
    nets = {k: v.to(dev) for k, v in nets.items()}
    x, y = x.to(dev), y.to(dev)
    steps = {k: make_step(m, x, y) for k, m in nets.items()}
    for st in steps.values():
        st()
    t0 = time.perf_counter()
    times = interleaved(steps, args.rounds, args.steps, args.device,
                        on_round=lambda r, t: print(f"  reference d={d} round {r + 1}/{args.rounds}", flush=True))
    lines.append(f"\n### Against hand-written code and peers, d={d}, batch {batch}\n")
    lines += notes
    lines.append(f"- {args.rounds} rounds x {args.steps} steps, {time.perf_counter() - t0:.0f} s\n")
    pairs = [("reslab preln", "hand-written", 1.03), ("reslab preln", "x-transformers", 1.0),
             ("reslab hc", "hyper-connections hc", 1.0)]
    for a, b, tgt in pairs:
        if a in times and b in times:
            r = [p / q for p, q in zip(times[a], times[b])]
            lines.append(f"- **{a} / {b}**: {fmt(r)} (target {verdict(r, tgt)}); median steps "
                         f"{1e3 * statistics.median(times[a]):.1f} / {1e3 * statistics.median(times[b]):.1f} ms")


def _version(mod: str) -> str:
    from importlib.metadata import version

    try:
        return version(mod.replace("_", "-"))
    except Exception:  # noqa: BLE001
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--batch", type=int, default=4, help="sequences per step at d=512 (scaled up at smaller d)")
    ap.add_argument("--no-batch-scaling", dest="batch_scales", action="store_false")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--skip-schemes", action="store_true", help="only the hand-written and peer comparisons")
    ap.add_argument("--skip-reference", action="store_true", help="only the schemes against Pre-LN")
    ap.add_argument("--schemes", nargs="+", choices=SCHEMES, help="time only these schemes against Pre-LN")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="S")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.wait_quiet:
        wait_until_quiet(args.wait_quiet)
    t0 = time.perf_counter()
    lines: list[str] = []
    for d in args.widths:
        if not args.skip_schemes:
            run_width(d, args, lines)
            if args.device == "cpu":
                run_machinery(d, args, lines)
        if not args.skip_reference:
            run_reference(d, args, lines)
    body = "\n".join(lines)
    print(body)
    if args.write:
        path = write_benchmark("bench_gpt.py", "Transformer schemes", __doc__, args.threads, time.perf_counter() - t0,
                               body, START, END)
        print(f"wrote {path}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
