"""
Vision Transformer (ViT) and the DINO projection head, in one file: torch only, no side effects at
import.

    import vision_transformer as vits
    model = vits.vit_small(patch_size=16)            # 21.7M parameters
    cls = model(images)                              # [B, 384], final-norm CLS token
    attn = model.get_last_selfattention(images)      # [B, 6, N, N]

Parameter names equal the published DINO checkpoints (and timm's ViT), so the official weights load
strictly. Inputs of any height and width divisible by the patch size work: the positional embedding
is interpolated as published.
"""
import math
from collections import OrderedDict
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class DropPath(nn.Module):
    """Stochastic depth: in training, zero the residual branch of whole samples and rescale the
    rest."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * mask / keep_prob


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_attention=False):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, C / heads]
        # explicit path, only when the weights themselves are wanted (attention maps)
        if return_attention:
            return ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        # Fast path: SDPA runs flash / memory-efficient kernels on CUDA, never materializing the
        # N x N matrix.
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, drop_path=0.0,
                 norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(),
                                             fc2=nn.Linear(hidden, dim)))

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Image to patch embeddings: [B, C, H, W] -> [B, H/p * W/p, D]."""

    def __init__(self, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=False, drop_path_rate=0.0,
                 norm_layer=nn.LayerNorm, grad_checkpointing=False):
        super().__init__()
        self.embed_dim = embed_dim
        # forward() with gradients keeps only the blocks' inputs
        self.grad_checkpointing = grad_checkpointing
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2 + 1, embed_dim))
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop, norm_layer) for drop in dpr])
        self.norm = norm_layer(embed_dim)
        # The published init: trunc_normal_(std=0.02) truncated at +-2, 100 sigma away: the same as
        # a plain normal draw, which is ~20x faster on the CPU than torch's inverse-CDF sampler.
        # Linear biases start at 0.
        for p in (self.pos_embed, self.cls_token):
            nn.init.normal_(p, std=0.02)
        self.apply(_init_linear)

    def interpolate_pos_encoding(self, x, h, w):
        """Positional embedding for an h x w input, resized bicubically from the trained grid
        exactly as the published code does (including its +0.1 on the scale factor), so published
        weights give the same features."""
        N = self.pos_embed.shape[1] - 1
        if x.shape[1] - 1 == N and h == w:
            return self.pos_embed
        side = int(math.sqrt(N))
        dim = x.shape[-1]
        h0, w0 = h // self.patch_size, w // self.patch_size
        grid = self.pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
        # The 0.1 avoids floating point error making floor(side * scale) one too small.
        grid = F.interpolate(grid, scale_factor=((h0 + 0.1) / side, (w0 + 0.1) / side),
                             mode="bicubic")
        assert grid.shape[-2:] == (h0, w0)
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((self.pos_embed[:, :1], patch_pos), 1)

    def prepare_tokens(self, x):
        B, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input size {h}x{w} is not a multiple of the patch size "
                             f"{self.patch_size}; crop or resize the image to a multiple of it")
        x = self.patch_embed(x)
        # Under autocast the patch embedding is bf16/fp16; the fp32 class token and positional
        # embedding make the residual stream fp32 (cat and + promote), as in the published code,
        # at every input size.
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), 1)
        return x + self.interpolate_pos_encoding(x, h, w)

    def forward(self, x):
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            # Activation checkpointing recomputes the block in backward; the RNG state is restored
            # for it, so drop path draws the same masks and the gradients are the same.
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)[:, 0]

    def get_last_selfattention(self, x):
        """Softmaxed attention of the last block: [B, heads, N, N], token 0 is CLS."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        last = self.blocks[-1]
        return last.attn(last.norm1(x), return_attention=True)

    def get_intermediate_layers(self, x, n=1):
        """Final-norm tokens of the last n blocks: a list of n tensors [B, N, D]."""
        x = self.prepare_tokens(x)
        output = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - n:
                output.append(self.norm(x))
        return output


def _init_linear(m):
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)  # the published trunc_normal_, see VisionTransformer
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _vit(embed_dim, num_heads):
    """The constructor of the published ViT of this width: 12 blocks, MLP ratio 4, qkv bias,
    LayerNorm eps 1e-6."""
    def vit(patch_size=16, **kwargs):
        return VisionTransformer(patch_size=patch_size, embed_dim=embed_dim, depth=12,
                                 num_heads=num_heads, mlp_ratio=4, qkv_bias=True,
                                 norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)
    return vit


vit_tiny = _vit(192, 3)
vit_small = _vit(384, 6)
vit_base = _vit(768, 12)


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| (one norm per output unit), written out
    rather than torch's weight_norm so the parameter names are the published `weight_g`,
    `weight_v` on every PyTorch version."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default, as published

    @property
    def weight(self):
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x):
        # fp32 even under autocast: the teacher sharpens these logits by 1 / 0.04, which would
        # magnify the rounding of a bf16 output (up to 2^-9 of a logit in [-1, 1]) 25-fold
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # what the newer parametrization (torch.nn.utils.parametrizations.weight_norm) writes
        for new, old in (("weight_g", "parametrizations.weight.original0"),
                         ("weight_v", "parametrizations.weight.original1")):
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class DINOHead(nn.Module):
    """MLP -> L2-normalize -> weight-normalized linear layer to out_dim prototypes."""

    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3,
                 hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        nlayers = max(nlayers, 1)
        layers = [nn.Linear(in_dim, hidden_dim if nlayers > 1 else bottleneck_dim)]
        for i in range(nlayers - 1):  # [BatchNorm], GELU, Linear
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers += [nn.GELU(),
                       nn.Linear(hidden_dim, bottleneck_dim if i == nlayers - 2 else hidden_dim)]
        # the published names: mlp.0, ... or mlp
        self.mlp = nn.Sequential(*layers) if nlayers > 1 else layers[0]
        self.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:  # g stays 1: every prototype has unit norm
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))
