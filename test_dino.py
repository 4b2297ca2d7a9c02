"""
Tests for vision_transformer.py, dino.py and bench.py, CPU only: `python -m pytest -q` (a few minutes on 2 cores);
the slow fault-injection tests run with `python -m pytest -q -m slow`, the GPU ones with `python -m pytest -q -m gpu`.
They follow dino.py's sections in its order: the model (vision_transformer.py), part 1 (the algorithm), part 2 (the
tool); then bench.py, then the tests that need a GPU. Every image folder comes from one factory (image_folder),
every weight file from another (checkpoint_file).
Expectations are independent of the code under test: hand-computed values,
invariants, or explicit slow references written here.
"""
import argparse
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

import bench
import dino
import vision_transformer as vits
from dino import (
    BLUR_KERNEL_SIZE, IMAGENET_MEAN, IMAGENET_STD, DataAugmentationDINO, DinoError, MultiCropGeometry,
    MultiCropPhotometry, _color_jitter, _gaussian_blur, _normalize, _rgb_to_grayscale, _solarize, apply_photometric,
    attention_maps, attn_main, extract_features, knn_classifier, knn_main, linear_main, parse_args,
    sample_photometric_params, shard_loader, threshold_masks,
)

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(1)  # the spawned two-process tests would otherwise oversubscribe 2 cores


@pytest.fixture(autouse=True)
def torch_global_switches():
    """Every test leaves torch's global switches as it found them. Read first, assigned back after: pytest's
    monkeypatch cannot undo attributes of torch's module objects (torch.backends.cuda.matmul under pytest 9)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic,
             torch.get_float32_matmul_precision(), torch.get_default_dtype(), torch.get_num_threads())
    yield
    matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic = saved[:4]
    torch.set_float32_matmul_precision(saved[4])
    torch.set_default_dtype(saved[5])
    torch.set_num_threads(saved[6])


# -----------------------------------------------------------------------------
# test data: the images, the image folders and the weight files every test uses

def picture(look, size=40, rng=None, c=0, classes=dino.DEMO_CLASSES):
    """One 8-bit RGB test image of class c (an index into classes). size: a side, or (height, width). look:
    "shapes": the demo's image of that class (square): one dark shape on a grey background under pixel noise;
    "color": the class's grey level, black for the first class to white for the last, plus noise: trivially separable;
    "noise": uniform noise;
    "gradient": smooth ramps plus a sine pattern (no randomness), so that crops, flips and blurs all change it."""
    h, w = (size, size) if isinstance(size, int) else size
    if look == "shapes":
        return dino.demo_image(classes[c], rng, h)[0]
    if look == "color":
        level = 255 * c / max(len(classes) - 1, 1)
        pixels = np.clip(level + rng.normal(0, 10, (h, w, 3)), 0, 255)
    elif look == "noise":
        pixels = rng.integers(0, 255, (h, w, 3))
    else:
        y, x = np.mgrid[0:h, 0:w]
        pixels = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 3.0 + y / 5.0)], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


def odd_picture(kind, rng):
    """A readable image of an unusual mode or shape."""
    if kind == "1x1":
        return Image.new("RGB", (1, 1), (200, 10, 10))
    if kind == "wide":  # 100 x 10000 pixels
        return Image.fromarray(rng.integers(0, 255, (100, 10000, 3), dtype=np.uint8))
    if kind == "cmyk":
        return Image.fromarray(rng.integers(0, 255, (30, 40, 4), dtype=np.uint8), "CMYK")
    if kind == "gray":
        return Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8), "L")
    if kind == "16bit":
        return Image.fromarray(rng.integers(0, 65535, (30, 40), dtype=np.uint16))
    if kind == "16bit_40000":  # one grey level, 40000 / 65535 of white
        return Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16))
    if kind == "palette":
        return Image.new("P", (33, 41), 3)
    assert kind == "rgba", kind
    return Image.new("RGBA", (50, 30), (255, 0, 0, 128))


def unreadable_bytes(kind, rng, first_image):
    """The content of a file that no image library reads (first_image: the path of a good PNG)."""
    if kind == "truncated":  # a PNG cut off after its header
        return first_image.read_bytes()[:200]
    if kind == "corrupt":  # a JPEG header, then noise
        return b"\xff\xd8\xff\xe0" + rng.bytes(500)
    if kind == "empty":
        return b""
    assert kind == "text", kind
    return b"not an image"


def image_folder(root, n=8, classes=2, size=40, look="shapes", names=None, bad=None, odd=None):
    """The one maker of test images on disk; returns root, as a str. Where the images go:
    n of them as root/<class>/<i>.png, image i in class i % len(classes) (classes: their names, or how many of the
    demo's classes; None: no class folders, root/<i>.png); with n = (train, val), as many under root/train/ and
    under root/val/; with names, one at each of these paths (relative to root) instead.
    size, look: each image's (see picture). Then bad: {path: kind} of unreadable files (see unreadable_bytes);
    odd: {path: kind} of readable images of unusual modes and shapes (see odd_picture).
    One generator, seeded 0, draws them all in this order: a test gets the same files every time."""
    root = Path(root)
    rng = np.random.default_rng(0)
    if isinstance(classes, int):
        classes = dino.DEMO_CLASSES[:classes]
    images = []  # (path, class index)
    if names is not None:
        images += [(root / name, 0) for name in names]
    else:
        splits = {root / "train": n[0], root / "val": n[1]} if isinstance(n, tuple) else {root: n}
        for folder, count in splits.items():
            for cls in classes or ():  # every class folder, even one without images
                os.makedirs(folder / cls, exist_ok=True)
            for i in range(count):
                if classes:
                    images.append((folder / classes[i % len(classes)] / f"{i}.png", i % len(classes)))
                else:
                    images.append((folder / f"{i}.png", 0))
    os.makedirs(root, exist_ok=True)
    for path, c in images:
        os.makedirs(path.parent, exist_ok=True)
        picture(look, size, rng, c, classes or dino.DEMO_CLASSES).save(path)
    for name, kind in (bad or {}).items():
        os.makedirs((root / name).parent, exist_ok=True)
        first_image = images[0][0] if images else None
        (root / name).write_bytes(unreadable_bytes(kind, rng, first_image))
    for name, kind in (odd or {}).items():
        os.makedirs((root / name).parent, exist_ok=True)
        odd_picture(kind, rng).save(root / name)
    return str(root)


# train/ and val/ of 3 classes, each its own grey level: k-NN and linear probes tell them apart perfectly
LABELLED = dict(n=(12, 6), classes=("a", "b", "c"), look="color", size=32)
# the embedding tests' folder: readable images in an order that sorting by path gives, a broken one among them
EMBED_NAMES = ["cat.png", "dogs/d1.png", "dogs/d2.jpg", "zebra.png"]
EMBED_FOLDER = dict(names=EMBED_NAMES, look="noise", size=(40, 36), bad={"dogs/bad.png": "truncated"})


def tiny_vit():
    torch.manual_seed(0)
    return vits.vit_tiny(patch_size=16).eval()


def checkpoint_file(path, kind="ours", out_dim=None, seed=0, module=False, new_weight_norm=False, numpy1=False,
                    extra=None):
    """The one maker of weight files: writes path, returns (student, teacher), the networks in it: vit_tiny/16
    backbones, or with out_dim MultiCropWrappers with heads of out_dim outputs, made from seed, the teacher first
    (seed 0: its backbone is tiny_vit()). kind:
    "plain": the teacher backbone's state dict, as the published weights (dino_deitsmall16_pretrain.pth); no student.
    "ours": a training checkpoint as dino.py writes one, without the optimizer: student, teacher, epoch, args.
    module: its keys prefixed `module.` (as a DDP-wrapped network saves them); new_weight_norm: the heads' last layers
    as newer PyTorch names weight norm (parametrizations.weight.original0/1); extra: entries added.
    "published": checkpoint.pth as the published main_dino.py writes it (out_dim needed): the DDP student's keys carry
    `module.`, the teacher's not, heads with weight_g / weight_v, args an argparse.Namespace, numpy scalars in the
    optimizer state (numpy1: under numpy 1's module names), the loss center and the fp16 scaler.
    "truncated" (a checkpoint cut off halfway), "empty", "text": no checkpoint at all (no networks)."""
    path = Path(path)
    if kind in ("truncated", "empty", "text"):
        if kind == "truncated":
            torch.save({"teacher": {"w": torch.randn(1000)}}, path)
            path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
        elif kind == "empty":
            path.write_bytes(b"")
        else:
            path.write_text("hello, this is no checkpoint\n")
        return None, None
    torch.manual_seed(seed)
    networks = []
    for _ in range(1 if kind == "plain" else 2):  # the teacher, then the student
        backbone = vits.vit_tiny(patch_size=16)
        networks.append(dino.MultiCropWrapper(backbone, vits.DINOHead(192, out_dim)) if out_dim else backbone)
    if kind == "plain":
        torch.save(networks[0].state_dict(), path)
        return None, networks[0]
    teacher, student = networks
    if kind == "published":
        optimizer = torch.optim.AdamW(dino.get_params_groups(student))
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = np.float64(1e-4), np.float64(0.04)
        args = argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=out_dim, norm_last_layer=True,
                                  use_fp16=True, global_crops_scale=(0.4, 1.0), lr=0.0005, dist_url="env://", gpu=0,
                                  rank=0)
        ckpt = {"student": {f"module.{k}": v for k, v in student.state_dict().items()},
                "teacher": teacher.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 7, "args": args,
                "dino_loss": {"center": torch.randn(1, out_dim)},
                "fp16_scaler": torch.amp.GradScaler("cpu").state_dict()}
        assert isinstance(ckpt["optimizer"]["param_groups"][0]["lr"], np.float64)
        if numpy1:  # numpy 1's module names for the scalars, whichever numpy runs the test (numpy 2 writes _core)
            torch.save(ckpt, path, _use_new_zipfile_serialization=False)
            raw = path.read_bytes().replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            assert raw.count(b"numpy.core.multiarray\nscalar") >= 1
            path.write_bytes(raw)
        else:
            torch.save(ckpt, path)
        return student, teacher

    def entries(network):
        state = network.state_dict()
        if not out_dim:
            state = {f"backbone.{k}": v for k, v in state.items()}
        if new_weight_norm:
            state = {k.replace("last_layer.weight_g", "last_layer.parametrizations.weight.original0")
                     .replace("last_layer.weight_v", "last_layer.parametrizations.weight.original1"): v
                     for k, v in state.items()}
        if module:
            state = {f"module.{k}": v for k, v in state.items()}
        return state

    ckpt = {"student": entries(student), "teacher": entries(teacher), "epoch": 1,
            "args": {"arch": "vit_tiny", "patch_size": 16, "global_crops_size": 32}}
    torch.save({**ckpt, **(extra or {})}, path)
    return student, teacher


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A training checkpoint of a random vit_tiny/16 (its teacher is tiny_vit()) trained at 32 pixels, no heads."""
    path = tmp_path_factory.mktemp("run") / "checkpoint.pth"
    checkpoint_file(path)
    return str(path)


# -----------------------------------------------------------------------------
# running the CLI: in this process, as a user runs it, in a process group

def train_argv(data, out, *extra):
    return ["train", "--data_path", str(data), "--output_dir", str(out), "--arch", "vit_tiny", "--patch_size", "16",
            "--out_dim", "32", "--epochs", "2", "--batch_size_per_gpu", "4", "--global_crops_size", "32",
            "--local_crops_size", "16", "--local_crops_number", "2", "--num_workers", "0", "--warmup_epochs", "1",
            "--log_every", "1", *extra]


def parse(command, argv):
    return parse_args([command, *argv])


def main_error(argv, capsys):
    """Run the CLI in-process; it must exit with status 2 and a one-line 'error: ...' message."""
    with pytest.raises(SystemExit) as e:
        dino.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def one_line_error(fn, match):
    with pytest.raises(DinoError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def read_log(out):
    with open(out / "log.txt") as f:
        return [json.loads(line) for line in f]


def run_cli(argv, cwd=HERE, timeout=240):
    """The CLI as a user runs it: a separate process; returns (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, os.path.join(HERE, "dino.py"), *argv], cwd=cwd, capture_output=True,
                       text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def start_cli(argv, stderr_path, env=None, python_args=("dino.py",)):
    """The CLI in a separate process, stderr to a file (a pipe nobody reads could fill up and block it)."""
    with open(stderr_path, "w") as err:
        return subprocess.Popen([sys.executable, *python_args, *argv], cwd=HERE, env={**os.environ, **(env or {})},
                                stdout=subprocess.DEVNULL, stderr=err)


def wait_for(condition, p, timeout=120):
    """Poll condition() every 2 ms while process p runs; True once it holds, False if p exited first."""
    deadline = time.time() + timeout
    while p.poll() is None and time.time() < deadline:
        if condition():
            return True
        time.sleep(0.002)
    assert time.time() < deadline, "timed out waiting"
    return False


def stderr_line(path):
    """The process's stderr, which must be one 'error: ...' line."""
    err = open(path).read().strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# Several processes in one test form a gloo group on the CPU, GPU or not (NCCL refuses two processes on one GPU)
GLOO_ON_THE_CPU = {"CUDA_VISIBLE_DEVICES": ""}


def rank_environment(rank, port, local_rank=None):
    """The environment torchrun gives process `rank` of a group of 2 on this machine (local_rank: on its node)."""
    return dict(RANK=str(rank), LOCAL_RANK=str(rank if local_rank is None else local_rank), WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **GLOO_ON_THE_CPU)


def become_rank(rank, port):
    """A spawned worker's first step: become process `rank` of a gloo group (init_distributed joins it), one thread."""
    os.environ.update(rank_environment(rank, port))
    torch.set_num_threads(1)


# -----------------------------------------------------------------------------
# vision_transformer.py: the model

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


def test_grad_checkpointing_recomputes_blocks_and_keeps_the_gradients(tmp_path):
    """The same gradients with activation checkpointing, each block run a second time in backward. Drop path 0.5,
    so that masks are surely drawn: the recomputation must draw the same ones."""
    grads, runs = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = vits.vit_tiny(patch_size=16, drop_path_rate=0.5, grad_checkpointing=checkpointing)
        calls = []
        model.blocks[5].register_forward_pre_hook(lambda *_: calls.append(1))
        x = torch.randn(4, 3, 32, 32)
        model(x).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        runs.append(len(calls))
    assert runs == [1, 2]
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-6, atol=1e-7, msg=n)
    with torch.no_grad():  # without gradients nothing needs recomputing
        calls.clear()
        model(x)
    assert len(calls) == 1
    # the teacher needs none: it never computes gradients
    student, teacher = dino.build_dino_networks("vit_tiny", out_dim=32, grad_checkpointing=True)
    assert student.backbone.grad_checkpointing and not teacher.backbone.grad_checkpointing


def test_drop_path_per_sample():
    torch.manual_seed(0)
    x = torch.ones(2000, 3, 4)
    drop_path = vits.DropPath(0.25)
    out = drop_path(x)
    kept = out[:, 0, 0] != 0
    assert abs(kept.float().mean() - 0.75) < 0.05
    assert torch.all(out[kept] == 1 / 0.75) and torch.all(out[~kept] == 0)  # whole samples, rescaled
    assert torch.equal(drop_path.eval()(x), x)


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


def test_head_last_layer_is_fp32_under_autocast():
    """The teacher sharpens the head's output by 1/0.04: its last layer runs in fp32 even under bf16 autocast."""
    torch.manual_seed(0)
    head = vits.DINOHead(64, 4096, bottleneck_dim=32, norm_last_layer=False)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    v, g = head.last_layer.weight_v, head.last_layer.weight_g
    x, z = torch.randn(16, 64), F.normalize(torch.randn(16, 32), dim=-1)
    reference = z.double() @ (g * v / v.norm(dim=1, keepdim=True)).double().T  # logits up to ~1.2
    with torch.no_grad():
        fp32_out = head(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert head.mlp(x).dtype == torch.bfloat16  # autocast is on
            out, last = head(x), head.last_layer(z)
    assert out.dtype == last.dtype == torch.float32
    # a bf16 output would be off by up to 2^-9 of a logit: 4e-3 here
    torch.testing.assert_close(last.double(), reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(out, fp32_out, rtol=0, atol=0.02)  # the bf16 MLP's rounding, through the normalization


@pytest.mark.parametrize("size", [32, 48], ids=["native_grid", "interpolated"])
def test_residual_stream_is_fp32_under_autocast(size):
    """As in the published code, bf16 autocast leaves the residual stream (tokens between blocks) in fp32, whether the
    positional embedding is used as is or interpolated."""
    model = vits.vit_tiny(patch_size=16, img_size=32).eval()
    dtypes = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.patch_embed(x).dtype == torch.bfloat16
        assert model.prepare_tokens(x).dtype == torch.float32
        model(x)
    assert dtypes == [torch.float32] * 12


# =============================================================================
# Part 1: the algorithm
# =============================================================================

# -----------------------------------------------------------------------------
# data and multi-crop

LOW = torch.tensor([(0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1)
HIGH = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1)


def images(n=6, h=40, w=48, seed=0):
    """uint8-valued float batch in [0, 1] with some exactly gray pixels (the hue edge case)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (n, 3, h, w), generator=g).float() / 255
    img[:, :, :5] = img[:, :1, :5]
    return img


def in_normalized_range(t):
    t = t.cpu()
    return bool(((t >= LOW - 1e-5) & (t <= HIGH + 1e-5)).all())


def test_data_augmentation_dino():
    aug = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 3, global_crops_size=32, local_crops_size=16)
    crops = aug(picture("gradient", (40, 48)))
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 and in_normalized_range(c) for c in crops)


def test_data_augmentation_dino_holds_the_published_recipe():
    """Each view's transforms in the published order with the published probabilities and ranges (SPEC.md): flip .5,
    jitter (0.4, 0.4, 0.2, 0.1) p .8, grayscale .2, blur 1 / .1 / .5, solarize at 128 on global view 2 only, p .2."""
    aug = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 2, global_crops_size=32, local_crops_size=16)
    assert len(aug.views) == 4

    def recipe(view):
        crop, flip, jitter, gray, blur, *solarize, normalize = view.transforms
        assert isinstance(crop, T.RandomResizedCrop) and crop.interpolation == T.InterpolationMode.BICUBIC
        (color,) = jitter.transforms
        ranges = [color.brightness, color.contrast, color.saturation, color.hue]
        assert isinstance(gray, T.RandomGrayscale) and isinstance(blur.transforms[0], T.Lambda)
        assert [type(t) for t in solarize] in ([], [T.RandomSolarize])
        assert all(t.threshold == 128 for t in solarize)
        return (crop.size, crop.scale, flip.p, jitter.p, ranges, gray.p, blur.p, [t.p for t in solarize])

    ranges = [(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]
    assert [recipe(view) for view in aug.views] == [
        ((32, 32), (0.4, 1.0), 0.5, 0.8, ranges, 0.2, 1.0, []),
        ((32, 32), (0.4, 1.0), 0.5, 0.8, ranges, 0.2, 0.1, [0.2]),
        ((16, 16), (0.05, 0.4), 0.5, 0.8, ranges, 0.2, 0.5, []),
        ((16, 16), (0.05, 0.4), 0.5, 0.8, ranges, 0.2, 0.5, []),
    ]


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_multi_crop_geometry(mode):
    geometry = MultiCropGeometry((0.4, 1.0), (0.05, 0.4), 4, global_crops_size=32, local_crops_size=16)
    crops = geometry(picture("gradient", (40, 48)).convert(mode).convert("RGB"))
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 4
    assert all(c.dtype == torch.uint8 for c in crops)


@pytest.mark.parametrize("w, h, sizes", [(48, 40, (32, 16)), (500, 375, (224, 96))])  # up- and downsampling
def test_geometry_equals_torchvision_crop_and_flip(w, h, sizes):
    """Same boxes and flips as torchvision's PIL ops; torch's uint8 antialiased bicubic is Pillow's filter, so
    the pixels agree to within rounding (which pass of the separable resize runs first differs by a level or two)."""
    img = picture("gradient", (h, w))
    torch.manual_seed(0)
    crops = MultiCropGeometry((0.4, 1.0), (0.05, 0.4), 4, *sizes)(img)
    torch.manual_seed(0)
    for crop, size, scale in zip(crops, [sizes[0]] * 2 + [sizes[1]] * 4, [(0.4, 1.0)] * 2 + [(0.05, 0.4)] * 4):
        i, j, h, w = T.RandomResizedCrop.get_params(img, scale, ratio=(3 / 4, 4 / 3))
        ref = TF.resized_crop(img, i, j, h, w, [size, size], TF.InterpolationMode.BICUBIC)
        if torch.rand(1) < 0.5:
            ref = TF.hflip(ref)
        assert crop.dtype == torch.uint8 and crop.shape == (3, size, size)
        diff = (crop.int() - TF.pil_to_tensor(ref).int()).abs()
        assert diff.max() <= 2 and diff.float().mean() < 0.05, (diff.max(), diff.float().mean())


def test_bad_and_odd_images_are_skipped_and_counted(tmp_path, capsys):
    """Unreadable files cost a warning each and are counted, not the run; odd ones (tiny, huge, CMYK, 16-bit, grey,
    palette, RGBA) train as RGB; images beside the class folders count too."""
    data = tmp_path / "data"
    unreadable = {"disk/5_corrupt.png": "truncated", "ring/3_corrupt.jpg": "corrupt", "disk/9_empty.jpg": "empty",
                  "ring/7_text.png": "text", "dots/corrupt.jpg": "corrupt"}  # a class folder with nothing readable
    odd = {"disk/1x1.png": "1x1", "ring/wide.jpg": "wide", "disk/cmyk.jpg": "cmyk", "ring/sixteen.png": "16bit",
           "gray.png": "gray", "sixteen.png": "16bit_40000", "palette.gif": "palette", "rgba.png": "rgba"}
    image_folder(data, n=15, bad=unreadable, odd=odd)
    good = (data / "disk" / "0.png").read_bytes()
    assert Image.open(data / "disk" / "cmyk.jpg").mode == "CMYK"
    assert Image.open(data / "ring" / "sixteen.png").mode.startswith("I")
    assert len(dino.list_images(data)) == 28  # 7 batches of 4 (drop_last): every file is drawn once
    dino.main(train_argv(data, tmp_path / "out", "--epochs", "1"))
    log = read_log(tmp_path / "out")
    assert log[0]["skipped_images"] == 5 and np.isfinite(log[0]["loss"])  # no two unreadable files in a row
    err = capsys.readouterr().err
    assert all(f"skipping unreadable image {data / path}" in err for path in unreadable)
    assert err.count("skipping unreadable image") == 5
    assert dino.load_rgb(data / "sixteen.png").getpixel((0, 0)) == (156, 156, 156)  # 40000 / 65535 * 255, not clipped
    assert (data / "disk" / "0.png").read_bytes() == good  # the good files were left alone


# -----------------------------------------------------------------------------
# model glue

def test_multicrop_wrapper_runs_backbone_once_per_resolution():
    torch.manual_seed(0)
    backbone = vits.vit_tiny(patch_size=16).eval()
    head = vits.DINOHead(192, 10)
    wrapper = dino.MultiCropWrapper(backbone, head)
    calls = []
    backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)] + [torch.randn(2, 3, 16, 16) for _ in range(3)]
    with torch.no_grad():
        out = wrapper(crops)
        calls_batched = list(calls)
        per_crop = torch.cat([head(backbone(c)) for c in crops])
    assert calls_batched == [4, 6]
    torch.testing.assert_close(out, per_crop, atol=1e-5, rtol=1e-4)


def test_teacher_starts_as_student_copy_without_drop_path():
    student, teacher = dino.build_dino_networks("vit_tiny", out_dim=32, drop_path_rate=0.1)
    for (n, s), t in zip(student.state_dict().items(), teacher.state_dict().values()):
        assert torch.equal(s, t), n
    assert not any(p.requires_grad for p in teacher.parameters())
    assert student.backbone.blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    assert all(b.drop_path.drop_prob == 0 for b in teacher.backbone.blocks)


@pytest.mark.parametrize("arch, classifier, dim",
                         [("resnet18", "fc", 512), ("mobilenet_v3_small", "classifier.3", 1024)])
def test_torchvision_backbones_are_the_models_without_their_classifier(arch, classifier, dim):
    """A torchvision model as the published code takes it: its classifier (`fc`, or the last Linear of `classifier`)
    an identity, the head's input size the classifier's."""
    torch.manual_seed(0)
    model = dino.build_backbone(arch).eval()
    expected = torchvision.models.get_model(arch).eval()
    expected.set_submodule(classifier, nn.Identity())
    expected.load_state_dict(model.state_dict())  # strict: every other parameter and buffer, under its name
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected(x), rtol=0, atol=0)
    assert model(x).shape == (2, dim) and model.embed_dim == dim
    student, teacher = dino.build_dino_networks(arch, out_dim=16)
    assert student.head.mlp[0].in_features == dim and teacher.training  # the teacher runs in train mode
    assert {"resnet50", "resnext50_32x4d", "wide_resnet50_2", "convnext_tiny"} <= set(dino.TORCHVISION_ARCHS)


def test_own_backbone_gets_a_head_and_a_teacher_copy():
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    student, teacher = dino.build_dino_networks(backbone, out_dim=16, embed_dim=8)
    assert student.backbone is backbone and teacher.backbone is not backbone
    for (n, s), t in zip(student.state_dict().items(), teacher.state_dict().values()):
        assert torch.equal(s, t), n
    assert not any(p.requires_grad for p in teacher.parameters())
    crops = [torch.randn(4, 3, size, size) for size in (32, 32, 16)]
    assert student(crops).shape == (12, 16) and teacher(crops[:2]).shape == (8, 16)


# -----------------------------------------------------------------------------
# loss

def reference_dino_loss(student_out, teacher_out, center, ncrops, student_temp, teacher_temp):
    """The DINO loss pair by pair, as in the paper's Algorithm 1."""
    s = student_out.chunk(ncrops)
    t = torch.softmax((teacher_out - center) / teacher_temp, dim=-1).chunk(2)
    total, n = 0.0, 0
    for iq, q in enumerate(t):
        for v in range(ncrops):
            if v == iq:
                continue
            total += torch.sum(-q * torch.log_softmax(s[v] / student_temp, dim=-1), dim=-1).mean()
            n += 1
    return total / n


def test_dino_loss_equals_pairwise_reference_with_center_and_temperature_schedule():
    torch.manual_seed(0)
    ncrops, batch, K = 5, 3, 11
    loss_fn = dino.DINOLoss(K, ncrops, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=4,
                            nepochs=10, student_temp=0.1, center_momentum=0.9)
    temps = {0: 0.04, 2: 0.06, 3: 0.07, 9: 0.07}  # linspace(0.04, 0.07, 4), then constant
    center = torch.zeros(1, K)
    for epoch, temp in temps.items():
        student = torch.randn(ncrops * batch, K, requires_grad=True)
        teacher = torch.randn(2 * batch, K)
        loss = loss_fn(student, teacher, epoch)
        ref = reference_dino_loss(student, teacher, center, ncrops, 0.1, temp)
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.autograd.grad(loss, student)[0], torch.autograd.grad(ref, student)[0],
                                   atol=1e-6, rtol=1e-4)
        # collapse indicators: the teacher's mean entropy, and loss = entropy + KL
        q = torch.softmax((teacher - center) / temp, dim=-1)
        torch.testing.assert_close(loss_fn.stats["teacher_entropy"], -(q * q.log()).sum(-1).mean())
        torch.testing.assert_close(loss_fn.stats["teacher_entropy"] + loss_fn.stats["kl"], loss.detach())
        center = 0.9 * center + 0.1 * teacher.mean(dim=0, keepdim=True)
        torch.testing.assert_close(loss_fn.center, center)


def test_dino_loss_collapse_indicators_on_collapsed_outputs():
    loss_fn = dino.DINOLoss(8, 4, 0.04, 0.04, 0, 1)
    same = torch.zeros(4 * 2, 8)  # every output identical and uniform: a collapsed network
    loss = loss_fn(same, same[:4], 0)
    assert abs(loss.item() - math.log(8)) < 1e-5
    assert abs(loss_fn.stats["kl"].item()) < 1e-5
    assert abs(loss_fn.stats["batch_mean_entropy"].item() - math.log(8)) < 1e-5


# -----------------------------------------------------------------------------
# schedules and updates

def test_cosine_scheduler_values():
    s = dino.cosine_scheduler(1.0, 0.0, epochs=10, niter_per_ep=2, warmup_epochs=2, start_warmup_value=0.0)
    assert len(s) == 20
    assert s[0] == 0.0 and s[3] == pytest.approx(1.0) and s[1] == pytest.approx(1 / 3)  # linear warmup over 4 iters
    assert s[4] == pytest.approx(1.0)  # cosine starts at the base value
    assert s[4 + 8] == pytest.approx(0.5)  # halfway through the 16 cosine iterations
    assert s[19] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert np.all(np.diff(s[4:]) < 0)


def test_teacher_ema_update_matches_per_parameter_formula():
    torch.manual_seed(0)
    student, teacher = vits.DINOHead(8, 16, hidden_dim=12, bottleneck_dim=4), vits.DINOHead(8, 16, hidden_dim=12,
                                                                                          bottleneck_dim=4)
    before = [p.detach().clone() for p in teacher.parameters()]
    dino.update_teacher(list(student.parameters()), list(teacher.parameters()), 0.996)
    for t, t0, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.996 * t0 + (1 - 0.996) * s, atol=1e-7, rtol=1e-6)


def test_clip_gradients_matches_per_parameter_loop():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(n)) for n in (3, 50, 7)]
    for p, scale in zip(params, (0.01, 10.0, 1.0)):
        p.grad = torch.randn_like(p) * scale
    expected = []
    for p in params:  # the published rule, one tensor at a time
        norm = p.grad.norm(2)
        coef = 3.0 / (norm + 1e-6)
        expected.append(p.grad * coef if coef < 1 else p.grad.clone())
    norms = dino.clip_gradients(params, 3.0)
    assert norms.shape == (3,)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e)
    assert params[1].grad.norm() == pytest.approx(3.0, rel=1e-5)


