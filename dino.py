r"""
DINO: self-distillation with no labels (Caron et al., ICCV 2021), in one file.

    # demo: generates a small dataset, trains vit_tiny on the CPU in minutes
    python dino.py train
    # k-NN accuracy of the demo run vs random init
    python dino.py knn
    # the paper's ViT-S/16 recipe
    python dino.py train --data_path /imagenet/train --output_dir runs/vits16
    # continue from pretrained weights
    python dino.py train --data_path my_images --pretrained_weights dino_deitsmall16_pretrain.pth
    python dino.py attn --image_path cat.jpg --pretrained_weights dino_deitsmall16_pretrain.pth
    python dino.py linear --data_path /imagenet --pretrained_weights runs/vits16/checkpoint.pth
    python dino.py embed --data_path photos --pretrained_weights runs/vits16/checkpoint.pth \
        --output photos.npz

Every visible CUDA GPU gets one process; under torchrun the launcher's environment is used
(multi-node); with no GPU everything runs on the CPU. The file reads in two parts. Part 1, the
algorithm, in the order of the paper's Algorithm 1: data and multi-crop, model glue, loss, schedules
and updates, the train step and epoch loop, the batched device photometry the loop may use, then
k-NN, attention maps, the linear probe and embeddings; each section uses only torch, torchvision,
numpy, PIL and the sections above it. Part 2,
the tool: checkpoints, processes, the demo data and presets, the commands and the CLI. Importing
this file has no side effects.
"""
import argparse
import contextlib
import copy
import dataclasses
import datetime
import itertools
import json
import logging
import math
import os
import pickle
import random
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
import torchvision.datasets
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageFilter

import vision_transformer as vits


class DinoError(Exception):
    """A problem with the user's input: the CLI prints it on one line and exits with status 2."""


def get_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def mean_over_processes(x):
    """The tensor x, averaged over all processes in place."""
    if get_world_size() > 1:
        dist.all_reduce(x)
    # a Python scalar: no host-to-device copy
    x /= get_world_size()
    return x


# =============================================================================
# Part 1: the algorithm
# =============================================================================

# -----------------------------------------------------------------------------
# data and multi-crop

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PIL image -> normalized tensor
NORMALIZE = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
BICUBIC = T.InterpolationMode.BICUBIC  # every resize of the published code


# The photometric recipe, one table for both paths: DataAugmentationDINO (PIL, in the loader
# workers) and the batched device path (MultiCropPhotometry, after the train step).
FLIP_P = 0.5  # horizontal flip, after the crop
JITTER_P = 0.8  # color jitter, its four ops in a random order
# the jitter's factor ranges: brightness, contrast, saturation, hue (the published
# ColorJitter(0.4, 0.4, 0.2, 0.1))
JITTER_RANGES = ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
GRAYSCALE_P = 0.2
BLUR_SIGMA = (0.1, 2.0)  # the Gaussian blur's sigma (PIL's radius), uniform
# (blur p, solarize p) of global view 1, global view 2, and the local views
VIEW_PROBS = ((1.0, 0.0), (0.1, 0.2), (0.5, 0.0))


def _pil_gaussian_blur(img):
    """PIL Gaussian blur with radius (= sigma) drawn uniformly from BLUR_SIGMA, as in the published
    code."""
    return img.filter(ImageFilter.GaussianBlur(radius=torch.empty(1).uniform_(*BLUR_SIGMA).item()))


class DataAugmentationDINO:
    """The published multi-crop recipe on the CPU: PIL image -> 2 global then N local normalized
    tensors."""

    def __init__(self, global_crops_scale, local_crops_scale, local_crops_number,
                 global_crops_size=224, local_crops_size=96):
        # (size, scale) of each view's crop: 2 global, then the local ones
        self.crops = [(global_crops_size, global_crops_scale)] * 2
        self.crops += [(local_crops_size, local_crops_scale)] * local_crops_number
        flip_and_color_jitter = [T.RandomHorizontalFlip(FLIP_P),
                                 T.RandomApply([T.ColorJitter(*JITTER_RANGES)], JITTER_P),
                                 T.RandomGrayscale(GRAYSCALE_P)]
        self.views = []  # each view's transform (the published global_transfo1, 2, local_transfo)
        probs = VIEW_PROBS[:2] + VIEW_PROBS[2:] * local_crops_number
        for (size, scale), (blur_p, solarize_p) in zip(self.crops, probs):
            ops = [T.RandomResizedCrop(size, scale=scale, interpolation=BICUBIC),
                   *flip_and_color_jitter, T.RandomApply([T.Lambda(_pil_gaussian_blur)], blur_p)]
            if solarize_p:  # as published: the views that never solarize draw no number for it
                ops.append(T.RandomSolarize(threshold=128, p=solarize_p))
            self.views.append(T.Compose(ops + [NORMALIZE]))

    def __call__(self, image):
        return [view(image) for view in self.views]


# The training path: the loader workers only crop and flip (MultiCropGeometry); the photometric
# ops, the CPU bottleneck of DataAugmentationDINO, run on the device on whole batches
# (MultiCropPhotometry, after the train step), per sample alike.

class MultiCropGeometry(DataAugmentationDINO):
    """The geometric half of DataAugmentationDINO, its crops and flips: PIL RGB image -> 2 global
    then N local uint8 [3, h, w] crops."""

    def __call__(self, img):
        img = TF.pil_to_tensor(img)  # a [3, H, W] view of the HWC pixels; crops are views of it
        crops = []
        # each: RandomResizedCrop(size, scale, bicubic) + RandomHorizontalFlip(FLIP_P)
        for size, scale in self.crops:
            i, j, h, w = T.RandomResizedCrop.get_params(img, scale, ratio=(3 / 4, 4 / 3))
            # torch's antialiased bicubic resize of uint8 is Pillow's filter (within 2 levels),
            # vectorized: 4x faster
            crop = F.interpolate(img[None, :, i:i + h, j:j + w], size=(size, size), mode="bicubic",
                                 antialias=True)
            crops.append(crop[0].flip(-1) if torch.rand(1) < FLIP_P else crop[0])
        return crops


IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def to_uint8(a):
    """A float array of 0..255 values, rounded to the nearest 8-bit levels."""
    return a.round().astype(np.uint8)


def load_rgb(path):
    """Open any PIL-readable image as 8-bit RGB (16-bit and float images are rescaled, not
    clipped)."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            a = np.asarray(img, dtype=np.float64)
            # 16-bit data, or 8-bit data stored in a 32-bit mode, by its range; float data by its
            # maximum
            scale = 65535.0 if a.max() > 255 else 255.0
            if img.mode == "F":
                scale = max(a.max(), 1.0)
            img = Image.fromarray(to_uint8(np.clip(a / scale, 0, 1) * 255), "L")
        return img.convert("RGB")


def list_images(root):
    """All image files under root, recursively, in a fixed order."""
    return sorted(p for p in Path(root).rglob("*")
                  if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())


# what PIL raises on a bad file
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class ImageDataset(Dataset):
    """Every image under `root`, recursively (labels ignored). An unreadable file costs a warning,
    not the run: the next readable one replaces it, counted in `skipped` (shared memory: the
    workers' counts reach the main process). An index (index, epoch) seeds the augmentation by
    (seed, epoch, index): a resume draws the same crops."""

    def __init__(self, root, transform, seed=0):
        if not os.path.isdir(root):
            raise DinoError(
                f"--data_path {root} is not a directory; point it at a folder of images")
        self.files = list_images(root)
        if not self.files:
            raise DinoError(f"--data_path {root} holds no images ({', '.join(IMG_EXTENSIONS)}); "
                            f"point it at a folder of images")
        self.transform = transform
        self.seed = seed
        self.skipped = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        if not isinstance(index, tuple):
            return self._load(index)
        index, epoch = index
        # the caller's random stream (drop path, ...) stays its own
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 10007 + epoch) * len(self.files) + index)
            return self._load(index)

    def _read(self, path):
        """The transformed image, or None after a warning if the file cannot be read."""
        try:
            return self.transform(load_rgb(path))
        except UNREADABLE as e:
            print(f"warning: skipping unreadable image {path}: {e}", file=sys.stderr)

    def _load(self, index):
        for offset in range(len(self.files)):
            path = self.files[(index + offset) % len(self.files)]
            image = self._read(path)
            if image is not None:
                return image
            self.skipped += 1
        raise DinoError(f"no image under the data path could be read (last tried: {path})")


class ImageFiles(ImageDataset):
    """The images under root for inference: (image, True), or if unreadable (a black image,
    False), a row to drop."""

    def __getitem__(self, index):
        image = self._read(self.files[index])
        if image is None:
            return self.transform(Image.new("RGB", (1, 1))), False
        return image, True


def eval_transform(resize_size, crop_size):
    """The paper's evaluation preprocessing: bicubic resize of the short side (None: 256 for 224),
    center crop."""
    resize = T.Resize(resize_size or round(crop_size * 256 / 224),
                      interpolation=BICUBIC)
    return T.Compose([resize, T.CenterCrop(crop_size), NORMALIZE])


class EpochSampler(DistributedSampler):
    """DistributedSampler whose indices carry their epoch, for ImageDataset's per-sample seeds."""

    def __iter__(self):
        return ((index, self.epoch) for index in super().__iter__())


# -----------------------------------------------------------------------------
# model glue

ARCHS = {"vit_tiny": vits.vit_tiny, "vit_small": vits.vit_small, "vit_base": vits.vit_base,
         # the published code's names for the same
         "deit_tiny": vits.vit_tiny, "deit_small": vits.vit_small}
# torchvision's classification models, as the published code takes them, but those that cannot be
# backbones here: no Linear classifier (squeezenet), auxiliary outputs in training (googlenet,
# inception_v3), a fixed input size (torchvision's vit_*, maxvit_t: the local crops differ)
TORCHVISION_ARCHS = [
    name for name in torchvision.models.list_models(module=torchvision.models)
    if not name.startswith(("squeezenet", "googlenet", "inception", "vit_", "maxvit"))]


def build_backbone(arch, patch_size=16, **vit_options):
    """A ViT of ARCHS (vit_options: drop_path_rate, grad_checkpointing), or torchvision's
    classification model arch (TORCHVISION_ARCHS) with its classifier, the last Linear layer,
    replaced by an identity (as the published code replaces `fc`); embed_dim is the feature size."""
    if arch in ARCHS:
        return ARCHS[arch](patch_size=patch_size, **vit_options)
    model = torchvision.models.get_model(arch)
    classifier = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    model.embed_dim = model.get_submodule(classifier).in_features
    model.set_submodule(classifier, nn.Identity())
    return model


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


def build_dino_networks(arch="vit_small", patch_size=16, out_dim=65536, use_bn_in_head=False,
                        norm_last_layer=True, drop_path_rate=0.1, grad_checkpointing=False,
                        embed_dim=None):
    """Student and teacher, each backbone + DINO head, the teacher equal to the student and without
    gradients. arch: a name for build_backbone (a ViT's student gets drop path and, if asked,
    activation checkpointing; the teacher neither), or your own nn.Module, mapping images
    [B, 3, H, W] at every crop size to features [B, D] (the teacher gets a copy of it), with D given
    as embed_dim or its embed_dim attribute."""
    if isinstance(arch, nn.Module):
        student_backbone, teacher_backbone = arch, copy.deepcopy(arch)
    else:
        student_backbone = build_backbone(arch, patch_size, drop_path_rate=drop_path_rate,
                                          grad_checkpointing=grad_checkpointing)
        teacher_backbone = build_backbone(arch, patch_size)
    dim = embed_dim or student_backbone.embed_dim
    student_head = vits.DINOHead(dim, out_dim, use_bn_in_head, norm_last_layer)
    teacher_head = vits.DINOHead(dim, out_dim, use_bn_in_head)
    student = MultiCropWrapper(student_backbone, student_head)
    teacher = MultiCropWrapper(teacher_backbone, teacher_head)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)  # the teacher only ever moves by EMA
    return student, teacher


# -----------------------------------------------------------------------------
# loss

def cross_entropy_over_pairs(student_logits, q):
    """Algorithm 1's H(t, s) = -q_t . log p_s summed over the samples and over the pairs of a
    teacher view t and a student view s != t, each student softmax computed once:
    -sum_t q_t . (sum_s log p_s - log p_t). student_logits [ncrops, b, K]: the student's outputs
    over its temperature; q [2, b, K]: the teacher's centered, sharpened softmax of the 2 global
    views."""
    log_p = student_logits.log_softmax(-1)
    return -(q * (log_p.sum(0) - log_p[:2])).sum()


