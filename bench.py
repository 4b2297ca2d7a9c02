"""
bench.py: DINO training throughput and memory, the straightforward baseline and ours (dino.py) measured side by
side in one process. Prints one markdown table (--json PATH also writes the numbers).

    python bench.py                                                 # CPU: vit_tiny, batch 8, out_dim 4096, ~2 min
    python bench.py --threads 1                                     # a CPU shared with other jobs: steadier
    python bench.py --arch vit_small --batch_size 64 --workers 15   # one GPU (H100): the targets
    python bench.py --arch vit_base --only step                     # the model step alone, ViT-B/16
    python bench.py --arch vit_small --batch_size 16 --accum_iter 4 --grad_checkpointing   # memory: ours on one batch
                                                         # as is, as 4 accumulated micro-batches, with checkpointing

Parts: the train step on synthetic crops already on the device (images/s, ms/step, model FLOP utilization from an
analytic FLOP count, peak memory); the data pipeline per worker (in this process, one thread) on a folder of JPEGs
(generated, 500x375, unless --data_dir); end to end (dino.train_loader's DataLoader with --workers feeding the
baseline's loop, and dino.train_one_epoch itself for ours).

Baseline, as the published DINO code does it: explicit softmax(q k^T) v attention, fp16 autocast + GradScaler on a
GPU (fp32 on the CPU), the loss pair by pair, per-parameter gradient clipping with a .item() each, a finite-loss
.item() every step, AdamW(foreach=False, fused=False), a Python-loop EMA, the full augmentation in the workers
(dino.DataAugmentationDINO). Ours: what `python dino.py train` runs, called (dino.build_train_state, dino.train_step,
dino.train_loader, dino.train_one_epoch: fused AdamW, bf16 autocast on a GPU; on a GPU MultiCropGeometry in the workers
and MultiCropPhotometry on the device, without one DataAugmentationDINO in the workers, as the baseline). Both take
their flags, crops and lr from dino.parse_args (with --warmup_epochs 0: the step part runs at the base values).

With --accum_iter N and/or --grad_checkpointing it measures instead ours alone on one batch: as is, as N micro-batches
(dino.py --accum_iter), with activation checkpointing; each in a fresh process, so that each peak memory is its own.
"""
import argparse
import contextlib
import datetime
import itertools
import json
import math
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from PIL import Image, ImageDraw, ImageFilter

import dino
import vision_transformer as vits


# ------------------------------ the baseline ---------------------------------
class ExplicitAttention(vits.Attention):
    """The published attention: materializes softmax(q k^T / sqrt(d)) [B, heads, N, N], then multiplies by v."""

    def forward(self, x, return_attention=False):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (attention dropout is 0 in DINO)
        if return_attention:
            return attn
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class PlainWeightNormLinear(vits.WeightNormLinear):
    """The published weight-normed last layer: F.linear at autocast's precision (ours computes it in fp32)."""

    def forward(self, x):
        return F.linear(x, self.weight)


class PairwiseDINOLoss(nn.Module):
    """The published DINOLoss: a log_softmax and a cross-entropy per (teacher view, other student view) pair."""

    def __init__(self, out_dim, ncrops, teacher_temp, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.ncrops, self.teacher_temp, self.student_temp, self.momentum = \
            ncrops, teacher_temp, student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output, teacher_output):
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        teacher_out = F.softmax((teacher_output - self.center) / self.teacher_temp, dim=-1).detach().chunk(2)
        total, n_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v != iq:
                    total = total + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                    n_terms += 1
        with torch.no_grad():
            batch_center = teacher_output.sum(dim=0, keepdim=True) / len(teacher_output)
            self.center = self.center * self.momentum + batch_center * (1 - self.momentum)
        return total / n_terms


