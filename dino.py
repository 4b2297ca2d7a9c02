"""
DINO: self-distillation with no labels (Caron et al., ICCV 2021), in one file.

    python dino.py train                       # demo: generates a small dataset, trains vit_tiny on the CPU in minutes
    python dino.py train --data_path /imagenet/train --output_dir runs/vits16   # the paper's ViT-S/16 recipe
    python dino.py knn                         # k-NN accuracy of the demo run vs random init
    python dino.py attn --image_path cat.jpg --pretrained_weights dino_deitsmall16_pretrain.pth
    python dino.py linear --data_path /imagenet --pretrained_weights runs/vits16/checkpoint.pth

Every visible CUDA GPU gets one process; under torchrun the launcher's
environment is used (multi-node); with no GPU everything runs on the CPU.
Sections: data, model glue, loss, schedules and optimization, distributed,
checkpoints, train, knn, attn, linear, CLI. Importing this file has no side effects.
"""
import argparse
import datetime
import itertools
import json
import logging
import math
import os
import pickle
import random
import re
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.datasets
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

import vision_transformer as vits


class DinoError(Exception):
    """A problem with the user's input: the CLI prints it on one line and exits with status 2."""


# -----------------------------------------------------------------------------
# data

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pil_gaussian_blur(img):
    """PIL Gaussian blur with radius (= sigma) drawn uniformly from [0.1, 2], as in the published code."""
    return img.filter(ImageFilter.GaussianBlur(radius=torch.empty(1).uniform_(0.1, 2.0).item()))


class DataAugmentationDINO:
    """The published multi-crop recipe on the CPU: PIL image -> 2 global then N local normalized tensors."""

    def __init__(self, global_crops_scale, local_crops_scale, local_crops_number,
                 global_crops_size=224, local_crops_size=96):
        bicubic = T.InterpolationMode.BICUBIC
        flip_and_color_jitter = T.Compose([
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ])
        normalize = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        global_crop = T.RandomResizedCrop(global_crops_size, scale=global_crops_scale, interpolation=bicubic)
        self.global_transfo1 = T.Compose([
            global_crop, flip_and_color_jitter, T.RandomApply([T.Lambda(_pil_gaussian_blur)], p=1.0), normalize,
        ])
        self.global_transfo2 = T.Compose([
            global_crop, flip_and_color_jitter, T.RandomApply([T.Lambda(_pil_gaussian_blur)], p=0.1),
            T.RandomSolarize(threshold=128, p=0.2), normalize,
        ])
        self.local_crops_number = local_crops_number
        self.local_transfo = T.Compose([
            T.RandomResizedCrop(local_crops_size, scale=local_crops_scale, interpolation=bicubic),
            flip_and_color_jitter, T.RandomApply([T.Lambda(_pil_gaussian_blur)], p=0.5), normalize,
        ])

    def __call__(self, image):
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        crops += [self.local_transfo(image) for _ in range(self.local_crops_number)]
        return crops


# The split path used for training: the photometric ops are the CPU bottleneck of DataAugmentationDINO, so the
# DataLoader workers only crop and flip (MultiCropGeometry) and the device applies the rest to whole batches
# (MultiCropPhotometry), with the same distributions, per sample.

def _random_resized_crop_flip(img, size, scale):
    """RandomResizedCrop(size, scale, bicubic) + RandomHorizontalFlip(0.5): uint8 [3, H, W] -> [3, size, size].

    torch's antialiased bicubic resize of uint8 images is Pillow's filter (outputs within 2 levels of PIL's),
    vectorized: about 4x faster than PIL, and resizing is most of a loader worker's time.
    """
    i, j, h, w = T.RandomResizedCrop.get_params(img, scale, ratio=(3 / 4, 4 / 3))
    crop = F.interpolate(img[None, :, i:i + h, j:j + w], size=(size, size), mode="bicubic", antialias=True)[0]
    return crop.flip(-1) if torch.rand(1) < 0.5 else crop


class MultiCropGeometry:
    """The geometric half of DataAugmentationDINO: PIL RGB image -> 2 global then N local uint8 [3, h, w] crops."""

    def __init__(self, global_crops_scale, local_crops_scale, local_crops_number,
                 global_crops_size=224, local_crops_size=96):
        self.crops = [(global_crops_size, global_crops_scale)] * 2
        self.crops += [(local_crops_size, local_crops_scale)] * local_crops_number

    def __call__(self, img):
        img = TF.pil_to_tensor(img)  # a [3, H, W] view of the HWC pixels; crops are views of it
        return [_random_resized_crop_flip(img, size, scale) for size, scale in self.crops]


# Batched photometric ops on float images [B, 3, H, W] in [0, 1] with per-sample factors [B]; each equals the
# torchvision.transforms.functional (v1) tensor op of the same name applied to every sample with its own factor.

def _per_sample(x):
    """[B] -> [B, 1, 1, 1], to broadcast per-sample factors and masks over images."""
    return x.view(-1, 1, 1, 1)


def _rgb_to_grayscale(img):
    """ITU-R 601-2 luma (torchvision's weights), [B, 1, H, W]."""
    r, g, b = img.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(img, other, factor):
    """factor * img + (1 - factor) * other, clamped to [0, 1]."""
    factor = _per_sample(factor)
    return (factor * img + (1.0 - factor) * other).clamp(0.0, 1.0)


def _rgb_to_hsv(img):
    """RGB -> HSV, all in [0, 1], as torchvision's (Pillow's) conversion."""
    r, g, b = img.unbind(dim=1)
    maxc, minc = img.amax(dim=1), img.amin(dim=1)
    delta = maxc - minc
    gray = delta == 0  # hue and saturation are 0 there; replacing the divisors by 1 avoids nan
    s = delta / torch.where(gray, torch.ones_like(maxc), maxc)
    delta = torch.where(gray, torch.ones_like(delta), delta)
    h = torch.where(maxc == r, (g - b) / delta,
                    torch.where(maxc == g, 2.0 + (b - r) / delta, 4.0 + (r - g) / delta))
    return torch.fmod(h / 6.0 + 1.0, 1.0), s, maxc


def _hsv_to_rgb(h, s, v):
    """HSV -> RGB [B, 3, H, W], the branch-free form of the sector formula."""
    k = torch.stack([(n + 6.0 * h) % 6.0 for n in (5.0, 3.0, 1.0)], dim=1)
    return v.unsqueeze(1) * (1.0 - s.unsqueeze(1) * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))


def _adjust_hue(img, factor):
    """Rotate the hue by factor (in turns, [-0.5, 0.5]) in HSV space."""
    h, s, v = _rgb_to_hsv(img)
    return _hsv_to_rgb((h + factor.view(-1, 1, 1)) % 1.0, s, v)


def _gaussian_blur(img, sigma, kernel_size):
    """Separable Gaussian blur with a per-sample sigma and reflect padding."""
    B, C, H, W = img.shape
    x = torch.arange(kernel_size, device=img.device, dtype=img.dtype) - (kernel_size - 1) / 2
    kernel = torch.exp(-0.5 * (x / sigma.view(-1, 1)).pow(2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0)  # [B * C, k]
    pad = kernel_size // 2
    # the samples' channels become the groups of one depthwise convolution
    out = F.pad(img.reshape(1, B * C, H, W), (pad, pad, 0, 0), mode="reflect")
    out = F.conv2d(out, kernel.view(B * C, 1, 1, kernel_size), groups=B * C)
    out = F.pad(out, (0, 0, pad, pad), mode="reflect")
    out = F.conv2d(out, kernel.view(B * C, 1, kernel_size, 1), groups=B * C)
    return out.view(B, C, H, W)


def _solarize(img):
    """Invert pixels >= 0.5: PIL's solarize(threshold=128) on the image rounded to uint8 (x * 255 >= 127.5)."""
    return torch.where(img >= 0.5, 1.0 - img, img)


def _normalize(img):
    """ImageNet mean/std normalization, per channel with Python scalars (no host-to-device copy)."""
    return torch.stack([(img[:, c] - m) / s for c, (m, s) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD))], dim=1)


JITTER_RANGES = ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))  # ColorJitter(0.4, 0.4, 0.2, 0.1)
BLUR_SIGMA = (0.1, 2.0)
BLUR_KERNEL_SIZE = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1  # 13: +-3 sigma of the widest blur


