"""Vision Transformer (Dosovitskiy et al. 2021) in the small CIFAR configuration of the ZSharp paper.

The image is cut into ``patch_size x patch_size`` patches, each linearly embedded (a strided
convolution); a learned class token is prepended and learned position embeddings added. Then
``depth`` pre-LN encoder blocks ``x = x + MHA(LN(x)); x = x + MLP(LN(x))`` (GELU MLP), a final
LayerNorm, and a linear head on the class token. Paper configuration: 32x32 inputs, 4x4 patches,
7 blocks, hidden size 384, MLP size 384, 12 heads, no dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"hidden size {dim} must be divisible by the number of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class EncoderBlock(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """ViT with a class token.

    Args:
        num_classes: size of the output layer.
        image_size: side of the (square) input images; must be a multiple of ``patch_size``.
        patch_size: side of a patch in pixels.
        in_channels: channels of the input images.
        dim: hidden size. depth: number of encoder blocks. heads: attention heads.
        mlp_dim: hidden size of the MLP in each block.
    """

    def __init__(self, num_classes: int = 10, image_size: int = 32, patch_size: int = 4, in_channels: int = 3,
                 dim: int = 384, depth: int = 7, heads: int = 12, mlp_dim: int = 384) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
        num_patches = (image_size // patch_size) ** 2
        self.image_size = image_size
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.empty(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(f"ViT built for {self.image_size}x{self.image_size} images, got "
                             f"{x.shape[-2]}x{x.shape[-1]}; pass image_size= to build_model")
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        out = self.norm(self.blocks(tokens))
        return self.head(out[:, 0])