def make_baseline_step(s, amp_dtype, args):
    """The published train step on s's networks, optimizer, loss and scaler (None: no fp16), at the schedules'
    first values."""
    student = s.student
    teacher = s.teacher
    optimizer = s.optimizer
    scaler = s.scaler
    momentum = s.schedules["momentum"][0]

    def step(crops, epoch):
        with torch.autocast(crops[0].device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            teacher_output = teacher(crops[:2])
            loss = s.dino_loss(student(crops), teacher_output)
        if not math.isfinite(loss.item()):
            sys.exit("loss is not finite")
        optimizer.zero_grad()
        (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
        for p in student.parameters():  # the published clip_gradients: a host sync per parameter tensor
            if p.grad is not None:
                norm = p.grad.norm(2)
                norm.item()
                clip_coef = args.clip_grad / (norm + 1e-6)
                if clip_coef < 1:
                    p.grad.mul_(clip_coef)
        if epoch < args.freeze_last_layer:
            for p in student.head.last_layer.parameters():
                p.grad = None
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        with torch.no_grad():
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(momentum).add_((1 - momentum) * ps.detach())
        return loss.detach()

    return step


# ------------------------------ building both --------------------------------
def dino_args(a, *flags, compile=True):
    """dino.py's train flags for this benchmark, then `flags` (more dino.py flags, the last one wins), the unset ones
    from its paper recipe (nothing duplicated here). --warmup_epochs 0: the schedules start at their base values
    (the lr scaled by dino.py)."""
    argv = ["train", "--data_path", a.data_dir or "unused", "--arch", a.arch, "--patch_size", str(a.patch_size),
            "--out_dim", str(a.out_dim), "--batch_size_per_gpu", str(a.batch_size), "--precision", a.precision,
            "--global_crops_size", str(a.global_crops_size), "--local_crops_size", str(a.local_crops_size),
            "--local_crops_number", str(a.local_crops_number), "--freeze_last_layer", "0", "--epochs", "1",
            "--warmup_epochs", "0", "--num_workers", str(a.workers)]
    if a.compile and compile:
        argv.append("--compile")
    args = dino.parse_args(argv + list(flags))
    args.last_layer_autocast = a.last_layer_autocast  # bench's own
    return args


def build(args, device, amp_dtype, baseline, n_iter=1):
    """(step, the TrainState it runs on); the same seed, so the baseline and ours start from the same weights.
    Ours: exactly what dino.train builds (dino.build_train_state, schedules of n_iter steps); its step runs the
    schedules' first values. The baseline: the same networks with the published parts swapped in, at those values."""
    torch.manual_seed(0)
    s = dino.build_train_state(args, n_iter, 1, device)
    if not baseline:
        if args.last_layer_autocast:  # what the fp32 last layer costs: ours with the published one
            for m in (s.student.head.last_layer, s.teacher.head.last_layer):
                m.__class__ = PlainWeightNormLinear
        if args.compile:
            dino.compile_step(s)  # as dino.train does with --compile

        def step(crops, epoch):  # the batch as --accum_iter micro-batches
            pieces = [c.chunk(args.accum_iter) for c in crops]
            micro_batches = [[p[k] for p in pieces] for k in range(args.accum_iter)]
            return dino.train_step(s, micro_batches, epoch, 0)
        return step, s
    swap = {vits.Attention: ExplicitAttention, vits.WeightNormLinear: PlainWeightNormLinear}
    for m in [*s.student.modules(), *s.teacher.modules()]:
        m.__class__ = swap.get(type(m), type(m))
    # group 1 (biases, norms) keeps its weight decay 0
    s.optimizer = torch.optim.AdamW(dino.get_params_groups(s.student), lr=s.schedules["lr"][0],
                                    weight_decay=s.schedules["wd"][0], foreach=False, fused=False)
    s.dino_loss = PairwiseDINOLoss(args.out_dim, 2 + args.local_crops_number, args.teacher_temp).to(device)
    s.scaler = None
    if amp_dtype == torch.float16:
        s.scaler = torch.amp.GradScaler(device.type)
    return make_baseline_step(s, amp_dtype, args), s


def synthetic_crops(args, batch, device):
    g = torch.Generator().manual_seed(1)
    sizes = [args.global_crops_size] * 2 + [args.local_crops_size] * args.local_crops_number
    return [torch.randn(batch, 3, s, s, generator=g).to(device) for s in sizes]


def resident_bytes(objs):
    """Bytes held between steps by these modules (params, grads, buffers), optimizers (state) and tensors."""
    storages = {}
    for o in objs:
        if isinstance(o, nn.Module):
            ts = [*o.parameters(), *o.buffers(), *(p.grad for p in o.parameters() if p.grad is not None)]
        else:
            ts = [v for s in o.state.values() for v in s.values()] if isinstance(o, torch.optim.Optimizer) else [o]
        storages.update({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                         for t in ts if torch.is_tensor(t)})
    return sum(storages.values())


def flops_per_image(model, patch, gsize, lsize, nlocal, head):
    """Analytic FLOPs of one training step per image (matmuls only; a multiply-add is 2 FLOPs).

    ViT block on N tokens of width D: qkv 6ND^2, scores q k^T 2N^2D, attn @ v 2N^2D, proj 2ND^2, MLP (4D hidden)
    16ND^2: 24ND^2 + 4N^2D. Patch embedding 2 * n_patches * 3p^2 * D. DINO head on the CLS token:
    2 (D h + h h + h b + b out_dim), h = 2048, b = 256. Student: forward + backward = 3x forward over all crops,
    except the patch embedding, 2x (the images need no gradient). Teacher: forward over the 2 global crops.
    ViT-S/16, 2x224 + 8x96 crops, out_dim 65536: 113.4 GFLOP per image.
    """
    D, depth = model.embed_dim, len(model.blocks)

    def backbone(size):  # (patch embedding, blocks)
        n = (size // patch) ** 2
        return 2 * n * 3 * patch ** 2 * D, depth * (24 * (n + 1) * D ** 2 + 4 * (n + 1) ** 2 * D)

    lin = [m for m in head.mlp.modules() if isinstance(m, nn.Linear)]
    head = 2 * (sum(m.in_features * m.out_features for m in lin) + head.last_layer.weight_v.numel())
    (gp, gb), (lp, lb) = backbone(gsize), backbone(lsize)
    student = 2 * (3 * gb + 2 * gp) + nlocal * (3 * lb + 2 * lp) + 3 * (2 + nlocal) * head
    return student + 2 * (gp + gb + head)


# ------------------------------ the three parts ------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_same_loss(a, device, res):
    """Guard: same init, same inputs, fp32, eager: both steps give the same loss (step 1 also checks the update)."""
    check = dino_args(a, "--precision", "fp32", compile=False)  # ours takes its precision from these flags
    crops = synthetic_crops(check, min(a.batch_size, 4), device)
    steps = {name: build(check, device, None, name == "baseline")[0] for name in ("baseline", "ours")}
    losses = {name: [] for name in steps}
    for i in range(2):
        for name, step in steps.items():
            torch.manual_seed(100 + i)  # the same drop-path masks
            losses[name].append(step(crops, 0).item())
    res["check"] = [abs(o - b) for o, b in zip(losses["ours"], losses["baseline"])]
    print(f"check: loss ours {losses['ours'][0]:.6f} baseline {losses['baseline'][0]:.6f}", flush=True)


def bench_step(a, device, runners, res):
    crops = synthetic_crops(dino_args(a), a.batch_size, device)
    model = runners["ours"][1].student
    flops = flops_per_image(model.backbone, a.patch_size, a.global_crops_size, a.local_crops_size,
                            a.local_crops_number, model.head)
    res["gflop_per_image"] = flops / 1e9
    for step, _ in runners.values():
        for _ in range(a.warmup):
            step(crops, 0)
    sync(device)
    rounds = min(a.steps, 3)  # interleaved, best of: a load change on a shared machine hits both alike
    ms, peak = {n: [] for n in runners}, {n: 0 for n in runners}
    for r in range(rounds):
        n_steps = a.steps // rounds + (r < a.steps % rounds)
        for name, (step, s) in runners.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                rest = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            for _ in range(n_steps):
                step(crops, 0)
            sync(device)
            ms[name].append((time.perf_counter() - t0) * 1000 / n_steps)
            if device.type == "cuda":  # this run's peak, less what the other one holds between its steps
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device) - rest
                                 + resident_bytes([s.student, s.teacher, s.optimizer, *crops]))
    for name in runners:
        r = res[name]
        r["ms_per_step"] = min(ms[name])
        r["step_img_s"] = a.batch_size * 1000 / r["ms_per_step"]
        r["mfu"] = r["step_img_s"] * flops / (a.peak_tflops * 1e12) if a.peak_tflops else None
        r["peak_mem_gib"] = peak[name] / 2 ** 30 if device.type == "cuda" else None


def make_jpeg(path, seed):
    """A photo-like 500x375 JPEG (quality 90, ~75 KB): gradient, blurred shapes, texture, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:375, 0:500] / 500.0
    c0, c1 = rng.uniform(0, 255, (2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    t = (x * np.cos(angle) + y * np.sin(angle))[..., None]
    img = Image.fromarray((c0 + (c1 - c0) * (t - t.min()) / (t.max() - t.min())).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(6, 20)):
        x0, y0 = rng.uniform(-50, 500), rng.uniform(-50, 375)
        box = [x0, y0, x0 + rng.uniform(20, 250), y0 + rng.uniform(20, 200)]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(rng.integers(0, 256, 3).tolist()))
    img = np.asarray(img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2))), dtype=np.float32)
    texture = Image.fromarray(rng.integers(0, 256, (94, 125), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
    img = img + 0.15 * (np.asarray(texture, np.float32)[..., None] - 128) + rng.normal(0, 12, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def e2e_batches(a):
    """(warm-up, timed) batches of the end-to-end epoch: at least 3 per worker timed, every image at least once."""
    prefetched = 2 * a.workers  # the DataLoader's prefetch_factor (2) batches per worker
    warmup = max(a.warmup, 2 * prefetched)
    return warmup, max(a.steps, 3 * a.workers, math.ceil(a.images / a.batch_size) - warmup)


def image_folder(a, tmp):
    """A folder for dino.train_loader whose epoch is the end-to-end one: a.images images (generated JPEGs, or the
    first of --data_dir's, whose own epoch may take hours), linked over and over, each once in the first links."""
    source = a.data_dir
    if source is None:
        source = os.path.join(tmp, "jpeg")
        os.mkdir(source)
        with multiprocessing.Pool() as pool:
            pool.starmap(make_jpeg, [(os.path.join(source, f"{i:05d}.jpg"), i) for i in range(a.images)])
    images = dino.list_images(source)[:a.images]
    folder = os.path.join(tmp, "images")
    os.mkdir(folder)
    for k in range(sum(e2e_batches(a)) * a.batch_size):
        image = images[k % len(images)].absolute()
        os.symlink(image, os.path.join(folder, f"{k:07d}{image.suffix}"))
    return folder


def bench_data(a, args, device, res):
    """What one loader worker of dino.train_loader does per batch (decode, transform, collate), here in this process
    on one thread. Ours is the GPU path's worker (crops only); without a GPU, ours runs the baseline's
    DataAugmentationDINO."""
    loaders = {"baseline": dino.train_loader(args, 0, 1, device, False),
               "ours": dino.train_loader(args, 0, 1, device, device.type == "cuda")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    n = min(len(loaders["baseline"].dataset), a.images)
    b = a.batch_size
    seconds = {k: 0.0 for k in loaders}
    for start in range(-b, n - b + 1, b):  # the first batch warms up; batches interleave across the variants
        for name, loader in loaders.items():
            t0 = time.perf_counter()
            # as the sampler indexes it: (index, epoch), which seeds the sample's crops
            loader.collate_fn([loader.dataset[i % n, 0] for i in range(start, start + b)])
            seconds[name] += (time.perf_counter() - t0) * (start >= 0)
    torch.set_num_threads(threads)
    for name in loaders:
        res[name]["data_img_s"] = n // b * b / seconds[name]


class Clocked:
    """A loader whose images/s is timed from its batch `warmup` on: the clock starts (the device synchronized) just
    before that batch is fetched, and images_per_s() after the last step stops it. The warm-up must outlast the
    workers' start-up burst (each delivers its prefetched batches at once), so that a loader-bound run is not
    credited with batches made before the clock started. Has the len and batch_size that train_one_epoch reads."""

    def __init__(self, loader, warmup, device):
        self.loader = loader
        self.batch_size = getattr(loader, "batch_size", None)
        self.warmup = warmup
        self.device = device
        self.images = 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        for k in itertools.count():
            if k == self.warmup:
                sync(self.device)
                self.start = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                return
            if k >= self.warmup:
                self.images += len(batch[0])
            yield batch

    def images_per_s(self):
        sync(self.device)
        return self.images / (time.perf_counter() - self.start)


def timed_images_per_s(batches, step, warmup, steps, device):
    """Images/s of `steps` batches fetched and stepped after `warmup` of them (the clock of Clocked)."""
    clocked = Clocked(batches, warmup, device)
    for crops in itertools.islice(clocked, warmup + steps):
        step(crops)
    return clocked.images_per_s()


def bench_e2e(a, args, device, runners, res):
    """One epoch of dino.train_loader's loader (its images linked to e2e_batches' count), timed after the warm-up
    batches. The baseline: its step in bench.py's loop, the published augmentation in the workers. Ours:
    dino.train_one_epoch itself on what dino.train gives it (on a GPU the crops-only workers and
    MultiCropPhotometry)."""
    warmup, steps = e2e_batches(a)
    res["e2e_steps"] = steps
    res["e2e_warmup"] = warmup
    baseline_step = runners["baseline"][0]

    def run(crops):
        baseline_step([c.to(device, non_blocking=True) for c in crops], 0)

    loader = dino.train_loader(args, 0, 1, device, False)
    res["baseline"]["e2e_img_s"] = timed_images_per_s(loader, run, warmup, steps, device)
    on_device = device.type == "cuda"
    photometry = None
    if on_device:
        # as dino.train builds it
        photometry = dino.MultiCropPhotometry(args.local_crops_number, runners["ours"][1].amp_dtype or
                                              torch.float32, args.compile)
    clocked = Clocked(dino.train_loader(args, 0, 1, device, on_device), warmup, device)
    stats = dino.train_one_epoch(runners["ours"][1], clocked, 0, 1, log_every=args.log_every,
                                 photometry=photometry)
    res["ours"]["e2e_img_s"] = clocked.images_per_s()
    # dino.py's own figure: the whole epoch, the workers' start-up included
    res["ours"]["e2e_epoch_img_s"] = stats["images_per_s"]


def memory_child(a, device, amp):
    """In a fresh process (its peak memory is its own): ours with the dino.py flags a.variant (a JSON list) adds, one
    warm-up step and the best of a.steps timed ones; prints one JSON line. Peak memory: on a GPU the peak allocated
    during the steps; on the CPU the process's peak resident set and its growth over what it held with the networks
    built."""
    args = dino_args(a, *json.loads(a.variant))
    step, _ = build(args, device, amp, False)
    crops = synthetic_crops(args, a.batch_size, device)
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step(crops, 0)
    ms = []
    for _ in range(a.steps):  # the best step: a load change on a shared machine only slows some
        sync(device)
        t0 = time.perf_counter()
        step(crops, 0)
        sync(device)
        ms.append((time.perf_counter() - t0) * 1000)
    ms, peak = min(ms), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_gib": (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak) / 2**30,
                      "growth_gib": None if device.type == "cuda" else (peak - built) / 2**30,
                      "ms_per_step": ms, "img_s": a.batch_size * 1000 / ms}))