def _color_jitter(img, apply, order, factors):
    """Where apply, ColorJitter's ops (0 brightness, 1 contrast, 2 saturation, 3 hue) in each sample's own order
    (a permutation of 0..3) with its factors [B, 4].

    Hue, the costly op, runs once: first the blends at the positions before each sample's hue, then hue, then
    the blends after it.
    """
    hue_position = (order == 3).int().argmax(dim=1)
    for p in range(3):
        img = _jitter_blend(img, apply & (p < hue_position), order[:, p], factors)
    img = torch.where(_per_sample(apply), _adjust_hue(img, factors[:, 3]), img)
    for p in range(1, 4):
        img = _jitter_blend(img, apply & (p > hue_position), order[:, p], factors)
    return img


def _jitter_blend(img, chosen, op, factors):
    """Where chosen, torchvision's adjust_brightness (op 0), adjust_contrast (1) or adjust_saturation (2) with the
    sample's factor: a blend with black, with the mean gray level, or with the gray image."""
    gray = _rgb_to_grayscale(img)
    kind = _per_sample(op)
    other = torch.where(kind == 0, 0.0, torch.where(kind == 1, gray.mean(dim=(1, 2, 3), keepdim=True), gray))
    factor = factors.gather(1, op[:, None]).squeeze(1)
    return torch.where(_per_sample(chosen), _blend(img, other, factor), img)


def sample_photometric_params(n, blur_p, solarize_p, device=None):
    """Draws every random choice of the photometric pipeline for n samples of one view, from the global torch RNG."""
    def uniform(low, high):
        return torch.empty(n, device=device).uniform_(low, high)

    return dict(
        jitter=torch.rand(n, device=device) < 0.8,
        order=torch.rand(n, 4, device=device).argsort(dim=1),  # a random permutation per sample
        factors=torch.stack([uniform(low, high) for low, high in JITTER_RANGES], dim=1),
        grayscale=torch.rand(n, device=device) < 0.2,
        blur=torch.rand(n, device=device) < blur_p,
        sigma=uniform(*BLUR_SIGMA),
        solarize=torch.rand(n, device=device) < solarize_p,
    )


def apply_photometric(img, params):
    """Color jitter, grayscale, blur, solarize with the sampled params, then normalize: [B, 3, H, W] in [0, 1]."""
    img = _color_jitter(img, params["jitter"], params["order"], params["factors"])
    img = torch.where(_per_sample(params["grayscale"]), _rgb_to_grayscale(img).expand_as(img), img)
    img = torch.where(_per_sample(params["blur"]), _gaussian_blur(img, params["sigma"], BLUR_KERNEL_SIZE), img)
    img = torch.where(_per_sample(params["solarize"]), _solarize(img), img)
    return _normalize(img)


class MultiCropPhotometry:
    """The photometric half of DataAugmentationDINO on batches of MultiCropGeometry's uint8 crops, on their device.

    Takes the list of 2 + N uint8 batches [B, 3, h, w] and returns normalized float32 batches of the same shapes.
    No host synchronization, so on a GPU it runs asynchronously.
    """

    # (blur p, solarize p) of global view 1, global view 2, and the local views
    PROBS = ((1.0, 0.0), (0.1, 0.2), (0.5, 0.0))

    def __init__(self, local_crops_number):
        self.local_crops_number = local_crops_number

    def _augment(self, views, probs):
        """Augments a group of views sharing the same probabilities as one batch."""
        img = torch.cat(views).float().div(255)
        img = apply_photometric(img, sample_photometric_params(len(img), *probs, device=img.device))
        return list(img.split(len(views[0])))

    def __call__(self, views):
        assert len(views) == 2 + self.local_crops_number
        out = self._augment(views[:1], self.PROBS[0]) + self._augment(views[1:2], self.PROBS[1])
        if self.local_crops_number:
            out += self._augment(views[2:], self.PROBS[2])
        return out


IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def load_rgb(path):
    """Open any PIL-readable image as 8-bit RGB (16-bit and float images are rescaled, not clipped)."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            a = np.asarray(img, dtype=np.float64)
            if img.mode == "F":
                scale = max(a.max(), 1.0)
            else:  # 16-bit data, or 8-bit data stored in a 32-bit mode
                scale = 65535.0 if a.max() > 255 else 255.0
            img = Image.fromarray((np.clip(a / scale, 0, 1) * 255).round().astype(np.uint8), "L")
        return img.convert("RGB")


def list_images(root):
    """All image files under root, recursively, in a fixed order."""
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())


class ImageDataset(torch.utils.data.Dataset):
    """Every image under `root`, recursively (an ImageFolder's class folders included, labels ignored).

    An unreadable file is replaced by the next readable one and counted, so one bad
    JPEG costs a warning rather than a two-day run. Items are (transform(img), n_skipped).
    """

    def __init__(self, root, transform):
        if not os.path.isdir(root):
            raise DinoError(f"--data_path {root} is not a directory; point it at a folder of images")
        self.files = list_images(root)
        if not self.files:
            raise DinoError(f"--data_path {root} holds no images ({', '.join(IMG_EXTENSIONS)}); "
                            f"point it at a folder of images")
        self.transform = transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        for skipped in range(len(self.files)):
            path = self.files[(index + skipped) % len(self.files)]
            try:
                img = load_rgb(path)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                print(f"warning: skipping unreadable image {path}: {e}", file=sys.stderr)
                continue
            return self.transform(img), skipped
        raise DinoError(f"no image under the data path could be read (last tried: {path})")


DEMO_CLASSES = ("stripes_h", "stripes_v", "stripes_d", "checker", "rings", "dots")


# Color pairs shared by every class: color tells nothing about the class, so features must encode the shape.
DEMO_PALETTE = ((230, 60, 40), (30, 40, 120)), ((250, 220, 60), (40, 110, 50)), ((235, 235, 235), (90, 60, 140)), \
    ((70, 200, 220), (120, 40, 30))


def demo_image(cls, rng, size=64):
    """A procedural image whose class is its shape pattern, not its colors, position or scale."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    freq = rng.uniform(3, 6)
    phase = rng.uniform(0, 2 * np.pi)
    cx, cy = rng.uniform(0.2, 0.8, size=2)
    pattern = {
        "stripes_h": lambda: np.sin(2 * np.pi * freq * y + phase),
        "stripes_v": lambda: np.sin(2 * np.pi * freq * x + phase),
        "stripes_d": lambda: np.sin(2 * np.pi * freq * (x + y) / np.sqrt(2) + phase),
        "checker": lambda: np.sin(2 * np.pi * freq * x + phase) * np.sin(2 * np.pi * freq * y + phase),
        "rings": lambda: np.sin(2 * np.pi * freq * np.hypot(x - cx, y - cy) + phase),
        "dots": lambda: np.cos(2 * np.pi * freq * x + phase) + np.cos(2 * np.pi * freq * y + phase) - 1,
    }[cls]()
    fg, bg = DEMO_PALETTE[rng.integers(len(DEMO_PALETTE))]
    if rng.random() < 0.5:
        fg, bg = bg, fg
    img = np.where((pattern > 0)[..., None], fg, bg) + rng.normal(0, 12, size=(size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_demo_dataset(root, n_train=100, n_val=25, seed=0):
    """Write the demo ImageFolder (root/train/<class>, root/val/<class>) once; return root."""
    root = Path(root)
    done = root / ".complete"
    if not done.exists():
        rng = np.random.default_rng(seed)
        for split, n in (("train", n_train), ("val", n_val)):
            for cls in DEMO_CLASSES:
                (root / split / cls).mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    demo_image(cls, rng).save(root / split / cls / f"{i:04d}.png")
        done.touch()
    return str(root)


# -----------------------------------------------------------------------------
# model glue

ARCHS = {"vit_tiny": vits.vit_tiny, "vit_small": vits.vit_small, "vit_base": vits.vit_base}


def build_backbone(arch, patch_size, **kwargs):
    if arch not in ARCHS:
        raise DinoError(f"unknown --arch {arch}; choose one of {', '.join(ARCHS)}")
    return ARCHS[arch](patch_size=patch_size, **kwargs)


class MultiCropWrapper(nn.Module):
    """Backbone once per run of equal-resolution crops, head once on all of them."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops):
        if not isinstance(crops, (list, tuple)):
            crops = [crops]
        features = [self.backbone(torch.cat(list(group)))
                    for _, group in itertools.groupby(crops, key=lambda c: c.shape[-2:])]
        return self.head(torch.cat(features))


def _guess_arch(state_dict):
    """'vit_small, patch 16' from a backbone state dict, for error messages."""
    dims = {192: "vit_tiny", 384: "vit_small", 768: "vit_base"}
    try:
        dim = state_dict["cls_token"].shape[-1]
        patch = state_dict["patch_embed.proj.weight"].shape[-1]
    except (KeyError, AttributeError, IndexError):
        return None
    return f"--arch {dims.get(dim, f'(embed dim {dim})')} --patch_size {patch}"


def load_pretrained_weights(model, path, checkpoint_key=None):
    """Load a published DINO backbone, a plain state dict, or one of our training checkpoints.

    `model` is a VisionTransformer, a DINOHead or a MultiCropWrapper. From a full
    checkpoint ({'student', 'teacher', ...}) `checkpoint_key` picks the network
    (default: teacher); `module.` and `backbone.` / `head.` prefixes are stripped
    as the model needs. Any mismatch raises a one-line DinoError.
    """
    state = load_checkpoint_file(path)
    if isinstance(state, dict) and checkpoint_key is None and "teacher" in state:
        checkpoint_key = "teacher"
    if checkpoint_key is not None:
        if not isinstance(state, dict) or checkpoint_key not in state:
            keys = ", ".join(k for k in state if isinstance(state[k], dict)) if isinstance(state, dict) else ""
            raise DinoError(f"{path} has no '{checkpoint_key}' entry (it has: {keys or 'none'}); "
                            f"pass --checkpoint_key with one of those")
        state = state[checkpoint_key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DinoError(f"{path} is not a state dict of tensors; pass --checkpoint_key to pick one")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if isinstance(model, vits.VisionTransformer):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if not k.startswith("head.")}
    elif isinstance(model, vits.DINOHead):
        state = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")} or state
    model_state = model.state_dict()
    renamed = {k.replace("parametrizations.weight.original0", "weight_g")
                .replace("parametrizations.weight.original1", "weight_v"): v for k, v in state.items()}
    missing = sorted(set(model_state) - set(renamed))
    unexpected = sorted(set(renamed) - set(model_state))
    wrong_shape = [f"{k} {tuple(renamed[k].shape)} vs {tuple(model_state[k].shape)}"
                   for k in model_state if k in renamed and renamed[k].shape != model_state[k].shape]
    if missing or unexpected or wrong_shape:
        backbone_keys = {k.removeprefix("backbone."): v for k, v in renamed.items()}
        guess = _guess_arch(backbone_keys)
        problems = []
        if wrong_shape:
            problems.append(f"{len(wrong_shape)} shape mismatches (e.g. {wrong_shape[0]})")
        if missing:
            problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        hint = f"the checkpoint looks like {guess}: pass that" if guess else "check --arch and --patch_size"
        raise DinoError(f"{path} does not fit the model: {'; '.join(problems)}; {hint}")
    model.load_state_dict(state, strict=True)
    return model


# -----------------------------------------------------------------------------
# loss

class DINOLoss(nn.Module):
    """Cross-entropy between the sharpened, centered teacher and the student, over all pairs of different views.

    Each crop's log-softmax and each teacher view's softmax is computed once; the
    sum over pairs (teacher view t, student view s != t) is sum_t q_t . (sum_s log p_s - log p_t).
    """

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(max(nepochs - warmup_teacher_temp_epochs, 0)) * teacher_temp))
        self.stats = {}  # detached collapse indicators of the last call; read them only when logging

    def forward(self, student_output, teacher_output, epoch):
        temp = self.teacher_temp_schedule[min(epoch, len(self.teacher_temp_schedule) - 1)]
        log_p = F.log_softmax(student_output.float() / self.student_temp, dim=-1).unflatten(0, (self.ncrops, -1))
        log_q = F.log_softmax((teacher_output.float() - self.center) / temp, dim=-1).unflatten(0, (2, -1))
        q = log_q.exp()
        batch = q.shape[1]
        n_pairs = 2 * (self.ncrops - 1)
        cross = (q * (log_p.sum(0, keepdim=True) - log_p[:2])).sum()
        loss = -cross / (batch * n_pairs)
        self._record_stats(loss, q, log_q)
        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def _record_stats(self, loss, q, log_q):
        # The paper's collapse study: loss = h(P_t) + KL(P_t || P_s).
        teacher_entropy = -(q * log_q).sum(-1).mean()
        mean_q = q.mean(dim=(0, 1))
        self.stats = {"teacher_entropy": teacher_entropy, "kl": loss.detach() - teacher_entropy,
                      "batch_mean_entropy": -(mean_q * mean_q.clamp_min(1e-12).log()).sum()}

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = teacher_output.float().sum(dim=0, keepdim=True)
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world_size > 1:
            dist.all_reduce(batch_center)
        batch_center /= len(teacher_output) * world_size  # a Python scalar: no host-to-device copy per step
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


# -----------------------------------------------------------------------------
# schedules and optimization

def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """One value per iteration: linear warmup from start_warmup_value, then a half cosine to final_value."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, cosine))


def get_params_groups(model):
    """Weight decay on weight matrices only: none on biases, norms, tokens and other 1-D parameters."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (not_regularized if name.endswith(".bias") or param.ndim <= 1 else regularized).append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


@torch.no_grad()
def clip_gradients(params, clip):
    """Clip each parameter tensor's gradient to norm `clip` (the DINO rule), with no host sync; returns the norms."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads))
    coefs = (clip / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(coefs.unbind()))
    return norms


@torch.no_grad()
def update_teacher(student_params, teacher_params, momentum):
    """EMA: teacher <- momentum * teacher + (1 - momentum) * student, one fused op for all parameters."""
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)


# -----------------------------------------------------------------------------
# distributed

def get_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process():
    return get_rank() == 0


def init_distributed(timeout_minutes=30):
    """(rank, world_size, device). Joins the process group when launched by torchrun or `launch`."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return 0, 1, device
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if backend == "nccl" else None)
    return rank, world_size, device


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LostContactError(DinoError):
    """Another process of the group died or hung; every survivor reports it (the lost one may be rank 0)."""


def _run(fn, args):
    """fn(args), where a collective failing because another process died or hung becomes a one-line error."""
    try:
        return fn(args)
    except RuntimeError as e:  # gloo raises plain RuntimeErrors from its transport, NCCL and the store DistErrors
        if get_world_size() <= 1 or not (isinstance(e, dist.DistError) or "gloo/transport" in str(e)):
            raise
        raise LostContactError(f"lost contact with another training process ({_first_line(e)}); "
                               f"rerun the same command to resume from the last checkpoint") from None


def _spawned_worker(local_rank, fn, args, world_size, errors):
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size))
    try:
        _run(fn, args)
    except DinoError as e:  # the message goes to the launching process, which prints it once (not a traceback)
        errors.put(str(e))
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn, args):
    """Run fn(args) in one process per visible GPU, or once (under torchrun, or on one GPU / the CPU)."""
    n_gpus = torch.cuda.device_count()
    if "RANK" in os.environ or n_gpus <= 1:
        return _run(fn, args)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    errors = torch.multiprocessing.get_context("spawn").SimpleQueue()
    # spawn warns "Terminating process ... via signal SIGTERM" as it stops the others when one fails: noise there
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    try:
        torch.multiprocessing.spawn(_spawned_worker, args=(fn, args, n_gpus, errors), nprocs=n_gpus)
    except torch.multiprocessing.ProcessExitedException as e:  # a worker's exception (a bug) keeps its traceback
        if not errors.empty():
            raise DinoError(errors.get()) from None
        if e.signal_name:
            raise DinoError(f"training process {e.error_index} was killed by {e.signal_name}; "
                            f"rerun the same command to resume from the last checkpoint") from None
        raise


# -----------------------------------------------------------------------------
# checkpoints

def load_checkpoint_file(path):
    """torch.load that never runs code from the file and fails with one line naming the file."""
    path = str(path)
    if not os.path.isfile(path):
        raise DinoError(f"checkpoint {path} does not exist; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # the weights_only unpickler names the class or function it refused with "GLOBAL"
        if "global" in str(e).lower():
            raise DinoError(f"refusing to load {path}: it holds Python objects beyond tensors and plain data, "
                            f"and unpickling them could run code; re-save it as a plain state dict") from None
        raise DinoError(f"{path} is not a readable checkpoint (truncated or corrupt); re-download or delete it") \
            from None
    except Exception as e:  # garbage makes the unpickler fail in many ways (KeyError, IndexError, struct.error...)
        detail = _first_line(e) if isinstance(e, RuntimeError) else type(e).__name__  # torch's zip reader explains
        raise DinoError(f"{path} is not a readable checkpoint (truncated or corrupt: {detail}); "
                        f"re-download or delete it") from None


def _first_line(e):
    """An exception's message without paths, hints and tracebacks: its first line, else its type name."""
    lines = str(e).strip().splitlines()
    if not lines:
        return type(e).__name__
    return re.sub(r"^\[[^\]]*\]\s*", "", lines[0]).split(". ")[0]  # gloo prefixes [file.cc:line], then advice


def save_checkpoint(state, path):
    """Write to a temporary file, flush to disk, then rename: a crash never leaves a half-written checkpoint."""
    tmp = f"{path}.tmp"  # not per process: a killed save leaves one stale file that the next save replaces
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -----------------------------------------------------------------------------
# train

class MultiCropCollate:
    """Stack the i-th crop of every sample into batch i; on the CPU path also run the photometric augmentation here, in the loader workers."""

    def __init__(self, photometry=None):
        self.photometry = photometry

    def __call__(self, items):
        crops = [torch.stack(views) for views in zip(*(views for views, _ in items))]
        if self.photometry is not None:
            crops = self.photometry(crops)
        return crops, sum(skipped for _, skipped in items)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_output_dir(path):
    """Create the output dir and prove it is writable, before any work starts."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except FileExistsError:
        raise DinoError(f"--output_dir {path} is a file, not a directory; pass a directory path") from None
    except OSError as e:
        raise DinoError(f"--output_dir {path} is not writable ({e.strerror}); pass a writable directory") from None


def build_dino_networks(args):
    """Student (with drop path) and teacher (a copy without it), each backbone + DINO head."""
    student = build_backbone(args.arch, args.patch_size, drop_path_rate=args.drop_path_rate)
    teacher = build_backbone(args.arch, args.patch_size)
    embed_dim = student.embed_dim
    student = MultiCropWrapper(student, vits.DINOHead(embed_dim, args.out_dim, args.use_bn_in_head,
                                                      args.norm_last_layer))
    teacher = MultiCropWrapper(teacher, vits.DINOHead(embed_dim, args.out_dim, args.use_bn_in_head))
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)  # the teacher only ever moves by EMA
    return student, teacher


def build_loader(args, worker_photometry, rank, world_size):
    """Crops (and, without a GPU, the photometric augmentation) in the workers; batches of uint8 or float crops."""
    geometry = MultiCropGeometry(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                                 args.global_crops_size, args.local_crops_size)
    dataset = ImageDataset(args.data_path, geometry)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                                  seed=args.seed)
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=args.batch_size_per_gpu, num_workers=args.num_workers,
        pin_memory=torch.cuda.is_available(), drop_last=True, persistent_workers=args.num_workers > 0,
        collate_fn=MultiCropCollate(worker_photometry))
    if len(loader) == 0:
        raise DinoError(f"{len(dataset)} images split over {world_size} process(es) do not fill one batch of "
                        f"--batch_size_per_gpu {args.batch_size_per_gpu}; lower it or add images")
    return loader, sampler


STRUCTURAL_FLAGS = ("arch", "patch_size", "out_dim", "norm_last_layer", "use_bn_in_head")
TRAINING_STATE = ("student", "teacher", "optimizer", "dino_loss", "epoch")  # what save_epoch writes and resume needs


def restore_training(path, args, student, teacher, optimizer, scaler, dino_loss):
    """Resume from `path` if it exists; returns the epoch to start at."""
    log = os.path.join(os.path.dirname(path), "log.txt")
    if not os.path.exists(path):
        if is_main_process():
            trim_log(log, 0)  # lines of a run killed before its first checkpoint
        return 0
    fresh = "to start fresh, move it away or pass another --output_dir"
    try:
        ckpt = load_checkpoint_file(path)
    except DinoError as e:
        raise DinoError(f"cannot resume: {e}; {fresh}") from None
    missing = [k for k in TRAINING_STATE if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise DinoError(f"cannot resume: {path} is not a training checkpoint (no {', '.join(missing)}); {fresh}")
    old = ckpt.get("args", {})
    clash = [f"--{k} {old[k]} (now {getattr(args, k)})" for k in STRUCTURAL_FLAGS
             if k in old and old[k] != getattr(args, k)]
    if clash:
        raise DinoError(f"{path} was trained with {', '.join(clash)}; pass the checkpoint's flags, "
                        f"or another --output_dir to start fresh")
    changed = [f"{k} {old[k]} -> {v}" for k, v in vars(args).items() if k in old and old[k] != v]
    if changed and is_main_process():
        print(f"resuming with changed flags: {', '.join(changed)}")
    student.load_state_dict(ckpt["student"])
    teacher.load_state_dict(ckpt["teacher"])
    optimizer.load_state_dict(ckpt["optimizer"])
    dino_loss.load_state_dict(ckpt["dino_loss"])
    if scaler is not None and "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    if is_main_process():
        print(f"resumed from {path} at epoch {ckpt['epoch']}")
        trim_log(log, ckpt["epoch"])
        if ckpt["epoch"] >= args.epochs:
            print(f"the checkpoint has all {args.epochs} epochs already: nothing to train; "
                  f"pass a larger --epochs to train longer")
    return ckpt["epoch"]


def trim_log(path, epoch):
    """Drop the log.txt lines of epochs >= `epoch`, which the checkpoint lacks: a run killed after logging an epoch
    but before saving it redoes that epoch and logs it again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if _logged_epoch(line) < epoch]
    if len(kept) < len(lines):
        with open(f"{path}.tmp", "w") as f:
            f.writelines(kept)
        os.replace(f"{path}.tmp", path)
        print(f"dropped {len(lines) - len(kept)} line(s) of {path} for epochs the checkpoint does not hold")


def _logged_epoch(line):
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):  # a line cut short
        return math.inf