def test_params_groups_exclude_biases_and_1d_from_weight_decay():
    model = dino.MultiCropWrapper(vits.VisionTransformer(embed_dim=16, depth=1, num_heads=2, qkv_bias=True),
                                   vits.DINOHead(16, 8))
    regularized, not_regularized = dino.get_params_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert not_regularized["weight_decay"] == 0.0
    assert all(p.ndim > 1 and not names[id(p)].endswith(".bias") for p in regularized["params"])
    no_wd = {names[id(p)] for p in not_regularized["params"]}
    assert {"backbone.cls_token", "backbone.pos_embed"}.isdisjoint(no_wd)  # 3-D tokens are regularized, as published
    assert {"backbone.norm.weight", "backbone.blocks.0.attn.qkv.bias", "head.mlp.0.bias"} <= no_wd
    assert "head.last_layer.weight_g" not in no_wd  # frozen: in no group


# -----------------------------------------------------------------------------
# the train step and the epoch loop

def record_forwards(monkeypatch):
    """Every MultiCropWrapper call of a training run: (is teacher, crops, output, the network's state before)."""
    calls = []
    forward = dino.MultiCropWrapper.forward

    def recording(self, crops):
        is_teacher = not any(p.requires_grad for p in self.parameters())
        state = {k: v.cpu().clone() for k, v in self.state_dict().items()}  # on the CPU, as checkpoints load
        out = forward(self, crops)
        calls.append((is_teacher, [c.cpu() for c in crops], out.detach().float().cpu(), state))
        return out

    monkeypatch.setattr(dino.MultiCropWrapper, "forward", recording)
    return calls


def test_train_step_follows_algorithm_1(tmp_path, monkeypatch):
    """Which crops each network sees, what the EMA and the center see (once per step), what is frozen when:
    4 images, batch 4, so each epoch is one step."""
    data = image_folder(tmp_path / "data", n=4)
    calls = record_forwards(monkeypatch)
    dino.main(train_argv(data, tmp_path / "out", "--saveckp_freq", "1", "--warmup_epochs", "0", "--lr", "10",
                         "--momentum_teacher", "0.9", "--clip_grad", "0"))
    assert [is_teacher for is_teacher, *_ in calls] == [True, False, True, False]  # teacher, then student, per step
    (_, t_crops, t_out, t_state), (_, s_crops, _, s_state) = calls[:2]
    assert [tuple(c.shape) for c in s_crops] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
    assert len(t_crops) == 2 and all(torch.equal(t, s) for t, s in zip(t_crops, s_crops))  # the 2 global crops
    epoch0, epoch1 = (dino.load_checkpoint_file(tmp_path / "out" / f"checkpoint000{e}.pth") for e in (0, 1))
    # EMA, once: teacher_1 = 0.9 teacher_0 + 0.1 student_1 (the momentum at iteration 0 is the base value)
    for k, v in epoch0["teacher"].items():
        torch.testing.assert_close(v, 0.9 * t_state[k] + 0.1 * epoch0["student"][k], rtol=1e-5, atol=1e-6)
    # the center moves once, by 0.1 x the mean teacher output over the batch (from 0)
    torch.testing.assert_close(epoch0["dino_loss"]["center"], 0.1 * t_out.mean(0, keepdim=True))
    # the last layer is fixed in epoch 0 (--freeze_last_layer 1) and learns in epoch 1; the rest learns throughout
    last, block = "head.last_layer.weight_v", "backbone.blocks.0.mlp.fc1.weight"
    assert torch.equal(epoch0["student"][last], s_state[last]) and not torch.equal(epoch1["student"][last],
                                                                                   s_state[last])
    assert not torch.equal(epoch0["student"][block], s_state[block])


def train_step_from(args, precision, device, crops):
    """One train step of a fresh TrainState (seed 0) at this precision: (loss, gradients, parameter changes)."""
    args.precision = precision
    torch.manual_seed(0)
    s = dino.build_train_state(args, 1, 1, device)
    assert s.scaler.is_enabled() == (precision == "fp16")
    before = [p.detach().clone() for p in s.student.parameters()]
    torch.manual_seed(1)  # the same drop-path masks
    loss = dino.train_step(s, [crops], 0, 0).item()
    # the gradients as the optimizer took them: unscaled (fp16) and clipped
    grads = torch.cat([p.grad.flatten() for p in s.student.parameters() if p.grad is not None]).double()
    moves = torch.cat([(p.detach() - b).flatten() for p, b in zip(s.student.parameters(), before)]).double()
    return loss, grads, moves


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_mixed_precision_steps_are_close_to_fp32(tmp_path, device):
    """The same step from the same init and crops at fp32 and under autocast (fp16: with the GradScaler). Tolerances:
    bf16 keeps 8 significant bits, fp16 11; AdamW's first step moves every weight by about lr x sign(gradient), so
    the few whose tiny gradients flip sign under rounding make up the relative difference of the moves."""
    args = parse_args(train_argv(tmp_path, tmp_path / "out", "--out_dim", "64", "--warmup_epochs", "0",
                                 "--freeze_last_layer", "0"))
    g = torch.Generator().manual_seed(2)
    crops = [torch.randn(4, 3, size, size, generator=g).to(device) for size in (32, 32, 16, 16)]
    loss, grads, moves = train_step_from(args, "fp32", torch.device(device), crops)
    for precision, loss_tol, grad_tol, move_tol in (("bf16", 2e-3, 0.05, 0.3), ("fp16", 5e-4, 0.01, 0.15)):
        amp_loss, amp_grads, amp_moves = train_step_from(args, precision, torch.device(device), crops)
        assert abs(amp_loss - loss) < loss_tol * loss, precision
        assert (amp_grads - grads).norm() < grad_tol * grads.norm(), precision
        assert moves.norm() > 0 and (amp_moves - moves).norm() < move_tol * moves.norm(), precision