def bench_memory(a, device):
    """Ours on the same batch as one, as --accum_iter micro-batches, and with --grad_checkpointing (those asked
    for), each in its own subprocess: (results, the table)."""
    variants = {f"batch {a.batch_size}": []}
    if a.accum_iter > 1:  # dino.py's flags for the same batch (and lr) as micro-batches
        micro = a.batch_size // a.accum_iter
        variants[f"{a.accum_iter} x {micro} accumulated"] = ["--batch_size_per_gpu", str(micro),
                                                             "--accum_iter", str(a.accum_iter)]
    if a.grad_checkpointing:
        variants["--grad_checkpointing"] = ["--grad_checkpointing"]
    res = {}
    for name, flags in variants.items():
        child = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--variant",
                                json.dumps(flags)], capture_output=True, text=True)
        if child.returncode:
            sys.exit(child.stderr)
        res[name] = json.loads(child.stdout.splitlines()[-1])
    kind = "GiB allocated" if device.type == "cuda" else "GiB resident"
    rows = [f"device: {device_name(device)}; torch {torch.__version__}; {datetime.datetime.now():%Y-%m-%d %H:%M}",
            f"command: python {' '.join(sys.argv)}", "",
            f"| {a.arch}/{a.patch_size}, one step on a batch of {a.batch_size} | " + " | ".join(res) + " |",
            "|---|" + "---|" * len(res)]
    for key, name, spec in (("peak_gib", f"peak memory, {kind}", ".2f"),
                            ("growth_gib", "peak growth over the built networks, GiB", ".2f"),
                            ("ms_per_step", f"ms/step (best of {a.steps})", ".0f"), ("img_s", "images/s", ".2f")):
        if res[next(iter(res))][key] is not None:
            rows.append(f"| {name} | " + " | ".join(format(r[key], spec) for r in res.values()) + " |")
    return res, "\n".join(rows)