def plain_args(args):
    """argparse Namespace -> dict of plain values, safe for weights_only loading."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}


def autocast_dtype(precision, device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else \
            "fp16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def train(args):
    rank, world_size, device = init_distributed(args.dist_timeout)
    if is_main_process():
        prepare_output_dir(args.output_dir)
    seed_everything(args.seed)  # same initial weights on every rank
    amp_dtype = autocast_dtype(args.precision, device)
    # colour, blur and solarize run batched on the GPU; without one, in the loader workers
    photometry = MultiCropPhotometry(args.local_crops_number)
    device_photometry = photometry if device.type == "cuda" else None
    loader, sampler = build_loader(args, None if device_photometry else photometry, rank, world_size)

    student, teacher = build_dino_networks(args)
    if args.use_bn_in_head and world_size > 1:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    student, teacher = student.to(device), teacher.to(device)
    ddp_student = nn.parallel.DistributedDataParallel(student) if world_size > 1 else student
    optimizer = torch.optim.AdamW(get_params_groups(student), fused=True)  # one kernel for all parameters, CPU or GPU
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    ncrops = 2 + args.local_crops_number
    dino_loss = DINOLoss(args.out_dim, ncrops, args.warmup_teacher_temp, args.teacher_temp,
                         args.warmup_teacher_temp_epochs, args.epochs).to(device)

    n_iter = len(loader)
    total_batch = args.batch_size_per_gpu * world_size
    schedules = {  # .tolist(): plain floats, so the optimizer state stays loadable with weights_only
        "lr": cosine_scheduler(args.lr * total_batch / 256.0, args.min_lr, args.epochs, n_iter,
                               args.warmup_epochs).tolist(),
        "wd": cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, n_iter).tolist(),
        "momentum": cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, n_iter).tolist(),
    }
    checkpoint_path = os.path.join(args.output_dir, "checkpoint.pth")
    start_epoch = restore_training(checkpoint_path, args, student, teacher, optimizer, scaler, dino_loss)
    step_fn = make_train_step(ddp_student, student, teacher, dino_loss, optimizer, scaler, amp_dtype, args)
    if is_main_process():
        print(f"training {args.arch}/{args.patch_size} on {len(loader.dataset)} images, {world_size} process(es) on "
              f"{device.type}, batch {total_batch}, {n_iter} it/epoch, precision {args.precision}")

    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        seed_everything(args.seed + 1000 * epoch + rank)  # augmentations and drop path differ per rank, replay on resume
        stats = train_one_epoch(step_fn, loader, device_photometry, schedules,
                                optimizer, dino_loss, epoch, n_iter, args, device)
        if is_main_process():
            save_epoch(args, epoch, stats, student, teacher, optimizer, scaler, dino_loss)
    if world_size > 1:
        dist.barrier()
    return student, teacher, dino_loss


def make_train_step(ddp_student, student, teacher, dino_loss, optimizer, scaler, amp_dtype, args):
    """One iteration of the paper's Algorithm 1, returning the loss as a device tensor (no host sync)."""
    student_params, teacher_params = list(student.parameters()), list(teacher.parameters())
    last_layer_params = list(student.head.last_layer.parameters())
    if args.compile:
        ddp_student, teacher = torch.compile(ddp_student), torch.compile(teacher)

    def step(crops, epoch, momentum):
        device_type = crops[0].device.type
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            with torch.no_grad():
                teacher_output = teacher(crops[:2])  # the teacher sees only the 2 global views
            student_output = ddp_student(crops)
            loss = dino_loss(student_output, teacher_output, epoch)  # also moves the center
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if args.clip_grad:
            clip_gradients(student_params, args.clip_grad)
        if epoch < args.freeze_last_layer:  # a fixed last layer early on keeps training from collapsing
            for p in last_layer_params:
                p.grad = None
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        update_teacher(student_params, teacher_params, momentum)
        return loss.detach()

    return step