def test_device_photometry_path_on_the_cpu(tmp_path, monkeypatch):
    """The GPU data path run on the CPU: the loader gives uint8 crops, colour / blur / solarize run batched before
    the step, which gets normalized float crops of the same shapes. Training keeps TF32 off."""
    data = image_folder(tmp_path / "data")
    loaded, stepped = [], []
    photometry, step = MultiCropPhotometry.__call__, dino.train_step

    def recording_photometry(self, views):
        loaded.append([(v.dtype, tuple(v.shape)) for v in views])
        return photometry(self, views)

    def recording_step(s, micro_batches, epoch, i):
        (crops,) = micro_batches  # --accum_iter 1: the batch is one micro-batch
        stepped.append([c.clone() for c in crops])
        return step(s, micro_batches, epoch, i)

    monkeypatch.setattr(MultiCropPhotometry, "__call__", recording_photometry)
    monkeypatch.setattr(dino, "train_step", recording_step)
    torch.backends.cuda.matmul.allow_tf32 = False  # torch_global_switches restores it
    dino.train(parse_args(train_argv(data, tmp_path / "out", "--epochs", "1")), device_photometry=True)
    shapes = [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
    assert loaded == [[(torch.uint8, shape) for shape in shapes]] * 2  # 8 images, batch 4
    assert len(stepped) == 2
    for crops in stepped:
        assert [tuple(c.shape) for c in crops] == shapes
        assert all(c.dtype == torch.float32 and in_normalized_range(c) for c in crops)
    assert math.isfinite(read_log(tmp_path / "out")[0]["loss"])
    assert not torch.backends.cuda.matmul.allow_tf32


# --accum_iter: micro-batches of 2 from the loader are the batch of 4 it would give with batch 4 (same sampler order,
# per-sample augmentation seeds): with drop path 0 the runs must agree. SGD, as AdamW would hide a wrong gradient
# scale (it normalizes the gradient).
ACCUM = ("--drop_path_rate", "0", "--optimizer", "sgd", "--lr", "10", "--warmup_epochs", "0", "--precision", "fp32")
BIG, MICRO = ("--batch_size_per_gpu", "4"), ("--batch_size_per_gpu", "2", "--accum_iter", "2")


def assert_same_run(a, b, tol=1e-5):
    for net in ("student", "teacher"):
        for k in a[net]:
            torch.testing.assert_close(a[net][k], b[net][k], rtol=tol, atol=tol, msg=f"{net} {k}")
    torch.testing.assert_close(a["dino_loss"]["center"], b["dino_loss"]["center"], rtol=tol, atol=tol)


def test_accum_iter_equals_the_big_batch(tmp_path, capsys):
    """2 epochs of 2 steps: the same student, teacher, center and log (lr scaled by the total batch, schedules
    stepped per optimizer step). Without clipping, so the summed gradient's scale is checked exactly."""
    data = image_folder(tmp_path / "data", n=8)
    # the CPU's data path on a GPU too: the batched photometry draws its parameters per (micro-)batch
    dino.train(parse_args(train_argv(data, tmp_path / "big", *ACCUM, "--clip_grad", "0", *BIG)),
               device_photometry=False)
    capsys.readouterr()
    dino.train(parse_args(train_argv(data, tmp_path / "micro", *ACCUM, "--clip_grad", "0", *MICRO)),
               device_photometry=False)
    printed = capsys.readouterr().out
    assert "batch 4, 2 it/epoch" in printed and "it 2/2 " in printed and "it 3/" not in printed
    assert_same_run(*(dino.load_checkpoint_file(tmp_path / run / "checkpoint.pth") for run in ("big", "micro")))
    big, micro = read_log(tmp_path / "big"), read_log(tmp_path / "micro")
    assert big[1]["lr"] == micro[1]["lr"] > 0
    for k in ("loss", "teacher_entropy", "kl", "batch_mean_entropy"):  # of the whole batch, not of a micro-batch
        assert [e[k] for e in micro] == pytest.approx([e[k] for e in big], rel=1e-5), k


class CountingDDP(nn.parallel.DistributedDataParallel):
    """DDP that counts its gradient all-reduces (one per bucket and backward that synchronizes)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reductions = 0

        def hook(state, bucket):
            self.reductions += 1
            return allreduce_hook(None, bucket)
        self.register_comm_hook(None, hook)


def _accum_worker(rank, data, out, port, results):
    become_rank(rank, port)
    nn.parallel.DistributedDataParallel = CountingDDP
    runs = {}
    for name, flags in (("big", BIG), ("micro", MICRO)):
        # clipping on and active: once, on the summed gradient (a lr so high that its direction shows above tol)
        s = dino.train(dino.parse_args(train_argv(data, out / name, *ACCUM, "--clip_grad", "0.01", "--lr", "1000",
                                                  "--epochs", "1", *flags)))
        runs[name] = {"student": s.student.state_dict(), "teacher": s.teacher.state_dict(),
                      "dino_loss": s.dino_loss.state_dict(), "reductions": s.student_forward.reductions}
    results[rank] = runs
    torch.distributed.destroy_process_group()


def test_accum_iter_two_processes_equals_the_big_batch(tmp_path):
    """8 images, 4 per process: one step of a batch of 4 per process, or of 2 micro-batches of 2."""
    data = image_folder(tmp_path / "data", n=8)
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(_accum_worker, args=(data, tmp_path, dino._free_port(), results), nprocs=2)
    for rank in range(2):
        assert_same_run(results[rank]["big"], results[rank]["micro"])
        assert_same_run(results[0]["micro"], results[rank]["micro"], tol=0)  # every process holds the same networks
        # no_sync: the gradients are all-reduced in the last micro-batch's backward only
        assert results[rank]["micro"]["reductions"] == results[rank]["big"]["reductions"] > 0


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    data = image_folder(tmp_path / "data")
    loss_and_means = dino.DINOLoss.loss_and_means
    steps = []

    def nan_in_epoch_1(self, student_output, teacher_output, temp):
        steps.append(len(steps))
        # 8 images, batches of 4: epoch 1 begins with the third step
        if len(steps) > 2:
            student_output = student_output * float("nan")
        return loss_and_means(self, student_output, teacher_output, temp)

    monkeypatch.setattr(dino.DINOLoss, "loss_and_means", nan_in_epoch_1)
    err = main_error(train_argv(data, tmp_path / "out"), capsys)
    assert "loss is not finite at epoch 1, iteration 0" in err and "--precision fp32" in err
    assert f"intact: {tmp_path / 'out'}/checkpoint.pth" in err  # the last good state, named
    ckpt = dino.load_checkpoint_file(tmp_path / "out" / "checkpoint.pth")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["teacher"].values())
    assert len(read_log(tmp_path / "out")) == 1


# -----------------------------------------------------------------------------
# the device data path: batched photometry

TV_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def factors(n, low, high, seed=1):
    return torch.empty(n).uniform_(low, high, generator=torch.Generator().manual_seed(seed))


def per_sample(fn, img, *args):
    """torchvision reference: fn applied to each sample with its own scalar args."""
    return torch.stack([fn(img[i], *[a[i].item() for a in args]) for i in range(len(img))])


@pytest.mark.parametrize("op_index, low, high", [(0, 0.0, 2.0), (1, 0.0, 2.0), (2, 0.0, 2.0), (3, -0.5, 0.5)])
def test_jitter_ops_match_torchvision(op_index, low, high):
    """Each op alone (the others at their identity factors, in random orders) equals torchvision's, per sample."""
    torch.manual_seed(0)
    img, f = images(), factors(6, low, high)
    all_factors = torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(6, 1)
    all_factors[:, op_index] = f
    order = torch.rand(6, 4).argsort(dim=1)
    out = _color_jitter(img, torch.ones(6, dtype=torch.bool), order, all_factors)
    torch.testing.assert_close(out, per_sample(TV_JITTER[op_index], img, f), atol=1e-5, rtol=0)


def test_grayscale_solarize_normalize_match_torchvision():
    img = images()
    torch.testing.assert_close(_rgb_to_grayscale(img), TF.rgb_to_grayscale(img), atol=1e-6, rtol=0)
    torch.testing.assert_close(_solarize(img), TF.solarize(img, 0.5), atol=0, rtol=0)
    torch.testing.assert_close(_normalize(img), TF.normalize(img, IMAGENET_MEAN, IMAGENET_STD), atol=1e-6, rtol=0)


def test_solarize_threshold_equals_pil_128():
    img = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    ref = TF.pil_to_tensor(TF.solarize(TF.to_pil_image(img[0]), 128))
    assert torch.equal((_solarize(img.float() / 255) * 255).round().to(torch.uint8)[0], ref)


def test_blur_matches_torchvision():
    img, sigma = images(), factors(6, 0.1, 2.0)
    ref = torch.stack([TF.gaussian_blur(img[i], [BLUR_KERNEL_SIZE] * 2, [s.item()] * 2) for i, s in enumerate(sigma)])
    torch.testing.assert_close(_gaussian_blur(img, sigma, BLUR_KERNEL_SIZE), ref, atol=1e-5, rtol=0)


def test_jitter_order_varies_and_matches_sequential_torchvision():
    torch.manual_seed(0)
    img = images(n=16)
    params = sample_photometric_params(16, blur_p=0.0, solarize_p=0.0)
    params["jitter"][:], params["grayscale"][:] = True, False
    orders = params["order"]
    assert len({tuple(o.tolist()) for o in orders}) > 8
    assert all(sorted(o.tolist()) == [0, 1, 2, 3] for o in orders)
    ref = img.clone()
    for i in range(16):
        for op_index in orders[i].tolist():
            ref[i] = TV_JITTER[op_index](ref[i], params["factors"][i, op_index].item())
    torch.testing.assert_close(apply_photometric(img, params), TF.normalize(ref, IMAGENET_MEAN, IMAGENET_STD),
                               atol=1e-4, rtol=0)


def test_apply_photometric_matches_torchvision_pipeline():
    torch.manual_seed(1)
    img = images(n=32)
    params = sample_photometric_params(32, blur_p=0.5, solarize_p=0.5)
    ref = []
    for i, x in enumerate(img):
        p = {k: v[i] for k, v in params.items()}
        if p["jitter"]:
            for op_index in p["order"].tolist():
                x = TV_JITTER[op_index](x, p["factors"][op_index].item())
        if p["grayscale"]:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if p["blur"]:
            x = TF.gaussian_blur(x, [BLUR_KERNEL_SIZE] * 2, [p["sigma"].item()] * 2)
        if p["solarize"]:
            x = TF.solarize(x, 0.5)
        ref.append(TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD))
    torch.testing.assert_close(apply_photometric(img, params), torch.stack(ref), atol=1e-4, rtol=0)


@pytest.mark.parametrize("view, blur_p, solarize_p", [(0, 1.0, 0.0), (1, 0.1, 0.2), (2, 0.5, 0.0)])
def test_application_frequencies(view, blur_p, solarize_p):
    torch.manual_seed(view)
    n = 4000
    params = sample_photometric_params(n, *dino.VIEW_PROBS[view])
    for key, p in [("jitter", 0.8), ("grayscale", 0.2), ("blur", blur_p), ("solarize", solarize_p)]:
        rate, stderr = params[key].float().mean().item(), max((p * (1 - p) / n) ** 0.5, 1e-9)
        assert abs(rate - p) <= 4 * stderr, (key, rate, p)
    sigma = params["sigma"]
    assert 0.1 <= sigma.min() and sigma.max() <= 2.0 and abs(sigma.mean().item() - 1.05) < 0.03
    for j, (low, high) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        f = params["factors"][:, j]
        assert low <= f.min() and f.max() <= high and abs(f.mean().item() - (low + high) / 2) < 0.05 * (high - low)
    first_ops = params["order"][:, 0]
    assert all(abs((first_ops == k).float().mean().item() - 0.25) < 4 * (0.1875 / n) ** 0.5 for k in range(4))


def test_photometry_call_shapes_range_and_sampling():
    geometry = MultiCropGeometry((0.4, 1.0), (0.05, 0.4), 3, global_crops_size=32, local_crops_size=16)
    batch = [torch.stack(v) for v in zip(*[geometry(picture("gradient", (40, 48))) for _ in range(4)])]
    photometry = MultiCropPhotometry(3)
    torch.manual_seed(0)
    out = photometry(batch)
    assert [o.shape for o in out] == [b.shape for b in batch]
    assert all(o.dtype == torch.float32 and in_normalized_range(o) for o in out)
    # __call__ draws view 1, view 2, then all locals as one group, with VIEW_PROBS
    torch.manual_seed(0)
    probs = dino.VIEW_PROBS
    ref = [apply_photometric(b.float() / 255, sample_photometric_params(4, *probs[k])) for k, b in enumerate(batch[:2])]
    locals_ = torch.cat(batch[2:]).float() / 255
    ref += apply_photometric(locals_, sample_photometric_params(12, *probs[2])).split(4)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=0, rtol=0)


def test_photometry_has_no_host_sync():
    # meta tensors have no data: any .item(), .cpu() or data-dependent branch would raise
    views = [torch.empty(2, 3, 32, 32, dtype=torch.uint8, device="meta")] * 2
    views += [torch.empty(2, 3, 16, 16, dtype=torch.uint8, device="meta")] * 2
    out = MultiCropPhotometry(2)(views)
    assert [(o.shape, o.dtype, o.device.type) for o in out] == [(v.shape, torch.float32, "meta") for v in views]


# -----------------------------------------------------------------------------
# k-NN

def reference_knn(train_features, train_labels, test_features, test_labels, k, T):
    """One test sample at a time, in plain Python: k nearest by cosine, votes exp(sim / T)."""
    hits1 = hits5 = 0
    for feature, label in zip(test_features.double(), test_labels.tolist()):
        sims = (train_features.double() @ feature).tolist()
        nearest = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        votes = {}
        for j in nearest:
            votes[train_labels[j].item()] = votes.get(train_labels[j].item(), 0.0) + np.exp(sims[j] / T)
        ranked = sorted(votes, key=lambda c: -votes[c])
        hits1 += ranked[0] == label
        hits5 += label in ranked[:5]
    return 100.0 * hits1 / len(test_labels), 100.0 * hits5 / len(test_labels)


def test_knn_classifier_on_clusters():
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(4, 32, generator=g), dim=1)
    train_labels, test_labels = torch.arange(40) % 4, torch.arange(12) % 4
    train = F.normalize(centers[train_labels] + 0.05 * torch.randn(40, 32, generator=g), dim=1)
    test = F.normalize(centers[test_labels] + 0.05 * torch.randn(12, 32, generator=g), dim=1)
    assert knn_classifier(train, train_labels, test, test_labels, k=5, T=0.07, num_classes=4) == (100.0, 100.0)
    # with the labels of the test set shifted, nothing is right, not even within the top 5 of 4 classes
    top1, top5 = knn_classifier(train, train_labels, test, (test_labels + 1) % 4, k=5, T=0.07, num_classes=4)
    assert top1 == 0.0 and top5 == 0.0


def test_knn_classifier_matches_brute_force_and_chunking():
    g = torch.Generator().manual_seed(1)
    train = F.normalize(torch.randn(60, 8, generator=g), dim=1)
    test = F.normalize(torch.randn(23, 8, generator=g), dim=1)
    for num_classes in (3, 9):
        train_labels = torch.randint(num_classes, (60,), generator=g)
        test_labels = torch.randint(num_classes, (23,), generator=g)
        for k in (1, 4, 10, 60):
            for temp in (0.07, 0.5):
                expected = reference_knn(train, train_labels, test, test_labels, k, temp)
                for chunk_size in (1, 7, 1000):
                    got = knn_classifier(train, train_labels, test, test_labels, k, temp, num_classes, chunk_size)
                    assert got == pytest.approx(expected), (num_classes, k, temp, chunk_size)


def test_shards_cover_the_dataset_once(monkeypatch):
    for world_size in (1, 2, 3, 5):
        for n in (0, 1, 4, 7, 10):
            monkeypatch.setattr(dino, "get_world_size", lambda: world_size)
            indices = []
            for rank in range(world_size):
                monkeypatch.setattr(dino, "get_rank", lambda: rank)
                indices += list(shard_loader(list(range(n)), 1, 0, "cpu").dataset)
            assert indices == list(range(n))


def seven_images(root):
    """A dataset of 7 images (more in one shard of 2 than in the other), as (image, True)."""
    return dino.ImageFiles(root, dino.eval_transform(32, 32))