def side_by_side(a, device, amp, amp_base, precisions):
    """The baseline and ours, the parts --only picks: (results, the table)."""
    res = {"baseline": {}, "ours": {}}
    if a.only in (None, "step"):
        check_same_loss(a, device, res)
    if a.only in (None, "step", "e2e"):
        args = dino_args(a)
        n_iter = sum(e2e_batches(a))  # ours' schedules: the end-to-end epoch's
        runners = {"baseline": build(args, device, amp_base, True), "ours": build(args, device, amp, False, n_iter)}
    if a.only in (None, "step"):
        bench_step(a, device, runners, res)
    if a.only == "step":
        return res, table(a, res, device, precisions)
    with tempfile.TemporaryDirectory() as tmp:
        args = dino_args(a, "--data_path", image_folder(a, tmp))
        if a.only in (None, "data"):
            bench_data(a, args, device, res)
        if a.only in (None, "e2e"):
            bench_e2e(a, args, device, runners, res)
    return res, table(a, res, device, precisions)


# ------------------------------ --ablate: one speed lever at a time ---------------------------
# Each row is ours (dino.build_train_state + dino.train_step, fed by dino.MultiCropPhotometry as on a GPU) with one
# lever changed, then the best combination; all in this process, from the same initial weights and crops.
ABLATION_LEVERS = [  # (row name, settings that differ from today's default); exact: the same maths
    ("default (eager)", {}),
    ("compile the whole step", {"compile": "default"}),
    ("compile + CUDA graphs", {"compile": "reduce-overhead"}),
    ("batch x2", {"batch": 2}),
    ("batch x4", {"batch": 4}),
    ("last layer TF32", {"tf32": True}),
    ("chunked head cross-entropy (4 chunks)", {"chunks": 4}),
    ("photometry compiled, emitting the autocast dtype", {"photometry": "compiled"}),
    ("host-to-device copy in the step (as train_one_epoch)", {"copy": "same stream"}),
    ("host-to-device copy on a side stream, a step ahead", {"copy": "side stream"}),
    ("SDPA flash", {"sdpa": "FLASH_ATTENTION"}),
    ("SDPA memory-efficient", {"sdpa": "EFFICIENT_ATTENTION"}),
    ("SDPA cuDNN", {"sdpa": "CUDNN_ATTENTION"}),
    ("SDPA math", {"sdpa": "MATH"}),
]
# levers that change no number on the CPU (TF32 and the SDPA kernels act on GPUs; compile is exact up to rounding)
EXACT_ON_CPU = ("compile", "tf32", "chunks", "photometry", "copy")


