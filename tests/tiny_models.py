"""Tiny pre-LN transformer towers for core tests (2 blocks, hidden 32), with their adapter sites."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mosa_scale.backbones.base import BlockSites

IN_DIM, TOKENS, CLASSES = 16, 5, 10


class SplitAttention(nn.Module):
    """Self-attention with separate q/k/v/o projections (the HF layout)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.o_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True) if fused else SplitAttention(d, heads)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0] if self.fused else self.attn(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        h = x + self.attention(self.ln_1(x))
        return h + self.mlp(self.ln_2(h))


class TinyTower(nn.Module):
    """tokens (B, T, 16) -> pooled features (B, D)."""

    def __init__(self, d: int = 32, depth: int = 2, heads: int = 4, fused: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(IN_DIM, d)
        self.blocks = nn.ModuleList(Block(d, heads, fused) for _ in range(depth))
        self.ln_f = nn.LayerNorm(d)
        self.checkpoint_fn = None  # e.g. router.checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for blk in self.blocks:
            x = self.checkpoint_fn(blk, x) if self.checkpoint_fn is not None else blk(x)
        return self.ln_f(x).mean(1)

    def sites(self) -> list[BlockSites]:
        out = []
        for i, blk in enumerate(self.blocks):
            p = f"blocks.{i}"
            lora = dict(qkv_fused=f"{p}.attn") if blk.fused else dict(q=f"{p}.attn.q_proj", v=f"{p}.attn.v_proj")
            out.append(BlockSites(block=p, attn=f"{p}.attn", ln2=f"{p}.ln_2", mlp=f"{p}.mlp", **lora))
        return out


class Classifier(nn.Module):
    def __init__(self, tower: nn.Module, width: int, classes: int = CLASSES) -> None:
        super().__init__()
        self.tower = tower
        self.mosa_head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 16) -> (B, C)
        return self.mosa_head(self.tower(x))


def make_tower(seed: int = 0, **kw) -> TinyTower:
    torch.manual_seed(seed)
    return TinyTower(**kw)


def batches(n: int, *, batch: int = 4, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, TOKENS, IN_DIM, generator=g), torch.randint(CLASSES, (batch,), generator=g))
        for _ in range(n)
    ]