def extract_worker(rank, port, tmp_path):
    become_rank(rank, port)
    dist.init_process_group("gloo")
    try:
        features = extract_features(tiny_vit(), seven_images(tmp_path / "seven"), 2, 0, "cpu")
        torch.save(features, tmp_path / f"rank{rank}.pth")
        embedded = dino.embed_folder(tiny_vit(), tmp_path / "images", crop_size=32, patch_tokens=True, batch_size=2)
        torch.save(embedded, tmp_path / f"embedded{rank}.pth")
    finally:
        dist.destroy_process_group()


def test_extract_features_and_embed_folder_two_processes_equal_one(tmp_path):
    image_folder(tmp_path / "seven", n=7, classes=None, look="noise", size=32)
    single = extract_features(tiny_vit(), seven_images(tmp_path / "seven"), 2, 0, "cpu")
    assert single.shape == (7, 192) and single.dtype == torch.float32
    assert torch.allclose(single.norm(dim=1), torch.ones(7))
    image_folder(tmp_path / "images", **EMBED_FOLDER)  # 5 files, the broken one in process 0's shard of 2
    single_embedded = dino.embed_folder(tiny_vit(), tmp_path / "images", crop_size=32, patch_tokens=True)
    torch.multiprocessing.spawn(extract_worker, args=(dino._free_port(), tmp_path), nprocs=2)
    # process 0 gets all 7 features, in dataset order; the others nothing
    torch.testing.assert_close(torch.load(tmp_path / "rank0.pth"), single, atol=1e-5, rtol=0)
    assert torch.load(tmp_path / "rank1.pth") is None
    # the same for the embeddings, the unreadable file's row dropped after the gather
    embedded = torch.load(tmp_path / "embedded0.pth")
    assert embedded["paths"] == single_embedded["paths"] and torch.load(tmp_path / "embedded1.pth") is None
    for k in ("cls", "patch_tokens"):
        torch.testing.assert_close(embedded[k], single_embedded[k], atol=1e-5, rtol=1e-5)


def test_knn_accuracy_runs_in_eval_mode_and_restores_the_mode(tmp_path):
    root = image_folder(tmp_path, n=(6, 3), classes=("a", "b", "c"), look="color", size=32)
    transform = dino.eval_transform(32, 32)
    sets = dino.image_folders(root, transform, transform)
    for training in (True, False):
        model, modes = tiny_vit().train(training), []
        model.register_forward_pre_hook(lambda m, _: modes.append(m.training))
        assert dino.knn_accuracy(model, *sets, 4, 0, "cpu") == [(6, 100.0, 100.0)]  # k=20 capped; separable colors
        assert modes and not any(modes) and model.training == training


# -----------------------------------------------------------------------------
# attention maps

def test_attention_maps_non_square():
    model = tiny_vit()
    img = torch.randn(3, 48, 64)
    maps = attention_maps(model, torch.stack([img, img.flip(-1)]))
    assert maps.shape == (2, 3, 3, 4)
    with torch.no_grad():
        for i, x in enumerate((img, img.flip(-1))):  # row r, column c is patch r * 4 + c, the token after it
            attn = model.get_last_selfattention(x[None])[0]
            for r, c in ((0, 0), (1, 3), (2, 1)):
                torch.testing.assert_close(maps[i, :, r, c], attn[:, 0, 1 + r * 4 + c])


def test_threshold_masks_are_minimal():
    maps = torch.rand(4, 5, 7) ** 3
    for threshold in (0.05, 0.3, 0.6, 0.9, 1.0):
        masks = threshold_masks(maps, threshold)
        assert masks.shape == maps.shape and masks.dtype == torch.bool
        for m, keep in zip(maps.double(), masks):
            fraction = m[keep].sum() / m.sum()
            assert fraction >= threshold - 1e-12
            assert fraction - m[keep].min() / m.sum() < threshold  # without the smallest kept patch: short
            assert (~keep).all() or keep.all() or m[keep].min() >= m[~keep].max()  # the largest patches are kept


def test_attention_jaccard_on_hand_made_maps():
    """2 x 2 patches of 2 x 2 pixels; the 60 % mass keeps: the 0.7 patch alone; the top row (0.4 + 0.4); all but the
    0.2 patch (0.3, then both 0.25s: 0.55 before the second is still short of 0.6)."""
    maps = torch.tensor([[[0.7, 0.1], [0.1, 0.1]], [[0.4, 0.4], [0.1, 0.1]], [[0.3, 0.25], [0.25, 0.2]]])
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, :2, :1] = True  # half of the kept patch: 2 / 4
    masks[1, :, :2] = True  # the left half, against the top row: 4 / (8 + 8 - 4)
    masks[2] = True  # the whole image: 12 / 16
    torch.testing.assert_close(dino.attention_jaccard(maps, masks, 2), torch.tensor([0.5, 1 / 3, 0.75]))


# -----------------------------------------------------------------------------
# linear probe

def linear_worker(rank, port, args):
    become_rank(rank, port)
    try:
        best = linear_main(args)  # joins the gloo group through init_distributed
        torch.save(best, os.path.join(args.output_dir, f"best{rank}.pth"))
    finally:
        dist.destroy_process_group()


def test_linear_probe_two_processes(tmp_path, checkpoint):
    data = image_folder(tmp_path / "data", n=(14, 6), classes=("bright", "dark"), look="color", size=32)
    args = parse("linear", [
        "--data_path", data, "--pretrained_weights", checkpoint, "--epochs", "3", "--batch_size_per_gpu", "2",
        "--lr", "1.0", "--num_workers", "0", "--output_dir", str(tmp_path)])
    torch.multiprocessing.spawn(linear_worker, args=(dino._free_port(), args), nprocs=2)
    best = [torch.load(tmp_path / f"best{rank}.pth") for rank in range(2)]
    assert best[0] == best[1] and best[0]["top1"] == 100.0  # the val counts of both shards were summed
    assert torch.load(tmp_path / "linear.pth", weights_only=True)["epoch"] == 3


# -----------------------------------------------------------------------------
# embeddings