def ablation_config(a, cuda):
    """The step the ablation times: ViT-S/16's paper recipe on a GPU; --dry: vit_tiny on small crops (a CPU)."""
    if a.dry:
        return dict(arch="vit_tiny", gsize=32, lsize=16, nlocal=2, out_dim=256, batch=4, warmup=0, steps=1,
                    backend="aot_eager")
    return dict(arch=a.arch, gsize=224, lsize=96, nlocal=8, out_dim=65536, batch=a.batch_size, warmup=5,
                steps=a.steps, backend="inductor")


def ablation_run(cfg, lever, device):
    """One row: (results, step function); results has ms/step, images/s, compile seconds, peak GiB, and the loss
    after one step from the same start."""
    batch = cfg["batch"] * lever.get("batch", 1)
    if lever.get("compile") == "reduce-overhead" and device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA GPU")
    if lever.get("copy") == "side stream" and device.type != "cuda":
        raise RuntimeError("a side stream needs a CUDA GPU")
    args = dino.parse_args(["train", "--data_path", "unused", "--arch", cfg["arch"], "--patch_size", "16",
                            "--out_dim", str(cfg["out_dim"]), "--batch_size_per_gpu", str(batch),
                            "--global_crops_size", str(cfg["gsize"]), "--local_crops_size", str(cfg["lsize"]),
                            "--local_crops_number", str(cfg["nlocal"]), "--warmup_epochs", "0",
                            "--freeze_last_layer", "0", "--epochs", "1"])
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    torch.manual_seed(0)
    s = dino.build_train_state(args, 1, 1, device)
    if "compile" in lever:
        mode = None if lever["compile"] == "default" else lever["compile"]
        dino.compile_step(s, backend=cfg["backend"], fullgraph=True, mode=mode)
    photometry = dino.MultiCropPhotometry(cfg["nlocal"], s.amp_dtype or torch.float32)
    if lever.get("photometry") == "compiled":
        photometry.apply = torch.compile(dino.apply_photometric, backend=cfg["backend"], fullgraph=True)
    g = torch.Generator().manual_seed(1)
    sizes = [cfg["gsize"]] * 2 + [cfg["lsize"]] * cfg["nlocal"]
    crops = [torch.randint(0, 256, (batch, 3, n, n), generator=g, dtype=torch.uint8) for n in sizes]
    if device.type == "cuda":
        crops = [c.pin_memory() for c in crops]  # as the loader's
    copy = lever.get("copy")
    on_device = [c.to(device) for c in crops]

    def step():
        views = on_device
        if copy == "same stream":
            views = [c.to(device, non_blocking=True) for c in crops]
        if copy == "side stream":  # this batch was copied during the last step; the next one copies now
            main = torch.cuda.current_stream(device)
            main.wait_stream(side)
            views = ahead.pop()
            for v in views:
                v.record_stream(main)  # its memory is not reused before the step is done with it
            ahead.append(copy_ahead())
        return dino.train_step(s, [photometry(views)], 0, 0)

    def copy_ahead():
        with torch.cuda.stream(side):
            return [c.to(device, non_blocking=True) for c in crops]

    if copy == "side stream":
        side = torch.cuda.Stream(device)
        ahead = [copy_ahead()]

    with ablation_switches(lever):
        torch.manual_seed(2)  # the same photometry and drop path in every row
        t0 = time.perf_counter()
        step()
        loss = step().item()  # after one step from the same start
        first_two_s = time.perf_counter() - t0
        for _ in range(cfg["warmup"]):
            step()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(cfg["steps"]):
            step()
        sync(device)
        ms = (time.perf_counter() - t0) * 1000 / cfg["steps"]
    peak = None
    if device.type == "cuda":  # this row's own: less what was allocated before it was built
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 30
    compile_s = max(first_two_s - 2 * ms / 1000, 0.0)  # the first two steps' time beyond two steps'
    return dict(batch=batch, ms_per_step=ms, img_s=batch * 1000 / ms, compile_s=compile_s, peak_gib=peak,
                loss_after_one_step=loss), step