class DINOLoss(nn.Module):
    """The paper's DINOLoss: H(teacher, student) averaged over all pairs of different views
    (loss_and_means), then the center's EMA (update_center). train_step calls the two itself: the
    loss per micro-batch, the center once per optimizer step."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp,
                 warmup_teacher_temp_epochs, nepochs, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        temps = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(max(nepochs - warmup_teacher_temp_epochs, 0)) * teacher_temp))
        # a tensor (see teacher_temp), not in the state dict: the flags rebuild it
        self.register_buffer("teacher_temps", torch.tensor(temps, dtype=torch.float32),
                             persistent=False)
        # detached collapse indicators of the last center update, by name; read them only when
        # logging
        self.stats = {}

    def forward(self, student_output, teacher_output, epoch):
        """The loss of a batch; then the center moves."""
        loss, means = self.loss_and_means(student_output, teacher_output, self.teacher_temp(epoch))
        self.update_center(means)
        return loss

    def teacher_temp(self, epoch):
        """The epoch's teacher temperature, a 0-dim tensor: a compiled step takes a new value
        without recompiling."""
        return self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)]

    def loss_and_means(self, student_output, teacher_output, temp):
        """The loss of a (micro-)batch at teacher temperature temp, and its means over the samples
        by name (detached): the loss, the teacher's entropy and softmax (collapse indicators) and
        its output (the center's step). Changes nothing."""
        # [views, batch, out_dim]: ncrops student views, 2 teacher views
        logits = (student_output.float() / self.student_temp).unflatten(0, (self.ncrops, -1))
        log_q = ((teacher_output.float() - self.center) / temp).log_softmax(-1)
        log_q = log_q.unflatten(0, (2, -1))
        q = log_q.exp()
        n_pairs = 2 * (self.ncrops - 1)
        loss = cross_entropy_over_pairs(logits, q) / (q.shape[1] * n_pairs)
        with torch.no_grad():
            means = {"loss": loss.detach(),
                     "teacher_entropy": -(q * log_q).sum(-1).mean(),
                     "teacher_softmax": q.mean((0, 1)),
                     "teacher_output": teacher_output.float().mean(0)}
        return loss, means

    @torch.no_grad()
    def update_center(self, means):
        """Once per optimizer step: the center moves toward the mean teacher output of the step's
        batch (over all processes, which step equal batches); the collapse indicators of that batch
        (this process's). means: loss_and_means' of the batch (of its micro-batches, weighted by
        their shares). The paper's collapse study: loss = h(P_t) + KL(P_t || P_s)."""
        teacher = mean_over_processes(means["teacher_output"])
        self.center.mul_(self.center_momentum).add_(teacher, alpha=1 - self.center_momentum)
        mean_q = means["teacher_softmax"]
        self.stats = {"teacher_entropy": means["teacher_entropy"],
                      "kl": means["loss"] - means["teacher_entropy"],
                      "batch_mean_entropy": -(mean_q * mean_q.clamp_min(1e-12).log()).sum()}


# -----------------------------------------------------------------------------
# schedules and updates

def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                     start_warmup_value=0):
    """One value per iteration: linear warmup from start_warmup_value, then a half cosine to
    final_value."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cos = np.cos(np.pi * iters / len(iters))  # half a period over the iterations after the warmup
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + cos)
    return np.concatenate((warmup, cosine))


def get_params_groups(model):
    """Weight decay on weight matrices only: none on biases, norms, tokens and other 1-D
    parameters."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim <= 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