def stop_if_not_finite(bad_iter, epoch, args):
    """Check, at log intervals only, whether any loss so far was inf/nan; then stop every rank."""
    if get_world_size() > 1:
        dist.all_reduce(bad_iter, op=dist.ReduceOp.MAX)
    if bad_iter.item() >= 0:
        raise DinoError(f"loss is not finite at epoch {epoch}, iteration {bad_iter.item()}; nothing was saved since, "
                        f"{os.path.join(args.output_dir, 'checkpoint.pth')} holds the last good state. Try "
                        f"--precision fp32, a lower --lr, or a larger --freeze_last_layer")


def train_one_epoch(step, loader, photometry, schedules, optimizer, dino_loss, epoch, n_iter, args, device):
    sums = {}
    skipped = 0
    bad_iter = torch.tensor(-1, device=device)
    start = time.time()
    for it, (crops, n_skipped) in enumerate(loader):
        i = epoch * n_iter + it
        for group in optimizer.param_groups:
            group["lr"] = schedules["lr"][i]
        optimizer.param_groups[0]["weight_decay"] = schedules["wd"][i]  # group 0 is the regularized one
        crops = [c.to(device, non_blocking=True) for c in crops]
        if photometry is not None:  # GPU path: colour, blur, solarize batched on the device
            crops = photometry(crops)
        loss = step(crops, epoch, schedules["momentum"][i])

        bad_iter = torch.where((bad_iter < 0) & ~torch.isfinite(loss), it, bad_iter)
        for k, v in {"loss": loss, **dino_loss.stats}.items():
            sums[k] = sums.get(k, 0.0) + v
        skipped += n_skipped
        if (it + 1) % args.log_every == 0 or it + 1 == n_iter:
            stop_if_not_finite(bad_iter, epoch, args)
            if is_main_process():
                elapsed = time.time() - start
                eta = elapsed / (it + 1) * ((args.epochs - epoch) * n_iter - it - 1)
                print(f"epoch {epoch}/{args.epochs} it {it + 1}/{n_iter} loss {sums['loss'].item() / (it + 1):.4f} "
                      f"lr {schedules['lr'][i]:.2e} wd {schedules['wd'][i]:.3f} "
                      f"momentum {schedules['momentum'][i]:.4f} "
                      f"{(it + 1) * len(crops[0]) * get_world_size() / elapsed:.1f} img/s "
                      f"eta {datetime.timedelta(seconds=int(eta))}", flush=True)
    means = torch.stack([sums[k] for k in sums]).float() / n_iter
    skipped_total = torch.tensor(float(skipped), device=device)
    if get_world_size() > 1:
        dist.all_reduce(means)
        means /= get_world_size()
        dist.all_reduce(skipped_total)
    stats = {k: v.item() for k, v in zip(sums, means)}
    elapsed = time.time() - start
    stats.update(epoch=epoch, lr=schedules["lr"][i], wd=schedules["wd"][i], momentum=schedules["momentum"][i],
                 images_per_s=n_iter * len(crops[0]) * get_world_size() / elapsed, epoch_time_s=elapsed,
                 skipped_images=int(skipped_total.item()))
    return stats


def save_epoch(args, epoch, stats, student, teacher, optimizer, scaler, dino_loss):
    """Append one JSON line to log.txt, checkpoint (atomically), and warn when the stats show collapse.

    checkpoint.pth is written last: a run killed before it redoes this epoch on resume, and trim_log drops the
    line logged here, so log.txt, checkpointNNNN.pth and checkpoint.pth always agree.
    """
    state = {"student": student.state_dict(), "teacher": teacher.state_dict(), "optimizer": optimizer.state_dict(),
             "dino_loss": dino_loss.state_dict(), "epoch": epoch + 1, "args": plain_args(args)}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
        f.write(json.dumps(stats) + "\n")
    if args.saveckp_freq and epoch % args.saveckp_freq == 0:
        save_checkpoint(state, os.path.join(args.output_dir, f"checkpoint{epoch:04d}.pth"))
    save_checkpoint(state, os.path.join(args.output_dir, "checkpoint.pth"))
    print(f"epoch {epoch} done: loss {stats['loss']:.4f}, teacher entropy {stats['teacher_entropy']:.3f}, "
          f"KL {stats['kl']:.3f}, batch-mean entropy {stats['batch_mean_entropy']:.3f} "
          f"(max {math.log(args.out_dim):.3f}), {stats['skipped_images']} unreadable images skipped", flush=True)
    if stats["kl"] < 1e-3 or abs(stats["loss"] - math.log(args.out_dim)) < 1e-3 * math.log(args.out_dim):
        print(f"warning: the outputs look collapsed (KL(teacher||student) {stats['kl']:.2e}, loss {stats['loss']:.3f} "
              f"vs ln(out_dim) {math.log(args.out_dim):.3f}); try a lower --teacher_temp, a higher "
              f"--momentum_teacher (e.g. 0.9995 with small batches), or a larger batch", flush=True)


# -----------------------------------------------------------------------------
# evaluation plumbing shared by knn, attn and linear

def add_model_args(p):
    p.add_argument("--pretrained_weights", default=None, help="a backbone state dict, a published DINO "
                   "checkpoint or one of our training checkpoints; default: <output_dir>/checkpoint.pth")
    p.add_argument("--checkpoint_key", default=None, help="network to take from a training checkpoint "
                   "(default: teacher)")
    p.add_argument("--arch", default=None, choices=list(ARCHS), help="default: the checkpoint's, else vit_small")
    p.add_argument("--patch_size", type=int, default=None, help="default: the checkpoint's, else 16")
    p.add_argument("--output_dir", default="output", help="the training run to evaluate (its checkpoint.pth "
                   "and demo_data/ are the defaults); results are written here (attention maps in attn/)")


def resolve_weights(args):
    """Default to the run in --output_dir; returns the flags it was trained with ({} for other weights)."""
    if args.pretrained_weights is None:
        args.pretrained_weights = os.path.join(args.output_dir, "checkpoint.pth")
        if not os.path.isfile(args.pretrained_weights):
            raise DinoError(f"no --pretrained_weights given and no trained run at {args.pretrained_weights}; "
                            f"run `python dino.py train` first, or pass --pretrained_weights")
    ckpt = load_checkpoint_file(args.pretrained_weights)
    train_args = ckpt.get("args") if isinstance(ckpt, dict) else None
    train_args = train_args if isinstance(train_args, dict) else {}
    # The checkpoint knows its architecture; --arch / --patch_size are only needed for other weights.
    args.arch = args.arch or train_args.get("arch", RECIPE["arch"])
    args.patch_size = args.patch_size or train_args.get("patch_size", RECIPE["patch_size"])
    prepare_output_dir(args.output_dir)  # knn, attn and linear write there (and the demo data): fail before any work
    return train_args


def load_backbone(args, device, pretrained=True):
    """The frozen backbone in eval mode: --pretrained_weights, or a random init (seed 0) as a baseline."""
    if not pretrained:
        torch.manual_seed(0)
    model = build_backbone(args.arch, args.patch_size)
    if pretrained:
        load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key)
    return model.eval().requires_grad_(False).to(device)


def demo_data(args):
    return make_demo_dataset(os.path.join(args.output_dir, "demo_data"))


def add_data_args(p):
    p.add_argument("--data_path", default=None, help="folder holding train/<class>/ and val/<class>/ images; "
                   "default: the demo data of --output_dir")
    p.add_argument("--resize_size", type=int, default=None, help="shorter side before the center crop "
                   "(default: crop_size * 256 / 224; the demo: crop_size)")
    p.add_argument("--crop_size", type=int, default=None, help="side of the images fed to the model "
                   "(default 224; the demo: its global crop size)")
    p.add_argument("--num_workers", type=int, default=None, help="data loader processes per GPU")


