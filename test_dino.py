"""
Tests for vision_transformer.py and dino.py, CPU only: `python -m pytest -q` (a few minutes on 2 cores);
the slow fault-injection tests run with `python -m pytest -q -m slow`.
Expectations are independent of the code under test: hand-computed values,
invariants, or explicit slow references written here.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

import dino
import vision_transformer as vits
from dino import (
    BLUR_KERNEL_SIZE, IMAGENET_MEAN, IMAGENET_STD, DataAugmentationDINO, DinoError, MultiCropGeometry,
    MultiCropPhotometry, _adjust_brightness, _adjust_contrast, _adjust_hue, _adjust_saturation, _gaussian_blur,
    _normalize, _rgb_to_grayscale, _solarize, apply_photometric, sample_photometric_params,
)

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(2)


# -----------------------------------------------------------------------------
# model

@pytest.mark.parametrize("arch, dim, heads", [("vit_tiny", 192, 3), ("vit_small", 384, 6), ("vit_base", 768, 12)])
def test_output_shapes(arch, dim, heads):
    model = getattr(vits, arch)(patch_size=16).eval()
    for h, w in [(224, 224), (224, 160), (96, 96)]:
        x = torch.randn(1, 3, h, w)
        n = (h // 16) * (w // 16) + 1
        with torch.no_grad():
            assert model(x).shape == (1, dim)
            assert model.get_last_selfattention(x).shape == (1, heads, n, n)
            layers = model.get_intermediate_layers(x, n=2)
        assert len(layers) == 2 and all(t.shape == (1, n, dim) for t in layers)


def test_patch_size_8_and_bad_input_size():
    model = vits.vit_tiny(patch_size=8).eval()
    with torch.no_grad():
        assert model.get_last_selfattention(torch.randn(1, 3, 40, 24)).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        model(torch.randn(1, 3, 40, 30))


def reference_attention(attn, x):
    """Attention written out: softmax(q k^T / sqrt(d)) v, then the output projection."""
    B, N, C = x.shape
    h = attn.num_heads
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = [t.reshape(B, N, h, C // h).transpose(1, 2) for t in qkv.split(C, dim=-1)]
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // h), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(B, N, C)
    return out @ attn.proj.weight.T + attn.proj.bias, weights


def test_sdpa_attention_equals_explicit_reference_forward_and_backward():
    torch.manual_seed(0)
    attn = vits.Attention(64, num_heads=4, qkv_bias=True)
    x = torch.randn(3, 17, 64, requires_grad=True)
    out = attn(x)
    ref, ref_weights = reference_attention(attn, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn(x, return_attention=True), ref_weights, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, attn.qkv.weight, attn.proj.weight], g)
    ref_grads = torch.autograd.grad(ref, [x, attn.qkv.weight, attn.proj.weight], g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_last_selfattention_equals_reference_through_the_network():
    torch.manual_seed(0)
    model = vits.vit_tiny(patch_size=16).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        tokens = model.prepare_tokens(x)
        for blk in model.blocks[:-1]:
            tokens = blk(tokens)
        _, ref = reference_attention(model.blocks[-1].attn, model.blocks[-1].norm1(tokens))
        torch.testing.assert_close(model.get_last_selfattention(x), ref, atol=1e-5, rtol=1e-4)
        assert torch.allclose(ref.sum(-1), torch.ones(()))


def published_vit_keys(depth=12):
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        for name in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                     "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                     "mlp.fc2.weight", "mlp.fc2.bias"):
            keys.append(f"blocks.{i}.{name}")
    return keys + ["norm.weight", "norm.bias"]


def vit_param_count(dim, patch=16, tokens=197, depth=12):
    """By hand: patch conv + cls + pos + depth x (2 LN, qkv, proj, fc1, fc2) + final LN."""
    block = 4 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (4 * dim * dim + 4 * dim) + (4 * dim * dim + dim)
    return 3 * patch * patch * dim + dim + dim + tokens * dim + depth * block + 2 * dim


def test_state_dict_names_shapes_and_parameter_counts_match_published():
    model = vits.vit_small(patch_size=16)
    sd = model.state_dict()
    assert list(sd) == published_vit_keys()
    assert sd["pos_embed"].shape == (1, 197, 384) and sd["patch_embed.proj.weight"].shape == (384, 3, 16, 16)
    assert sd["blocks.0.attn.qkv.weight"].shape == (1152, 384) and sd["blocks.11.mlp.fc1.weight"].shape == (1536, 384)
    n_small = sum(p.numel() for p in model.parameters())
    n_base = sum(p.numel() for p in vits.vit_base(patch_size=16).parameters())
    assert n_small == vit_param_count(384) == 21_665_664  # "21M" in the paper's table
    assert n_base == vit_param_count(768) == 85_798_656
    ln = model.blocks[0].norm1
    assert ln.eps == 1e-6 and model.blocks[0].mlp.fc1.out_features == 4 * 384


def test_pos_embed_interpolation():
    torch.manual_seed(0)
    model = vits.vit_small(patch_size=16).eval()
    x224 = torch.randn(1, 197, 384)
    assert model.interpolate_pos_encoding(x224, 224, 224) is model.pos_embed  # published weights, untouched
    pe = model.interpolate_pos_encoding(torch.randn(1, 12 * 20 + 1, 384), 192, 320)
    grid = model.pos_embed[:, 1:].reshape(1, 14, 14, 384).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, scale_factor=(12.1 / 14, 20.1 / 14), mode="bicubic")  # the published code's call
    torch.testing.assert_close(pe[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, -1, 384))
    torch.testing.assert_close(pe[:, :1], model.pos_embed[:, :1])
    # Exactly-sized bicubic resizing (what timm does) gives nearly the same features.
    by_size = F.interpolate(grid, size=(12, 20), mode="bicubic").permute(0, 2, 3, 1).reshape(1, -1, 384)
    img = torch.rand(2, 3, 192, 320)
    with torch.no_grad():
        ours = model(img)
        model.interpolate_pos_encoding = lambda x, h, w: torch.cat((model.pos_embed[:, :1], by_size), dim=1)
        theirs = model(img)
    assert F.cosine_similarity(ours, theirs).min() > 0.999


def test_drop_path_per_sample():
    torch.manual_seed(0)
    x = torch.ones(2000, 3, 4)
    out = vits.drop_path(x, 0.25, training=True)
    kept = out[:, 0, 0] != 0
    assert abs(kept.float().mean() - 0.75) < 0.05
    assert torch.all(out[kept] == 1 / 0.75) and torch.all(out[~kept] == 0)  # whole samples, rescaled
    assert torch.equal(vits.drop_path(x, 0.25, training=False), x)


def test_head_weight_norm_and_freezing():
    head = vits.DINOHead(32, 100, norm_last_layer=True)
    assert [k for k in head.state_dict()] == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
                                              "mlp.4.weight", "mlp.4.bias", "last_layer.weight_g", "last_layer.weight_v"]
    g = head.last_layer.weight_g
    assert torch.all(g == 1) and not g.requires_grad
    assert vits.DINOHead(32, 100, norm_last_layer=False).last_layer.weight_g.requires_grad
    x = torch.randn(5, 32)
    h = F.normalize(head.mlp(x), dim=-1)
    v = head.last_layer.weight_v
    torch.testing.assert_close(head(x), h @ (v / v.norm(dim=1, keepdim=True)).T)  # unit-norm prototypes


def test_head_loads_both_weight_norm_namings():
    torch.manual_seed(0)
    ref = nn.utils.parametrizations.weight_norm(nn.Linear(16, 40, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original0.uniform_(0.5, 2.0)
    head = vits.DINOHead(8, 40, bottleneck_dim=16, norm_last_layer=False)
    new_names = {f"last_layer.{k}": v for k, v in ref.state_dict().items()}
    assert set(new_names) == {"last_layer.parametrizations.weight.original0", "last_layer.parametrizations.weight.original1"}
    head.load_state_dict({**{k: v for k, v in head.state_dict().items() if k.startswith("mlp")}, **new_names})
    z = torch.randn(4, 16)
    torch.testing.assert_close(head.last_layer(z), ref(z))
    # and the classic names round-trip
    other = vits.DINOHead(8, 40, bottleneck_dim=16, norm_last_layer=False)
    other.load_state_dict(head.state_dict())
    x = torch.randn(4, 8)
    torch.testing.assert_close(other(x), head(x))


def make_checkpoint_files(tmp_path, arch="vit_tiny"):
    """The formats load_pretrained_weights accepts, all holding the same backbone and head."""
    torch.manual_seed(0)
    backbone = getattr(vits, arch)(patch_size=16)
    head = vits.DINOHead(backbone.embed_dim, 64)
    wrapper = dino.MultiCropWrapper(backbone, head)
    files = {}
    files["plain"] = tmp_path / "plain.pth"
    torch.save(backbone.state_dict(), files["plain"])
    full = {"student": {f"module.{k}": v + 1 for k, v in wrapper.state_dict().items()},
            "teacher": {f"module.{k}": v for k, v in wrapper.state_dict().items()}, "epoch": 3, "args": {"arch": arch}}
    files["full"] = tmp_path / "full.pth"
    torch.save(full, files["full"])
    files["new_weight_norm"] = tmp_path / "newwn.pth"
    sd = {k.replace("last_layer.weight_g", "last_layer.parametrizations.weight.original0")
           .replace("last_layer.weight_v", "last_layer.parametrizations.weight.original1"): v
          for k, v in wrapper.state_dict().items()}
    torch.save({"teacher": sd}, files["new_weight_norm"])
    return wrapper, files


def test_load_pretrained_weights_formats_round_trip(tmp_path):
    wrapper, files = make_checkpoint_files(tmp_path)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        expected_features, expected_out = wrapper.backbone(x), wrapper(x)
        for name in ("plain", "full", "new_weight_norm"):
            model = dino.load_pretrained_weights(vits.vit_tiny(patch_size=16), files[name])
            torch.testing.assert_close(model(x), expected_features, rtol=0, atol=0)
        for name in ("full", "new_weight_norm"):
            whole = dino.MultiCropWrapper(vits.vit_tiny(patch_size=16), vits.DINOHead(192, 64))
            dino.load_pretrained_weights(whole, files[name], "teacher")
            torch.testing.assert_close(whole(x), expected_out, rtol=0, atol=0)
        student = dino.load_pretrained_weights(vits.vit_tiny(patch_size=16), files["full"], "student")
        assert not torch.allclose(student(x), expected_features)  # the student entry (+1) was picked


def test_load_pretrained_weights_wrong_arch_is_one_line(tmp_path):
    _, files = make_checkpoint_files(tmp_path)
    with pytest.raises(DinoError) as e:
        dino.load_pretrained_weights(vits.vit_small(patch_size=8), files["full"])
    msg = str(e.value)
    assert "\n" not in msg and "--arch vit_tiny --patch_size 16" in msg and "shape mismatch" in msg
    with pytest.raises(DinoError, match="no 'nope' entry"):
        dino.load_pretrained_weights(vits.vit_tiny(patch_size=16), files["full"], "nope")