def chunked_cross_entropy(chunks):
    """The chunks lever, bench's own until the GPU ablation earns it a place in dino.py: dino's
    cross_entropy_over_pairs over chunks of the batch, each recomputed in backward (activation checkpointing), so
    that no [ncrops, batch, out_dim] log-probabilities are kept for it. The same sum, in another order."""
    def cross_entropy(student_logits, q):
        pairs = zip(student_logits.chunk(chunks, 1), q.chunk(chunks, 1))
        return sum(checkpoint(CROSS_ENTROPY_OVER_PAIRS, *pair, use_reentrant=False) for pair in pairs)
    return cross_entropy


CROSS_ENTROPY_OVER_PAIRS = dino.cross_entropy_over_pairs  # dino.py's, whatever a lever puts in its place


@contextlib.contextmanager
def ablation_switches(lever):
    """The global switches a lever sets (TF32 for fp32 matmuls, the SDPA kernel, dino's cross-entropy in chunks),
    restored afterwards."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = lever.get("tf32", False)
    if "chunks" in lever:
        dino.cross_entropy_over_pairs = chunked_cross_entropy(lever["chunks"])
    try:
        if "sdpa" in lever:
            with sdpa_kernel(getattr(SDPBackend, lever["sdpa"])):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        dino.cross_entropy_over_pairs = CROSS_ENTROPY_OVER_PAIRS


PROFILE_KINDS = (("matrix multiplies", ("mm", "gemm", "linear", "matmul", "conv", "cutlass", "sm90", "wgmma")),
                 ("attention", ("attention", "sdpa", "flash", "fmha")),
                 ("loss", ("log_softmax", "logsumexp", "cross")),
                 ("optimizer", ("adam", "foreach", "lerp", "_fused")),
                 ("copies", ("copy", "memcpy", "to_copy", "cat")))


def profile_shares(step, device, steps):
    """Share of one step's wall time per kind of work (by kernel or op name), and idle (wall time no kernel
    ran; on the CPU the ops' time spent outside the ones profiled)."""
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall = (time.perf_counter() - t0) * 1e6  # microseconds
    busy = {name: 0.0 for name, _ in PROFILE_KINDS}
    busy["element-wise and other"] = 0.0
    for e in prof.key_averages():
        # on a GPU the kernels alone (each is also listed under the CPU op that launched it)
        if cuda and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t = e.self_device_time_total if cuda else e.self_cpu_time_total
        kind = next((name for name, keys in PROFILE_KINDS if any(k in e.key.lower() for k in keys)),
                    "element-wise and other")
        busy[kind] += t
    busy["idle"] = max(wall - sum(busy.values()), 0.0)
    return {k: v / wall for k, v in busy.items()}