def resolve_data(args, train_args):
    """--data_path (the demo data when unset), its image sizes and loader workers."""
    args.demo = args.data_path is None
    if args.demo:
        args.data_path = demo_data(args)
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(args.data_path, split)):
            raise DinoError(f"--data_path {args.data_path} has no {split}/ folder; it must hold "
                            f"train/<class>/ and val/<class>/ image folders")
    # The demo is evaluated at the resolution it was trained at; otherwise the paper's 256 -> 224 center crop.
    args.crop_size = args.crop_size or (train_args.get("global_crops_size", DEMO["global_crops_size"])
                                        if args.demo else 224)
    args.resize_size = args.resize_size or (args.crop_size if args.demo else round(args.crop_size * 256 / 224))
    if args.crop_size % args.patch_size:
        raise DinoError(f"--crop_size {args.crop_size} is not a multiple of --patch_size {args.patch_size}")
    if args.num_workers is None:
        args.num_workers = (DEMO if args.demo else RECIPE)["num_workers"]
    if args.demo:
        print(f"no --data_path: evaluating {args.pretrained_weights} ({args.arch}/{args.patch_size}) on the demo "
              f"data in {args.data_path} at {args.crop_size} pixels")


def eval_transform(resize_size, crop_size):
    return T.Compose([T.Resize(resize_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(crop_size),
                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def image_folders(data_path, train_transform, val_transform):
    """ImageFolders data_path/train and data_path/val; their class folders must match, or labels would differ."""
    folders = []
    for split, transform in (("train", train_transform), ("val", val_transform)):
        root = os.path.join(data_path, split)
        try:
            folders.append(torchvision.datasets.ImageFolder(root, transform, loader=load_rgb))
        except FileNotFoundError as e:  # no class folders, or a class folder without images
            raise DinoError(f"{root}: {e}") from None
    train, val = folders
    if train.classes != val.classes:
        differ = sorted(set(train.classes) ^ set(val.classes))
        raise DinoError(f"train/ and val/ of {data_path} must hold the same class folders "
                        f"({len(train.classes)} vs {len(val.classes)}; e.g. {differ[0]} is in only one)")
    return train, val


def shard(dataset):
    """This process's contiguous slice of dataset: sizes differ by at most one, nothing padded or repeated."""
    rank, world_size, n = get_rank(), get_world_size(), len(dataset)
    return torch.utils.data.Subset(dataset, range(n * rank // world_size, n * (rank + 1) // world_size))


# -----------------------------------------------------------------------------
# knn

@torch.no_grad()
def knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes=1000,
                   chunk_size=256):
    """Weighted k-NN accuracy (top-1, top-5) in percent, as in the paper.

    Each of the k most similar train features votes for its label with weight exp(cos_sim / T); the
    features must be L2-normalized, so dot products are cosine similarities. Test features are taken
    chunk_size at a time: memory is chunk_size x len(train), never test x train.
    """
    train_labels = train_labels.long()
    hits1 = hits5 = 0
    for i in range(0, len(test_labels), chunk_size):
        sims, idx = (test_features[i:i + chunk_size] @ train_features.T).topk(k, dim=1)
        votes = torch.zeros(len(idx), num_classes, dtype=sims.dtype, device=sims.device)
        votes.scatter_add_(1, train_labels[idx], (sims / T).exp())
        # A class no neighbour voted for is no hit, even within the top 5 (its rank among zeros is arbitrary).
        scores, preds = votes.topk(min(5, num_classes), dim=1)
        hits = (preds == test_labels[i:i + chunk_size, None]) & (scores > 0)
        hits1 += hits[:, 0].sum().item()
        hits5 += hits.any(dim=1).sum().item()
    return 100.0 * hits1 / len(test_labels), 100.0 * hits5 / len(test_labels)


@torch.no_grad()
def extract_features(model, dataset, batch_size, num_workers, device):
    """L2-normalized float32 CLS features of every image, in dataset order, on the CPU of every process.

    Each process embeds its contiguous shard (no padding, so no image counts twice when len(dataset)
    is not a multiple of the world size) and the shards are gathered back in rank order.
    """
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(shard(dataset), batch_size=batch_size, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    features = [F.normalize(model(images.to(device, non_blocking=True)).float(), dim=1).cpu()
                for images, _ in loader]
    if get_world_size() > 1:
        # Object gather: shards differ in length (one may be empty), so no padding bookkeeping is needed.
        shards = [None] * get_world_size()
        dist.all_gather_object(shards, features)
        features = [f for s in shards for f in s]
    return torch.cat(features)


def add_knn_args(p):
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--nb_knn", type=int, nargs="+", default=[10, 20, 100, 200], help="numbers of neighbours k")
    p.add_argument("--temperature", type=float, default=0.07, help="votes weigh exp(cos_sim / temperature)")
    p.add_argument("--batch_size_per_gpu", type=int, default=128)
    p.add_argument("--dump_features", default=None, help="also save the features and labels in this folder")
    p.add_argument("--load_features", default=None, help="use the features saved by --dump_features in this "
                   "folder instead of computing them (no model or images needed)")


def resolve_knn_args(args):
    """Fill the flags left at None (see resolve_weights and resolve_data)."""
    args.demo = False
    if args.load_features is None:
        resolve_data(args, resolve_weights(args))
    return args


FEATURE_FILES = ("trainfeat", "trainlabels", "testfeat", "testlabels")  # the published eval_knn.py names


def load_features(folder):
    return tuple(load_checkpoint_file(os.path.join(folder, f"{name}.pth")) for name in FEATURE_FILES)


def knn_main(args):
    """k-NN accuracy for every k in --nb_knn; on the demo data also of a random init, to show what training bought."""
    _, _, device = init_distributed()
    if args.load_features:
        runs = {args.load_features: load_features(args.load_features)}
    else:
        transform = eval_transform(args.resize_size, args.crop_size)
        train_set, val_set = image_folders(args.data_path, transform, transform)
        train_labels, val_labels = torch.tensor(train_set.targets), torch.tensor(val_set.targets)
        models = [(args.pretrained_weights, True)]
        if args.demo:
            models.append(("random init (seed 0)", False))
        runs = {}
        for name, pretrained in models:
            model = load_backbone(args, device, pretrained)
            runs[name] = (extract_features(model, train_set, args.batch_size_per_gpu, args.num_workers, device),
                          train_labels,
                          extract_features(model, val_set, args.batch_size_per_gpu, args.num_workers, device),
                          val_labels)
        if args.dump_features and is_main_process():
            os.makedirs(args.dump_features, exist_ok=True)
            for name, tensor in zip(FEATURE_FILES, runs[args.pretrained_weights]):
                torch.save(tensor, os.path.join(args.dump_features, f"{name}.pth"))
    if not is_main_process():
        return
    rows = []
    for name, (train_features, train_labels, test_features, test_labels) in runs.items():
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
        # k cannot exceed the number of train images; small data sets get all of them as neighbours.
        for k in sorted({min(k, len(train_labels)) for k in args.nb_knn}):
            top1, top5 = knn_classifier(train_features.to(device), train_labels.to(device),
                                        test_features.to(device), test_labels.to(device), k,
                                        args.temperature, num_classes)
            rows.append(dict(model=name, k=k, top1=top1, top5=top5))
    print(f"weighted k-NN, T={args.temperature}, {len(train_labels)} train / {len(test_labels)} val images")
    width = max(len(r["model"]) for r in rows)
    print(f"{'model':<{width}}  {'k':>4}  {'top-1':>6}  {'top-5':>6}")
    for r in rows:
        print(f"{r['model']:<{width}}  {r['k']:>4}  {r['top1']:6.2f}  {r['top5']:6.2f}")
    prepare_output_dir(args.output_dir)
    path = os.path.join(args.output_dir, "knn_results.json")
    with open(path, "w") as f:
        json.dump({"args": plain_args(args), "results": rows}, f, indent=1)
    print(f"wrote {path}")


# -----------------------------------------------------------------------------
# attn

@torch.no_grad()
def attention_maps(model, img):
    """Last block's CLS-to-patch attention for one normalized image [3, H, W] -> [heads, H/p, W/p]."""
    p = model.patch_size
    attn = model.get_last_selfattention(img[None])  # [1, heads, N, N], token 0 is CLS
    return attn[0, :, 0, 1:].reshape(-1, img.shape[-2] // p, img.shape[-1] // p)


def threshold_masks(maps, threshold):
    """Per head, the smallest set of patches holding at least `threshold` of the attention mass (the paper's figure).

    Patches are taken in decreasing attention until the mass reaches the threshold: a patch is kept
    when the mass of the larger ones before it is still short of it.
    """
    flat = maps.flatten(1).double()  # double: the kept mass is compared to the threshold exactly
    values, order = flat.sort(dim=1, descending=True)
    mass_before = (values.cumsum(1) - values) / values.sum(1, keepdim=True)
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, mass_before < threshold)
    return keep.reshape(maps.shape)


# viridis at 0, 1/8, ..., 1: heat maps without a matplotlib dependency
VIRIDIS = np.array([[68, 1, 84], [71, 44, 123], [59, 82, 139], [44, 114, 142], [33, 145, 140],
                    [40, 174, 128], [94, 201, 98], [170, 220, 50], [253, 231, 37]], dtype=np.float64)


def colorize(a):
    """2-D array -> uint8 RGB image [H, W, 3], min-max normalized through the viridis colormap."""
    a = np.asarray(a, dtype=np.float64)
    a = (a - a.min()) / max(a.max() - a.min(), 1e-12)
    anchors = np.linspace(0, 1, len(VIRIDIS))
    rgb = np.stack([np.interp(a, anchors, VIRIDIS[:, c]) for c in range(3)], axis=-1)
    return rgb.round().astype(np.uint8)


def prepare_image(img, image_size, patch_size):
    """Resize a PIL image to image_size (H, W) and crop it to patch multiples: (PIL image, normalized tensor)."""
    h, w = image_size
    img = img.resize((w, h), Image.BICUBIC).crop((0, 0, w - w % patch_size, h - h % patch_size))
    return img, T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(img)


def save_attention_images(img, maps, masks, patch_size, out_dir):
    """Write the image, per-head heat maps, their mean, an overlay and the threshold masks; return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    up = lambda m: np.asarray(m).repeat(patch_size, axis=0).repeat(patch_size, axis=1)  # nearest, patch -> pixels
    image = np.asarray(img)
    mean = colorize(up(maps.mean(0)))
    pictures = [("img.png", image)] + [(f"attn-head{i}.png", colorize(up(m))) for i, m in enumerate(maps)]
    pictures += [("attn-mean.png", mean), ("attn-overlay.png", (image * 0.5 + mean * 0.5).round().astype(np.uint8))]
    if masks is not None:  # the image, darkened outside each head's mask
        pictures += [(f"mask-head{i}.png", (image * np.where(up(m), 1.0, 0.25)[..., None]).round().astype(np.uint8))
                     for i, m in enumerate(masks)]
    paths = []
    for name, array in pictures:
        paths.append(os.path.join(out_dir, name))
        Image.fromarray(array).save(paths[-1])
    return paths


def add_attn_args(p):
    add_model_args(p)
    p.add_argument("--image_path", default=None, help="any image PIL reads; default: the first demo val image")
    p.add_argument("--image_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="resize to this before cropping to patch multiples (default 480 480; the demo: 4x its "
                        "global crop size)")
    p.add_argument("--threshold", type=float, default=None, help="also write per-head masks keeping the "
                   "smallest set of patches that holds this fraction of the attention mass (e.g. 0.6)")


def resolve_attn_args(args):
    """Fill the flags left at None; the maps are written to <output_dir>/attn."""
    train_args = resolve_weights(args)
    if args.image_path is None:
        args.image_path = str(list_images(os.path.join(demo_data(args), "val"))[0])
        # Bigger than the demo's training crops, as the paper draws 224-trained maps at 480: finer maps.
        args.image_size = args.image_size or [4 * train_args.get("global_crops_size", DEMO["global_crops_size"])] * 2
    args.image_size = args.image_size or [480, 480]
    if min(args.image_size) < args.patch_size:
        raise DinoError(f"--image_size {args.image_size[0]} {args.image_size[1]} is smaller than one "
                        f"{args.patch_size}-pixel patch")
    if args.threshold is not None and not 0 < args.threshold <= 1:
        raise DinoError(f"--threshold {args.threshold} is not a fraction of the attention mass in (0, 1]")
    return args


def attn_main(args):
    """Attention maps of the last block's heads for one image; one process (device: first GPU, else CPU)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        img = load_rgb(args.image_path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DinoError(f"--image_path {args.image_path} is not a readable image ({str(e).splitlines()[0]})") from None
    img, x = prepare_image(img, args.image_size, args.patch_size)
    model = load_backbone(args, device)
    maps = attention_maps(model, x.to(device)).float().cpu()
    masks = None if args.threshold is None else threshold_masks(maps, args.threshold)
    for path in save_attention_images(img, maps, masks, args.patch_size, os.path.join(args.output_dir, "attn")):
        print(path)


# -----------------------------------------------------------------------------
# linear

def linear_features(model, images, n_last_blocks, avgpool_patchtokens):
    """Frozen features for the probe: CLS tokens of the last n blocks [+ the last block's mean patch token]."""
    blocks = model.get_intermediate_layers(images, n_last_blocks)
    features = [x[:, 0] for x in blocks]
    if avgpool_patchtokens:
        features.append(blocks[-1][:, 1:].mean(dim=1))
    return torch.cat(features, dim=-1).float()


def linear_classifier(dim, num_labels):
    """nn.Linear initialized as published: weight N(0, 0.01), bias 0, and no BatchNorm in front."""
    linear = nn.Linear(dim, num_labels)
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return linear


def train_linear_epoch(model, classifier, loader, optimizer, args, device):
    """One epoch of SGD on the classifier; the backbone only runs forward. Returns this process's mean loss."""
    classifier.train()
    loss_sum, count = torch.zeros((), device=device), 0
    for images, labels in loader:
        with torch.no_grad():
            features = linear_features(model, images.to(device, non_blocking=True), args.n_last_blocks,
                                       args.avgpool_patchtokens)
        loss = F.cross_entropy(classifier(features), labels.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(labels)  # no .item(): no host sync per step
        count += len(labels)
    return loss_sum.item() / max(count, 1)


@torch.no_grad()
def evaluate_linear(model, classifier, dataset, args, device):
    """(top-1, top-5) in percent over the whole dataset; each process scores its shard, the counts are summed."""
    classifier.eval()
    loader = torch.utils.data.DataLoader(shard(dataset), batch_size=args.batch_size_per_gpu,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda")
    counts = torch.zeros(3, device=device)  # top-1 hits, top-5 hits, images
    for images, labels in loader:
        logits = classifier(linear_features(model, images.to(device, non_blocking=True), args.n_last_blocks,
                                            args.avgpool_patchtokens))
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels.to(device)[:, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), torch.tensor(len(labels), device=device)])
    if get_world_size() > 1:
        dist.all_reduce(counts)
    return (100 * counts[0] / counts[2]).item(), (100 * counts[1] / counts[2]).item()


def add_linear_args(p):
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--n_last_blocks", type=int, default=None, help="concatenate the CLS tokens of this many "
                   "last blocks (default: 4; 1 for vit_base, as published)")
    p.add_argument("--avgpool_patchtokens", type=bool_flag, default=None, help="also concatenate the last "
                   "block's average patch token (default: false; true for vit_base, as published)")
    p.add_argument("--epochs", type=int, default=None, help="default 100; the demo: 10")
    p.add_argument("--lr", type=float, default=None, help="SGD lr for a total batch of 256, scaled linearly, "
                   "cosine to 0 (default 0.001; the demo: 0.1)")
    p.add_argument("--batch_size_per_gpu", type=int, default=None, help="default 128; the demo: 32")
    p.add_argument("--val_freq", type=int, default=1, help="epochs between validations")
    p.add_argument("--seed", type=int, default=0)


def resolve_linear_args(args):
    """Fill the flags left at None (see resolve_weights and resolve_data)."""
    resolve_data(args, resolve_weights(args))
    base = args.arch == "vit_base"
    args.n_last_blocks = args.n_last_blocks or (1 if base else 4)
    args.avgpool_patchtokens = base if args.avgpool_patchtokens is None else args.avgpool_patchtokens
    # The demo's few hundred images give a few dozen steps: they need a larger lr than ImageNet's 100 epochs.
    for name, demo, recipe in (("epochs", 10, 100), ("lr", 0.1, 0.001), ("batch_size_per_gpu", 32, 128)):
        if getattr(args, name) is None:
            setattr(args, name, demo if args.demo else recipe)
    return args


def linear_main(args):
    """Train a linear classifier on frozen features, validating every --val_freq epochs; save it as linear.pth."""
    rank, world_size, device = init_distributed()
    seed_everything(args.seed)
    bicubic = T.InterpolationMode.BICUBIC
    train_transform = T.Compose([T.RandomResizedCrop(args.crop_size, interpolation=bicubic), T.RandomHorizontalFlip(),
                                 T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    train_set, val_set = image_folders(args.data_path, train_transform,
                                       eval_transform(args.resize_size, args.crop_size))
    model = load_backbone(args, device)
    dim = model.embed_dim * (args.n_last_blocks + int(args.avgpool_patchtokens))
    classifier = linear_classifier(dim, len(train_set.classes)).to(device)
    ddp_classifier = classifier if world_size == 1 else nn.parallel.DistributedDataParallel(
        classifier, device_ids=[device] if device.type == "cuda" else None)
    lr = args.lr * args.batch_size_per_gpu * world_size / 256
    optimizer = torch.optim.SGD(ddp_classifier.parameters(), lr, momentum=0.9, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, eta_min=0)
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world_size, rank=rank, seed=args.seed)
    loader = torch.utils.data.DataLoader(train_set, sampler=sampler, batch_size=args.batch_size_per_gpu,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.num_workers > 0)
    if is_main_process():
        prepare_output_dir(args.output_dir)
        print(f"linear probe of {args.pretrained_weights} ({args.arch}/{args.patch_size}, {dim} features) on "
              f"{len(train_set)} train / {len(val_set)} val images, {len(train_set.classes)} classes, lr {lr:.2e}")
    best = dict(top1=0.0, top5=0.0, epoch=0)
    for epoch in range(args.epochs):
        start = time.time()
        sampler.set_epoch(epoch)
        loss = train_linear_epoch(model, ddp_classifier, loader, optimizer, args, device)
        scheduler.step()
        if (epoch + 1) % args.val_freq and epoch + 1 < args.epochs:
            continue
        # the plain module: DDP's forward would expect every process to run the same number of batches
        top1, top5 = evaluate_linear(model, classifier, val_set, args, device)
        if top1 > best["top1"] or not best["epoch"]:
            best = dict(top1=top1, top5=top5, epoch=epoch + 1)
        if is_main_process():
            print(f"epoch {epoch + 1}/{args.epochs}: loss {loss:.4f}, val top-1 {top1:.2f} top-5 {top5:.2f} "
                  f"(best top-1 {best['top1']:.2f} at epoch {best['epoch']}), {time.time() - start:.1f}s", flush=True)
            save_checkpoint({"state_dict": classifier.state_dict(), "classes": train_set.classes,
                             "epoch": epoch + 1, "top1": top1, "top5": top5, "best": best, "args": plain_args(args)},
                            os.path.join(args.output_dir, "linear.pth"))
    if is_main_process():
        print(f"best val top-1 {best['top1']:.2f} top-5 {best['top5']:.2f} (epoch {best['epoch']}); "
              f"classifier saved in {os.path.join(args.output_dir, 'linear.pth')}")
    return best


# -----------------------------------------------------------------------------
# CLI

# The paper's ImageNet ViT-S/16 run (100 epochs), used with --data_path.
RECIPE = dict(arch="vit_small", patch_size=16, out_dim=65536, epochs=100, batch_size_per_gpu=64, lr=0.0005,
              warmup_epochs=10, min_lr=1e-6, momentum_teacher=0.996, teacher_temp=0.04, warmup_teacher_temp=0.04,
              warmup_teacher_temp_epochs=0, global_crops_size=224, local_crops_size=96, local_crops_number=8,
              global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), num_workers=10, saveckp_freq=20,
              norm_last_layer=True, drop_path_rate=0.1)
# Without --data_path: the built-in demo dataset, sized to finish in minutes on a laptop CPU. A short run learns
# fastest with a high lr, a trainable last-layer norm, no drop path and a small output.
DEMO = dict(RECIPE, arch="vit_tiny", patch_size=8, out_dim=256, epochs=20, batch_size_per_gpu=32, lr=0.01,
            warmup_epochs=3, momentum_teacher=0.99, global_crops_size=32, local_crops_size=16, local_crops_number=4,
            local_crops_scale=(0.1, 0.4), num_workers=2, saveckp_freq=5, norm_last_layer=False, drop_path_rate=0.0)


def bool_flag(s):
    if s.lower() in ("1", "true", "on", "yes"):
        return True
    if s.lower() in ("0", "false", "off", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s}")


def add_train_args(p):
    p.add_argument("--data_path", default=None, help="folder of images (ImageFolder or flat, recursive); "
                                                     "omit for the built-in demo dataset")
    p.add_argument("--output_dir", default="output", help="checkpoints and log.txt; resumes from checkpoint.pth here")
    p.add_argument("--arch", default=None, choices=list(ARCHS))
    p.add_argument("--patch_size", type=int, default=None)
    p.add_argument("--out_dim", type=int, default=None, help="dimension of the DINO head output")
    p.add_argument("--norm_last_layer", type=bool_flag, default=None, help="weight-normalize the head's last "
                   "layer with g fixed at 1 (more stable); false can train better for small models")
    p.add_argument("--use_bn_in_head", type=bool_flag, default=False)
    p.add_argument("--momentum_teacher", type=float, default=None, help="base EMA momentum, cosine to 1")
    p.add_argument("--warmup_teacher_temp", type=float, default=None)
    p.add_argument("--teacher_temp", type=float, default=None)
    p.add_argument("--warmup_teacher_temp_epochs", type=int, default=None)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 autocast on GPUs that support it, fp16 on older GPUs, fp32 on the CPU")
    p.add_argument("--weight_decay", type=float, default=0.04)
    p.add_argument("--weight_decay_end", type=float, default=0.4)
    p.add_argument("--clip_grad", type=float, default=3.0, help="max gradient norm per parameter tensor; 0 disables")
    p.add_argument("--batch_size_per_gpu", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--freeze_last_layer", type=int, default=1, help="epochs during which the head's last layer is fixed")
    p.add_argument("--lr", type=float, default=None, help="peak lr for a total batch of 256, scaled linearly")
    p.add_argument("--warmup_epochs", type=int, default=None)
    p.add_argument("--min_lr", type=float, default=None)
    p.add_argument("--drop_path_rate", type=float, default=None, help="stochastic depth of the student")
    p.add_argument("--global_crops_scale", type=float, nargs=2, default=None)
    p.add_argument("--local_crops_number", type=int, default=None)
    p.add_argument("--local_crops_scale", type=float, nargs=2, default=None)
    p.add_argument("--global_crops_size", type=int, default=None)
    p.add_argument("--local_crops_size", type=int, default=None)
    p.add_argument("--saveckp_freq", type=int, default=None, help="also keep checkpointNNNN.pth every this many epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=None, help="data loader processes per GPU")
    p.add_argument("--log_every", type=int, default=10, help="iterations between progress lines")
    p.add_argument("--compile", action="store_true", help="torch.compile the student and teacher")
    p.add_argument("--dist_timeout", type=float, default=30, help="minutes a collective may wait for a lost process")


def resolve_train_args(args):
    """Fill every flag left unset from the recipe, or from the demo configuration when there is no --data_path."""
    prepare_output_dir(args.output_dir)  # before the demo data is written there, or any image is listed
    defaults = RECIPE if args.data_path else DEMO
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, list(v) if isinstance(v, tuple) else v)
    if args.data_path is None:
        args.data_path = os.path.join(make_demo_dataset(os.path.join(args.output_dir, "demo_data")), "train")
        print(f"no --data_path: using the demo dataset in {args.data_path} and the demo configuration "
              f"({args.arch}/{args.patch_size}, crops {args.global_crops_size}/{args.local_crops_size}, "
              f"out_dim {args.out_dim}, {args.epochs} epochs)")
    else:
        print(f"using the paper's recipe defaults for unset flags ({args.arch}/{args.patch_size}, "
              f"{args.epochs} epochs, out_dim {args.out_dim})")
    return args


def build_parser():
    parser = argparse.ArgumentParser(description="DINO: self-supervised ViT training and evaluation")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_args(sub.add_parser("train", help="self-supervised pre-training"))
    add_knn_args(sub.add_parser("knn", help="weighted k-NN accuracy of frozen features"))
    add_attn_args(sub.add_parser("attn", help="last-block attention maps of an image"))
    add_linear_args(sub.add_parser("linear", help="linear classifier on frozen features"))
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        # resolve in the launching process: it may write the demo dataset, which must happen once
        if args.command == "train":
            launch(train, resolve_train_args(args))
        elif args.command == "knn":
            launch(knn_main, resolve_knn_args(args))
        elif args.command == "attn":
            attn_main(resolve_attn_args(args))
        elif args.command == "linear":
            launch(linear_main, resolve_linear_args(args))
    except DinoError as e:
        if is_main_process() or isinstance(e, LostContactError):
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