def test_embed_folder_features_and_files(tmp_path, checkpoint, capsys):
    folder, model, names = tmp_path / "images", tiny_vit(), EMBED_NAMES
    image_folder(folder, **EMBED_FOLDER)
    # the documented default preprocessing at crop 32: resize to round(32 * 256 / 224) = 37, center crop 32
    x = torch.stack([T.Compose([T.Resize(37, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                                T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(
        Image.open(folder / name).convert("RGB")) for name in names])
    with torch.no_grad():
        cls = model(x)
        tokens = model.prepare_tokens(x)  # the patch tokens by hand: all blocks, then the final norm
        for blk in model.blocks:
            tokens = blk(tokens)
        patches = model.norm(tokens)[:, 1:].reshape(4, 2, 2, 192)
    out = dino.embed_folder(model, folder, crop_size=32, patch_tokens=True, n_last_blocks=3, batch_size=3)
    assert out["paths"] == names
    assert "dogs/bad.png" in capsys.readouterr().err
    torch.testing.assert_close(out["cls"], cls)
    torch.testing.assert_close(out["patch_tokens"], patches)  # [N, h, w, D], row-major patches
    assert out["last_blocks"].shape == (4, 3, 192)
    torch.testing.assert_close(out["last_blocks"][:, -1], cls)  # the last block's CLS token is model(x)
    # the CLI: .npz and .pt hold the same; float16 halves; no pickle needed to read either
    for ext, dtype in (("npz", "float32"), ("pt", "float16")):
        dino.main(["embed", "--data_path", str(folder), "--pretrained_weights", checkpoint, "--crop_size", "32",
                   "--patch_tokens", "--n_last_blocks", "3", "--num_workers", "0", "--dtype", dtype,
                   "--output", str(tmp_path / f"e.{ext}")])
        if ext == "npz":
            with np.load(tmp_path / "e.npz", allow_pickle=False) as f:
                saved = {k: torch.from_numpy(f[k]) if k != "paths" else f[k].tolist() for k in f.files}
        else:
            saved = torch.load(tmp_path / "e.pt", weights_only=True)
        assert saved["paths"] == names and saved["cls"].dtype == getattr(torch, dtype)
        for k in ("cls", "patch_tokens", "last_blocks"):
            # TF32 on a GPU (load_backbone turns it on for frozen features) or float16 storage: about 1e-3
            tol = 1e-2 if torch.cuda.is_available() else 2e-3 if dtype == "float16" else 1e-5
            torch.testing.assert_close(saved[k].float(), out[k], atol=tol, rtol=tol)
    assert "skipped 1 unreadable" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.tmp"))


# -----------------------------------------------------------------------------
# part 1 on its own

def part_1_alone():
    """dino.py above its `# Part 2: the tool` banner, run alone (as a copy in another project would be): its names."""
    lines = open(os.path.join(HERE, "dino.py")).read().split("\n")
    banner = lines.index("# Part 2: the tool")
    assert lines[banner - 1].startswith("# ====")
    part1 = {"__name__": "dino_part1"}
    exec(compile("\n".join(lines[:banner - 1]), "dino.py part 1", "exec"), part1)
    return part1


def test_part_1_alone_trains():
    """Part 1 alone builds a run from its own names and trains two steps (2 global crops of 32 pixels, 2 local of 16,
    batch 4); no CLI."""
    part1 = part_1_alone()
    assert not {"build_parser", "parse_args", "main"} & set(part1)
    assert not any(isinstance(v, type) and issubclass(v, argparse.ArgumentParser) for v in part1.values())
    assert part1["train_step"].__module__ == "dino_part1"  # not dino's, imported
    torch.manual_seed(0)
    student, teacher = part1["build_dino_networks"]("vit_tiny", patch_size=16, out_dim=32)
    loss = part1["DINOLoss"](32, 4, warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0,
                             nepochs=1)
    optimizer = torch.optim.AdamW(part1["get_params_groups"](student))
    schedule = part1["cosine_scheduler"]
    schedules = {"lr": schedule(1e-3, 1e-6, 1, 2), "wd": schedule(0.04, 0.4, 1, 2), "momentum": schedule(0.9, 1, 1, 2)}
    s = part1["TrainState"](student, teacher, loss, optimizer, torch.amp.GradScaler("cpu", enabled=False), schedules)
    teacher_start = [p.detach().clone() for p in teacher.parameters()]
    student_start = {name: p.detach().clone() for name, p in student.named_parameters()}
    for i in range(2):
        teacher_before = [p.detach().clone() for p in teacher.parameters()]
        crops = [torch.randn(4, 3, size, size) for size in (32, 32, 16, 16)]
        assert math.isfinite(part1["train_step"](s, [crops], 0, i).item())
        # EMA: teacher <- m teacher + (1 - m) student, with this iteration's momentum
        m = schedules["momentum"][i]
        for t, t0, p in zip(teacher.parameters(), teacher_before, student.parameters()):
            torch.testing.assert_close(t, m * t0 + (1 - m) * p.detach())
    # every trainable weight moved but the head's last layer (fixed in the first epoch: freeze_last_layer 1)
    moved = {name for name, p in student.named_parameters() if not torch.equal(p, student_start[name])}
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert moved == trainable - {"head.last_layer.weight_v"} and "backbone.blocks.0.attn.qkv.weight" in moved
    assert not all(torch.equal(t, t0) for t, t0 in zip(teacher.parameters(), teacher_start))
    assert not all(torch.equal(t, p) for t, p in zip(teacher.parameters(), student.parameters()))


def test_readme_own_backbone_example_trains_with_part_1_alone(monkeypatch, capsys):
    """README's "Any backbone" example, exactly as written, with `import dino` giving part 1 alone: a user's CNN trains
    two steps. Its BatchNorm statistics: the student's from 2 forward passes a step (global crops, local crops), the
    teacher's from 1 (the global crops), never copied from the student by the EMA."""
    readme = open(os.path.join(HERE, "README.md")).read()
    example = readme.split("## Any backbone")[1].split("```python\n")[1].split("```")[0]
    module = types.ModuleType("dino")
    module.__dict__.update(part_1_alone())
    monkeypatch.setitem(sys.modules, "dino", module)
    names = {}
    exec(compile(example, "README.md", "exec"), names)
    losses = [float(line.split("loss ")[1]) for line in capsys.readouterr().out.splitlines()]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    student, teacher = names["student"], names["teacher"]
    assert student.backbone is names["backbone"] and teacher.backbone is not names["backbone"]
    assert student.backbone[1].num_batches_tracked == 4 and teacher.backbone[1].num_batches_tracked == 2
    assert not torch.equal(student.backbone[1].running_mean, teacher.backbone[1].running_mean)
    # the EMA moved the teacher toward a student that moved on
    assert not any(torch.equal(t, p) for t, p in zip(teacher.backbone.parameters(), student.backbone.parameters()))


# =============================================================================
# Part 2: the tool
# =============================================================================

# -----------------------------------------------------------------------------
# checkpoints: loading, saving, resume, pretrained weights

def test_load_pretrained_weights_formats_round_trip(tmp_path):
    """The formats load_pretrained_weights accepts, all holding the same backbone and head."""
    files = {name: tmp_path / f"{name}.pth" for name in ("plain", "full", "new_weight_norm")}
    checkpoint_file(files["plain"], "plain")
    _, wrapper = checkpoint_file(files["full"], out_dim=64, module=True)
    checkpoint_file(files["new_weight_norm"], out_dim=64, new_weight_norm=True)
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
        assert not torch.allclose(student(x), expected_features)  # the student entry (another network) was picked


def test_published_resnet50_weights_load_strictly_and_give_torchvisions_features(tmp_path, capsys):
    """dino_resnet50_pretrain.pth's layout (torchvision's resnet50 keys without fc.; it cannot be downloaded here), and
    a full checkpoint's networks: loaded strictly, they give torchvision's resnet50 with fc = Identity()."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50()
    for m in resnet.modules():  # BatchNorm statistics of a trained network, not the initial 0 and 1
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    with_fc = resnet.state_dict()
    published = {k: v for k, v in with_fc.items() if not k.startswith("fc.")}
    torch.save(published, tmp_path / "published.pth")
    full = {"teacher": {f"backbone.{k}": v for k, v in published.items()} | {"head.mlp.0.weight": torch.zeros(1)},
            "student": {f"module.backbone.{k}": v for k, v in published.items()}}
    torch.save(full, tmp_path / "full.pth")
    resnet.fc = nn.Identity()
    resnet.eval()
    x = torch.randn(2, 3, 64, 64)
    model = dino.build_backbone("resnet50").eval()
    with torch.no_grad():
        expected = resnet(x)
        assert expected.shape == (2, 2048)
        for name, key in (("published", None), ("full", "teacher"), ("full", "student")):
            model.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)  # no leftovers
            dino.load_pretrained_weights(model, tmp_path / f"{name}.pth", key)
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
            entry = f"{key} " if key else ""
            ignored = "; head ignored" if key == "teacher" else ""
            # torchvision's resnet50 has 320 tensors, less fc.weight and fc.bias
            assert capsys.readouterr().out == f"loaded {tmp_path / name}.pth: {entry}backbone, 318 tensors{ignored}\n"
    # strictly: a missing tensor, or torchvision's classifier, is an error
    torch.save({k: v for k, v in published.items() if k != "layer4.2.bn3.running_var"}, tmp_path / "missing.pth")
    torch.save(with_fc, tmp_path / "with_fc.pth")
    for name, expected_error in (("missing", "1 missing keys (e.g. layer4.2.bn3.running_var)"),
                                 ("with_fc", "2 unexpected keys (e.g. fc.weight)")):
        one_line_error(lambda: dino.load_pretrained_weights(model, tmp_path / f"{name}.pth"), re.escape(expected_error))
    # embed: the pooled 2048-d features under cls, on the k-NN preprocessing (crop 32: resize 37, center crop 32)
    folder = image_folder(tmp_path / "images", n=3, classes=None)
    dino.main(["embed", "--data_path", folder, "--arch", "resnet50", "--pretrained_weights",
               str(tmp_path / "published.pth"), "--crop_size", "32", "--num_workers", "0", "--output",
               str(tmp_path / "e.pt")])
    preprocess = T.Compose([T.Resize(37, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                            T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    images = torch.stack([preprocess(Image.open(os.path.join(folder, f"{i}.png")).convert("RGB")) for i in range(3)])
    saved = torch.load(tmp_path / "e.pt", weights_only=True)
    assert saved["paths"] == ["0.png", "1.png", "2.png"] and set(saved) == {"paths", "cls"}
    with torch.no_grad():
        torch.testing.assert_close(saved["cls"], resnet(images), rtol=1e-5, atol=1e-5)


def test_weights_of_another_arch_are_one_line(tmp_path, checkpoint):
    full = tmp_path / "full.pth"
    checkpoint_file(full, out_dim=64, module=True)
    with pytest.raises(DinoError) as e:
        dino.load_pretrained_weights(vits.vit_small(patch_size=8), full)
    msg = str(e.value)
    assert "\n" not in msg and "--arch vit_tiny --patch_size 16" in msg and "shape mismatch" in msg
    with pytest.raises(DinoError, match="no 'nope' entry"):
        dino.load_pretrained_weights(vits.vit_tiny(patch_size=16), full, "nope")
    image = os.path.join(image_folder(tmp_path / "images", n=1, classes=None), "0.png")
    args = parse("attn", ["--pretrained_weights", checkpoint, "--arch", "vit_small", "--image_path", image,
                          "--output_dir", str(tmp_path)])
    one_line_error(lambda: attn_main(args), "vit_tiny")  # the checkpoint's arch, suggested


def test_unreadable_checkpoints_are_one_line_errors_and_never_overwritten(tmp_path, capsys):
    files = {}
    for kind in ("truncated", "empty", "text", "plain"):  # plain: a backbone, not a training run
        files[kind] = tmp_path / f"{kind}.pth"
        checkpoint_file(files[kind], kind)
    for name in ("truncated", "empty", "text"):
        with pytest.raises(dino.DinoError, match="is not a readable checkpoint") as e:
            dino.load_checkpoint_file(files[name])
        assert str(files[name]) in str(e.value) and "\n" not in str(e.value)
    data = image_folder(tmp_path / "data", n=4)
    for name, path in files.items():
        out = tmp_path / f"run_{name}"
        os.makedirs(out)
        (out / "checkpoint.pth").write_bytes(path.read_bytes())
        err = main_error(train_argv(data, out, "--epochs", "1"), capsys)
        assert "cannot resume" in err and str(out / "checkpoint.pth") in err and "to start fresh" in err, err
        assert (out / "checkpoint.pth").read_bytes() == path.read_bytes()  # left alone
        assert not (out / "log.txt").exists()
    for command in ("knn", "attn", "linear"):
        err = main_error([command, "--pretrained_weights", str(files["truncated"]), "--output_dir",
                          str(tmp_path / "eval")], capsys)
        assert "is not a readable checkpoint" in err and str(files["truncated"]) in err


class RunsCode:
    """Unpickling it creates the marker file: what a malicious checkpoint could do with any command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def torch_load_calls(source):
    """The argument text of every torch.load(...) call in source."""
    calls = []
    for match in re.finditer(r"torch\.load\(", source):
        depth, i = 1, match.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        calls.append(source[match.end():i - 1])
    return calls


def test_every_torch_load_is_weights_only():
    calls = torch_load_calls(open(os.path.join(HERE, "dino.py")).read())
    assert calls and all("weights_only=True" in call for call in calls), calls
    assert not torch_load_calls(open(os.path.join(HERE, "vision_transformer.py")).read())


def test_code_running_pickle_is_refused_by_every_entry_point(tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pth"
    checkpoint_file(evil, extra={"payload": RunsCode(marker)})
    torch.load(evil, weights_only=False)  # the file really runs code when unpickled unsafely
    assert marker.exists()
    marker.unlink()

    refused = "could run code"
    with pytest.raises(dino.DinoError, match=refused):
        dino.load_pretrained_weights(dino.vits.vit_tiny(patch_size=16), evil)
    data = image_folder(tmp_path / "data", n=4)
    os.makedirs(tmp_path / "run")
    (tmp_path / "run" / "checkpoint.pth").write_bytes(evil.read_bytes())
    assert refused in main_error(train_argv(data, tmp_path / "run"), capsys)
    for command in ("knn", "attn", "linear"):
        err = main_error([command, "--pretrained_weights", str(evil), "--output_dir", str(tmp_path / "eval")], capsys)
        assert refused in err and str(evil) in err
    err = main_error(["embed", "--data_path", str(data), "--pretrained_weights", str(evil), "--output",
                      str(tmp_path / "features.npz")], capsys)
    assert refused in err and not (tmp_path / "features.npz").exists()
    assert not marker.exists()


def test_official_checkpoint_loads_through_every_entry_point(tmp_path, capsys):
    for numpy1 in (False, True):
        official = tmp_path / f"official{numpy1}.pth"
        networks = checkpoint_file(official, "published", out_dim=32, seed=3, numpy1=numpy1)
        student, teacher = (network.state_dict() for network in networks)
        ckpt = dino.load_checkpoint_file(official)
        assert ckpt["args"].arch == "vit_tiny" and ckpt["epoch"] == 7
        for key, expected in (("teacher", teacher), ("student", student)):
            model = dino.load_pretrained_weights(vits.vit_tiny(patch_size=16), official, key)
            assert all(torch.equal(v, expected[f"backbone.{k}"]) for k, v in model.state_dict().items())
            assert capsys.readouterr().out == f"loaded {official}: {key} backbone, 150 tensors; head ignored\n"
        head = dino.load_pretrained_weights(vits.DINOHead(192, 32), official)
        assert torch.equal(head.last_layer.weight_v, teacher["head.last_layer.weight_v"])
        assert capsys.readouterr().out == f"loaded {official}: teacher head, 8 tensors; backbone ignored\n"
    data = image_folder(tmp_path / "data", **LABELLED)
    image = os.path.join(data, "val", "a", "0.png")
    out = str(tmp_path / "eval")
    for argv in (["knn", "--data_path", data, "--crop_size", "32", "--nb_knn", "2", "--num_workers", "0"],
                 ["attn", "--image_path", image, "--image_size", "32", "32"],
                 ["linear", "--data_path", data, "--crop_size", "32", "--epochs", "1", "--num_workers", "0"]):
        dino.main(argv + ["--pretrained_weights", str(official), "--output_dir", out])  # arch from its args
        assert f"loaded {official}: teacher backbone, 150 tensors; head ignored" in capsys.readouterr().out


def test_short_training_run_writes_checkpoint_and_json_log(tmp_path, capsys):
    data = image_folder(tmp_path / "data")
    dino.main(train_argv(data, tmp_path / "out", "--saveckp_freq", "1"))
    log = read_log(tmp_path / "out")
    assert [entry["epoch"] for entry in log] == [0, 1]
    for entry in log:
        assert math.isfinite(entry["loss"]) and entry["skipped_images"] == 0
        assert {"teacher_entropy", "kl", "batch_mean_entropy", "lr", "wd", "momentum", "images_per_s"} <= set(entry)
        assert entry["loss"] == pytest.approx(entry["teacher_entropy"] + entry["kl"], rel=1e-4)
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["args"]["arch"] == "vit_tiny"
    assert {"student", "teacher", "optimizer", "dino_loss"} <= set(ckpt)
    assert (tmp_path / "out" / "checkpoint0000.pth").exists() and (tmp_path / "out" / "checkpoint0001.pth").exists()
    assert not list((tmp_path / "out").glob("*.tmp*"))
    printed = capsys.readouterr().out
    assert "it 2/2 loss" in printed and "img/s" in printed and "eta" in printed


# the published ResNet-50 recipe's flags (its README), at test sizes
RESNET_RECIPE = ["--optimizer", "sgd", "--lr", "0.03", "--weight_decay", "1e-4", "--weight_decay_end", "1e-4",
                 "--global_crops_scale", "0.14", "1", "--local_crops_scale", "0.05", "0.14"]


def test_torchvision_resnet18_trains_resumes_and_evaluates_without_arch(tmp_path, capsys):
    """A convnet run on the CPU with the published ResNet-50 recipe, then k-NN, linear and embed read its arch from the
    checkpoint. The teacher keeps BatchNorm statistics of its own forward passes: in train mode, once per step on the
    global crops (the student twice, global and local), never moved by the EMA."""
    data = image_folder(tmp_path / "data", **LABELLED)
    out = tmp_path / "out"
    argv = ["train", "--data_path", os.path.join(data, "train"), "--output_dir", str(out), "--arch", "resnet18",
            *RESNET_RECIPE, "--out_dim", "32", "--epochs", "1", "--batch_size_per_gpu", "6", "--global_crops_size",
            "32", "--local_crops_size", "16", "--local_crops_number", "2", "--num_workers", "0", "--warmup_epochs", "0"]
    dino.main(argv)
    dino.main([*argv, "--epochs", "2"])  # the same command, one epoch more: resumes
    assert "resumed from" in capsys.readouterr().out
    log = read_log(out)
    assert [entry["epoch"] for entry in log] == [0, 1] and all(math.isfinite(entry["loss"]) for entry in log)
    assert all(entry["wd"] == pytest.approx(1e-4) for entry in log)
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["args"]["arch"] == "resnet18" and ckpt["epoch"] == 2
    steps = 2 * 2  # 12 train images in batches of 6, 2 epochs
    assert ckpt["teacher"]["backbone.bn1.num_batches_tracked"] == steps
    assert ckpt["student"]["backbone.bn1.num_batches_tracked"] == 2 * steps
    assert not torch.equal(ckpt["teacher"]["backbone.bn1.running_mean"], ckpt["student"]["backbone.bn1.running_mean"])
    # embed without --arch: the teacher's pooled 512-d features, as torchvision's resnet18 with fc = Identity() gives
    # them on the k-NN preprocessing (crop 32: resize 37, center crop 32)
    resnet = torchvision.models.resnet18()
    resnet.fc = nn.Identity()
    resnet.load_state_dict({k.removeprefix("backbone."): v for k, v in ckpt["teacher"].items()
                            if k.startswith("backbone.")})
    val = os.path.join(data, "val")
    dino.main(["embed", "--data_path", val, "--pretrained_weights", str(out / "checkpoint.pth"), "--crop_size", "32",
               "--num_workers", "0", "--output", str(tmp_path / "e.pt")])
    saved = torch.load(tmp_path / "e.pt", weights_only=True)
    preprocess = T.Compose([T.Resize(37, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                            T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    images = torch.stack([preprocess(Image.open(os.path.join(val, p)).convert("RGB")) for p in saved["paths"]])
    with torch.no_grad():
        torch.testing.assert_close(saved["cls"], resnet.eval()(images), rtol=1e-5, atol=1e-5)
    # k-NN and a linear probe on the backbone's output (no concatenation of blocks)
    evaluation = ["--data_path", data, "--output_dir", str(out), "--crop_size", "32", "--num_workers", "0"]
    dino.main(["knn", *evaluation])
    dino.main(["linear", *evaluation, "--epochs", "1"])
    assert json.loads((out / "knn_results.json").read_text())["results"][0]["model"].endswith("checkpoint.pth")
    linear = torch.load(out / "linear.pth", weights_only=True)
    assert linear["state_dict"]["weight"].shape == (3, 512)


# A training run killed anywhere (slow): what is on disk is always usable, and rerunning the same command
# finishes the same run.
EPOCHS = 5


def modified_after(path, since_ns):
    try:
        return path.stat().st_mtime_ns > since_ns
    except FileNotFoundError:  # not there yet, or just renamed away
        return False


def teacher(path):
    return dino.load_checkpoint_file(path)["teacher"]


def assert_same_teacher(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check_log(out, epochs, n_kills):
    """log.txt holds a line per saved epoch, in order, except at most one per kill (checkpoint first, then log)."""
    logged = [entry["epoch"] for entry in read_log(out)] if (out / "log.txt").exists() else []
    assert logged == sorted(set(logged)) and set(logged) <= set(range(epochs)), logged
    assert len(set(range(epochs)) - set(logged)) <= n_kills, logged


def check_killed_run(out, n_kills):
    """What a SIGKILL may leave: no checkpoint yet, or a loadable one that log.txt agrees with."""
    ckpt_path = out / "checkpoint.pth"
    if not ckpt_path.exists():
        return 0
    ckpt = dino.load_checkpoint_file(ckpt_path)
    assert set(dino.TRAINING_STATE) <= set(ckpt) and 1 <= ckpt["epoch"] <= EPOCHS
    check_log(out, ckpt["epoch"], n_kills)
    return ckpt["epoch"]


@pytest.mark.slow
def test_sigkill_anywhere_then_rerun_resumes_and_equals_uninterrupted_run(tmp_path):
    data = image_folder(tmp_path / "data")

    def argv(out):
        return train_argv(data, out, "--epochs", str(EPOCHS))

    code, _, err = run_cli(argv(tmp_path / "straight"))
    assert code == 0, err
    out = tmp_path / "killed"
    log, tmp, ckpt = out / "log.txt", out / "checkpoint.pth.tmp", out / "checkpoint.pth"
    rng = random.Random(0)
    kills = []
    for attempt in range(8):
        since = time.time_ns()
        p = start_cli(argv(out), tmp_path / "stderr.txt")
        if attempt == 0:  # during the very first save of checkpoint.pth: there is none to fall back on
            wait_for(lambda: modified_after(tmp, since), p)
        elif attempt == 1:  # during a save that replaces a checkpoint.pth
            wait_for(lambda: ckpt.exists() and modified_after(tmp, max(since, ckpt.stat().st_mtime_ns)), p)
        elif attempt == 2:  # during startup or the first steps
            time.sleep(rng.uniform(0.1, 3.0))
        else:  # anywhere in the next epoch or so after an epoch end: saves, steps, the log; or after the last one
            wait_for(lambda: modified_after(log, since), p)
            time.sleep(rng.uniform(0.0, 1.5))
        p.kill()
        if p.wait() == 0:
            break
        assert p.returncode == -signal.SIGKILL, open(tmp_path / "stderr.txt").read()
        kills.append(check_killed_run(out, len(kills) + 1))
    print("checkpoint epochs left by the kills:", kills)
    assert kills[:2] == [0, 1], kills  # the first kill left no checkpoint, the second the one of epoch 1
    code, _, err = run_cli(argv(out))  # the same command once more: it finishes the run (or has nothing to do)
    assert code == 0, err
    assert_same_teacher(teacher(out / "checkpoint.pth"), teacher(tmp_path / "straight" / "checkpoint.pth"))
    check_log(out, EPOCHS, len(kills))
    assert read_log(out)[-1]["epoch"] == EPOCHS - 1
    assert not list(out.glob("*.tmp*"))  # a killed save leaves no lasting litter


@pytest.mark.parametrize("workers", ["0", "2"])  # 2: persistent loader workers, started once per run
def test_resume_is_bit_exact(tmp_path, workers):
    data = image_folder(tmp_path / "data")
    argv = ["--saveckp_freq", "1", "--num_workers", workers]
    dino.main(train_argv(data, tmp_path / "straight", *argv))
    # An interrupted run: only the state after epoch 0 exists; rerunning the same command finishes it.
    os.makedirs(tmp_path / "resumed")
    os.replace(tmp_path / "straight" / "checkpoint0000.pth", tmp_path / "resumed" / "checkpoint.pth")
    dino.main(train_argv(data, tmp_path / "resumed", *argv))
    a = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)
    for net in ("teacher", "student"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net} {k}"
    assert torch.equal(a["dino_loss"]["center"], b["dino_loss"]["center"])
    assert read_log(tmp_path / "straight")[1]["loss"] == read_log(tmp_path / "resumed")[0]["loss"]


def test_resume_refuses_network_changes_and_reports_harmless_ones(tmp_path, capsys):
    data = image_folder(tmp_path / "data", n=4)
    dino.main(train_argv(data, tmp_path / "out", "--epochs", "1"))
    capsys.readouterr()
    err = main_error(train_argv(data, tmp_path / "out", "--arch", "vit_small", "--patch_size", "8",
                                "--out_dim", "64"), capsys)
    for difference in ("--arch vit_tiny (now vit_small)", "--patch_size 16 (now 8)", "--out_dim 32 (now 64)"):
        assert difference in err, err
    dino.main(train_argv(data, tmp_path / "out", "--epochs", "2", "--num_workers", "1"))
    printed = capsys.readouterr().out
    assert "resuming with changed flags" in printed and "epochs 1 -> 2" in printed and "num_workers 0 -> 1" in printed
    assert "resumed from" in printed and [entry["epoch"] for entry in read_log(tmp_path / "out")] == [0, 1]
    dino.main(train_argv(data, tmp_path / "out", "--epochs", "2", "--num_workers", "1"))
    assert "nothing to train" in capsys.readouterr().out
    assert len(read_log(tmp_path / "out")) == 2


def test_continued_pretraining_from_a_full_checkpoint(tmp_path, capsys):
    """lr 0 and teacher momentum 1: after an epoch both networks are still the file's, backbones and heads."""
    official = tmp_path / "official.pth"
    networks = checkpoint_file(official, "published", out_dim=32, seed=3)  # not the run's seed, 0
    student, teacher = (network.state_dict() for network in networks)
    data = image_folder(tmp_path / "data", n=4)
    dino.main(train_argv(data, tmp_path / "out", "--pretrained_weights", str(official), "--epochs", "1", "--lr", "0",
                         "--min_lr", "0", "--momentum_teacher", "1"))
    printed = capsys.readouterr().out
    assert f"loaded {official}: student backbone and head, 158 tensors" in printed
    assert f"loaded {official}: teacher backbone and head, 158 tensors" in printed
    run = dino.load_checkpoint_file(tmp_path / "out" / "checkpoint.pth")
    for name, expected in (("teacher", teacher), ("student", student)):
        assert run[name].keys() == expected.keys() and all(torch.equal(run[name][k], expected[k]) for k in expected)
    assert run["epoch"] == 1 and torch.count_nonzero(run["dino_loss"]["center"]) > 0  # a fresh run, its own center
    # the run in --output_dir wins over --pretrained_weights, and says so
    dino.main(train_argv(data, tmp_path / "out", "--pretrained_weights", str(official), "--epochs", "1"))
    assert "exists: resuming that run, --pretrained_weights is not used" in capsys.readouterr().out
    # a head of another out_dim: one line that names the flags, or fresh heads on request
    err = main_error(train_argv(data, tmp_path / "other", "--pretrained_weights", str(official), "--out_dim", "64"),
                     capsys)
    assert "--out_dim 32" in err and "--pretrained_heads false" in err
    dino.main(train_argv(data, tmp_path / "other", "--pretrained_weights", str(official), "--out_dim", "64",
                         "--pretrained_heads", "false", "--epochs", "1"))
    assert "teacher backbone, 150 tensors; head ignored" in capsys.readouterr().out


def test_freeze_backbone_epochs_keeps_pretrained_backbone_bit_identical(tmp_path, capsys):
    weights = tmp_path / "dino_deittiny16_pretrain.pth"  # published-style: a plain backbone state dict
    checkpoint_file(weights, "plain", seed=5)  # not the run's seed, 0
    pretrained = torch.load(weights, weights_only=True)
    data = image_folder(tmp_path / "data", n=4)
    dino.main(train_argv(data, tmp_path / "out", "--pretrained_weights", str(weights), "--freeze_backbone_epochs",
                         "1", "--saveckp_freq", "1", "--warmup_epochs", "0", "--lr", "1", "--freeze_last_layer", "0"))
    assert "the heads start fresh" in capsys.readouterr().out
    epoch0, epoch1 = (dino.load_checkpoint_file(tmp_path / "out" / f"checkpoint000{e}.pth") for e in (0, 1))
    for net in ("student", "teacher"):
        backbone = {k.removeprefix("backbone."): v for k, v in epoch0[net].items() if k.startswith("backbone.")}
        assert all(torch.equal(backbone[k], v) for k, v in pretrained.items()), net
        assert not torch.equal(epoch1[net]["backbone.blocks.0.attn.qkv.weight"], pretrained["blocks.0.attn.qkv.weight"])
    torch.manual_seed(0)  # the run's seed
    init = dino.build_dino_networks("vit_tiny", out_dim=32)[0].state_dict()
    assert not torch.equal(epoch0["student"]["head.mlp.0.weight"], init["head.mlp.0.weight"])  # the head learned


# -----------------------------------------------------------------------------
# processes: distributed setup and the launcher

def _two_rank_worker(rank, data, out, port, results):
    become_rank(rank, port)
    run = dino.train(dino.parse_args(train_argv(data, out, "--epochs", "1")))
    teacher, loss = run.teacher, run.dino_loss
    # the center must equal the EMA of the all-process batch means: check one update by hand
    center = loss.center.clone()
    teacher_out = torch.randn(6, 32) + rank  # 3 samples x 2 views
    loss(torch.randn(12, 32), teacher_out, 0)  # 3 samples x 4 crops
    results[rank] = {"teacher": {k: v.clone() for k, v in teacher.state_dict().items()}, "center_before": center,
                     "center_after": loss.center.clone(), "teacher_out": teacher_out}
    torch.distributed.destroy_process_group()


def test_two_processes_train_together(tmp_path):
    data = image_folder(tmp_path / "data", n=16)
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(_two_rank_worker, args=(data, tmp_path / "out", dino._free_port(), results), nprocs=2)
    r0, r1 = results[0], results[1]
    for k in r0["teacher"]:
        assert torch.equal(r0["teacher"][k], r1["teacher"][k]), k
    assert torch.equal(r0["center_before"], r1["center_before"])
    mean = torch.cat([r0["teacher_out"], r1["teacher_out"]]).mean(0, keepdim=True)
    torch.testing.assert_close(r0["center_after"], 0.9 * r0["center_before"] + 0.1 * mean)
    torch.testing.assert_close(r1["center_after"], r0["center_after"])
    assert read_log(tmp_path / "out")[0]["epoch"] == 0


@pytest.mark.parametrize("visible, index", [(1, 0), (4, 3)], ids=["one_gpu_per_process", "all_gpus_visible"])
def test_device_is_the_local_rank_among_the_visible_gpus(monkeypatch, visible, index):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # joining the group is not what this checks
    for name, value in dict(RANK="7", WORLD_SIZE="8", LOCAL_RANK="3").items():
        monkeypatch.setenv(name, value)
    assert dino.init_distributed() == (7, 8, torch.device("cuda", index))


def test_two_processes_on_one_gpu_is_one_line(monkeypatch):
    """torchrun --nproc_per_node 2 on one GPU: NCCL refuses (its message, as NCCL 2.28 words it), one line says why."""
    def nccl_refuses(*args, **kwargs):
        raise dist.DistBackendError("NCCL error in: NCCLUtils.cpp:93, invalid usage\nLast error:\n"
                                    "Duplicate GPU detected : rank 1 and rank 0 both on CUDA device 60\n")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "init_process_group", nccl_refuses)
    for name, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(DinoError) as e:
        dino.init_distributed()
    assert str(e.value) == ("the process group did not start: Duplicate GPU detected : rank 1 and rank 0 both on CUDA "
                            "device 60; run one process per GPU (torchrun --nproc_per_node at most 1)")


def test_a_process_leaves_its_group_whether_it_fails_or_not(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")

    def joins(fail):
        dino.init_distributed()
        assert dist.is_initialized()
        if fail:
            raise RuntimeError("a bug")
        return "done"

    for fail in (False, True):
        monkeypatch.setenv("MASTER_PORT", str(dino._free_port()))
        if fail:
            with pytest.raises(RuntimeError, match="a bug"):  # one process: a bug keeps its traceback
                dino._run(joins, fail)
        else:
            assert dino._run(joins, fail) == "done"
        assert not dist.is_initialized()


def test_processes_that_resume_different_epochs_stop(tmp_path, monkeypatch):
    """Output dirs not shared between nodes: this process finds a checkpoint of epoch 1, another one none (its
    all_reduce, MAX, is played here)."""
    data = image_folder(tmp_path / "data", n=8)
    argv = train_argv(data, tmp_path / "out")
    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / "checkpoint.pth").touch()
    monkeypatch.setattr(dino, "resume", lambda path, s, args: 1)
    monkeypatch.setattr(dino, "init_distributed", lambda timeout: (0, 2, torch.device("cpu")))
    other_process = torch.tensor([0, 0])  # resumed nothing: starts at epoch 0
    monkeypatch.setattr(dist, "all_reduce", lambda t, op: t.copy_(torch.maximum(t, other_process)))
    with pytest.raises(DinoError, match=r"the processes resumed different epochs \(0 to 1\).*shares"):
        dino.train(parse_args(argv))


def test_batchnorm_head_with_several_cpu_processes_is_not_synced(tmp_path):
    """SyncBatchNorm runs on CUDA only: several CPU processes keep plain BatchNorm (statistics per process), in the head
    and in a convnet."""
    args = parse_args(train_argv(tmp_path, tmp_path / "out", "--use_bn_in_head", "true"))
    s = dino.build_train_state(args, 1, 2, torch.device("cpu"))
    kinds = {type(m) for m in [*s.student.head.modules(), *s.teacher.head.modules()]}
    assert nn.BatchNorm1d in kinds and nn.SyncBatchNorm not in kinds
    convnet = parse_args(["train", "--data_path", str(tmp_path), "--arch", "resnet18", "--out_dim", "32"])
    kinds = {type(m) for m in dino.build_train_state(convnet, 1, 2, torch.device("cpu")).teacher.modules()}
    assert nn.BatchNorm2d in kinds and nn.SyncBatchNorm not in kinds
    crops = [torch.randn(4, 3, size, size) for size in (32, 32, 16, 16)]
    assert math.isfinite(dino.train_step(s, [crops], 0, 0).item())


def start_rank(rank, argv, port, stderr_path):
    """One process of a 2-process gloo group, as on two nodes: nothing but the group connects them."""
    return start_cli(argv, stderr_path, {**rank_environment(rank, port, local_rank=0), "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
@pytest.mark.parametrize("victim, sig", [(1, signal.SIGKILL), (0, signal.SIGKILL), (1, signal.SIGSTOP)],
                         ids=["rank1_killed", "rank0_killed", "rank1_hangs"])
def test_survivor_of_a_lost_process_exits_with_one_line_and_rerun_resumes(tmp_path, victim, sig):
    data = image_folder(tmp_path / "data", n=16)
    out = tmp_path / "out"
    # 0.25 minutes: a hung peer (SIGSTOP) is given up on after 15 s; a dead one is noticed at once
    argv = train_argv(data, out, "--epochs", "4", "--dist_timeout", "0.25")
    port = dino._free_port()
    procs = [start_rank(rank, argv, port, tmp_path / f"err{rank}.txt") for rank in range(2)]
    try:
        # epoch 0's line written whole (a kill between a checkpoint and its log line costs that line, as designed)
        logged = lambda: (out / "log.txt").exists() and (out / "log.txt").read_text().endswith("\n")
        assert wait_for(logged, procs[0]), open(tmp_path / "err0.txt").read()
        procs[victim].send_signal(sig)
        start = time.time()
        survivor = procs[1 - victim]
        assert survivor.wait(timeout=60) == 2 and time.time() - start < 60
    finally:
        for p in procs:
            p.kill()
            p.wait()
    err = stderr_line(tmp_path / f"err{1 - victim}.txt")
    assert "lost contact with another training process" in err and "rerun the same command to resume" in err
    port = dino._free_port()
    procs = [start_rank(rank, argv, port, tmp_path / f"rerun{rank}.txt") for rank in range(2)]
    assert [p.wait(timeout=240) for p in procs] == [0, 0], open(tmp_path / "rerun0.txt").read()
    assert [entry["epoch"] for entry in read_log(out)] == [0, 1, 2, 3]


def test_error_in_launched_processes_is_one_line(tmp_path, capsys, monkeypatch):
    # launch() spawns one process per GPU; with two "GPUs" the spawned workers find none and join a gloo group.
    torch.cuda.is_available()  # this process reads CUDA_VISIBLE_DEVICES now, before the change for its children
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(dino._free_port()))
    data = image_folder(tmp_path / "data", n=4)
    err = main_error(train_argv(data, tmp_path / "out", "--batch_size_per_gpu", "3"), capsys)
    assert "4 images split over 2 process(es) do not fill one batch" in err


def test_launcher_names_a_process_killed_by_a_signal(monkeypatch):
    """What torch.multiprocessing.spawn raises when a process dies of a signal (NCCL's watchdog aborts one whose peer
    is lost), as one line; the real thing is the slow test below."""
    def one_aborted(*args, **kwargs):
        raise torch.multiprocessing.ProcessExitedException("process 1 terminated with signal SIGABRT", error_index=1,
                                                           error_pid=4321, exit_code=-6, signal_name="SIGABRT")

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.multiprocessing, "spawn", one_aborted)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(DinoError) as e:
        dino.launch(dino.train, None)
    assert "training process 1 was killed by SIGABRT (NCCL" in str(e.value) and "rerun" in str(e.value)
    assert "\n" not in str(e.value)


TWO_FAKE_GPUS = ["-c", "import sys, torch; torch.cuda.device_count = lambda: 2; import dino; dino.main(sys.argv[1:])"]


def spawned_workers(pid):
    children = open(f"/proc/{pid}/task/{pid}/children").read().split()
    return [int(c) for c in children if "spawn_main" in open(f"/proc/{c}/cmdline").read()]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"), reason="needs /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGABRT], ids=["killed", "aborted_as_by_nccl"])
def test_launched_process_killed_is_one_line(tmp_path, sig):
    data = image_folder(tmp_path / "data", n=16)
    out = tmp_path / "out"
    p = start_cli(train_argv(data, out, "--epochs", "50"), tmp_path / "err.txt", GLOO_ON_THE_CPU, TWO_FAKE_GPUS)
    try:
        assert wait_for(lambda: (out / "log.txt").exists(), p)
        workers = spawned_workers(p.pid)
        assert len(workers) == 2
        os.kill(workers[1], sig)
        assert p.wait(timeout=60) == 2
    finally:
        p.kill()
        p.wait()
    err = stderr_line(tmp_path / "err.txt")
    assert "rerun the same command to resume" in err and (f"killed by {sig.name}" in err or "lost contact" in err)


# -----------------------------------------------------------------------------
# the demo data and the presets

def test_demo_dataset(tmp_path):
    """Deterministic; classes balanced; each mask is the drawn object: dark where it is, the one grey background
    around it, both under the pixel noise; the object covers its share of the image, the ring has its hole."""
    for run in ("a", "b"):
        dino.make_demo_dataset(tmp_path / run, n_train=3, n_val=2, seed=5)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    for split, n in (("train", 3), ("val", 2)):
        for cls in dino.DEMO_CLASSES:
            assert len(os.listdir(tmp_path / "a" / split / cls)) == n
            assert len(os.listdir(tmp_path / "a" / "masks" / split / cls)) == n
    rng = np.random.default_rng(0)
    for cls in dino.DEMO_CLASSES * 5:
        img, mask = dino.demo_image(cls, rng)
        pixels = np.asarray(img, dtype=np.float64)
        assert mask.shape == (64, 64) and mask.dtype == bool
        # the noise clipped at 0 raises the object's mean above its 25..40
        assert pixels[mask].mean() < 60 and abs(pixels[~mask].mean() - dino.DEMO_GREY) < 5, cls
        assert abs(pixels[~mask].std() - dino.DEMO_NOISE) < 5, cls
        assert dino.DEMO_AREA[0] - 0.02 < mask.mean() < dino.DEMO_AREA[1] + 0.02, cls
        if cls == "ring":
            ys, xs = np.nonzero(mask)
            assert not mask[round(ys.mean()), round(xs.mean())]


def test_demo_data_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    """Written beside its place and renamed: a run that dies while writing leaves nothing there, and a process that
    finds another one's copy renamed first keeps that one."""
    root = tmp_path / "demo_data"
    draw, rename, calls = dino.demo_image, os.rename, itertools.count()

    def dies_at_image_10(cls, rng):
        if next(calls) == 10:
            raise KeyboardInterrupt
        return draw(cls, rng)

    monkeypatch.setattr(dino, "demo_image", dies_at_image_10)
    with pytest.raises(KeyboardInterrupt):
        dino.make_demo_dataset(root, n_train=3, n_val=1)
    assert not root.exists()
    before = set(os.listdir(tmp_path))

    def another_process_first(src, dst):
        os.makedirs(os.path.join(dst, "train"))
        rename(src, dst)

    monkeypatch.setattr(os, "rename", another_process_first)
    assert dino.make_demo_dataset(root, n_train=3, n_val=1) == str(root)
    assert os.listdir(root) == ["train"]  # the other process's copy, untouched
    assert set(os.listdir(tmp_path)) == before | {"demo_data"}  # ours is gone


def test_knn_every_defaults(tmp_path, monkeypatch, capsys):
    """The demo evaluates its own labelled data after each epoch; other data need --knn_data_path for it."""
    launched = []
    monkeypatch.setattr(dino, "launch", lambda fn, args: launched.append(args))
    monkeypatch.setattr(dino, "make_demo_dataset", lambda root, seed: image_folder(root, **LABELLED))
    dino.main(["train", "--output_dir", str(tmp_path)])
    assert launched[0].knn_every == 1 and launched[0].knn_data_path == str(tmp_path / "demo_data_seed0")
    assert parse_args(["train", "--preset", "demo", "--data_path", str(tmp_path)]).knn_every == 0  # unlabelled
    assert "--knn_every needs --knn_data_path" in main_error(["train", "--data_path", str(tmp_path), "--knn_every",
                                                              "2", "--output_dir", str(tmp_path)], capsys)


def test_demo_data_follows_the_seed(tmp_path, monkeypatch):
    """`train --seed S` trains on the demo data of seed S, in a folder of its own; knn and attn with no data path
    evaluate on the data of the checkpoint's seed; the folder of another seed is never read."""
    made, make_demo_dataset = [], dino.make_demo_dataset

    def demo(root, seed):
        made.append((os.path.basename(root), seed))
        return make_demo_dataset(root, n_train=1, n_val=2, seed=seed)

    launched = []
    monkeypatch.setattr(dino, "launch", lambda fn, args: launched.append(args))
    monkeypatch.setattr(dino, "make_demo_dataset", demo)
    dino.main(["train", "--output_dir", str(tmp_path), "--seed", "3"])
    assert made == [("demo_data_seed3", 3)]
    assert launched[0].data_path == str(tmp_path / "demo_data_seed3" / "train")
    assert launched[0].knn_data_path == str(tmp_path / "demo_data_seed3")
    checkpoint_file(tmp_path / "checkpoint.pth", extra={"args": {"arch": "vit_tiny", "patch_size": 16,
                                                                 "global_crops_size": 32, "seed": 3}})
    for command in ("knn", "attn"):
        made.clear()
        dino.main([command, "--output_dir", str(tmp_path), *(["--num_workers", "0"] if command == "knn" else [])])
        assert made == [("demo_data_seed3", 3)], command
    # the real data: seed 3's images are not seed 0's
    images = {s: Path(make_demo_dataset(tmp_path / f"s{s}", 1, 1, s)) / "val" / "disk" / "0000.png" for s in (0, 3)}
    assert images[0].read_bytes() != images[3].read_bytes()


def test_preset_small_takes_the_small_data_recipe_for_unset_flags(tmp_path):
    """--preset small on the user's data: the small-data recipe for the unset flags, the paper's sizes, a given flag
    wins; the demo preset is that recipe with the demo's sizes; a --data_path run keeps the paper's recipe."""
    recipe = dict(use_bn_in_head=True, momentum_teacher=0.97, lr=0.005, warmup_epochs=1, out_dim=256,
                  teacher_temp=0.0175, warmup_teacher_temp=0.0175)
    small = parse_args(["train", "--preset", "small", "--data_path", str(tmp_path), "--teacher_temp", "0.03"])
    assert small.preset == "small" and small.teacher_temp == 0.03
    assert {k: getattr(small, k) for k in recipe if k != "teacher_temp"} == {
        k: v for k, v in recipe.items() if k != "teacher_temp"}
    assert (small.arch, small.patch_size, small.global_crops_size, small.epochs) == ("vit_small", 16, 224, 100)
    demo = parse_args(["train"])
    assert demo.preset == "demo" and {k: getattr(demo, k) for k in recipe} == recipe
    assert (demo.arch, demo.patch_size, demo.global_crops_size, demo.epochs) == ("vit_tiny", 8, 32, 4)
    paper = parse_args(["train", "--data_path", str(tmp_path)])
    assert (paper.use_bn_in_head, paper.momentum_teacher, paper.out_dim) == (False, 0.996, 65536)

# -----------------------------------------------------------------------------
# the commands: train, knn, attn, embed, linear

# We run as root: chmod cannot make a directory read-only for us. /proc refuses new entries for everyone, and a
# path under a regular file cannot be created.
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_bad_data_paths_and_output_dirs_are_one_line_errors_before_any_work(tmp_path, checkpoint, capsys):
    # output dirs: no command writes anything
    (tmp_path / "a_file").write_text("")
    weights = tmp_path / "weights.pth"
    checkpoint_file(weights, "plain")
    for out in ("/proc/dino_test_output", str(tmp_path / "a_file" / "out")):
        err = main_error(["train", "--output_dir", out], capsys)  # the demo: it would write its data there first
        assert f"--output_dir {out} is not writable" in err, err
        for command in ("knn", "attn", "linear"):  # before they extract features or train
            err = main_error([command, "--pretrained_weights", str(weights), "--arch", "vit_tiny",
                              "--output_dir", out], capsys)
            assert f"--output_dir {out} is not writable" in err, err
    assert "is a file" in main_error(["train", "--output_dir", str(tmp_path / "a_file")], capsys)
    assert sorted(os.listdir(tmp_path)) == ["a_file", "weights.pth"]  # nothing was written
    # the training data; first as a user runs it: a process that exits with status 2 after one line
    code, _, err = run_cli(train_argv(tmp_path / "missing", tmp_path / "out"))
    assert code == 2 and err.strip().count("\n") == 0 and "error: --data_path" in err and "Traceback" not in err
    assert "is not a directory" in main_error(train_argv(tmp_path / "missing", tmp_path / "out"), capsys)
    empty = image_folder(tmp_path / "empty", n=0, classes=1, bad={"notes.txt": "text"})  # a class folder, no image
    assert "holds no images" in main_error(train_argv(empty, tmp_path / "out"), capsys)
    data = image_folder(tmp_path / "data", n=4)
    assert "is a file" in main_error(train_argv(data, tmp_path / "a_file"), capsys)
    assert "not writable" in main_error(train_argv(data, tmp_path / "a_file" / "sub"), capsys)
    assert "do not fill one batch" in main_error(train_argv(data, tmp_path / "out", "--batch_size_per_gpu", "5"),
                                                 capsys)
    assert not (tmp_path / "out" / "checkpoint.pth").exists()
    # the evaluation data
    labelled = image_folder(tmp_path / "labelled", **LABELLED)
    os.rename(os.path.join(labelled, "val"), os.path.join(labelled, "validation"))
    for command, run in (("knn", knn_main), ("linear", linear_main)):
        argv = ["--data_path", labelled, "--pretrained_weights", checkpoint, "--output_dir", str(tmp_path / "eval")]
        one_line_error(lambda: run(parse(command, argv)), "no val/ folder")
    args = parse("attn", ["--pretrained_weights", checkpoint, "--arch", "vit_small", "--image_path", empty,
                          "--output_dir", str(tmp_path)])
    one_line_error(lambda: attn_main(args), "holds no images")
    image_folder(tmp_path / "notes", n=0, classes=None, bad={"notes.png": "text"})
    args.image_path = str(tmp_path / "notes" / "notes.png")
    one_line_error(lambda: attn_main(args), "not a readable image")


@pytest.mark.parametrize("major, expected", [(8, torch.bfloat16), (7, torch.float16)], ids=["A100", "V100"])
def test_precision_auto_takes_bf16_only_where_gpus_compute_it_natively(monkeypatch, major, expected):
    # A GPU of this compute capability, on which bf16 tensors can be made (emulated before capability 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: argparse.Namespace(major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    assert dino.autocast_dtype("auto", torch.device("cuda", 0)) == expected
    assert dino.autocast_dtype("auto", torch.device("cpu")) is None
    assert dino.autocast_dtype("fp16", torch.device("cuda", 0)) == torch.float16


@pytest.mark.parametrize("backend", [pytest.param("aot_eager", marks=pytest.mark.slow),
                                     pytest.param("inductor", marks=pytest.mark.gpu)])
def test_compiled_run_finishes_with_the_eager_loss(tmp_path, monkeypatch, backend):
    """--compile for one epoch, the same loss as eager. On the CPU through aot_eager (graph capture and AOT autograd,
    no code generation): inductor's CPU code generation takes 5 minutes on 2 cores and is not the GPU's anyway.
    fullgraph: a graph break in the step's forward fails the test."""
    data = image_folder(tmp_path / "data", n=4)
    dino.main(train_argv(data, tmp_path / "eager", "--epochs", "1"))
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile(fn, backend=backend, fullgraph=True))
    dino.main(train_argv(data, tmp_path / "compiled", "--epochs", "1", "--compile"))
    eager, compiled = read_log(tmp_path / "eager")[0]["loss"], read_log(tmp_path / "compiled")[0]["loss"]
    assert math.isfinite(compiled) and compiled == pytest.approx(eager, rel=1e-2 if backend == "inductor" else 1e-5)


def reference_features(model, root, split, size):
    """(L2-normalized CLS features, labels) of root/split/<class>/*, one image at a time: resize, center crop."""
    features, labels = [], []
    for label, cls in enumerate(sorted(os.listdir(os.path.join(root, split)))):
        for name in sorted(os.listdir(os.path.join(root, split, cls))):
            img = Image.open(os.path.join(root, split, cls, name)).convert("RGB")
            x = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(img)
            with torch.no_grad():
                features.append(F.normalize(model(x[None]), dim=1)[0])
            labels.append(label)
    return torch.stack(features), torch.tensor(labels)


def test_knn_every_logs_the_teachers_knn_top1(tmp_path, capsys):
    """Noise images with random labels: accuracies far from 0 and 100, checked against the saved teachers."""
    data, root = image_folder(tmp_path / "data"), tmp_path / "labelled"
    image_folder(root, n=(12, 9), classes=("a", "b", "c"), look="noise", size=(40, 36))
    dino.main(train_argv(data, tmp_path / "out", "--knn_every", "1", "--knn_data_path", str(root),
                         "--saveckp_freq", "1"))
    log = read_log(tmp_path / "out")
    assert [e["epoch"] for e in log] == [0, 1]
    assert "teacher k-NN top-1" in capsys.readouterr().out
    for e in log:
        ckpt = dino.load_checkpoint_file(tmp_path / "out" / f"checkpoint{e['epoch']:04d}.pth")
        teacher = vits.vit_tiny(patch_size=16).eval()
        teacher.load_state_dict({k.removeprefix("backbone."): v for k, v in ckpt["teacher"].items()
                                 if k.startswith("backbone.")})
        (train, train_labels), (val, val_labels) = (reference_features(teacher, root, split, 32)
                                                    for split in ("train", "val"))
        assert 0 <= e["knn_top1"] <= 100
        assert e["knn_top1"] == pytest.approx(reference_knn(train, train_labels, val, val_labels, 12, 0.07)[0])


def test_evaluation_allows_tf32_on_gpus():
    torch.backends.cuda.matmul.allow_tf32 = False  # torch_global_switches restores it
    dino.load_backbone(argparse.Namespace(arch="vit_tiny", patch_size=16), torch.device("cpu"),  # knn, attn, linear
                       pretrained=False)
    assert torch.backends.cuda.matmul.allow_tf32


def test_knn_main_demo_run_with_random_init(tmp_path, checkpoint, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["knn", "--output_dir", str(out), "--num_workers", "0"]
    with pytest.raises(DinoError, match="python dino.py train"):
        parse_args(argv)
    os.makedirs(out)
    shutil.copy(checkpoint, out / "checkpoint.pth")
    monkeypatch.setattr(dino, "make_demo_dataset", lambda root, seed: image_folder(root, **LABELLED))  # a stand-in
    args = parse_args(argv)  # the checkpoint's arch, patch size and training resolution (its args: see checkpoint)
    assert (args.arch, args.patch_size, args.crop_size, args.resize_size) == ("vit_tiny", 16, 32, 32)
    assert args.data_path == str(out / "demo_data_seed0")
    dino.main(argv)
    results = json.loads((out / "knn_results.json").read_text())["results"]
    ks = [10, 12]  # 20, 100 and 200 are capped at the 12 train images
    assert [(r["model"], r["k"]) for r in results] == [(str(out / "checkpoint.pth"), k) for k in ks] + \
        [("random init (seed 0)", k) for k in ks]
    assert results[0]["top1"] == 100.0  # the colors are trivially separable
    assert "random init (seed 0)" in capsys.readouterr().out


def test_attn_main_writes_maps(tmp_path, checkpoint, capsys):
    image = tmp_path / "gray16.png"  # a 16-bit grayscale image, not 8-bit RGB
    image_folder(tmp_path, n=0, classes=None, odd={"gray16.png": "16bit"})
    args = parse("attn", [
        "--pretrained_weights", checkpoint, "--image_path", str(image), "--image_size", "40", "72",
        "--threshold", "0.6", "--output_dir", str(tmp_path)])
    settled = dict(vars(args))
    attn_main(args)
    assert vars(args) == settled
    names = sorted(os.listdir(tmp_path / "attn"))
    assert names == sorted(["img.png", "attn-mean.png", "attn-overlay.png"] +
                           [f"{kind}-head{i}.png" for kind in ("attn", "mask") for i in range(3)])
    for name in names:  # 40 x 72 cropped to multiples of 16
        with Image.open(tmp_path / "attn" / name) as img:
            assert img.size == (64, 32) and img.mode == "RGB"
    printed = capsys.readouterr().out.splitlines()
    # 12 blocks x 12 tensors + class token, positions, patch embedding (2) and final norm (2)
    assert printed[0] == f"loaded {checkpoint}: teacher backbone, 150 tensors"
    assert sorted(printed[1:]) == [str(tmp_path / "attn" / name) for name in names]


def test_attn_demo_defaults_and_jaccard(tmp_path, checkpoint, monkeypatch, capsys):
    """On the demo: the maps of its first val image at 4x the training resolution, and the Jaccard scores of the
    trained teacher and of random init over its val images, at the training resolution (32: the checkpoint's)."""
    shutil.copy(checkpoint, tmp_path / "checkpoint.pth")
    make_demo_dataset = dino.make_demo_dataset
    monkeypatch.setattr(dino, "make_demo_dataset",
                        lambda root, seed: make_demo_dataset(root, n_train=1, n_val=2, seed=seed))
    argv = ["attn", "--output_dir", str(tmp_path)]
    args = parse_args(argv)
    assert args.image_path == str(tmp_path / "demo_data_seed0" / "val" / "cross" / "0000.png")  # the first, sorted
    assert args.image_size == [128, 128]
    dino.main(argv)
    assert sorted(os.listdir(tmp_path / "attn")) == sorted(
        ["demo_jaccard.json", "img.png", "attn-mean.png", "attn-overlay.png"] + [f"attn-head{i}.png" for i in range(3)])
    with Image.open(tmp_path / "attn" / "img.png") as img:
        assert img.size == (128, 128)
    scores = json.loads((tmp_path / "attn" / "demo_jaccard.json").read_text())
    masks = [np.asarray(Image.open(p).resize((32, 32), Image.BOX)) >= 128
             for p in sorted((tmp_path / "demo_data_seed0" / "masks" / "val").rglob("*.png"))]
    assert scores["images"] == 12 and scores["chance"] == pytest.approx(np.mean(masks))
    for name in ("trained", "random"):
        assert 0 < scores[name] <= scores[f"{name}_best_head"] <= 1
    assert "attention on the object" in capsys.readouterr().out


def test_attn_on_a_folder(tmp_path, checkpoint, capsys):
    folder = tmp_path / "images"
    image_folder(folder, names=["a.png", "sub/b.jpg"], look="noise", size=(40, 50), bad={"sub/bad.png": "text"})
    argv = ["--pretrained_weights", checkpoint, "--image_size", "32", "48"]
    attn_main(parse("attn", [*argv, "--image_path", str(folder), "--output_dir", str(tmp_path / "out")]))
    printed, err = capsys.readouterr()
    assert re.findall(r"^(\d/3) ", printed, re.M) == ["1/3", "2/3"]  # progress; the 3rd image is the bad one
    assert err.count("warning") == 1 and str(folder / "sub" / "bad.png") in err
    files = sorted(["img.png", "attn-mean.png", "attn-overlay.png"] + [f"attn-head{i}.png" for i in range(3)])
    for name in ("a", "sub/b"):  # each as the image alone would give
        assert sorted(os.listdir(tmp_path / "out" / "attn" / name)) == files
        attn_main(parse("attn", [*argv, "--image_path", str(folder / name) + (".png" if name == "a" else ".jpg"),
                                 "--output_dir", str(tmp_path / name)]))
        for f in files:
            assert (tmp_path / "out" / "attn" / name / f).read_bytes() == (tmp_path / name / "attn" / f).read_bytes()
    assert sorted(os.listdir(tmp_path / "out" / "attn")) == ["a", "sub"]
    os.remove(folder / "a.png")
    os.remove(folder / "sub" / "b.jpg")
    argv += ["--image_path", str(folder), "--output_dir", str(tmp_path / "out")]
    one_line_error(lambda: attn_main(parse("attn", argv)), "could be read")
    os.remove(folder / "sub" / "bad.png")
    one_line_error(lambda: attn_main(parse("attn", argv)), "holds no images")


def test_embed_bad_inputs(tmp_path, checkpoint, capsys):
    folder = tmp_path / "images"
    image_folder(folder, **EMBED_FOLDER)
    argv = ["embed", "--data_path", str(folder), "--pretrained_weights", checkpoint, "--num_workers", "0"]
    assert "must end in .npz (numpy) or .pt" in main_error([*argv, "--output", str(tmp_path / "e.txt")], capsys)
    assert "vit_tiny has only 12 blocks" in main_error([*argv, "--n_last_blocks", "13", "--output",
                                                         str(tmp_path / "e.pt")], capsys)
    for name in EMBED_NAMES:
        os.remove(folder / name)
    with pytest.raises(SystemExit):
        dino.main([*argv, "--crop_size", "32", "--output", str(tmp_path / "e.pt")])
    warning, error = capsys.readouterr().err.strip().split("\n")  # the file named, then one line and status 2
    assert "dogs/bad.png" in warning and error.startswith("error: no image under --data_path")
    assert not (tmp_path / "e.pt").exists()


def test_linear_probe_separates_bright_from_dark(tmp_path, checkpoint):
    data = image_folder(tmp_path / "data", n=(16, 8), classes=("bright", "dark"), look="color", size=32)
    args = parse("linear", [
        "--data_path", data, "--pretrained_weights", checkpoint, "--crop_size", "32", "--epochs", "4",
        "--batch_size_per_gpu", "4", "--lr", "1.0", "--num_workers", "0", "--output_dir", str(tmp_path)])
    assert (args.n_last_blocks, args.avgpool_patchtokens) == (4, False)  # vit_tiny: the published choice for ViT-S
    settled = dict(vars(args))
    best = linear_main(args)
    assert vars(args) == settled  # the command reads its flags, never rewrites them
    assert best["top1"] == 100.0
    saved = torch.load(tmp_path / "linear.pth", weights_only=True)
    assert saved["state_dict"]["weight"].shape == (2, 4 * 192) and saved["classes"] == ["bright", "dark"]
    assert saved["args"]["arch"] == "vit_tiny" and saved["epoch"] == 4


# -----------------------------------------------------------------------------
# the CLI

def test_recipe_defaults(tmp_path):
    args = parse_args(["train", "--data_path", str(tmp_path), "--output_dir", str(tmp_path / "out")])
    assert (args.arch, args.patch_size, args.out_dim, args.lr, args.epochs, args.batch_size_per_gpu) == \
        ("vit_small", 16, 65536, 0.0005, 100, 64)
    assert (args.momentum_teacher, args.teacher_temp, args.weight_decay, args.weight_decay_end, args.clip_grad) == \
        (0.996, 0.04, 0.04, 0.4, 3.0)
    assert (args.local_crops_number, args.global_crops_scale, args.local_crops_scale) == (8, [0.4, 1.0], [0.05, 0.4])
    assert args.freeze_last_layer == 1 and args.norm_last_layer is True
    assert args.drop_path_rate == pytest.approx(0.1)  # the student's: see test_teacher_starts_as_student_copy_...


def test_bad_flags_are_one_line_errors_before_any_work(tmp_path, capsys):
    data = image_folder(tmp_path / "data", n=4)
    out = tmp_path / "out"
    for flags, expected in [(["--batch_size_per_gpu", "0"], "--batch_size_per_gpu: must be at least 1"),
                            (["--num_workers", "-1"], "--num_workers: must be at least 0"),
                            (["--patch_size", "0"], "--patch_size: must be at least 1"),
                            (["--global_crops_size", "70"], "--global_crops_size 70 is not a multiple of --patch_size"),
                            (["--global_crops_scale", "1.5", "0.2"], "--global_crops_scale: must be in (0, 1]"),
                            (["--global_crops_scale", "0.9", "0.2"], "the smaller scale comes first"),
                            (["--lr", "-1"], "--lr: must be at least 0.0"), (["--out_dim", "1"], "at least 2"),
                            (["--teacher_temp", "0"], "--teacher_temp: must be above 0"),
                            (["--epochs", "0"], "--epochs: must be at least 1"),
                            (["--optimizer", "lars"], "lars is the published code's optimizer for convnets")]:
        assert expected in main_error(train_argv(data, out, *flags), capsys), flags
    for command, flags, expected in [("knn", ["--nb_knn", "0"], "--nb_knn: must be at least 1"),
                                     ("knn", ["--temperature", "0"], "--temperature: must be above 0"),
                                     ("linear", ["--batch_size_per_gpu", "0"], "must be at least 1")]:
        assert expected in main_error([command, "--output_dir", str(out), *flags], capsys)
    assert not out.exists()


def test_official_command_line_parses_and_acts(tmp_path):
    argv = ["train", "--arch", "deit_small", "--patch_size", "16", "--out_dim", "65536", "--norm_last_layer", "false",
            "--warmup_teacher_temp", "0.04", "--teacher_temp", "0.07", "--warmup_teacher_temp_epochs", "30",
            "--use_fp16", "false", "--weight_decay", "0.04", "--weight_decay_end", "0.4", "--clip_grad", "0",
            "--batch_size_per_gpu", "64", "--epochs", "800", "--freeze_last_layer", "1", "--lr", "0.0005",
            "--warmup_epochs", "10", "--min_lr", "1e-5", "--global_crops_scale", "0.25", "1.0", "--local_crops_scale",
            "0.05", "0.25", "--local_crops_number", "10", "--seed", "0", "--num_workers", "10", "--optimizer", "sgd",
            "--momentum_teacher", "0.996", "--drop_path_rate", "0.1", "--use_bn_in_head", "false", "--data_path",
            str(tmp_path), "--output_dir", str(tmp_path / "out"), "--saveckp_freq", "20", "--dist_url", "env://",
            "--local_rank", "0"]
    args = parse_args(argv)
    assert (args.arch, args.precision, args.optimizer, args.teacher_temp, args.local_crops_number) == \
        ("deit_small", "fp32", "sgd", 0.07, 10)
    assert args.global_crops_scale == [0.25, 1.0] and args.norm_last_layer is False and args.clip_grad == 0
    assert parse_args(argv + ["--use_fp16", "true"]).precision == "fp16"
    assert parse_args(argv + ["--local-rank=1"]).local_rank == 1
    args.arch, args.out_dim, args.local_crops_number = "deit_tiny", 32, 2
    s = dino.build_train_state(args, 1, 1, torch.device("cpu"))
    assert isinstance(s.optimizer, torch.optim.SGD) and s.optimizer.defaults["momentum"] == 0.9
    assert s.student.backbone.embed_dim == 192 and s.amp_dtype is None and not s.scaler.is_enabled()


def test_published_resnet50_command_line_builds_its_recipe(tmp_path):
    """The published README's ResNet-50 command with `dino.py train` in place of its script: SGD, lr 0.03 x total batch
    / 256, weight decay 1e-4 throughout, its crop scales (the training step: test_torchvision_resnet18_trains_...)."""
    data = image_folder(tmp_path / "data", n=2, classes=None)
    args = parse_args(["train", "--arch", "resnet50", *RESNET_RECIPE, "--data_path", data, "--num_workers", "0"])
    args.out_dim = 256  # the default 65536 builds slowly on a CPU
    s = dino.build_train_state(args, 2, 2, torch.device("cpu"))  # 2 iterations an epoch, 2 processes
    assert isinstance(s.optimizer, torch.optim.SGD) and s.optimizer.defaults["momentum"] == 0.9
    assert max(s.schedules["lr"]) == pytest.approx(0.03 * 64 * 2 / 256)  # after the 10 warm-up epochs
    assert s.schedules["wd"] == pytest.approx([1e-4] * 200)
    assert isinstance(s.student.backbone, torchvision.models.ResNet) and s.student.head.mlp[0].in_features == 2048
    crops = dino.train_loader(args, 0, 1, torch.device("cpu"), on_device=True).dataset.transform.crops
    assert crops == [(224, [0.14, 1.0])] * 2 + [(96, [0.05, 0.14])] * 8


def test_vit_only_flags_and_attn_with_a_convnet_are_one_line_errors(tmp_path, checkpoint, capsys):
    data = image_folder(tmp_path / "data", n=4)
    out = tmp_path / "out"
    train = ["train", "--data_path", data, "--output_dir", str(out), "--arch", "resnet18"]
    # given at a preset's value, or abbreviated, a flag is given all the same
    for flags, expected in [(["--patch_size", "16"], "--patch_size: for ViTs only, not --arch resnet18"),
                            (["--drop_path_rate=0.1", "--grad_checkpointing"], "--drop_path_rate --grad_checkpointing"),
                            (["--patch", "8"], "--patch_size:")]:
        assert expected in main_error(train + flags, capsys), flags
    for arch in ("resnet", "squeezenet1_0", "vit_b_16"):  # no such name; no Linear classifier; a fixed input size
        error = main_error(train + ["--arch", arch], capsys)
        assert f"invalid choice: '{arch}'" in error and "vit_small" in error and "resnext50_32x4d" in error
    # left at their defaults, the paper's or a preset's (demo: patch size 8, no drop path), they are ignored; the
    # crops need not be multiples of a patch size
    assert parse_args(train + ["--global_crops_size", "100"]).arch == "resnet18"
    assert parse_args(["train", "--arch", "resnet18", "--output_dir", str(out)]).preset == "demo"
    evaluation = ["--pretrained_weights", checkpoint, "--arch", "resnet18", "--output_dir", str(out)]
    for command, flags in [("knn", ["--patch_size", "16"]), ("linear", ["--n_last_blocks", "2"]),
                           ("linear", ["--avgpool_patchtokens", "true"]), ("embed", ["--patch_tokens"]),
                           ("embed", ["--n_last_blocks", "1"])]:
        if command == "embed":
            flags += ["--data_path", data, "--output", str(tmp_path / "e.pt")]
        assert f"{flags[0]}: for ViTs only, not --arch resnet18" in main_error([command, *evaluation, *flags], capsys)
    assert "attention maps need a ViT, not --arch resnet18" in main_error(["attn", *evaluation], capsys)


# -----------------------------------------------------------------------------
# train: the collapse alarm

def collapse_lines(out):
    return [line for line in out.splitlines() if line.startswith("warning: collapse")]


def test_collapse_alarm_names_each_collapse_and_flags_for_the_run(tmp_path, capsys):
    """The paper's two collapses, driven on tiny data by flags alone. Centering without sharpening (teacher
    temperature 10): the teacher's outputs are flat, entropy ln(out_dim), and the student follows, KL near 0:
    uniform. A sharp teacher (0.01) that follows a fast student (momentum 0.2, lr 0.05, the last layer free) in
    steps too few for the center to catch up: every image peaks on one dimension. Each epoch in that state while
    the teacher still moves prints one line naming it, with flags derived from this run's values; the run goes on
    to its last epoch. The last epoch ends the schedules (lr and the teacher's EMA step near 0: the teacher frozen) with
    the outputs still flat and the teacher's features still telling the classes apart (k-NN): no alarm there."""
    data = image_folder(tmp_path / "data")
    dino.main(train_argv(data, tmp_path / "healthy"))
    assert collapse_lines(capsys.readouterr().out) == []
    labelled = image_folder(tmp_path / "labelled", **LABELLED)
    flat = ["--teacher_temp", "10", "--warmup_teacher_temp", "10", "--knn_every", "1", "--knn_data_path", labelled]
    dino.main(train_argv(os.path.join(labelled, "train"), tmp_path / "uniform", *flat, "--epochs", "4"))
    uniform = read_log(tmp_path / "uniform")
    assert [e["epoch"] for e in uniform] == [0, 1, 2, 3]
    assert all(e["teacher_entropy"] > 0.9 * math.log(32) and e["kl"] < 0.1 * math.log(32) for e in uniform)
    # 3 iterations an epoch: the EMA step 1 - m of the last epoch's, 0.004 (1 + cos(pi j / 12)) / 2 for j = 9, 10, 11,
    # is 0.0003 in the mean, under a tenth of the first step, 0.004
    frozen = uniform[-1]
    assert frozen["teacher_step"] == pytest.approx(0.004 * (0.1464 + 0.0670 + 0.0170) / 3, abs=1e-6)
    assert frozen["lr"] < 1e-5 and frozen["knn_top1"] == 100.0
    warning = ("warning: collapse to uniform outputs (teacher entropy near ln(out_dim), KL near 0) in epoch {}; the "
               "run goes on; for this run try --use_bn_in_head true, --teacher_temp 5, --momentum_teacher 0.998")
    assert collapse_lines(capsys.readouterr().out) == [warning.format(epoch) for epoch in (0, 1, 2)]
    # a run of one epoch is all schedule: its collapse is reported
    dino.main(train_argv(os.path.join(labelled, "train"), tmp_path / "short", *flat, "--epochs", "1"))
    assert collapse_lines(capsys.readouterr().out) == [warning.format(0)]
    dino.main(train_argv(data, tmp_path / "one", "--teacher_temp", "0.01", "--warmup_teacher_temp", "0.01",
                         "--momentum_teacher", "0.2", "--lr", "0.05", "--freeze_last_layer", "0", "--epochs", "3"))
    one = read_log(tmp_path / "one")
    assert [e["epoch"] for e in one] == [0, 1, 2] and one[-1]["batch_mean_entropy"] < 0.1 * math.log(32)
    warned = [e["epoch"] for e in one if e["batch_mean_entropy"] < 0.1 * math.log(32)]
    assert collapse_lines(capsys.readouterr().out) == [
        f"warning: collapse to one dimension (batch-mean entropy near 0) in epoch {epoch}; the run goes on; for "
        f"this run try --teacher_temp 0.02, --momentum_teacher 0.6, --lr 0.025" for epoch in warned]


# -----------------------------------------------------------------------------
# bench.py

def loader_bound(burst, period, batch):
    """Batches as a DataLoader's workers make them: `burst` ready at the start (their prefetch), then one every
    `period` seconds, made in the background whether or not they are taken yet."""
    start = time.perf_counter()
    for i in itertools.count():
        time.sleep(max(0.0, start + (i - burst + 1) * period - time.perf_counter()))
        yield [torch.zeros(batch, 1)]


def test_bench_end_to_end_rate_is_the_loaders_rate():
    batch, period, burst = 8, 0.05, 4  # 2 workers prefetching 2 batches each; a step faster than the loader
    step = lambda crops: time.sleep(0.005)
    cpu = torch.device("cpu")
    measured = bench.timed_images_per_s(loader_bound(burst, period, batch), step, 2 * burst, 6, cpu)
    assert measured == pytest.approx(batch / period, rel=0.15)  # 160 images/s
    # The old timing: the clock started once warm-up batch 1 had arrived (counted), with the burst behind it.
    for i, crops in enumerate(loader_bound(burst, period, batch)):
        if i == 1:
            start = time.perf_counter()
        step(crops)
        if i == 3:  # --warmup 1 --steps 3, the CPU defaults
            break
    assert 3 * batch / (time.perf_counter() - start) > 3 * batch / period


def test_bench_train_one_epoch_is_timed_at_the_loaders_rate(monkeypatch):
    # ours end to end: dino.train_one_epoch itself over bench.Clocked, a step faster than the loader
    batch, period, burst, warmup, steps = 8, 0.05, 4, 8, 6

    class Loader:  # loader_bound with the len and batch_size that train_one_epoch reads
        batch_size = batch

        def __len__(self):
            return warmup + steps

        def __iter__(self):
            return itertools.islice(loader_bound(burst, period, batch), warmup + steps)

    def train_step(s, micro_batches, epoch, i):
        time.sleep(0.005)
        return torch.tensor(1.0)

    monkeypatch.setattr(dino, "train_step", train_step)
    loss = argparse.Namespace(center=torch.zeros(1), stats={})
    schedules = {name: [0.0] * (warmup + steps) for name in ("lr", "wd", "momentum")}
    s = argparse.Namespace(dino_loss=loss, schedules=schedules, checkpoint_path="unused")
    clocked = bench.Clocked(Loader(), warmup, torch.device("cpu"))
    stats = dino.train_one_epoch(s, clocked, 0, 1)
    assert clocked.images_per_s() == pytest.approx(batch / period, rel=0.15)  # 160 images/s
    # the epoch's own figure counts the workers' start-up burst, made before its clock's images
    assert stats["images_per_s"] > 1.2 * batch / period


def test_bench_ablation_dry_run_has_every_row_and_exact_levers(tmp_path):
    """bench.py --ablate --dry on the CPU: a row for each lever and the best combination; the levers that keep the
    maths (compile on aot_eager with fullgraph, chunked cross-entropy, photometry compiled, TF32 on a CPU) change
    the loss after one step from the same start by less than 1e-5; CUDA graphs and the GPU-only SDPA kernels are
    rows that say n/a."""
    out = tmp_path / "ablate.json"
    p = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--ablate", "--dry", "--threads", "1",
                        "--json", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]["rows"]
    for name, _ in bench.ABLATION_LEVERS:
        assert name in rows and f"| {name} |" in p.stdout, name
    best = [name for name in rows if name.startswith("best combination")]
    assert len(best) == 1 and "img_s" in rows[best[0]]
    gpu_only = {"compile + CUDA graphs": "CUDA graphs need a CUDA GPU",
                "host-to-device copy on a side stream, a step ahead": "a side stream needs a CUDA GPU"}
    for name, error in gpu_only.items():
        assert error in rows[name]["error"], name
    for name, lever in bench.ABLATION_LEVERS:
        if set(lever) & set(bench.EXACT_ON_CPU) and name not in gpu_only:
            assert rows[name]["loss_diff"] < 1e-5, name
    assert "profile of one step, default" in p.stdout and "| idle |" in p.stdout


def test_bench_chunks_lever_keeps_the_loss_and_its_gradient():
    """The bench's chunked cross-entropy (in place of dino's while the lever is set, dino's again after it) gives the
    pairwise reference's loss and gradient."""
    torch.manual_seed(0)
    ncrops, batch, K = 4, 6, 9
    student, teacher = torch.randn(ncrops * batch, K, requires_grad=True), torch.randn(2 * batch, K)
    loss_fn = dino.DINOLoss(K, ncrops, 0.04, 0.04, 0, 1)
    ref = reference_dino_loss(student, teacher, torch.zeros(1, K), ncrops, 0.1, 0.04)
    with bench.ablation_switches({"chunks": 3}):
        assert dino.cross_entropy_over_pairs is not bench.CROSS_ENTROPY_OVER_PAIRS
        loss = loss_fn(student, teacher, 0)
    assert dino.cross_entropy_over_pairs is bench.CROSS_ENTROPY_OVER_PAIRS
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(loss, student)[0], torch.autograd.grad(ref, student)[0],
                               atol=1e-6, rtol=1e-4)


def test_bench_peak_flops_from_the_device_name():
    # dense bf16 tensor-core TFLOP/s from NVIDIA's datasheets; unknown cards get none (FLOP utilization n/a)
    for name, peak in [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
                       ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA H100 NVL", None),
                       ("Tesla V100-SXM2-16GB", None), ("NVIDIA GeForce RTX 4090", None)]:
        assert bench.peak_tflops(name) == peak, name


# -----------------------------------------------------------------------------
# on a CUDA GPU only: `python -m pytest -q -m gpu` (.ci/gpu). The bf16 / fp16 steps against fp32 and the compiled
# run are the gpu cases of the tests above.

@pytest.mark.gpu
def test_gpu_photometry_equals_cpu_photometry():
    img = images(n=32)
    torch.manual_seed(0)
    params = sample_photometric_params(32, 0.5, 0.5)
    cpu = apply_photometric(img, params)
    gpu = apply_photometric(img.cuda(), {k: v.cuda() for k, v in params.items()}).cpu()
    # within half a uint8 level, PIL's own rounding (cuDNN may run the blur's convolutions in TF32)
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=0.5 / 255 / min(IMAGENET_STD))


@pytest.mark.gpu
def test_gpu_attention_runs_on_flash_or_memory_efficient_kernels():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = vits.vit_small(patch_size=16, drop_path_rate=0.1).cuda()
    # with only these allowed, SDPA raises "No available kernel" where it would fall back to the math path
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            for size in (224, 96):  # global and local crops, forward and backward
                model(torch.randn(8, 3, size, size, device="cuda")).float().sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.gpu
def test_gpu_several_processes_sync_every_batchnorm(tmp_path):
    """Several processes on CUDA: every BatchNorm, a convnet's and the head's, in the student and in the teacher,
    computes its statistics over the whole batch (SyncBatchNorm); one process keeps plain BatchNorm."""
    args = parse_args(["train", "--data_path", str(tmp_path), "--arch", "resnet18", "--out_dim", "32",
                       "--use_bn_in_head", "true"])
    for world_size, kind in ((2, nn.SyncBatchNorm), (1, nn.BatchNorm2d)):
        s = dino.build_train_state(args, 1, world_size, torch.device("cuda"))
        for network in (s.student, s.teacher):
            norms = [type(m) for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            assert len(norms) == 20 + 2 and kind in norms, (world_size, norms)  # resnet18's 20, the head's 2
            assert (nn.SyncBatchNorm in norms) == (world_size > 1)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_train_step_has_no_host_sync(tmp_path, precision):
    args = parse_args(train_argv(tmp_path, tmp_path / "out", "--precision", precision, "--freeze_last_layer", "0"))
    s = dino.build_train_state(args, 3, 1, torch.device("cuda"))
    crops = [torch.randn(4, 3, size, size, device="cuda") for size in (32, 32, 16, 16)]
    dino.train_step(s, [crops], 0, 0)  # the first step creates the optimizer state
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    try:
        losses = [dino.train_step(s, [crops], 0, i) for i in (1, 2)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(math.isfinite(loss.item()) for loss in losses)

