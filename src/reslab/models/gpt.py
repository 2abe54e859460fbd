"""GPT-style decoder whose trunk is the shared trunk: every attention and every MLP sublayer is one branch.

A ``gptL`` model has ``L`` layers, so the trunk runs ``2L`` branches (attention, MLP, attention, MLP, ...) and
every residual scheme sees two branches per layer. The branches carry no norm and no skip: the scheme owns the
rule, including where the norms sit (Pre-LN by default on this family; ``residual="postln"``, ``"sandwich"``,
``"deepnorm"``, ``"rezero"`` (no norm), ...). The family builds (nanoGPT layout, Radford et al. 2019):

- stem: token embedding, plus learned absolute positions (``positions="learned"``); with
  ``positions="rotary"`` the attention branches rotate queries and keys instead (Su et al. 2021, RoFormer);
- branches: causal self-attention through ``scaled_dot_product_attention`` (role ``"attn"``) and a GELU MLP
  of width ``mlp_ratio * d`` (role ``"mlp"``);
- head: a final norm (the Pre-LN final LN, and the logit lens's decoder) and the unembedding, optionally tied
  to the token embedding.

Initialisation is GPT-2's: weights ``N(0, 0.02)``, biases zero; the branches' output projections (role
``"out"``) are additionally scaled by ``1/sqrt(2L)`` (``scaled_out_init=True``). Branches declare their weights
by role (:meth:`CausalSelfAttention.projections`), so schemes such as DeepNorm re-initialise by role, never by
parameter name. Inputs are token ids ``(N, T)`` with ``T <= context`` (``input_shape=(context,)``); outputs are
logits ``(N, T, vocab)`` with ``vocab = num_classes``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reslab.branch import BranchSpec, weights_by_role
from reslab.models.base import FamilyParts, register_family
from reslab.norms import NORM_TYPES

GPT2_STD = 0.02
#: ``reslab train``'s defaults: AdamW with weight decay 0.1, linear warm-up and cosine decay, on the pydoc text
GPT_RECIPE = dict(data="pydoc", optimizer="adamw", lr=3e-3, weight_decay=0.1, schedule="cosine", warmup_steps=20,
                  epochs=5, batch_size=64)


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021, arXiv 2104.09864) for heads of size ``head_dim``."""

    def __init__(self, head_dim: int, context: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary positions need an even head size, got {head_dim}")
        inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        ang = torch.outer(torch.arange(context, dtype=torch.float64), inv)
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Rotate ``x`` of shape ``(N, H, T, head_dim)`` by its positions."""
        t = x.shape[-2]
        cos, sin = self.cos[:t].to(x.dtype), self.sin[:t].to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, ``proj(softmax(q k^T / sqrt(d_h) + causal) v)``.

    ``value_mix``, when given (by the value-residual scheme, per forward pass), maps this layer's values
    ``(N, T, d)`` to the values attention uses. ``key_input`` / ``value_input``, when given (by MUDD connections,
    per forward pass), are what keys and values are computed from (default ``x``, which queries always read).
    """

    role = "attn"

    def __init__(self, d: int, n_heads: int, rotary: Rotary | None = None, dropout: float = 0.0,
                 bias: bool = False) -> None:
        super().__init__()
        self.d, self.n_heads, self.dropout = d, n_heads, dropout
        self.qkv = nn.Linear(d, 3 * d, bias=bias)
        self.proj = nn.Linear(d, d, bias=bias)
        self.rotary = [rotary]  # shared by every layer; a list keeps it out of this module's parameters

    def forward(self, x: Tensor, value_mix: Callable[[Tensor], Tensor] | None = None,
                key_input: Tensor | None = None, value_input: Tensor | None = None) -> Tensor:
        n, t, d = x.shape
        if key_input is None and value_input is None:
            q, k, v = self.qkv(x).split(d, dim=-1)
        else:  # keys and values read their own inputs (MUDD's key and value ways); queries read x
            b = (None,) * 3 if self.qkv.bias is None else self.qkv.bias.split(d)
            q, k, v = (F.linear(z, w, bz) for z, w, bz in zip(
                (x, x if key_input is None else key_input, x if value_input is None else value_input),
                self.qkv.weight.split(d), b))
        if value_mix is not None:
            v = value_mix(v)
        q, k, v = (z.view(n, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        rot = self.rotary[0]
        if rot is not None:
            q, k = rot(q), rot(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))

    def projections(self) -> dict[str, list[Tensor]]:
        """Weights by role: ``query``, ``key``, ``value`` (views into the fused ``qkv``) and ``out``."""
        w, d = self.qkv.weight, self.d
        return {"query": [w[:d]], "key": [w[d:2 * d]], "value": [w[2 * d:]], "out": [self.proj.weight]}

    def zero_init_last_(self) -> None:
        nn.init.zeros_(self.proj.weight)


class MLP(nn.Module):
    """``proj(gelu(fc(x)))`` with hidden width ``ratio * d``."""

    role = "mlp"

    def __init__(self, d: int, ratio: int = 4, dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(d, ratio * d, bias=bias)
        self.proj = nn.Linear(ratio * d, d, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))

    def projections(self) -> dict[str, list[Tensor]]:
        """Weights by role: ``ffn`` (both layers) and ``out`` (the one writing to the stream)."""
        return {"ffn": [self.fc.weight, self.proj.weight], "out": [self.proj.weight]}

    def zero_init_last_(self) -> None:
        nn.init.zeros_(self.proj.weight)


class TokenStem(nn.Module):
    """Token embedding plus (optionally) learned absolute positions; dropout."""

    def __init__(self, vocab: int, d: int, context: int, learned_positions: bool, dropout: float) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d) if learned_positions else None
        self.drop = nn.Dropout(dropout)
        self.context = context

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[-1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens is longer than the model's context {self.context}")
        x = self.tok(idx)
        if self.pos is not None:
            x = x + self.pos.weight[:t]
        return self.drop(x)


class LMHead(nn.Module):
    """Final norm, then the unembedding ``W_U`` (the logit lens decodes any stream with this module)."""

    def __init__(self, norm: nn.Module, d: int, vocab: int) -> None:
        super().__init__()
        self.norm = norm
        self.unembed = nn.Linear(d, vocab, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.unembed(self.norm(x))


def _gpt2_init(modules: list[nn.Module], branches: list[nn.Module], layers: int, scaled_out: bool) -> None:
    for mod in modules:
        for m in mod.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, GPT2_STD)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
    if scaled_out:
        with torch.no_grad():
            for w in weights_by_role(branches, "out"):
                w.normal_(0.0, GPT2_STD / math.sqrt(2 * layers))


@register_family("gpt", depths=(4, 8, 12), depth_rule=">= 1 (layers of one attention and one MLP sublayer)",
                 check_depth=lambda d: d >= 1, default_input_shape=(128,), inputs="tokens",
                 paper="Radford et al. 2019 (GPT-2); Karpathy's nanoGPT layout",
                 description="GPT decoder, 2 branches per layer (options: d_model, n_heads, mlp_ratio, "
                             "positions=learned|rotary, tie_embeddings, dropout, bias, final_norm, "
                             "scaled_out_init)",
                 recipe=GPT_RECIPE)
def gpt(depth: int, num_classes: int, input_shape: tuple[int, ...], d_model: int = 128, n_heads: int = 4,
        mlp_ratio: int = 4, positions: str = "learned", tie_embeddings: bool = False, dropout: float = 0.0,
        bias: bool = False, final_norm: str = "layernorm", scaled_out_init: bool = True) -> FamilyParts:
    if len(input_shape) != 1:
        raise ValueError(f"gpt takes token sequences: input_shape must be (context,), got {input_shape}")
    context = int(input_shape[0])
    if d_model <= 0 or n_heads <= 0 or mlp_ratio <= 0:
        raise ValueError(f"d_model, n_heads and mlp_ratio must be positive, got {d_model}, {n_heads}, {mlp_ratio}")
    if d_model % n_heads:
        raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
    if positions not in ("learned", "rotary"):
        raise ValueError(f"positions must be 'learned' or 'rotary', got {positions!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if final_norm not in (*NORM_TYPES, "none"):
        raise ValueError(f"final_norm must be one of {', '.join((*NORM_TYPES, 'none'))}, got {final_norm!r}")
    rotary = Rotary(d_model // n_heads, context) if positions == "rotary" else None
    stem = TokenStem(num_classes, d_model, context, positions == "learned", dropout)
    branches: list[nn.Module] = []
    specs: list[BranchSpec] = []
    for _ in range(depth):
        branches += [CausalSelfAttention(d_model, n_heads, rotary, dropout, bias),
                     MLP(d_model, mlp_ratio, dropout, bias)]
        specs += [BranchSpec(d_model, d_model, 1, "features", role="attn"),
                  BranchSpec(d_model, d_model, 1, "features", role="mlp")]
    head = LMHead(nn.Identity() if final_norm == "none" else NORM_TYPES[final_norm](d_model), d_model, num_classes)
    _gpt2_init([stem, *branches, head], branches, depth, scaled_out_init)
    if rotary is not None:
        stem.rotary = rotary  # registered once (its buffers are not saved), so .to(device) moves it
    if tie_embeddings:
        head.unembed.weight = stem.tok.weight
    return FamilyParts(stem, branches, specs, head, norm="pre")