@torch.no_grad()
def clip_gradients(params, clip):
    """Clip each parameter tensor's gradient to norm `clip` (the DINO rule), with no host sync;
    returns the norms."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads))
    coefs = (clip / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(coefs.unbind()))
    return norms


@torch.no_grad()
def update_teacher(student_params, teacher_params, momentum):
    """EMA: teacher <- momentum * teacher + (1 - momentum) * student, one fused op for all
    parameters."""
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)


# -----------------------------------------------------------------------------
# the train step and the epoch loop

@dataclasses.dataclass
class TrainState:
    """One DINO run: the two networks, what updates them, and the per-iteration schedules."""
    student: nn.Module  # MultiCropWrapper
    teacher: nn.Module  # MultiCropWrapper, moved only by update_teacher
    dino_loss: DINOLoss  # holds the center
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    schedules: dict  # "lr", "wd", "momentum": one value per iteration
    # the step's rules beyond the loss: the recipe's gradient clipping (0: none) and freezing
    clip_grad: float = 3.0  # max gradient norm per parameter tensor
    freeze_last_layer: int = 1  # epochs with the head's last layer fixed
    freeze_backbone_epochs: int = 0  # epochs in which only the heads train
    # where the last good state is saved: a non-finite loss names it
    checkpoint_path: str = "checkpoint.pth"
    amp_dtype: torch.dtype = None  # autocast to this; None: fp32
    # the student as the step runs it (DDP-wrapped); default: student
    student_forward: nn.Module = None
    # forward_and_loss as the step runs it (compile_step); default: forward_and_loss
    compiled_forward: object = None


def forward_and_loss(student, teacher, dino_loss, crops, temp):
    """Algorithm 1's forward on one (micro-)batch: the teacher sees only the 2 global views, the
    student all of them; returns DINOLoss.loss_and_means at teacher temperature temp. The region
    compile_step compiles whole."""
    with torch.no_grad():
        teacher_output = teacher(crops[:2])
    student_output = student(crops)
    return dino_loss.loss_and_means(student_output, teacher_output, temp)


def compile_step(s, **options):
    """torch.compile the step's forward (teacher, student and loss as one region; with DDP it splits
    where DDP's hooks are); options are torch.compile's: fullgraph=True fails on a graph break,
    mode="reduce-overhead" adds CUDA graphs, for one micro-batch per step only (a micro-batch's
    gradients would live in the graph's memory, which its next run overwrites)."""
    s.compiled_forward = torch.compile(forward_and_loss, **options)


def train_step(s, micro_batches, epoch, i):
    """Iteration i of Algorithm 1 on one batch, given as a list of micro-batches (each a list of
    crops, the 2 global ones first) whose gradients add up to the whole batch's: one optimizer
    step, EMA and center update for all of them. Returns the batch's loss as a device tensor."""
    # this iteration's values of the schedules
    for group in s.optimizer.param_groups:
        group["lr"] = s.schedules["lr"][i]
    # group 0 is the regularized one
    s.optimizer.param_groups[0]["weight_decay"] = s.schedules["wd"][i]
    s.optimizer.zero_grad(set_to_none=True)

    # the views -> student and teacher -> the loss and its gradients, micro-batch by micro-batch
    student = s.student_forward or s.student
    forward = s.compiled_forward or forward_and_loss
    temp = s.dino_loss.teacher_temp(epoch)
    n = sum(len(crops[0]) for crops in micro_batches)  # samples in the batch
    batch_means = {}  # the loss and the center's and collapse indicators' means over the batch
    for k, crops in enumerate(micro_batches):
        # DDP all-reduces the gradients once, in the last micro-batch's backward
        if k < len(micro_batches) - 1 and hasattr(student, "no_sync"):
            sync_context = student.no_sync()
        else:
            sync_context = contextlib.nullcontext()
        # the loss is a mean over the micro-batch: weighted by its share, the gradients sum to the
        # batch's, and its means to the batch's
        share = len(crops[0]) / n
        with sync_context:
            with torch.autocast(crops[0].device.type, dtype=s.amp_dtype or torch.float32,
                                enabled=s.amp_dtype is not None):
                loss, means = forward(student, s.teacher, s.dino_loss, crops, temp)
            s.scaler.scale(loss * share).backward()
        # new tensors: a CUDA graph's outputs are overwritten by its next run
        batch_means = {key: batch_means.get(key, 0.0) + x * share for key, x in means.items()}

    # the student's step
    s.scaler.unscale_(s.optimizer)
    if s.clip_grad:
        clip_gradients(s.student.parameters(), s.clip_grad)
    frozen = []
    if epoch < s.freeze_last_layer:  # a fixed last layer early on keeps training from collapsing
        frozen += s.student.head.last_layer.parameters()
    if epoch < s.freeze_backbone_epochs:  # new heads first learn on the pretrained features
        frozen += s.student.backbone.parameters()
    for p in frozen:
        # the optimizer skips parameters without a gradient: no update, no weight decay
        p.grad = None
    s.scaler.step(s.optimizer)
    s.scaler.update()

    # EMA: the teacher follows the student
    update_teacher(list(s.student.parameters()), list(s.teacher.parameters()),
                   s.schedules["momentum"][i])

    # the center moves by the mean teacher output over all micro-batches (the same center for each)
    s.dino_loss.update_center(batch_means)
    return batch_means["loss"]


def stop_if_not_finite(bad_iter, epoch, checkpoint_path):
    """Check, at log intervals only, whether any loss so far was inf/nan; then stop every rank."""
    if get_world_size() > 1:
        dist.all_reduce(bad_iter, op=dist.ReduceOp.MAX)
    if bad_iter.item() >= 0:
        raise DinoError(f"loss is not finite at epoch {epoch}, iteration {bad_iter.item()}; "
                        f"intact: {checkpoint_path}. "
                        f"Try --precision fp32, a lower --lr, or a larger --freeze_last_layer")


def groups_of(loader, n):
    """The loader's batches, n at a time (a last incomplete group is dropped, as drop_last drops
    a partial batch)."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == n:
            yield group
            group = []


def train_one_epoch(s, loader, epoch, epochs, accum_iter=1, log_every=10, photometry=None):
    """One pass over the loader, accum_iter of its batches per optimizer step; returns the epoch's
    means (loss, collapse indicators) and speed. photometry: the GPU path's batched colour, blur
    and solarize, else None."""
    device = s.dino_loss.center.device
    n_iter = len(loader) // accum_iter
    # images per optimizer step, all processes
    batch = loader.batch_size * accum_iter * get_world_size()
    sums = {}
    # the first iteration with a non-finite loss, -1: none yet
    bad_iter = torch.tensor(-1, device=device)
    start = time.time()
    for it, batches in enumerate(groups_of(loader, accum_iter)):
        i = epoch * n_iter + it
        micro_batches = [[c.to(device, non_blocking=True) for c in crops] for crops in batches]
        if photometry is not None:
            micro_batches = [photometry(crops) for crops in micro_batches]
        loss = train_step(s, micro_batches, epoch, i)
        bad_iter = torch.where((bad_iter < 0) & ~torch.isfinite(loss), it, bad_iter)  # no host sync
        for k, v in {"loss": loss, **s.dino_loss.stats}.items():
            sums[k] = sums.get(k, 0.0) + v
        done = it + 1
        if done % log_every == 0 or done == n_iter:
            stop_if_not_finite(bad_iter, epoch, s.checkpoint_path)
            elapsed = time.time() - start
            eta = elapsed / done * ((epochs - epoch) * n_iter - done)
            if get_rank() == 0:
                print(f"epoch {epoch}/{epochs} it {done}/{n_iter} "
                      f"loss {sums['loss'].item() / done:.4f} "
                      f"lr {s.schedules['lr'][i]:.2e} wd {s.schedules['wd'][i]:.3f} "
                      f"momentum {s.schedules['momentum'][i]:.4f} "
                      f"{done * batch / elapsed:.1f} img/s "
                      f"eta {datetime.timedelta(seconds=int(eta))}", flush=True)
    means = mean_over_processes(torch.stack(list(sums.values())).float() / n_iter)
    elapsed = time.time() - start
    # the means, then the epoch's last schedule values and its speed
    schedules = {name: values[i] for name, values in s.schedules.items()}  # lr, wd, momentum
    # the teacher's mean EMA step 1 - momentum this epoch: how far it still moves
    momentum = s.schedules["momentum"][epoch * n_iter:i + 1]
    stats = dict(zip(sums, means.tolist()), epoch=epoch, **schedules,
                 teacher_step=1 - sum(momentum) / n_iter,
                 epoch_time_s=elapsed, images_per_s=n_iter * batch / elapsed)
    return stats


# -----------------------------------------------------------------------------
# the device data path: batched photometry

# Batched photometric ops on float images [B, 3, H, W] in [0, 1] with per-sample factors [B]; each
# equals the torchvision.transforms.functional (v1) tensor op of the same name applied to every
# sample with its own factor.

def _per_sample(x):
    """[B] -> [B, 1, 1, 1], to broadcast per-sample factors and masks over images."""
    return x.view(-1, 1, 1, 1)


def _rgb_to_grayscale(img):
    """ITU-R 601-2 luma (torchvision's weights), [B, 1, H, W]."""
    r, g, b = img.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _adjust_hue(img, factor):
    """Turn the hue by factor (in turns): torchvision's (Pillow's) RGB -> HSV, then the branch-free
    HSV -> RGB."""
    r, g, b = img.unbind(1)
    maxc = img.amax(1)  # the value v
    minc = img.amin(1)
    delta = maxc - minc
    gray = delta == 0  # hue and saturation are 0 there; replacing the divisors by 1 avoids nan
    s = delta / maxc.masked_fill(gray, 1.0)
    delta = delta.masked_fill(gray, 1.0)
    h = torch.where(maxc == r, (g - b) / delta,
                    torch.where(maxc == g, 2.0 + (b - r) / delta, 4.0 + (r - g) / delta))
    h = (torch.fmod(h / 6.0 + 1.0, 1.0) + factor.view(-1, 1, 1)) % 1.0
    k = torch.stack([(n + 6.0 * h) % 6.0 for n in (5.0, 3.0, 1.0)], 1)
    ramp = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return maxc.unsqueeze(1) * (1.0 - s.unsqueeze(1) * ramp)


def _gaussian_blur(img, sigma, kernel_size):
    """Separable Gaussian blur with a per-sample sigma and reflect padding."""
    B, C, H, W = img.shape
    x = torch.arange(kernel_size, device=img.device, dtype=img.dtype) - (kernel_size - 1) / 2
    kernel = torch.exp(-0.5 * (x / sigma.view(-1, 1)).pow(2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)  # [B * C, k]
    pad = kernel_size // 2
    # the samples' channels become the groups of one depthwise convolution
    out = F.pad(img.reshape(1, B * C, H, W), (pad, pad, 0, 0), mode="reflect")
    out = F.conv2d(out, kernel.view(B * C, 1, 1, kernel_size), groups=B * C)
    out = F.pad(out, (0, 0, pad, pad), mode="reflect")
    out = F.conv2d(out, kernel.view(B * C, 1, kernel_size, 1), groups=B * C)
    return out.view(B, C, H, W)


def _solarize(img):
    """Invert pixels >= 0.5: PIL's solarize(threshold=128) on the image rounded to uint8
    (x * 255 >= 127.5)."""
    return torch.where(img >= 0.5, 1.0 - img, img)


def _normalize(img):
    """ImageNet mean/std normalization, per channel with Python scalars (no host-to-device copy)."""
    return torch.stack([(img[:, c] - m) / s
                        for c, (m, s) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD))], 1)


BLUR_KERNEL_SIZE = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1  # 13: +-3 sigma of the widest blur


def _color_jitter(img, apply, order, factors):
    """Where apply, ColorJitter's ops (0 brightness, 1 contrast, 2 saturation, 3 hue) in each
    sample's order [B, 4] with its factors [B, 4]. Hue, the costly op, runs once: the blends before
    each sample's hue, hue, the rest."""
    hue_position = (order == 3).int().argmax(1)
    for p in range(3):
        img = _jitter_blend(img, apply & (p < hue_position), order[:, p], factors)
    img = torch.where(_per_sample(apply), _adjust_hue(img, factors[:, 3]), img)
    for p in range(1, 4):
        img = _jitter_blend(img, apply & (p > hue_position), order[:, p], factors)
    return img


def _jitter_blend(img, chosen, op, factors):
    """Where chosen, torchvision's adjust_brightness (op 0), adjust_contrast (1) or
    adjust_saturation (2) with the sample's factor: a blend with black, with the mean gray level,
    or with the gray image."""
    gray = _rgb_to_grayscale(img)
    kind = _per_sample(op)
    other = torch.where(kind == 0, 0.0,
                        torch.where(kind == 1, gray.mean((1, 2, 3), keepdim=True), gray))
    factor = _per_sample(factors.gather(1, op[:, None]).squeeze(1))
    blend = (factor * img + (1.0 - factor) * other).clamp(0.0, 1.0)
    return torch.where(_per_sample(chosen), blend, img)


def sample_photometric_params(n, blur_p, solarize_p, device=None):
    """Draws every random choice of the photometric pipeline for n samples of one view, from the
    global torch RNG."""

    def uniform(low, high):
        return torch.empty(n, device=device).uniform_(low, high)

    def coin(p):  # per sample, True with probability p
        return torch.rand(n, device=device) < p

    return dict(jitter=coin(JITTER_P),
                # a random permutation per sample
                order=torch.rand(n, 4, device=device).argsort(1),
                factors=torch.stack([uniform(low, high) for low, high in JITTER_RANGES], 1),
                grayscale=coin(GRAYSCALE_P),
                blur=coin(blur_p),
                sigma=uniform(*BLUR_SIGMA),
                solarize=coin(solarize_p))


def apply_photometric(img, params, dtype=torch.float32):
    """Color jitter, grayscale, blur, solarize with the sampled params, then normalize:
    [B, 3, H, W] in [0, 1]."""
    img = _color_jitter(img, params["jitter"], params["order"], params["factors"])
    img = torch.where(_per_sample(params["grayscale"]), _rgb_to_grayscale(img).expand_as(img), img)
    img = torch.where(_per_sample(params["blur"]),
                      _gaussian_blur(img, params["sigma"], BLUR_KERNEL_SIZE), img)
    img = torch.where(_per_sample(params["solarize"]), _solarize(img), img)
    return _normalize(img).to(dtype)


class MultiCropPhotometry:
    """DataAugmentationDINO's photometric half, batched on the device: uint8 crops -> normalized
    crops of dtype, no sync. Under autocast, the dtype the patch embedding casts its input to
    (bf16, fp16) gives the same step with half the bytes. compiled: torch.compile the ops."""

    def __init__(self, local_crops_number, dtype=torch.float32, compiled=False):
        self.local_crops_number = local_crops_number
        self.dtype = dtype
        self.apply = apply_photometric
        if compiled:
            self.apply = torch.compile(apply_photometric)

    def __call__(self, views):
        assert len(views) == 2 + self.local_crops_number
        out = []
        for group, probs in zip((views[:1], views[1:2], views[2:]), VIEW_PROBS):
            if group:  # the views sharing the same probabilities, as one batch
                img = torch.cat(group).float().div(255)
                params = sample_photometric_params(len(img), *probs, device=img.device)
                img = self.apply(img, params, self.dtype)
                out += img.split(len(group[0]))
        return out


# -----------------------------------------------------------------------------
# k-NN

@torch.no_grad()
def knn_classifier(train_features, train_labels, test_features, test_labels, k, T,
                   num_classes=1000, chunk_size=256):
    """Weighted k-NN accuracy (top-1, top-5) in percent, as in the paper: each of the k most
    similar train features (L2-normalized: dot products are cosine similarities) votes for its
    label with weight exp(cos_sim / T). Test features go chunk_size at a time: memory is
    chunk_size x len(train), never test x train."""
    train_labels = train_labels.long()
    hits1 = hits5 = 0
    for i in range(0, len(test_labels), chunk_size):
        sims, idx = (test_features[i:i + chunk_size] @ train_features.T).topk(k, 1)
        votes = torch.zeros(len(idx), num_classes, dtype=sims.dtype, device=sims.device)
        votes.scatter_add_(1, train_labels[idx], (sims / T).exp())
        # A class no neighbour voted for is no hit, even within the top 5
        # (its rank among zeros is arbitrary).
        scores, preds = votes.topk(min(5, num_classes), 1)
        hits = (preds == test_labels[i:i + chunk_size, None]) & (scores > 0)
        hits1 += hits[:, 0].sum().item()
        hits5 += hits.any(1).sum().item()
    return 100.0 * hits1 / len(test_labels), 100.0 * hits5 / len(test_labels)


def shard_loader(dataset, batch_size, num_workers, device):
    """A loader of this process's contiguous slice of dataset: sizes differ by at most one,
    nothing padded."""
    rank = get_rank()
    world_size = get_world_size()
    n = len(dataset)
    indices = range(n * rank // world_size, n * (rank + 1) // world_size)
    shard = Subset(dataset, indices)
    return DataLoader(shard, batch_size=batch_size, num_workers=num_workers,
                      pin_memory=torch.device(device).type == "cuda")


@torch.no_grad()
def extract_features(model, dataset, batch_size, num_workers, device):
    """L2-normalized float32 CLS features of every image, in order, on process 0's CPU (None
    elsewhere)."""
    loader = shard_loader(dataset, batch_size, num_workers, device)
    features = [F.normalize(model(images.to(device, non_blocking=True)).float(), dim=1)
                for images, _ in loader]
    features = torch.cat(features) if features else torch.zeros(0, model.embed_dim, device=device)
    return gather_shards(features, len(dataset))


def gather_shards(x, n):
    """Each process's rows of its shard_loader() of n items -> all n rows in order on process 0's
    CPU (else None)."""
    world_size = get_world_size()
    if world_size == 1:
        return x.cpu()
    # shards are this long or one shorter: pad to it, gather, then drop the padding
    longest = -(-n // world_size)
    padded = torch.cat([x, x.new_zeros(longest - len(x), *x.shape[1:])])
    shards = [torch.empty_like(padded) for _ in range(world_size)] if get_rank() == 0 else None
    dist.gather(padded, shards, dst=0)
    if get_rank() != 0:
        return None
    return torch.cat([s[:n * (r + 1) // world_size - n * r // world_size]
                      for r, s in enumerate(shards)]).cpu()


def knn_accuracy(model, train_set, val_set, batch_size, num_workers, device, ks=(20,), T=0.07):
    """Weighted k-NN [(k, top-1, top-5)] of model's features on ImageFolders for each k in ks, the
    model in eval mode meanwhile (then back in its mode); on process 0, None on the others."""
    training = model.training
    model.eval()
    train_features = extract_features(model, train_set, batch_size, num_workers, device)
    val_features = extract_features(model, val_set, batch_size, num_workers, device)
    model.train(training)
    if train_features is None:
        return None
    train_labels = torch.tensor(train_set.targets)
    val_labels = torch.tensor(val_set.targets)
    # knn_classifier's four inputs, on the device
    tensors = [t.to(device) for t in (train_features, train_labels, val_features, val_labels)]
    # small data sets get all their images as neighbours
    ks = sorted({min(k, len(train_set)) for k in ks})
    return [(k, *knn_classifier(*tensors, k, T, len(train_set.classes))) for k in ks]


# -----------------------------------------------------------------------------
# attention maps

@torch.no_grad()
def attention_maps(model, images):
    """Last block's CLS-to-patch attention of normalized images [B, 3, H, W]
    -> [B, heads, H/p, W/p]."""
    p = model.patch_size
    attn = model.get_last_selfattention(images)  # [B, heads, N, N], token 0 is CLS
    return attn[:, :, 0, 1:].unflatten(-1, (images.shape[-2] // p, images.shape[-1] // p))


def threshold_masks(maps, threshold):
    """Per head, the smallest set of patches holding at least `threshold` of the attention mass
    (the paper's figure): in decreasing attention, a patch is kept while the mass of the larger
    ones before it is short of it."""
    flat = maps.flatten(1).double()  # double: the kept mass is compared to the threshold exactly
    values, order = flat.sort(1, descending=True)
    mass_before = (values.cumsum(1) - values) / values.sum(1, keepdim=True)
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, mass_before < threshold)
    return keep.reshape(maps.shape)


def attention_jaccard(maps, masks, patch_size, mass=0.6):
    """The paper's segmentation score: per image, the Jaccard index |A & B| / |A | B| of the
    patches A holding `mass` of the attention map [N, h, w] (nearest-upsampled to pixels) and the
    object's pixel mask B [N, H, W]."""
    kept = threshold_masks(maps, mass)
    kept = kept.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
    return (kept & masks).flatten(1).sum(1) / (kept | masks).flatten(1).sum(1).clamp_min(1)


# viridis at 0, 1/8, ..., 1: heat maps without a matplotlib dependency
VIRIDIS = np.array([[68, 1, 84], [71, 44, 123], [59, 82, 139], [44, 114, 142], [33, 145, 140],
                    [40, 174, 128], [94, 201, 98], [170, 220, 50], [253, 231, 37]],
                   dtype=np.float64)


def colorize(a):
    """2-D array -> uint8 RGB image [H, W, 3], min-max normalized through the viridis colormap."""
    a = np.asarray(a, dtype=np.float64)
    a = (a - a.min()) / max(a.max() - a.min(), 1e-12)
    anchors = np.linspace(0, 1, len(VIRIDIS))
    rgb = np.stack([np.interp(a, anchors, VIRIDIS[:, c]) for c in range(3)], axis=-1)
    return to_uint8(rgb)


def save_attention_images(img, maps, masks, patch_size, out_dir):
    """Write the image, per-head heat maps, their mean, an overlay and the threshold masks; return
    the paths."""
    os.makedirs(out_dir, exist_ok=True)

    def upsample(m):  # nearest, patch -> pixels
        return np.asarray(m).repeat(patch_size, axis=0).repeat(patch_size, axis=1)

    image = np.asarray(img)
    mean = colorize(upsample(maps.mean(0)))
    pictures = [("img.png", image)]
    pictures += [(f"attn-head{i}.png", colorize(upsample(m))) for i, m in enumerate(maps)]
    overlay = to_uint8(image * 0.5 + mean * 0.5)
    pictures += [("attn-mean.png", mean), ("attn-overlay.png", overlay)]
    if masks is not None:
        # the image, darkened outside each head's mask
        for i, m in enumerate(masks):
            darkened = image * np.where(upsample(m), 1.0, 0.25)[..., None]
            pictures.append((f"mask-head{i}.png", to_uint8(darkened)))
    for name, array in pictures:
        Image.fromarray(array).save(os.path.join(out_dir, name))
    return [os.path.join(out_dir, name) for name, _ in pictures]


# -----------------------------------------------------------------------------
# linear probe

def linear_features(model, images, n_last_blocks, avgpool_patchtokens):
    """Frozen features for the probe: a ViT's CLS tokens of the last n blocks [+ the last block's
    mean patch token]; any other backbone's output (a convnet's pooled features, as published)."""
    if not isinstance(model, vits.VisionTransformer):
        return model(images).float()
    blocks = model.get_intermediate_layers(images, n_last_blocks)
    features = [x[:, 0] for x in blocks]
    if avgpool_patchtokens:
        features.append(blocks[-1][:, 1:].mean(1))
    return torch.cat(features, -1).float()


def train_linear_epoch(features, classifier, loader, optimizer, device):
    """One epoch of SGD on the classifier of the frozen features(images); returns this process's
    mean loss."""
    classifier.train()
    loss_sum = torch.zeros((), device=device)
    for images, labels in loader:
        with torch.no_grad():
            x = features(images.to(device, non_blocking=True))
        loss = F.cross_entropy(classifier(x), labels.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(labels)  # no .item(): no host sync per step
    # every index the sampler gives is one sample
    return loss_sum.item() / max(len(loader.sampler), 1)


@torch.no_grad()
def evaluate_linear(features, classifier, loader, device):
    """(top-1, top-5) in percent; each process scores its shard of the dataset, the counts are
    summed."""
    classifier.eval()
    counts = torch.zeros(3, device=device)  # top-1 hits, top-5 hits, images
    for images, labels in loader:
        logits = classifier(features(images.to(device, non_blocking=True)))
        top5 = logits.topk(min(5, logits.shape[1]), 1).indices
        hits = top5 == labels.to(device, non_blocking=True)[:, None]
        counts[:2] += torch.stack([hits[:, 0].sum(), hits.any(1).sum()])
        counts[2] += len(labels)  # a Python number: no host-to-device copy, no sync
    if get_world_size() > 1:
        dist.all_reduce(counts)
    return (100 * counts[0] / counts[2]).item(), (100 * counts[1] / counts[2]).item()


# -----------------------------------------------------------------------------
# embeddings

@torch.no_grad()
def embed_folder(model, folder, resize_size=None, crop_size=224, patch_tokens=False,
                 n_last_blocks=0, batch_size=64, num_workers=0, device="cpu"):
    """Embeddings of every readable image under folder (recursively) by a backbone in eval mode,
    preprocessed as for k-NN, on process 0 (None elsewhere): float32 CPU tensors 'cls' [N, D]
    (= model(x), a ViT's CLS token), for a ViT with patch_tokens 'patch_tokens' [N, h, w, D], with
    n_last_blocks n 'last_blocks' [N, n, D], and 'paths' relative to folder, in order."""
    dim = model.embed_dim
    dataset = ImageFiles(folder, eval_transform(resize_size, crop_size))
    loader = shard_loader(dataset, batch_size, num_workers, device)
    shapes = {"cls": (dim,), "readable": ()}
    if patch_tokens:
        h = crop_size // model.patch_size  # patches per side
        shapes["patch_tokens"] = (h, h, dim)
    if n_last_blocks:
        shapes["last_blocks"] = (n_last_blocks, dim)
    # a shard may be empty
    rows = {k: [torch.zeros(0, *shape, device=device)] for k, shape in shapes.items()}
    start = time.time()
    done = 0
    for b, (images, readable) in enumerate(loader, 1):
        images = images.to(device, non_blocking=True)
        if isinstance(model, vits.VisionTransformer):
            blocks = model.get_intermediate_layers(images, max(n_last_blocks, 1))
        else:  # another backbone's features, in the place of the last block's CLS token
            blocks = [model(images)[:, None]]
        batch = {"cls": blocks[-1][:, 0],
                 "readable": readable.to(device, torch.float32),  # gloo gathers no bool
                 "last_blocks": torch.stack([x[:, 0] for x in blocks], 1)}
        if patch_tokens:
            batch["patch_tokens"] = blocks[-1][:, 1:].unflatten(1, (h, h))
        for k in rows:
            rows[k].append(batch[k])
        done += len(images)
        if get_rank() == 0 and (b % 20 == 0 or b == len(loader)):
            print(f"embedded {done}/{len(loader.dataset)} images (process 0's share), "
                  f"{done / (time.time() - start):.1f} images/s per process", flush=True)
    rows = {k: gather_shards(torch.cat(v).float(), len(dataset)) for k, v in rows.items()}
    if get_rank() != 0:
        return None
    keep = rows.pop("readable").bool()
    paths = [p.relative_to(folder).as_posix() for p, kept in zip(dataset.files, keep) if kept]
    print(f"embedded {len(paths)} images, skipped {len(keep) - len(paths)} unreadable ones")
    return {"paths": paths} | {k: v[keep] for k, v in rows.items()}


# =============================================================================
# Part 2: the tool
# =============================================================================

# -----------------------------------------------------------------------------
# checkpoints: safe loading with a report, atomic saving, resume

def _harmless_globals():
    """What published checkpoints hold beyond tensors: args (a Namespace), numpy scalars; building
    them runs no code."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1
        from numpy.core.multiarray import scalar
    dtypes = [type(np.dtype(name)) for name in "float64 float32 float16 int64 int32 bool".split()]
    return [argparse.Namespace, np.dtype, *dtypes,
            (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]


def load_checkpoint_file(path):
    """torch.load that never runs code from the file and fails with one line naming the file."""
    if not os.path.isfile(path):
        raise DinoError(f"checkpoint {path} does not exist; check the path")
    try:
        with torch.serialization.safe_globals(_harmless_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # garbage makes the unpickler fail in many ways (KeyError, IndexError, struct.error...)
        # the weights_only unpickler names the class or function it refused with "GLOBAL"
        if isinstance(e, pickle.UnpicklingError) and "global" in str(e).lower():
            raise DinoError(
                f"refusing to load {path}: it holds Python objects beyond tensors and plain data, "
                f"and unpickling them could run code; re-save it as a plain state dict") from None
        detail = str(e).strip().split("\n")[0] if isinstance(e, RuntimeError) else type(e).__name__
        raise DinoError(f"{path} is not a readable checkpoint (truncated or corrupt: {detail}); "
                        f"re-download or delete it") from None


def plain_args(args):
    """Flags (a dict, or an argparse Namespace as the published code saves them) -> dict of plain
    values."""
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, dict):
        return {}
    return {k: v for k, v in args.items()
            if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}


def _guess_flags(state):
    """'--arch vit_small --patch_size 16 --out_dim 65536' from a state dict, for error messages."""
    flat = {k.removeprefix("backbone."): v for k, v in state.items()}
    flags = []
    if "cls_token" in flat and "patch_embed.proj.weight" in flat:
        dim = flat["cls_token"].shape[-1]
        arch = {192: "vit_tiny", 384: "vit_small", 768: "vit_base"}.get(dim, f"(embed dim {dim})")
        flags += [f"--arch {arch}", f"--patch_size {flat['patch_embed.proj.weight'].shape[-1]}"]
    for k in ("head.last_layer.weight_v", "head.last_layer.parametrizations.weight.original1"):
        if k in state:
            flags.append(f"--out_dim {state[k].shape[0]}")
    return " ".join(flags)


def load_pretrained_weights(model, path, checkpoint_key=None, checkpoint=None):
    """Published weights, a state dict or a training checkpoint (ours or the published code's;
    checkpoint_key picks its network, default teacher) into a backbone (a ViT, a torchvision model),
    a DINOHead or a MultiCropWrapper, strictly; prints what was taken. checkpoint: the file's
    content, when the caller has read it already."""
    ckpt = load_checkpoint_file(path) if checkpoint is None else checkpoint
    if not isinstance(ckpt, dict):  # (a list, a tensor): no entries, not a state dict
        ckpt = {}
    key = checkpoint_key or ("teacher" if "teacher" in ckpt else None)
    if key is not None:
        if key not in ckpt:
            entries = [k for k, v in ckpt.items() if isinstance(v, dict)]
            raise DinoError(
                f"{path} has no '{key}' entry (it has: {', '.join(entries) or 'none'}); "
                f"pass --checkpoint_key with one of those")
        ckpt = ckpt[key]
    if not isinstance(ckpt, dict) or not ckpt \
            or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise DinoError(f"{path} is not a state dict of tensors; pass --checkpoint_key to pick one")
    state = {k.removeprefix("module."): v for k, v in ckpt.items()}
    part = {MultiCropWrapper: "backbone and head",
            vits.DINOHead: "head"}.get(type(model), "backbone")
    prefix = f"{part}." if any(k.startswith(f"{part}.") for k in state) else ""
    taken = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    expected = model.state_dict()
    problems = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
                for k, v in taken.items() if k in expected and v.shape != expected[k].shape]
    problems = [f"{len(problems)} shape mismatches (e.g. {problems[0]})"] if problems else []
    if not problems:  # (WeightNormLinear renames the newer weight-norm keys as they load)
        missing, unexpected = model.load_state_dict(taken, strict=False)
        problems = [f"{len(keys)} {kind} keys (e.g. {keys[0]})"
                    for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if problems:
        guess = _guess_flags(state)
        hint = "check --arch and --patch_size"
        if guess:
            hint = f"the checkpoint looks like {guess}: pass that"
        raise DinoError(f"{path} does not fit the model: {'; '.join(problems)}; {hint}")
    ignored = sorted({k.split(".")[0] for k in state if not k.startswith(prefix)})
    message = f"loaded {path}: {key + ' ' if key else ''}{part}, {len(taken)} tensors"
    if ignored:
        message += f"; {', '.join(ignored)} ignored"
    if get_rank() == 0:
        print(message)
    return model


def save_checkpoint(state, path, write=torch.save):
    """write(state, file) to a temporary file, flush to disk, then rename: a crash never leaves a
    half-written file."""
    # not per process: a killed save leaves one stale file that the next save replaces
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def checkpoint_path(output_dir):
    """A run's checkpoint: what train writes every epoch and resumes from, what the evaluation
    commands evaluate by default."""
    return os.path.join(output_dir, "checkpoint.pth")


STRUCTURAL_FLAGS = ("arch", "patch_size", "out_dim", "norm_last_layer", "use_bn_in_head")
# What a training checkpoint holds besides "epoch", "args" and "scaler": save_epoch writes these
# parts of the TrainState, resume restores them. The scaler is optional: the published code names
# its fp16_scaler.
TRAINING_STATE = ("student", "teacher", "optimizer", "dino_loss")


def save_epoch(s, args, epoch, stats):
    """Checkpoint atomically, then log the stats (a crash loses a log line, never a checkpoint)."""
    state = {k: getattr(s, k).state_dict() for k in (*TRAINING_STATE, "scaler")}
    state.update(epoch=epoch + 1, args=plain_args(args))
    if args.saveckp_freq and epoch % args.saveckp_freq == 0:
        save_checkpoint(state, os.path.join(args.output_dir, f"checkpoint{epoch:04d}.pth"))
    save_checkpoint(state, s.checkpoint_path)
    with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
        f.write(json.dumps(stats) + "\n")
    max_entropy = math.log(args.out_dim)
    print(f"epoch {epoch} done: loss {stats['loss']:.4f}, "
          f"teacher entropy {stats['teacher_entropy']:.3f}, KL {stats['kl']:.3f}, "
          f"batch-mean entropy {stats['batch_mean_entropy']:.3f} (max {max_entropy:.3f}), "
          f"{stats['skipped_images']} unreadable images skipped", flush=True)


def resume(path, s, args):
    """Restore TrainState s from the checkpoint at path, trained with the flags args; returns the
    epoch to start at."""
    fresh = "to start fresh, move it away or pass another --output_dir"
    try:
        ckpt = load_checkpoint_file(path)
    except DinoError as e:
        raise DinoError(f"cannot resume: {e}; {fresh}") from None
    required = (*TRAINING_STATE, "epoch")
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise DinoError(f"cannot resume: {path} is not a training checkpoint "
                        f"(no {', '.join(missing)}); {fresh}")
    old = plain_args(ckpt.get("args"))
    clash = [f"--{k} {old[k]} (now {getattr(args, k)})" for k in STRUCTURAL_FLAGS
             if k in old and old[k] != getattr(args, k)]
    if clash:
        raise DinoError(f"{path} was trained with {', '.join(clash)}; pass the checkpoint's flags, "
                        f"or another --output_dir to start fresh")
    changed = [f"{k} {old[k]} -> {v}" for k, v in vars(args).items()
               if k in old and old[k] != v]
    for name in TRAINING_STATE:
        # the published code saves its student as DDP wraps it: module.backbone...
        state = {k.removeprefix("module."): v for k, v in ckpt[name].items()}
        getattr(s, name).load_state_dict(state)
    if ckpt.get("scaler"):
        s.scaler.load_state_dict(ckpt["scaler"])
    if get_rank() == 0:
        if changed:
            print(f"resuming with changed flags: {', '.join(changed)}")
        print(f"resumed from {path} at epoch {ckpt['epoch']}")
        if ckpt["epoch"] >= args.epochs:
            print(f"the checkpoint has all {args.epochs} epochs already: nothing to train; "
                  f"pass a larger --epochs to train longer")
    return ckpt["epoch"]


def start_from_weights(s, args):
    """Continued pre-training from --pretrained_weights, with a fresh optimizer and schedules: a
    full checkpoint gives each network its entry (heads too with --pretrained_heads), other weights
    both backbones and fresh heads."""
    ckpt = load_checkpoint_file(args.pretrained_weights)
    if isinstance(ckpt, dict) and {"student", "teacher"} <= set(ckpt) and args.pretrained_heads:
        try:
            for net, name in ((s.student, "student"), (s.teacher, "teacher")):
                load_pretrained_weights(net, args.pretrained_weights,
                                        args.checkpoint_key or name, ckpt)
        except DinoError as e:
            raise DinoError(f"{e}, or --pretrained_heads false to start new heads") from None
        return
    for net in (s.student, s.teacher):
        load_pretrained_weights(net.backbone, args.pretrained_weights, args.checkpoint_key, ckpt)
    frozen_epochs = args.freeze_backbone_epochs
    plan = "--freeze_backbone_epochs N would train them alone first"
    if frozen_epochs:
        plan = f"the backbone stays fixed for --freeze_backbone_epochs {frozen_epochs}"
    if get_rank() == 0:
        print(f"the heads start fresh; {plan}")


# -----------------------------------------------------------------------------
# processes: distributed setup and the launcher

def init_distributed(timeout_minutes=30):
    """(rank, world_size, device). Joins the process group when launched by torchrun or `launch`."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    device = torch.device("cpu")
    if cuda:
        # LOCAL_RANK counts the node's processes; where each one sees only its own GPU, that GPU is
        # number 0
        device = torch.device("cuda",
                              int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    # A lost or hung peer: gloo's collectives raise in Python (_run reports it); NCCL's wait on the
    # GPU, out of Python's reach, until NCCL's watchdog aborts the process (SIGABRT) after the
    # timeout, which the launcher or torchrun report. TORCH_NCCL_BLOCKING_WAIT would raise instead,
    # but makes every collective's wait a host sync.
    if "RANK" in os.environ and not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if cuda else "gloo",
                                    timeout=datetime.timedelta(minutes=timeout_minutes),
                                    device_id=device if cuda else None)
        # e.g. NCCL's "Duplicate GPU detected": more processes than GPUs
        except dist.DistBackendError as e:
            raise DinoError(
                f"the process group did not start: {str(e).strip().splitlines()[-1]}; "
                f"run one process per GPU (torchrun --nproc_per_node at most "
                f"{torch.cuda.device_count()})") from None
    return rank, world_size, device


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LostContactError(DinoError):
    """Another process of the group died or hung; every survivor reports it (the lost one may be
    rank 0)."""


def _run(fn, args):
    """fn(args) in this process; in a group, a failing collective or store (a RuntimeError) means a
    lost peer."""
    try:
        return fn(args)
    except RuntimeError as e:
        if get_world_size() <= 1:
            raise
        raise LostContactError(
            f"lost contact with another training process ({type(e).__name__}); "
            f"rerun the same command to resume from the last checkpoint") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawned_worker(local_rank, fn, args, world_size, errors):
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size))
    try:
        _run(fn, args)
    # the message goes to the launching process, which prints it once (not a traceback)
    except DinoError as e:
        errors.put(str(e))
        sys.exit(2)


def launch(fn, args):
    """fn(args) in one process per visible GPU, else in this one (torchrun, one GPU, CPU); a dead
    one ends them all."""
    n_gpus = torch.cuda.device_count()
    if "RANK" in os.environ or n_gpus <= 1:
        return _run(fn, args)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    errors = torch.multiprocessing.get_context("spawn").SimpleQueue()
    # spawn warns "Terminating process ... via signal SIGTERM" as it stops the others when one
    # fails: noise there
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    try:
        torch.multiprocessing.spawn(_spawned_worker, args=(fn, args, n_gpus, errors),
                                    nprocs=n_gpus)
    # a worker's exception (a bug) keeps its traceback
    except torch.multiprocessing.ProcessExitedException as e:
        if not errors.empty():
            raise DinoError(errors.get()) from None
        if e.signal_name:
            nccl = " (NCCL's reaction to a lost or hung process)"
            why = nccl if e.signal_name == "SIGABRT" else ""
            raise DinoError(f"training process {e.error_index} was killed by {e.signal_name}{why}; "
                            f"rerun the same command to resume from the last checkpoint") from None
        raise


# -----------------------------------------------------------------------------
# the demo data and the presets

def _polygon(n, radii=(1.0,), turn=-0.25):
    """n corners on the unit circle, the first at `turn` turns (-1/4: pointing up); a star
    alternates two radii."""
    angle = 2 * np.pi * (np.arange(n) / n + turn)
    return np.stack([np.cos(angle), np.sin(angle)], 1) * np.resize(radii, n)[:, None]


# a quarter of a cross's outline, rotated four times below
_ARM = np.array([[0.3, 0.3], [1, 0.3], [1, -0.3]])
# outlines at unit size: [(corners [n, 2], True to fill or False to cut out)]
DEMO_SHAPES = {
    "disk": [(_polygon(48), True)],
    "ring": [(_polygon(48), True), (0.55 * _polygon(48), False)],
    "square": [(_polygon(4, turn=-0.125), True)],
    "triangle": [(_polygon(3), True)],
    "cross": [(np.concatenate([_ARM @ np.linalg.matrix_power([[0, -1], [1, 0]], k)
                               for k in range(4)]), True)],
    "star": [(_polygon(10, (1.0, 0.45)), True)]}
DEMO_CLASSES = tuple(DEMO_SHAPES)
DEMO_AREA = (0.12, 0.28)  # the object's share of the image
DEMO_ROTATION = 15  # its rotation (degrees: DINO's augmentations have none)
DEMO_GREY = 155  # the background, the same in every image
# the pixel noise's standard deviation (grey levels): what hides the shape from a random network
DEMO_NOISE = 50


def demo_image(cls, rng, size=64, supersample=3):
    """A demo image and its object's mask [size, size]: the class is the shape of the one dark
    object on a grey background, under strong pixel noise. Crops of one image share the shape and
    hardly the noise (fixed per image, but each crop resamples it at its own scale and place), so
    DINO learns to see through the noise that drowns the shape in a random network's features.
    Nothing else is shared that separates images: the background is the same grey everywhere (a
    brightness, tint or clutter per image is what the crops of one image share, and the network
    learns that instead of the shape); place and size vary as the crops vary them, the tilt is
    small. The object is near black in every image: with a colour of its own, colour, not shape, is
    what crops of one image share. Supersampled: antialiased."""
    n = size * supersample
    img = Image.new("RGB", (n, n), (DEMO_GREY,) * 3)
    shape = DEMO_SHAPES[cls]
    shoelace = [0.5 * abs((c[:, 0] * np.roll(c[:, 1], 1) - c[:, 1] * np.roll(c[:, 0], 1)).sum())
                for c, _ in shape]
    area = sum(a if fill else -a for a, (_, fill) in zip(shoelace, shape))  # a cut-out subtracts
    # every class covers the same share of the image
    radius = np.sqrt(rng.uniform(*DEMO_AREA) * n * n / area)
    t = np.radians(rng.uniform(-DEMO_ROTATION, DEMO_ROTATION))
    corners = radius * np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
    center = rng.uniform(radius, n - radius, 2)
    mask = Image.new("L", (n, n))
    for c, fill in shape:
        ImageDraw.Draw(mask).polygon([tuple(p) for p in c @ corners + center],
                                     fill=255 if fill else 0)
    img.paste((int(rng.uniform(25, 40)),) * 3, mask=mask)  # near black: no colour
    pixels = np.asarray(img.resize((size, size), Image.BOX), dtype=np.float64)
    pixels += rng.normal(0, DEMO_NOISE, (size, size, 3))
    return (Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8)),
            np.asarray(mask.resize((size, size), Image.BOX)) >= 128)


def make_demo_dataset(root, n_train=300, n_val=200, seed=0):
    """The demo ImageFolder (root/{train,val}/<class>) and masks (root/masks/...), written once
    beside root and renamed into place: processes starting at once (torchrun) never read
    half-written images. 200 val images a class: on 50, k-NN moves by points between draws."""
    root = Path(root)
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
        rng = np.random.default_rng(seed)
        for split, n in (("train", n_train), ("val", n_val)):
            for cls in DEMO_CLASSES:
                image_dir = tmp / split / cls
                mask_dir = tmp / "masks" / split / cls
                for folder in (image_dir, mask_dir):
                    folder.mkdir(parents=True)
                for i in range(n):
                    img, mask = demo_image(cls, rng)
                    img.save(image_dir / f"{i:04d}.png")
                    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_dir / f"{i:04d}.png")
        try:
            os.rename(tmp, root)
        except OSError:  # another process renamed its copy first
            shutil.rmtree(tmp)
    return str(root)


def demo_path(output_dir, seed):
    """Where the demo data of a run with --seed seed lie: a folder per seed, so a run or an
    evaluation never reads another seed's images."""
    return str(Path(output_dir, f"demo_data_seed{seed}"))


# --preset P: PRESETS[P] holds its reason and, per command, the values of its unset flags
PRESETS = {"paper": {}}  # the parser's defaults
# --preset small: the recipe for a few thousand images and a few hundred steps, measured on the demo
# data (README); the paper's stays the default with --data_path
PRESETS["small"] = dict(
    why=("BatchNorm in the head (without it the teacher's outputs go uniform in a few hundred "
         "steps), a fast teacher (momentum 0.97: the paper's 0.996 barely leaves random init in so "
         "few steps), a high lr and a sharp teacher temperature (0.0175)"),
    # teacher temperature 0.0175: better than 0.02 in the mean over 5 demo seeds of k-NN, attention
    # and entropy; 0.015 sharpens k-NN but loses the attention (seed 0). lr 0.005: the teacher's
    # k-NN beats random init by 12 points or more on each of 5 demo seeds (at 0.01 it fell below
    # random init on some); the attention then finds the object on one seed in five (README).
    train=dict(use_bn_in_head=True, momentum_teacher=0.97, lr=0.005, warmup_epochs=1, out_dim=256,
               teacher_temp=0.0175, warmup_teacher_temp=0.0175))
# The demo configuration (--preset demo, the default without --data_path): the small recipe with
# the demo's data and sizes
PRESETS["demo"] = dict(
    why="sized to train in minutes on a CPU; " + PRESETS["small"]["why"],
    train=dict(PRESETS["small"]["train"], arch="vit_tiny", patch_size=8, epochs=4,
               batch_size_per_gpu=32, global_crops_size=32, local_crops_size=16,
               local_crops_number=4, local_crops_scale=[0.1, 0.4], num_workers=2, saveckp_freq=4,
               drop_path_rate=0.0, knn_every=1),
    # under two thousand images give a few dozen steps an epoch: they need a larger lr than
    # ImageNet's 100 epochs
    linear=dict(epochs=10, lr=0.1, batch_size_per_gpu=32, num_workers=2),
    knn=dict(num_workers=2, random_init=True, nb_knn=[10, 20]))  # the README table's k


# -----------------------------------------------------------------------------
# the commands

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_output_dir(path):
    """Create the output dir and prove it is writable, before any work starts."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except FileExistsError:
        raise DinoError(f"--output_dir {path} is a file, not a directory; "
                        f"pass a directory path") from None
    except OSError as e:
        raise DinoError(f"--output_dir {path} is not writable ({e.strerror}); "
                        f"pass a writable directory") from None


def autocast_dtype(precision, device):
    """--precision as an autocast dtype (None: fp32); auto: bf16 on GPUs with native bf16, fp16 on
    older ones."""
    if precision == "auto":
        if device.type != "cuda":
            precision = "fp32"
        elif torch.cuda.is_bf16_supported(including_emulation=False):
            precision = "bf16"
        else:
            precision = "fp16"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def build_train_state(args, n_iter, world_size, device):
    """The networks on the device, the optimizer, the loss and the schedules of a fresh run."""
    student, teacher = build_dino_networks(args.arch, args.patch_size, args.out_dim,
                                           args.use_bn_in_head, args.norm_last_layer,
                                           args.drop_path_rate, args.grad_checkpointing)
    # BatchNorm (in the head, in a convnet) over the whole batch, as published; SyncBatchNorm runs
    # on CUDA only. The teacher's too: its statistics come from its own forward passes (train mode),
    # the EMA moves its parameters only.
    if world_size > 1 and device.type == "cuda":
        student, teacher = (nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in (student, teacher))
    student, teacher = student.to(device), teacher.to(device)
    groups = get_params_groups(student)
    # lr and weight decay are set every step
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, fused=True)
    else:
        optimizer = torch.optim.SGD(groups, lr=0, momentum=0.9)
    dino_loss = DINOLoss(args.out_dim, 2 + args.local_crops_number, args.warmup_teacher_temp,
                         args.teacher_temp, args.warmup_teacher_temp_epochs, args.epochs).to(device)
    amp_dtype = autocast_dtype(args.precision, device)
    # linear scaling: the total batch
    lr = args.lr * args.batch_size_per_gpu * args.accum_iter * world_size / 256.0
    # .tolist(): plain floats, so the optimizer state stays loadable with weights_only
    schedules = {
        "lr": cosine_scheduler(lr, args.min_lr, args.epochs, n_iter, args.warmup_epochs).tolist(),
        "wd": cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs,
                               n_iter).tolist(),
        "momentum": cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, n_iter).tolist(),
    }
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return TrainState(student, teacher, dino_loss, optimizer, scaler, schedules,
                      clip_grad=args.clip_grad, freeze_last_layer=args.freeze_last_layer,
                      freeze_backbone_epochs=args.freeze_backbone_epochs,
                      checkpoint_path=checkpoint_path(args.output_dir), amp_dtype=amp_dtype)


def train_loader(args, rank, world_size, device, on_device):
    """This process's share of the --data_path images in multi-crop batches, reshuffled every epoch
    by loader.sampler.set_epoch. on_device: the workers only crop and flip (MultiCropPhotometry does
    the rest on the device)."""
    augment = MultiCropGeometry if on_device else DataAugmentationDINO
    transform = augment(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                        args.global_crops_size, args.local_crops_size)
    dataset = ImageDataset(args.data_path, transform, args.seed)
    sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                           seed=args.seed)
    # its own generator: worker seeds from the global one would shift drop path on resume
    return DataLoader(dataset, sampler=sampler, batch_size=args.batch_size_per_gpu,
                      num_workers=args.num_workers, pin_memory=device.type == "cuda",
                      drop_last=True, persistent_workers=args.num_workers > 0,
                      generator=torch.Generator())


def collapse_alarm(stats, args):
    """Prints one line naming the collapse an epoch's means show, if any, with the flags most likely
    to end it in this run (their values derived from this run's). The paper's two collapses: uniform
    (centering without enough sharpening: every teacher output flat, its entropy near ln(out_dim),
    the student matching it, KL near 0) and one dimension (sharpening without enough centering:
    every image's teacher output peaks on the same dimension, the batch-mean entropy near 0)."""
    max_entropy = math.log(args.out_dim)
    # At the end of the momentum schedule the teacher is frozen (this epoch's mean EMA step under a
    # tenth of the first) and the center catches up with its outputs, which flattens them: uniform
    # outputs there are no collapse, the features keep what they learned (demo runs with their
    # best k-NN end so). A collapse happens while the teacher still moves.
    teacher_moves = stats["teacher_step"] > 0.1 * (1 - args.momentum_teacher)
    # "near": within a tenth of ln(out_dim), the scale of all three
    flat = stats["teacher_entropy"] > 0.9 * max_entropy and stats["kl"] < 0.1 * max_entropy
    if flat and teacher_moves:
        kind = "uniform outputs (teacher entropy near ln(out_dim), KL near 0)"
        # BatchNorm in the head, then a sharper and a slower teacher
        fixes = [f"--teacher_temp {args.teacher_temp / 2:g}",
                 f"--momentum_teacher {1 - (1 - args.momentum_teacher) / 2:g}"]
        if not args.use_bn_in_head:
            fixes.insert(0, "--use_bn_in_head true")
    elif stats["batch_mean_entropy"] < 0.1 * max_entropy:
        kind = "one dimension (batch-mean entropy near 0)"
        # a softer and a slower teacher, a smaller student step
        fixes = [f"--teacher_temp {args.teacher_temp * 2:g}",
                 f"--momentum_teacher {1 - (1 - args.momentum_teacher) / 2:g}",
                 f"--lr {args.lr / 2:g}"]
    else:
        return
    print(f"warning: collapse to {kind} in epoch {stats['epoch']}; the run goes on; "
          f"for this run try {', '.join(fixes[:3])}", flush=True)


def train(args, device_photometry=None):
    """The train command in one process: data, networks, resume or pretrained weights, then the
    epochs. device_photometry: colour, blur and solarize batched on the device (default: on GPUs),
    else in the workers."""
    rank, world_size, device = init_distributed(args.dist_timeout)
    if rank == 0:
        prepare_output_dir(args.output_dir)
    seed_everything(args.seed)  # the same initial weights on every rank
    on_device = device.type == "cuda" if device_photometry is None else device_photometry
    loader = train_loader(args, rank, world_size, device, on_device)
    dataset = loader.dataset
    n_iter = len(loader) // args.accum_iter  # optimizer steps per epoch
    if n_iter == 0:
        raise DinoError(f"{len(dataset)} images split over {world_size} process(es) do not fill "
                        f"one batch of {args.batch_size_per_gpu * args.accum_iter}; lower "
                        f"--batch_size_per_gpu, --accum_iter")
    s = build_train_state(args, n_iter, world_size, device)
    if args.knn_every:  # at the training resolution: resize to the global crop size, center crop
        transform = eval_transform(args.global_crops_size, args.global_crops_size)
        knn_sets = image_folders(args.knn_data_path, transform, transform)
    start_epoch = 0
    if os.path.exists(s.checkpoint_path):  # an existing run wins over --pretrained_weights
        if args.pretrained_weights and rank == 0:
            print(f"{s.checkpoint_path} exists: resuming that run, "
                  f"--pretrained_weights is not used")
        start_epoch = resume(s.checkpoint_path, s, args)
    elif args.pretrained_weights:
        start_from_weights(s, args)
    # every rank must continue the same run: the output dir must be shared between nodes
    if world_size > 1:
        epochs = torch.tensor([start_epoch, -start_epoch], device=device)
        dist.all_reduce(epochs, op=dist.ReduceOp.MAX)
        if epochs[0] != -epochs[1]:
            raise DinoError(
                f"the processes resumed different epochs ({-epochs[1]} to {epochs[0]}): put "
                f"--output_dir on a filesystem that every node shares")
        s.student_forward = nn.parallel.DistributedDataParallel(s.student)
    photometry = None
    if on_device:
        photometry = MultiCropPhotometry(args.local_crops_number, s.amp_dtype or torch.float32,
                                         args.compile)
    if args.compile:
        compile_step(s)
    if rank == 0:
        print(f"training {args.arch}/{args.patch_size} on {len(dataset)} images, {world_size} "
              f"process(es) on {device.type}, batch "
              f"{args.batch_size_per_gpu * args.accum_iter * world_size}, {n_iter} it/epoch, "
              f"precision {args.precision}, compile {args.compile}, colour and blur "
              f"{'on the device' if photometry else 'in the loader workers'}", flush=True)
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        # drop path and device photometry: replayed on resume
        seed_everything(args.seed + 1000 * epoch + rank)
        skipped_before = dataset.skipped.item()
        stats = train_one_epoch(s, loader, epoch, args.epochs, args.accum_iter, args.log_every,
                                photometry)
        skipped = torch.tensor(dataset.skipped.item() - skipped_before, device=device)
        if world_size > 1:
            dist.all_reduce(skipped)
        stats["skipped_images"] = skipped.item()
        if args.knn_every and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
            results = knn_accuracy(s.teacher.backbone, *knn_sets, args.batch_size_per_gpu,
                                   args.num_workers, device)
            if rank == 0:
                stats["knn_top1"] = results[0][1]  # (k=20, top-1, top-5)
                print(f"epoch {epoch}: teacher k-NN top-1 {stats['knn_top1']:.2f} % on "
                      f"{args.knn_data_path}")
        if rank == 0:
            save_epoch(s, args, epoch, stats)
            collapse_alarm(stats, args)
    if world_size > 1:
        dist.barrier()
    return s


def load_backbone(args, device, pretrained=True):
    """The frozen backbone in eval mode: with --pretrained_weights, or (pretrained=False) random
    (seed 0)."""
    # frozen features: TF32 on GPUs, PyTorch's default before 1.12
    torch.backends.cuda.matmul.allow_tf32 = True
    if not pretrained:
        torch.manual_seed(0)
    model = build_backbone(args.arch, args.patch_size)
    if pretrained:
        load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key)
    return model.eval().requires_grad_(False).to(device)


def image_folders(data_path, train_transform, val_transform):
    """ImageFolders data_path/train and data_path/val; their class folders must match, or labels
    would differ."""
    folders = []
    for split, transform in (("train", train_transform), ("val", val_transform)):
        root = os.path.join(data_path, split)
        if not os.path.isdir(root):
            raise DinoError(f"{data_path} has no {split}/ folder; it must hold train/<class>/ and "
                            f"val/<class>/ image folders")
        try:
            folders.append(torchvision.datasets.ImageFolder(root, transform, loader=load_rgb))
        except FileNotFoundError as e:  # no class folders, or a class folder without images
            raise DinoError(f"{root}: {e}") from None
    train_set, val_set = folders
    if train_set.classes != val_set.classes:
        differ = sorted(set(train_set.classes) ^ set(val_set.classes))
        raise DinoError(f"train/ and val/ of {data_path} must hold the same class folders "
                        f"({len(train_set.classes)} vs {len(val_set.classes)}; e.g. {differ[0]} "
                        f"is in only one)")
    return train_set, val_set


def knn_main(args):
    """Weighted k-NN accuracy for every k in --nb_knn (and of a --random_init), printed and in
    knn_results.json."""
    _, _, device = init_distributed()
    transform = eval_transform(args.resize_size, args.crop_size)
    train_set, val_set = image_folders(args.data_path, transform, transform)
    models = [(args.pretrained_weights, True)]  # (name, pretrained)
    if args.random_init:
        models.append(("random init (seed 0)", False))
    rows = []
    for name, pretrained in models:
        model = load_backbone(args, device, pretrained)
        results = knn_accuracy(model, train_set, val_set, args.batch_size_per_gpu, args.num_workers,
                               device, args.nb_knn, args.temperature)
        # results is None on the processes other than 0
        rows += [dict(model=name, k=k, top1=top1, top5=top5) for k, top1, top5 in results or []]
    if get_rank() != 0:
        return
    print(f"weighted k-NN, T={args.temperature}, "
          f"{len(train_set)} train / {len(val_set)} val images")
    width = max(len(r["model"]) for r in rows)
    print(f"{'model':<{width}}  {'k':>4}  {'top-1':>6}  {'top-5':>6}")
    for r in rows:
        print(f"{r['model']:<{width}}  {r['k']:>4}  {r['top1']:6.2f}  {r['top5']:6.2f}")
    path = os.path.join(args.output_dir, "knn_results.json")
    Path(path).write_text(json.dumps({"args": plain_args(args), "results": rows}, indent=1))
    print(f"wrote {path}")


def demo_jaccard(args, device, out_dir):
    """Does attention find the object? Jaccard of the patches holding 60 % of the CLS attention with
    the object's mask on the demo's val images at the training resolution, trained and at random
    init; chance: the object's share. Written to out_dir/demo_jaccard.json."""
    demo, size = args.demo["root"], args.crop_size
    files = list_images(os.path.join(demo, "val"))
    images = torch.stack([eval_transform(size, size)(load_rgb(f)) for f in files])
    masks = []
    for f in files:  # each image's object mask, resized as the image
        mask = Image.open(Path(demo, "masks", f.relative_to(demo))).resize((size, size), Image.BOX)
        masks.append(torch.from_numpy(np.asarray(mask) >= 128))
    masks = torch.stack(masks)
    scores = {"chance": masks.float().mean().item(), "images": len(files), "size": size}
    for name, pretrained in (("trained", True), ("random", False)):
        model = load_backbone(args, device, pretrained)
        maps = torch.cat([attention_maps(model, x.to(device)).float().cpu()
                          for x in images.split(64)])
        # the mean over the images of the heads' mean map's Jaccard, then of each head's
        jaccard = [attention_jaccard(m, masks, args.patch_size).mean().item()
                   for m in (maps.mean(1), *maps.unbind(1))]
        scores[name] = jaccard[0]
        scores[f"{name}_best_head"] = max(jaccard[1:])
    print(f"attention on the object (Jaccard, {len(files)} demo val images, mean over heads, best "
          f"head): trained {scores['trained']:.3f}, {scores['trained_best_head']:.3f}; random "
          f"init {scores['random']:.3f}, {scores['random_best_head']:.3f}; chance "
          f"{scores['chance']:.3f}")
    os.makedirs(out_dir, exist_ok=True)
    Path(out_dir, "demo_jaccard.json").write_text(json.dumps(scores, indent=1))


def attn_main(args):
    """Last-block attention maps of an image, or of each image in a folder (an output folder each);
    one process."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = os.path.join(args.output_dir, "attn")
    if args.demo:
        demo_jaccard(args, device, out_dir)
    folder = os.path.isdir(args.image_path)
    if folder:  # (image, its output folder) for each image under the folder, in the same tree
        images = [(path, os.path.join(out_dir, path.relative_to(args.image_path).with_suffix("")))
                  for path in list_images(args.image_path)]
    else:
        images = [(args.image_path, out_dir)]
    if not images:
        raise DinoError(f"--image_path {args.image_path} holds no images "
                        f"({', '.join(IMG_EXTENSIONS)})")
    model = None
    for n, (path, out) in enumerate(images, 1):
        try:
            img = load_rgb(path)
        except UNREADABLE as e:
            if not folder:
                raise DinoError(f"--image_path {path} is not a readable image "
                                f"({str(e).splitlines()[0]})") from None
            print(f"warning: skipping unreadable image {path}: {e}", file=sys.stderr)
            continue
        # after the first readable image: an unreadable file is reported before the weights
        if model is None:
            model = load_backbone(args, device)
        # resized, then cropped to whole patches
        h, w = args.image_size
        p = args.patch_size
        img = img.resize((w, h), Image.BICUBIC).crop((0, 0, w - w % p, h - h % p))
        maps = attention_maps(model, NORMALIZE(img)[None].to(device))[0].float().cpu()
        masks = None if args.threshold is None else threshold_masks(maps, args.threshold)
        written = save_attention_images(img, maps, masks, args.patch_size, out)
        if folder:
            text = f"{n}/{len(images)} {path}: {len(written)} images in {out}"
        else:  # a single image: the files written
            text = "\n".join(written)
        print(text, flush=True)
    if model is None:  # loaded at the first readable image
        raise DinoError(f"no image in --image_path {args.image_path} could be read")


def embed_main(args):
    """embed_folder on --data_path with --pretrained_weights, written by process 0 to --output (.npz
    or .pt)."""
    _, _, device = init_distributed()
    model = load_backbone(args, device)
    if args.n_last_blocks and args.n_last_blocks > len(model.blocks):
        raise DinoError(f"--n_last_blocks {args.n_last_blocks}: {args.arch} has only "
                        f"{len(model.blocks)} blocks")
    out = embed_folder(model, args.data_path, args.resize_size, args.crop_size, args.patch_tokens,
                       args.n_last_blocks, args.batch_size_per_gpu, args.num_workers, device)
    if out is None:
        return
    if not out["paths"]:
        raise DinoError(f"no image under --data_path {args.data_path} could be read")
    # the paths stay strings
    arrays = {k: v.to(getattr(torch, args.dtype)) for k, v in out.items() if k != "paths"}
    out.update(arrays)
    if args.output.endswith(".npz"):  # the paths as a string array: np.load needs no pickle
        save_checkpoint({k: np.asarray(v) for k, v in out.items()}, args.output,
                        lambda a, f: np.savez(f, **a))
    else:
        save_checkpoint(out, args.output)
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in arrays.items())
    print(f"wrote {args.output}: {shapes}")


def linear_main(args):
    """A linear classifier on frozen features (SGD, cosine lr); the last epoch's is saved to
    linear.pth with scores."""
    rank, world_size, device = init_distributed()
    seed_everything(args.seed)
    train_transform = T.Compose([
        T.RandomResizedCrop(args.crop_size, interpolation=BICUBIC),
        T.RandomHorizontalFlip(), NORMALIZE])
    val_transform = eval_transform(args.resize_size, args.crop_size)
    train_set, val_set = image_folders(args.data_path, train_transform, val_transform)
    model = load_backbone(args, device)

    def features(images):
        return linear_features(model, images, args.n_last_blocks, args.avgpool_patchtokens)

    dim = model.embed_dim * (args.n_last_blocks + int(args.avgpool_patchtokens))
    classifier = nn.Linear(dim, len(train_set.classes)).to(device)
    # as published; the bias starts at 0, no BatchNorm in front
    nn.init.normal_(classifier.weight, std=0.01)
    nn.init.zeros_(classifier.bias)
    ddp = nn.parallel.DistributedDataParallel(classifier) if world_size > 1 else classifier
    lr = args.lr * args.batch_size_per_gpu * world_size / 256
    optimizer = torch.optim.SGD(ddp.parameters(), lr, momentum=0.9, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, eta_min=0)
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, seed=args.seed)
    loader = DataLoader(train_set, sampler=sampler, batch_size=args.batch_size_per_gpu,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=args.num_workers > 0)
    val_loader = shard_loader(val_set, args.batch_size_per_gpu, args.num_workers, device)
    if rank == 0:
        print(f"linear probe of {args.pretrained_weights} ({args.arch}/{args.patch_size}, {dim} "
              f"features) on {len(train_set)} train / {len(val_set)} val images, "
              f"{len(train_set.classes)} classes, lr {lr:.2e}")
    best = dict(top1=-1.0)
    for epoch in range(1, args.epochs + 1):
        start = time.time()
        sampler.set_epoch(epoch)
        loss = train_linear_epoch(features, ddp, loader, optimizer, device)
        scheduler.step()
        if epoch % args.val_freq and epoch < args.epochs:
            continue
        # the plain module: DDP's forward would expect every process to run the same number
        # of batches
        top1, top5 = evaluate_linear(features, classifier, val_loader, device)
        if top1 > best["top1"]:  # the first epoch of the best top-1
            best = dict(top1=top1, top5=top5, epoch=epoch)
        if rank == 0:
            print(f"epoch {epoch}/{args.epochs}: loss {loss:.4f}, val top-1 {top1:.2f} top-5 "
                  f"{top5:.2f} (best top-1 {best['top1']:.2f} at epoch {best['epoch']}), "
                  f"{time.time() - start:.1f}s", flush=True)
    if rank == 0:
        path = os.path.join(args.output_dir, "linear.pth")
        save_checkpoint({"state_dict": classifier.state_dict(), "classes": train_set.classes,
                         "epoch": args.epochs, "top1": top1, "top5": top5, "best": best,
                         "args": plain_args(args)}, path)
        print(f"best val top-1 {best['top1']:.2f} top-5 {best['top5']:.2f} "
              f"(epoch {best['epoch']}); the classifier of the last epoch is in {path}")
    return best


# -----------------------------------------------------------------------------
# the CLI

def number(kind, low, high=None, above=False):
    """argparse type: a number of this kind, at least low (above it with `above`), at most high."""
    def parse(text):
        value = kind(text)
        too_low = value <= low if above else value < low
        if too_low or (high is not None and value > high):
            if high is not None:
                bound = f"in ({low}, {high}]"
            elif above:
                bound = f"above {low}"
            else:
                bound = f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    return parse


COUNT = number(int, 0)
POSITIVE_INT = number(int, 1)
NONNEGATIVE = number(float, 0.0)
POSITIVE = number(float, 0, above=True)
FRACTION = number(float, 0, 1, above=True)


def bool_flag(s):
    if s.lower() in ("1", "true", "on", "yes"):
        return True
    if s.lower() in ("0", "false", "off", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s}")


def optimizer_name(s):
    if s not in ("adamw", "sgd"):
        lars = "lars is the published code's optimizer for convnets; ViTs train with adamw"
        raise argparse.ArgumentTypeError(lars if s == "lars" else f"expected adamw or sgd, got {s}")
    return s


# the type of a flag that names none: its default's kind, at least 0 (a negative count, lr or weight
# decay is a mistake); a flag with another range or kind names its type
IMPLIED_TYPES = {bool: bool_flag, int: COUNT, float: NONNEGATIVE}


class Parser(argparse.ArgumentParser):
    def add_argument(self, *names, **options):
        implied = IMPLIED_TYPES.get(type(options.get("default")))
        if implied:
            options.setdefault("type", implied)
        return super().add_argument(*names, **options)

    def error(self, message):
        # one line and status 2, like every other bad input (not argparse's usage block)
        self.exit(2, f"error: {message}; see python dino.py "
                     f"{' '.join(self.prog.split()[1:] + ['--help'])}\n")  # to stderr


# add_*_args(add) define a command's flags; add: its parser's add_argument
def add_model_args(add):
    add("--pretrained_weights",
        help="DINO weights or checkpoint; default: <output_dir>/checkpoint.pth")
    add("--checkpoint_key", help="network of a training checkpoint (default: teacher)")
    add("--arch", default="vit_small", choices=[*ARCHS, *TORCHVISION_ARCHS], metavar="ARCH",
        help="a ViT or torchvision model (resnet50...); default: the checkpoint's, else vit_small")
    add("--patch_size", type=POSITIVE_INT, default=16,
        help="default: the checkpoint's, else 16")
    add("--output_dir", default="output",
        help="the run to evaluate; knn, attn, linear write results here")


def add_eval_data_args(
        add,
        data_path_help="folder holding train/<class>/ and val/<class>/; default: the demo data",
        required=False):
    """The flags of the evaluations on a data set (knn, linear, embed): the model's, then the
    data's."""
    add_model_args(add)
    add("--data_path", required=required, help=data_path_help)
    add("--resize_size", type=POSITIVE_INT,
        help="default: crop_size * 256 / 224 (the demo data: crop_size)")
    add("--crop_size", type=POSITIVE_INT, default=224,
        help="default: 224 (the demo data: its global crop size)")
    add("--batch_size_per_gpu", type=POSITIVE_INT, default=128, help="images per GPU per batch")
    add("--num_workers", default=10, help="data loader processes per GPU")


def add_train_args(add):
    # data and output
    add("--data_path",
        help="folder of images (ImageFolder or flat, recursive); default: the demo data")
    add("--preset", choices=list(PRESETS),
        help="unset flags: the paper's recipe, the small-data one or the demo's")
    add("--output_dir", default="output",
        help="checkpoints and log.txt; resumes from checkpoint.pth here")
    # starting point
    add("--pretrained_weights",
        help="start both networks from these weights (continued pre-training)")
    add("--checkpoint_key",
        help="entry of a training checkpoint for both networks (default: each its own)")
    add("--pretrained_heads", default=True,
        help="take a training checkpoint's heads too")
    add("--freeze_backbone_epochs", default=0,
        help="epochs in which only the head trains")
    # model
    add("--arch", default="vit_small", choices=[*ARCHS, *TORCHVISION_ARCHS], metavar="ARCH",
        help="vit_tiny|small|base, or a torchvision model such as resnet50 (paper: vit_small)")
    add("--patch_size", type=POSITIVE_INT, default=16, help="patch side in pixels (paper: 16)")
    add("--out_dim", type=number(int, 2), default=65536, help="dimension of the DINO head output")
    add("--norm_last_layer", default=True,
        help="fix the last layer's weight norm at 1")
    add("--use_bn_in_head", default=False,
        help="BatchNorm in the head's MLP (paper: false)")
    # teacher
    add("--momentum_teacher", type=FRACTION, default=0.996, help="base EMA momentum, cosine to 1")
    add("--warmup_teacher_temp", type=POSITIVE, default=0.04,
        help="teacher temperature at the start, linear to --teacher_temp (paper: 0.04)")
    add("--teacher_temp", type=POSITIVE, default=0.04,
        help="teacher temperature after the warm-up (paper: 0.04)")
    add("--warmup_teacher_temp_epochs", default=0,
        help="epochs of the teacher temperature's warm-up (paper: 0)")
    # optimization
    add("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
        help="auto: bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 on the CPU")
    add("--use_fp16", dest="precision",
        type=lambda s: "fp16" if bool_flag(s) else "fp32", default=argparse.SUPPRESS,
        help="the published code's flag: true is --precision fp16, false fp32")
    add("--optimizer", type=optimizer_name, default="adamw", help="adamw or sgd")
    add("--weight_decay", default=0.04,
        help="weight decay at the start, cosine to --weight_decay_end (paper: 0.04)")
    add("--weight_decay_end", default=0.4,
        help="weight decay at the end (paper: 0.4)")
    add("--clip_grad", default=3.0,
        help="max gradient norm per tensor; 0: no clipping")
    add("--batch_size_per_gpu", type=POSITIVE_INT, default=64,
        help="images per GPU per loader batch (paper: 64, on 16 GPUs)")
    add("--accum_iter", type=POSITIVE_INT, default=1,
        help="micro-batches per optimizer step, EMA, schedule step and center update: "
             "a total batch of batch_size_per_gpu x accum_iter x processes")
    add("--grad_checkpointing", action="store_true", help="less memory, a third more compute")
    add("--epochs", type=POSITIVE_INT, default=100, help="epochs of training (paper: 100)")
    add("--freeze_last_layer", default=1,
        help="epochs with the head's last layer fixed")
    add("--lr", default=0.0005, help="peak lr for a total batch of 256")
    add("--warmup_epochs", default=10,
        help="epochs of linear lr warm-up from 0 (paper: 10)")
    add("--min_lr", default=1e-6,
        help="lr at the end of the cosine schedule (paper: 1e-6)")
    add("--drop_path_rate", default=0.1, help="stochastic depth of the student")
    # multi-crop
    add("--global_crops_scale", type=FRACTION, nargs=2, default=[0.4, 1.0],
        help="area range of the 2 global crops, a fraction of the image (paper: 0.4 1)")
    add("--local_crops_number", default=8,
        help="local crops per image; 0: no multi-crop (paper: 8)")
    add("--local_crops_scale", type=FRACTION, nargs=2, default=[0.05, 0.4],
        help="area range of the local crops (paper: 0.05 0.4)")
    add("--global_crops_size", type=POSITIVE_INT, default=224,
        help="side of the global crops in pixels (paper: 224)")
    add("--local_crops_size", type=POSITIVE_INT, default=96,
        help="side of the local crops in pixels (paper: 96)")
    # the run
    add("--saveckp_freq", default=20, help="also keep checkpointNNNN.pth this often")
    add("--knn_every", default=0,
        help="epochs between k-NN evaluations (k=20) of the teacher")
    add("--knn_data_path",
        help="for --knn_every: train/<class>/ and val/<class>/ (default: the demo's)")
    add("--seed", type=int, default=0,
        help="random seed (initial weights, data order, crops, drop path)")
    add("--num_workers", default=10, help="data loader processes per GPU")
    add("--log_every", type=POSITIVE_INT, default=10, help="iterations between progress lines")
    add("--compile", action="store_true",
        help="torch.compile the step's forward (teacher, student, loss) and the GPU photometry")
    add("--dist_timeout", type=POSITIVE, default=30,
        help="minutes a collective waits for a lost peer")
    add("--local_rank", "--local-rank", type=int,
        help="ignored: the launcher's environment decides")
    add("--dist_url", help="ignored likewise")


def add_knn_args(add):
    add_eval_data_args(add)
    add("--nb_knn", type=POSITIVE_INT, nargs="+", default=[10, 20, 100, 200],
        help="numbers of neighbours")
    add("--temperature", type=POSITIVE, default=0.07, help="votes weigh exp(cos_sim / temperature)")
    add("--random_init", default=False,
        help="also evaluate a random init (the demo: true)")


def add_attn_args(add):
    add_model_args(add)
    add("--image_path", help="any image PIL reads; default: the first demo val image")
    add("--image_size", type=POSITIVE_INT, nargs=2, metavar=("H", "W"), default=[480, 480],
        help="resize to this first (default 480 480; the demo: 4x its global crop size)")
    add("--threshold", type=FRACTION,
        help="also write per-head masks of this fraction of the attention")


def embeddings_file(path):
    if not path.endswith((".npz", ".pt")):
        raise argparse.ArgumentTypeError(
            f"must end in .npz (numpy) or .pt (torch), which picks the format; got {path}")
    return path


def add_embed_args(add):
    add_eval_data_args(add, "folder of images, searched recursively", required=True)
    add("--output", required=True, type=embeddings_file, help="FILE.npz or FILE.pt")
    add("--patch_tokens", action="store_true", help="also the final-norm patch tokens [N, h, w, D]")
    add("--n_last_blocks", default=0,
        help="also the CLS tokens of the last n blocks [N, n, D]")
    add("--dtype", choices=["float32", "float16"], default="float32",
        help="float16 halves the file")


def add_linear_args(add):
    add_eval_data_args(add)
    add("--n_last_blocks", type=POSITIVE_INT,
        help="CLS tokens of the last n blocks (default 4, vit_base 1)")
    add("--avgpool_patchtokens", type=bool_flag,
        help="and the mean patch token (default: for vit_base)")
    add("--epochs", type=POSITIVE_INT, default=100, help="epochs of training (paper: 100)")
    add("--lr", default=0.001,
        help="SGD lr for a total batch of 256, cosine to 0")
    add("--val_freq", type=POSITIVE_INT, default=1, help="epochs between validations")
    add("--seed", type=int, default=0, help="random seed (classifier init, data order)")


# name: (description, flags, the command)
COMMANDS = {"train": ("self-supervised pre-training", add_train_args, train),
            "knn": ("weighted k-NN accuracy of frozen features", add_knn_args, knn_main),
            "attn": ("last-block attention maps of an image", add_attn_args, attn_main),
            "linear": ("linear classifier on frozen features", add_linear_args, linear_main),
            "embed": ("CLS (and patch) token embeddings of every image in a folder",
                      add_embed_args, embed_main)}


def build_parser():
    """The CLI. A flag left out parses to None, so that what the command line gives shows;
    parser.defaults holds each command's defaults (the paper's recipe), filled in by parse_args."""
    parser = Parser(description="DINO: self-supervised ViT training and evaluation")
    parser.defaults = {}
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (description, add_args, _) in COMMANDS.items():
        p = sub.add_parser(name, help=description, description=description)
        add_args(p.add_argument)
        # (--use_fp16 has none: it sets --precision)
        defaults = {a.dest: a.default for a in p._actions if a.default is not argparse.SUPPRESS}
        parser.defaults[name] = defaults
        p.set_defaults(**dict.fromkeys(defaults))
    return parser


# flags that only a ViT has: with another backbone an error where given, ignored at their defaults
VIT_FLAGS = ("patch_size", "drop_path_rate", "grad_checkpointing", "patch_tokens", "n_last_blocks",
             "avgpool_patchtokens")


def parse_args(argv=None):
    """The values a command uses, settled in this one step: the flags the command line gives, the
    preset's values (else the defaults) for the others; for the evaluation commands, the arch, patch
    size, seed and resolution of the run they evaluate, from its checkpoint; without data, the demo
    data (args.demo, which main writes). A bad flag is one line before any work. Reads the
    checkpoint, writes nothing."""
    parser = build_parser()
    given = parser.parse_args(argv)
    args = copy.copy(given)
    command = args.command
    no_data = getattr(args, "data_path", "") is None  # train, knn, linear without --data_path
    # (train's flag; the other commands' is saved with their results too)
    args.preset = getattr(args, "preset", None) or ("demo" if no_data else "paper")
    for flag, value in (parser.defaults[command] | PRESETS[args.preset].get(command, {})).items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    trained = {}  # the flags the evaluated run was trained with
    if command != "train":
        if args.pretrained_weights is None:
            args.pretrained_weights = checkpoint_path(args.output_dir)
            if not os.path.isfile(args.pretrained_weights):
                raise DinoError(f"no --pretrained_weights given and no trained run at "
                                f"{args.pretrained_weights}; run `python dino.py train` first, or "
                                f"pass --pretrained_weights")
        ckpt = load_checkpoint_file(args.pretrained_weights)
        if isinstance(ckpt, dict):
            trained = plain_args(ckpt.get("args"))
    args.arch = given.arch or trained.get("arch", args.arch)
    args.patch_size = given.patch_size or trained.get("patch_size", args.patch_size)
    vit = args.arch in ARCHS
    # the ViT-only flags given (their defaults are None, False or 0)
    vit_only = [f"--{flag}" for flag in VIT_FLAGS if getattr(given, flag, None)]
    if vit_only and not vit:
        raise DinoError(f"{' '.join(vit_only)}: for ViTs only, not --arch {args.arch}; leave them "
                        f"out")
    args.demo = {}  # (a dict: plain_args leaves it out of the flags saved with a run's results)
    if no_data or getattr(args, "image_path", "") is None:  # the demo data; of the run's seed
        seed = args.seed if command == "train" else trained.get("seed", 0)
        args.demo = dict(root=demo_path(args.output_dir, seed), seed=seed)
    # an evaluation's resolution on the demo data: the run's training resolution
    size = trained.get("global_crops_size", PRESETS["demo"]["train"]["global_crops_size"])
    if command == "train":
        if no_data:
            args.data_path = os.path.join(args.demo["root"], "train")
            args.knn_data_path = args.knn_data_path or args.demo["root"]
        elif args.knn_data_path is None:
            # the demo preset's k-NN needs labelled data: the demo's, or --knn_data_path
            if given.knn_every:
                raise DinoError("--knn_every needs --knn_data_path, a folder holding "
                                "train/<class>/ and val/<class>/")
            args.knn_every = 0
        for flag in ("global_crops_scale", "local_crops_scale"):
            low, high = getattr(args, flag)
            if low > high:
                raise DinoError(f"--{flag} {low} {high}: the smaller scale comes first")
    elif command == "attn":
        if not vit:
            raise DinoError(f"attention maps need a ViT, not --arch {args.arch}; pass a ViT's "
                            f"weights")
        if args.demo:  # the first val image, as list_images orders them
            args.image_path = os.path.join(args.demo["root"], "val", min(DEMO_CLASSES), "0000.png")
            args.crop_size = size  # of the attention's Jaccard with the objects' masks
            # bigger than the demo's training crops, as the paper draws 224-trained maps at 480:
            # finer maps
            args.image_size = given.image_size or [4 * size, 4 * size]
        if min(args.image_size) < args.patch_size:
            raise DinoError(f"--image_size {args.image_size[0]} {args.image_size[1]} is smaller "
                            f"than one {args.patch_size}-pixel patch")
    elif no_data:  # at the run's training resolution
        args.data_path = args.demo["root"]
        args.crop_size = given.crop_size or size
        args.resize_size = given.resize_size or args.crop_size
    for flag in ("global_crops_size", "local_crops_size", "crop_size"):  # no flag's type checks
        if vit and getattr(args, flag, 0) % args.patch_size:
            raise DinoError(f"--{flag} {getattr(args, flag)} is not a multiple of --patch_size "
                            f"{args.patch_size}")
    if command == "linear":
        # as published: the 4 last CLS tokens, for ViT-B the last one + the patch mean; other
        # backbones: their output, as one block
        base = args.arch == "vit_base"
        args.n_last_blocks = args.n_last_blocks or (4 if vit and not base else 1)
        if args.avgpool_patchtokens is None:
            args.avgpool_patchtokens = base
    return args


def main(argv=None):
    try:
        args = parse_args(argv)
        out_dir = args.output_dir
        if args.command == "embed":
            out_dir = os.path.dirname(os.path.abspath(args.output))
        # before the demo data is written there, or any work starts
        prepare_output_dir(out_dir)
        if args.demo:  # written here, once, before the processes start
            make_demo_dataset(**args.demo)
        if args.command == "train":
            if args.demo:
                print(f"no --data_path: the demo dataset in {args.data_path}")
            line = (f"--preset {args.preset}: {args.arch}/{args.patch_size}, "
                    f"crops {args.global_crops_size}/{args.local_crops_size}, "
                    f"out_dim {args.out_dim}, {args.epochs} epochs (unset flags take these)")
            if args.preset != "paper":
                line += f"; {PRESETS[args.preset]['why']}"
            print(line)
        elif args.demo and args.command != "attn":
            print(f"no --data_path: evaluating {args.pretrained_weights} "
                  f"({args.arch}/{args.patch_size}) on the demo data in {args.data_path} at "
                  f"{args.crop_size} pixels")
        command = COMMANDS[args.command][2]
        if args.command == "attn":  # one process
            command(args)
        else:
            launch(command, args)
    except DinoError as e:
        if get_rank() == 0 or isinstance(e, LostContactError):
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