def ablate(a, device):
    """The --ablate table: each lever alone, then the best combination; profiles of the default and the best."""
    cuda = device.type == "cuda"
    cfg = ablation_config(a, cuda)
    if cuda:  # compiled drop path draws the eager masks: the compile rows' loss diff compares the maths
        import torch._inductor.config
        torch._inductor.config.fallback_random = True
    model = vits.vit_tiny() if a.dry else getattr(vits, a.arch)()
    head = vits.DINOHead(model.embed_dim, cfg["out_dim"])
    flops = flops_per_image(model, 16, cfg["gsize"], cfg["lsize"], cfg["nlocal"], head)
    rows, steps = {}, {}
    for name, lever in ABLATION_LEVERS:
        try:
            rows[name], step = ablation_run(cfg, lever, device)
        except Exception as e:  # a kernel this device lacks (flash attention on an old GPU, CUDA graphs on a CPU)
            rows[name] = dict(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:80]}")
            step = None
        if not lever:
            steps[name] = step  # the default's, profiled below; the others' memory goes
        rows[name]["lever"] = lever
        print(f"ablate: {name}: {rows[name]}", flush=True)
        del step
        if cuda:
            torch.cuda.empty_cache()
    default = rows[ABLATION_LEVERS[0][0]]
    # the best combination: the fastest compile mode, batch and SDPA kernel, and each other lever that paid 5 %
    best = {}
    for group in ("compile", "batch", "sdpa"):
        # a batch must fit an 80 GB H100 too (the peak leaves room for the allocator's cache)
        candidates = [(r["img_s"], r["lever"]) for r in rows.values()
                      if group in r["lever"] and "img_s" in r and r["img_s"] >= 1.05 * default["img_s"]
                      and (r["peak_gib"] or 0) <= 70]
        if candidates:
            best.update(max(candidates, key=lambda c: c[0])[1])
    for name, lever in ABLATION_LEVERS:
        r = rows[name]
        if set(lever) & {"tf32", "chunks", "photometry"} and r.get("img_s", 0) >= 1.05 * default["img_s"]:
            best.update(lever)
    name = "best combination: " + (", ".join(f"{k}={v}" for k, v in best.items()) or "the default")
    try:
        rows[name], steps[name] = ablation_run(cfg, best, device)
    except Exception as e:
        rows[name] = dict(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:80]}")
    rows[name]["lever"] = best
    for r in rows.values():
        if "img_s" in r:
            r["speedup"] = r["img_s"] / default["img_s"]
            r["mfu"] = r["img_s"] * flops / (a.peak_tflops * 1e12) if a.peak_tflops else None
            same_data = r["lever"].get("batch", 1) == 1
            r["loss_diff"] = abs(r["loss_after_one_step"] - default["loss_after_one_step"]) if same_data else None
    profiles = {}
    for label in (ABLATION_LEVERS[0][0], name):
        if steps.get(label):
            with ablation_switches(rows[label]["lever"]):
                profiles[label] = profile_shares(steps[label], device, 1 if a.dry else 3)
    return dict(config=cfg, gflop_per_image=flops / 1e9, rows=rows, profiles=profiles)


