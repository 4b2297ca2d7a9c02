"""
Vision Transformer (ViT) and the DINO projection head, in one file.

    import vision_transformer as vits
    model = vits.vit_small(patch_size=16)            # 21.7M parameters
    cls = model(images)                              # [B, 384], final-norm CLS token
    attn = model.get_last_selfattention(images)      # [B, 6, N, N]

Parameter names equal the published DINO checkpoints (and timm's ViT), so the
official weights load with `load_state_dict(..., strict=True)`. Any input whose
height and width are multiples of the patch size works: the positional
embedding is interpolated (bicubic) exactly as the published DINO code does.
The file has no dependencies beyond torch and no side effects at import.
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def drop_path(x, drop_prob=0.0, training=False):
    """Stochastic depth: zero the residual branch of whole samples, rescale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    return x * mask / keep_prob


class DropPath(nn.Module):
    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, return_attention=False):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        if return_attention:
            # Explicit path, only when the weights themselves are wanted (attention maps).
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            return attn
        # Fast path: SDPA runs flash / memory-efficient kernels on CUDA and never
        # materializes the N x N attention matrix.
        dropout = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def attention(self, x):
        """Softmaxed self-attention weights of this block: [B, heads, N, N]."""
        return self.attn(self.norm1(x), return_attention=True)


class PatchEmbed(nn.Module):
    """Image to patch embeddings: [B, C, H, W] -> [B, H/p * W/p, D]."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=0, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=False, drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.0, norm_layer=nn.LayerNorm, grad_checkpointing=False):
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.grad_checkpointing = grad_checkpointing  # forward() with gradients keeps only the blocks' inputs
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i], norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def interpolate_pos_encoding(self, x, h, w):
        """Positional embedding for an h x w input, resized bicubically from the trained grid.

        Reproduces the published DINO code exactly (including its +0.1 on the
        scale factor), so published weights give the published features.
        """
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and h == w:
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, :1]
        patch_pos_embed = self.pos_embed[:, 1:]
        dim = x.shape[-1]
        h0, w0 = h // self.patch_size, w // self.patch_size
        side = int(math.sqrt(N))
        # The 0.1 avoids floating point error making floor(side * scale) one too small.
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2).float(),
            scale_factor=((h0 + 0.1) / side, (w0 + 0.1) / side), mode="bicubic")
        assert patch_pos_embed.shape[-2:] == (h0, w0)
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed, patch_pos_embed), dim=1)

    def prepare_tokens(self, x):
        B, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input size {h}x{w} is not a multiple of the patch size {self.patch_size}; "
                             f"crop or resize the image to a multiple of it")
        x = self.patch_embed(x)
        # Under autocast the patch embedding is bf16/fp16; the fp32 class token and positional embedding make
        # the residual stream fp32 (cat and + promote), as in the published code, at every input size.
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, h, w)
        return self.pos_drop(x)

    def forward(self, x):
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            # Activation checkpointing recomputes the block in backward; the RNG state is restored for it, so drop
            # path draws the same masks and the gradients are the same.
            x = checkpoint(blk, x, use_reentrant=False) if self.grad_checkpointing and torch.is_grad_enabled() \
                else blk(x)
        return self.norm(x)[:, 0]

    def get_last_selfattention(self, x):
        """Softmaxed attention of the last block: [B, heads, N, N], token 0 is CLS."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1].attention(x)

    def get_intermediate_layers(self, x, n=1):
        """Final-norm tokens of the last n blocks: a list of n tensors [B, N, D]."""
        x = self.prepare_tokens(x)
        output = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - n:
                output.append(self.norm(x))
        return output


def trunc_normal_(tensor, std=0.02):
    """Normal(0, std) truncated to [-2, 2], the published init. At std 0.02 the bounds are 100 sigma away, so a
    plain normal draw is the same distribution, and ~20x faster on the CPU than torch's inverse-CDF sampler."""
    with torch.no_grad():
        return tensor.normal_(0, std).clamp_(-2, 2)


def _init_weights(m):
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def vit_tiny(patch_size=16, **kwargs):
    return VisionTransformer(patch_size=patch_size, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4,
                             qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def vit_small(patch_size=16, **kwargs):
    return VisionTransformer(patch_size=patch_size, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4,
                             qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def vit_base(patch_size=16, **kwargs):
    return VisionTransformer(patch_size=patch_size, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4,
                             qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| (one norm per output unit).

    Written out rather than using torch's weight_norm so the parameter names are
    the published ones (`weight_g`, `weight_v`) on every PyTorch version; state
    dicts written by the newer parametrization (`parametrizations.weight.original0/1`)
    are renamed on load.
    """

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default, as published

    @property
    def weight(self):
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x):
        # fp32 even under autocast: the teacher sharpens these logits by 1 / 0.04, which would magnify the rounding
        # of a bf16 output (up to 2^-9 of a logit in [-1, 1]) 25-fold
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for new, old in (("weight_g", "parametrizations.weight.original0"),
                         ("weight_v", "parametrizations.weight.original1")):
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class DINOHead(nn.Module):
    """MLP -> L2-normalize -> weight-normalized linear layer to out_dim prototypes."""

    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3, hidden_dim=2048,
                 bottleneck_dim=256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            for i in range(nlayers - 1):
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
                layers.append(nn.Linear(hidden_dim, bottleneck_dim if i == nlayers - 2 else hidden_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(_init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:  # g stays 1: every prototype has unit norm
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)