def ablation_table(a, res, device):
    cfg = res["config"]
    out = [f"device: {device_name(device)}; torch {torch.__version__}; {datetime.datetime.now():%Y-%m-%d %H:%M}",
           f"command: python {' '.join(sys.argv)}",
           f"step: {cfg['arch']}/16, 2x{cfg['gsize']} + {cfg['nlocal']}x{cfg['lsize']} crops, out_dim "
           f"{cfg['out_dim']}, {res['gflop_per_image']:.1f} GFLOP/image; autocast "
           f"{dino.autocast_dtype('auto', device)}; compile backend {cfg['backend']}; mean of {cfg['steps']} "
           f"steps after {cfg['warmup']}; loss diff: after one step from the same start, vs the default; "
           f"the rows without a copy feed crops already on the device, the two copy rows compare with each "
           f"other (the best combination leaves them out); peak GiB: allocated (a CUDA graph's pool is not "
           f"counted)", "",
           "| lever | batch | ms/step | images/s | % of peak | speed-up | peak GiB | compile s | loss diff |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        if "error" in r:
            out.append(f"| {name} | | n/a: {r['error']} | | | | | | |")
            continue
        cells = [str(r["batch"]), f"{r['ms_per_step']:.1f}", f"{r['img_s']:.1f}",
                 "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}", f"{r['speedup']:.2f}x",
                 "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}", f"{r['compile_s']:.1f}",
                 "n/a (other data)" if r["loss_diff"] is None else f"{r['loss_diff']:.1e}"]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    for label, shares in res["profiles"].items():
        out += ["", f"profile of one step, {label}:",
                "| " + " | ".join(shares) + " |", "|" + "---|" * len(shares),
                "| " + " | ".join(f"{v:.0%}" for v in shares.values()) + " |"]
    return "\n".join(out)


# ------------------------------ report ---------------------------------------
# Dense bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets (whose headline figures, with 2:4 sparsity, are
# twice these), by device name; the first match counts. Cards not listed here (H100 NVL, ...) need --peak_tflops.
PEAK_TFLOPS = (("H100 PCIe", 756), ("H100 NVL", None), ("H200 NVL", None), ("H100", 989), ("H200", 989),
               ("A100", 312))


def peak_tflops(name):
    return next((peak for key, peak in PEAK_TFLOPS if key.lower() in name.lower()), None)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def table(a, res, device, precisions):
    b, o = res["baseline"], res["ours"]
    rows = [f"device: {device_name(device)}; torch {torch.__version__}; {datetime.datetime.now():%Y-%m-%d %H:%M}",
            f"command: python {' '.join(sys.argv)}",
            f"precision: baseline {precisions[0]}, ours {precisions[1]}; compile: ours {a.compile}, baseline no"]
    if "check" in res:
        rows.append(f"check (fp32, same init and inputs): |loss_ours - loss_baseline| {res['check'][0]:.1e} at "
                    f"step 0, {res['check'][1]:.1e} at step 1")
    rows += ["", "| part | baseline | ours | ours / baseline |", "|---|---|---|---|"]

    def row(part, key, spec, okey=None):
        bv, ov = b.get(key), o.get(okey or key)
        if key in b:
            show = [("n/a" if v is None else format(v, spec)) for v in (bv, ov)]
            rows.append(f"| {part} | {show[0]} | {show[1]} | {f'{ov / bv:.2f}x' if bv and ov else ''} |")

    row(f"train step images/s ({a.arch}/{a.patch_size}, batch {a.batch_size}, 2x{a.global_crops_size} + "
        f"{a.local_crops_number}x{a.local_crops_size} crops, out_dim {a.out_dim})", "step_img_s", ".1f")
    row(f"train step ms/step (best of {min(a.steps, 3)} interleaved rounds)", "ms_per_step", ".1f")
    if "gflop_per_image" in res:
        peak = f"of {a.peak_tflops:g} TFLOPS" if a.peak_tflops else "n/a without --peak_tflops"
        row(f"model FLOP utilization ({res['gflop_per_image']:.1f} GFLOP/image, {peak})", "mfu", ".1%")
    row("peak memory GiB (allocated, each run's own)", "peak_mem_gib", ".2f")
    row("data images/s per worker (1 thread: decode + augment + collate; ours: the GPU path's crops only)",
        "data_img_s", ".1f")
    row(f"end-to-end images/s ({a.workers} workers, {res.get('e2e_steps')} steps after {res.get('e2e_warmup')}; "
        f"ours: dino.train_one_epoch)", "e2e_img_s", ".1f")
    return "\n".join(rows)


def main():
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vit_small" if cuda else "vit_tiny", choices=list(dino.ARCHS))
    p.add_argument("--patch_size", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=64 if cuda else 8)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="ours, as dino.py")
    p.add_argument("--baseline_precision", default="auto", choices=["auto", "fp16", "fp32"],
                   help="auto: fp16 + GradScaler on a GPU, fp32 on the CPU")
    p.add_argument("--global_crops_size", type=int, default=224)
    p.add_argument("--local_crops_size", type=int, default=96)
    p.add_argument("--local_crops_number", type=int, default=8)
    p.add_argument("--out_dim", type=int, default=65536 if cuda else 4096)
    p.add_argument("--steps", type=int, default=30 if cuda else 3, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=10 if cuda else 1)
    p.add_argument("--compile", action="store_true", help="torch.compile ours (the baseline stays eager)")
    p.add_argument("--workers", type=int, default=15 if cuda else 2, help="loader workers, end to end")
    p.add_argument("--images", type=int, default=512 if cuda else 64, help="JPEGs to generate (or to use)")
    p.add_argument("--data_dir", default=None, help="a folder of images to use instead of generated JPEGs")
    p.add_argument("--threads", type=int, default=None, help="torch threads of this process (default: torch's)")
    p.add_argument("--peak_tflops", type=float, help="peak for FLOP utilization (default: the GPU's dense bf16 peak "
                   "for an H100, H200 or A100, from its name; else FLOP utilization is n/a)")
    p.add_argument("--last_layer_autocast", action="store_true",
                   help="ours with the head's last layer at autocast's precision, to measure what fp32 costs")
    p.add_argument("--only", choices=["step", "data", "e2e"])
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--accum_iter", type=int, default=1, help="instead: peak memory and speed of ours on the batch "
                   "as one and as this many accumulated micro-batches, each in a fresh process")
    p.add_argument("--grad_checkpointing", action="store_true", help="instead: the same, and with activation "
                   "checkpointing of the student's blocks")
    p.add_argument("--ablate", action="store_true", help="instead: ours with one speed lever at a time, then the "
                   "best combination, and profiles of the default and the best (one process, ~5 min on an H100)")
    p.add_argument("--dry", action="store_true", help="with --ablate: vit_tiny on small crops, compile on the "
                   "aot_eager backend (fullgraph: a graph break fails): every row on a CPU in a minute or two")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: one of the runs of the above, as JSON flags
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if cuda else "cpu")
    a.peak_tflops = a.peak_tflops or (peak_tflops(torch.cuda.get_device_name(device)) if cuda else None)
    amp = dino.autocast_dtype(a.precision, device)
    amp_base = {"auto": torch.float16 if cuda else None, "fp16": torch.float16, "fp32": None}[a.baseline_precision]
    precisions = ["fp16 + GradScaler" if amp_base else "fp32" + ("" if cuda else " (fp16 + GradScaler is GPU-only)"),
                  {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 + GradScaler", None: "fp32"}[amp]]
    if amp:
        precisions[1] += " (last layer too)" if a.last_layer_autocast else " (head's last layer fp32)"
    if a.variant:
        return memory_child(a, device, amp)
    if a.ablate:
        res = ablate(a, device)
        print(ablation_table(a, res, device))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(dict(vars(a), device=device_name(device), torch=torch.__version__, results=res), f,
                          indent=1, default=str)
        return
    res, report = bench_memory(a, device) if a.accum_iter > 1 or a.grad_checkpointing else \
        side_by_side(a, device, amp, amp_base, precisions)
    print(report)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(vars(a), device=device_name(device), torch=torch.__version__, results=res), f, indent=1)


if __name__ == "__main__":
    main()
