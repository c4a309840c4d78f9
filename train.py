"""Train a convolutional denoising autoencoder: noisy image in, clean image out.

    python train.py --epochs 10            # MNIST, Gaussian noise of std 0.5
    python visualize.py                    # noisy / clean / denoised test images

The method comes first: the noise, the losses (supervised, and three that learn from noisy
images alone), one training step, one epoch, the evaluation. Checkpoints, resume, stop signals
and several processes follow; the training run and the command line come last.
"""

import argparse
import contextlib
import importlib.metadata
import math
import os
import random
import signal
import sys
import tempfile
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

import data
import model

DEFAULT_CHECKPOINT = "checkpoints/autoencoder.pt"
TEST_NOISE_SEED = 2024  # independent of --seed: every run and epoch is scored on the same noise
EVAL_BATCH_SIZE = 1000  # inference only: large batches are fastest and fit easily in memory
FINITE_CHECK_EVERY = 50  # steps between checks that the loss is finite (each check syncs a GPU)
SSIM_WINDOW = 11  # Wang et al. 2004: an 11 x 11 Gaussian window of sigma 1.5
HELDOUT_DRAWS = 16  # a self-supervised held-out loss is averaged over this many random masks
LR_SCHEDULES = ("constant", "onecycle")
PRECISIONS = ("auto", "fp32", "bf16")
CLIPS = ("on", "off")  # --clip: are noisy pixels clipped to [0, 1]

# ---------------------------------------------------------------- noise

# What --noise-level means for each type, its default and its largest value. Poisson is the
# only type where a larger level means less noise: it is the photon count of a white pixel.
NOISES = {
    "gaussian": ("standard deviation on the [0, 1] scale", 0.5, 100.0),
    "salt-pepper": ("fraction of pixel values replaced, half by 0 and half by 1", 0.2, 1.0),
    "poisson": ("photons a white pixel collects (larger is cleaner)", 10.0, 1e9),
    "speckle": ("standard deviation of the multiplicative noise", 0.5, 100.0),
    "none": ("nothing is added: the images of a folder are noisy already", 0.0, 0.0),
}
MIN_PHOTONS = 1e-3  # fewer, and Poisson(x * level) / level divides by almost nothing


class Noise(NamedTuple):
    """A noise type (a key of NOISES), its level: a float, or [lo, hi] to draw one level per
    image uniformly (blind training: one model for a range of levels), and whether noisy pixels
    are clipped to [0, 1] (clipping makes the noise's mean non-zero near black and white)."""

    kind: str
    level: object
    clip: bool = True

    def __str__(self):  # 'sigma 0.5', 'salt-pepper 0.2', 'sigma 0.1:0.5 unclipped', 'none'
        if self.kind == "none":
            return "none"
        level = self.level if isinstance(self.level, (list, tuple)) else [self.level]
        return ("sigma " if self.kind == "gaussian" else f"{self.kind} ") + ":".join(
            f"{v:g}" for v in level) + ("" if self.clip else " unclipped")


def config_noise(config):
    """The Noise a checkpoint config records."""
    return Noise(config["noise"], config["noise_level"], config.get("clip", "on") == "on")


def add_noise(images, noise, generator):
    """Noisy copies of `images` (N x C x H x W in [0, 1]), clipped to [0, 1] if noise.clip.

    "gaussian" adds N(0, level^2); "speckle" adds images * N(0, level^2); "salt-pepper" sets a
    fraction `level` of the values to 0 or 1; "poisson" counts Poisson(images * level) photons
    and divides by `level`; "none" adds nothing (the images are noisy already). The same
    generator state gives the same noisy images.
    """
    kind, level = noise[:2]
    if kind == "none":
        return images.clone()
    clip = (lambda x: x.clamp_(0, 1)) if noise.clip else (lambda x: x)  # in place
    if isinstance(level, (list, tuple)):  # one level per image, N x 1 x 1 x 1
        lo, hi = level
        level = torch.rand((len(images),) + (1,) * (images.dim() - 1), generator=generator,
                           device=images.device, dtype=images.dtype).mul_(hi - lo).add_(lo)
    draw = {"generator": generator, "device": images.device, "dtype": images.dtype}
    if kind == "gaussian":
        noise = torch.randn(images.shape, **draw)  # N x C x H x W
        return clip(noise.mul_(level).add_(images))  # in place: one allocation per batch
    if kind == "speckle":
        noise = torch.randn(images.shape, **draw)  # N x C x H x W
        return clip(noise.mul_(level).add_(1).mul_(images))
    if kind == "salt-pepper":
        u = torch.rand(images.shape, **draw)  # N x C x H x W, uniform in [0, 1)
        salt_or_pepper = (u >= level / 2).to(images.dtype)  # 0 below level / 2, else 1
        return torch.where(u < level, salt_or_pepper, images)  # N x C x H x W
    if kind == "poisson":
        photons = torch.poisson(images * level, generator=generator)  # N x C x H x W
        return clip(photons.div_(level))
    check_noise(noise)  # an unknown type: raises, naming the known ones


def check_noise(noise):
    """Raise ValueError (one line) unless `noise` is a known type with a level it can have."""
    kind, level = noise[:2]
    if kind not in NOISES:
        raise ValueError(f"unknown noise {kind!r} (choose from {', '.join(NOISES)})")
    if kind == "none" and level != 0:
        raise ValueError("--noise none adds nothing, so it takes no --noise-level")
    levels = list(level) if isinstance(level, (list, tuple)) else [level]
    if not (len(levels) in (1, 2) and all(is_number(v) for v in levels)
            and levels[0] <= levels[-1]):
        raise ValueError(f"noise level must be a number, or LO:HI with LO <= HI, got {level!r}")
    meaning, _, largest = NOISES[kind]
    smallest = MIN_PHOTONS if kind == "poisson" else 0
    if levels[0] < smallest or levels[-1] > largest:
        raise ValueError(f"a {kind} level is the {meaning}: from {smallest:g} to {largest:g}, "
                         f"got {Noise(kind, level)}")


def is_number(value):
    """True for a finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------- losses: with and without clean images

# Each loss takes (model, batch, noise, generator). Supervised batches are clean images; the
# self-supervised ones never see a clean image: their batches are noisy images drawn once.
N2S_GRID = 4  # noise2self hides every 4th pixel in both directions: 16 phases
NEIGHBOR_GAMMA = 2.0  # neighbor2neighbor's regulariser weight (Huang et al. 2021)


def supervised_loss(net, clean, noise, generator):
    """MSE between the model's output for a noisy copy of `clean` (B x C x H x W) and `clean`.
    The model sees only the noisy batch (feeding it the clean one, a common tutorial bug,
    trains an identity map)."""
    noisy = add_noise(clean, noise, generator)  # B x C x H x W
    return F.mse_loss(net(noisy).float(), clean)


def noise2noise_loss(net, pairs, noise=None, generator=None):
    """Noise2Noise (Lehtinen et al., ICML 2018): the model maps one noisy copy of an image to
    another, independent one. pairs: B x 2 x C x H x W. With zero-mean noise the expected
    target is the clean image, so the minimiser is the same as with clean targets."""
    noisy, target = pairs[:, 0].contiguous(), pairs[:, 1]  # contiguous: the fast kernels
    return F.mse_loss(net(noisy).float(), target)


def noise2self_loss(net, noisy, noise, generator):
    """Noise2Self (Batson & Royer, ICML 2019): hide one phase of a N2S_GRID x N2S_GRID grid of
    pixels, replace each by the mean of its 8 neighbours, and score the output only at the
    hidden pixels against the noisy input (B x C x H x W). The model cannot copy a pixel's own
    noise, so it learns to predict it from its neighbours."""
    c, (h, w) = noisy.shape[1], noisy.shape[-2:]
    row, col = torch.randint(0, N2S_GRID, (2,), generator=generator,
                             device=generator.device).tolist()
    hidden = torch.zeros(h, w, dtype=torch.bool, device=noisy.device)  # H x W
    hidden[row::N2S_GRID, col::N2S_GRID] = True
    ring = torch.ones(c, 1, 3, 3, device=noisy.device, dtype=noisy.dtype) / 8
    ring[:, :, 1, 1] = 0  # the 8 neighbours, not the pixel itself
    mean = F.conv2d(F.pad(noisy, (1, 1, 1, 1), mode="reflect"), ring, groups=c)  # B x C x H x W
    restored = net(torch.where(hidden, mean, noisy)).float()  # B x C x H x W
    return F.mse_loss(restored[..., hidden], noisy[..., hidden])


def neighbor2neighbor_loss(net, noisy, noise, generator):
    """Neighbor2Neighbor (Huang et al., CVPR 2021): from each 2x2 cell of a noisy batch
    (B x C x H x W) take one pixel and one of its two side neighbours, giving two half-size
    images whose noise is independent; the model maps one to the other. The regulariser asks
    the same of the model's output for the whole image, sampled the same way (weight
    NEIGHBOR_GAMMA), which corrects for the two pixels not sharing the same clean value."""
    b, _, h, w = noisy.shape
    first = torch.randint(0, 4, (b, 1, h // 2, w // 2), generator=generator,
                          device=generator.device).to(noisy.device)  # cell index 0..3
    side = torch.randint(0, 2, first.shape, generator=generator,
                         device=generator.device).to(noisy.device)
    second = torch.where(side.bool(), first ^ 1, first ^ 2)  # 0-1 and 2-3 row, 0-2 and 1-3 column

    def pick(images, index):  # B x C x H x W -> B x C x H/2 x W/2
        cells = F.pixel_unshuffle(images, 2).unflatten(1, (-1, 4))  # B x C x 4 x H/2 x W/2
        return cells.gather(2, index.unsqueeze(1).expand(-1, cells.shape[1], -1, -1, -1))[:, :, 0]

    multiple = model.size_multiple(unwrap(net).widths)
    g1, g2 = pick(noisy, first), pick(noisy, second)  # B x C x H/2 x W/2 each
    out = forward_padded(net, g1, multiple).float()  # B x C x H/2 x W/2
    with torch.no_grad():
        whole = net(noisy).float()  # B x C x H x W
    gap = pick(whole, first) - pick(whole, second)  # B x C x H/2 x W/2
    return F.mse_loss(out, g2) + NEIGHBOR_GAMMA * F.mse_loss(out - g2, gap)


def forward_padded(net, images, multiple):
    """net(images) for any height and width: reflect-pad them up to multiples of `multiple`
    (what the model's strides need), run the model, crop back. N x C x H x W -> same."""
    h, w = images.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if not (pad_h or pad_w):
        return net(images)
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"  # reflect needs pad < size
    return net(F.pad(images, (0, pad_w, 0, pad_h), mode=mode))[..., :h, :w]


METHODS = {"supervised": supervised_loss, "noise2noise": noise2noise_loss,
           "noise2self": noise2self_loss, "neighbor2neighbor": neighbor2neighbor_loss}


def training_images(images, method, noise, seed):
    """What a method trains on: the clean images for "supervised" (noise is added per batch);
    for the self-supervised methods, noisy copies drawn once from `seed` (noise2noise: two
    independent ones, N x 2 x C x H x W), so that they never see a clean image and never see
    two draws of one image unless they are meant to. `images`: a tensor, or a list (a folder)."""
    if method == "supervised":
        return images
    generator, draws = torch.Generator().manual_seed(seed), 2 if method == "noise2noise" else 1

    def noisy(x):  # x: N x C x H x W -> N x C x H x W, or N x 2 x C x H x W
        copies = [add_noise(data.to_float(x), noise, generator) for _ in range(draws)]
        return copies[0] if draws == 1 else torch.stack(copies, 1)

    if isinstance(images, torch.Tensor):
        return noisy(images)
    return [noisy(image[None])[0] for image in images]  # C x H x W or 2 x C x H x W each


# ---------------------------------------------------------------- one step, one epoch


def train_step(net, optimizer, batch, noise, generator, *, amp=False, loss=supervised_loss):
    """One optimizer step: the loss of a batch (clean images for supervised_loss, the default;
    noisy ones for the self-supervised losses), backward, step. Returns the loss (0-dim, not
    synced). `amp`: bfloat16 autocast for the forward pass; loss and weights stay float32."""
    with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=amp):
        value = loss(net, batch, noise, generator)
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    optimizer.step()
    return value.detach()


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite by step `step`."""

    def __init__(self, step):
        super().__init__(f"non-finite loss by step {step}")
        self.step = step


class Interrupted(Exception):
    """Training stopped between two steps on request; `position` says where, for an exact resume."""

    def __init__(self, position):
        super().__init__(f"interrupted after step {position['step']}")
        self.position = position


def train_epoch(net, optimizer, images, generator, *, noise, batch_size, scheduler=None,
                amp=False, position=None, should_stop=None, progress=None, share=(0, 1),
                loss=supervised_loss):
    """One pass over `images` (clean, N x C x H x W) in an order drawn by `generator`, one
    train_step per batch (then a scheduler step). Returns the mean training loss as a float;
    raises NonFiniteLoss if it is NaN or infinite. share=(rank, processes): this process
    trains on every processes-th image of each batch, and returns its part of the mean.

    `should_stop()` is asked after every step; when it says yes, Interrupted carries the
    position after that step ({"order", "step", "loss_sum"}). Passing it back as `position`,
    with the generator as it was then, finishes the epoch exactly as if it had never stopped.
    """
    net.train()
    if position is None:
        position = {"order": data.shuffle(len(images), generator), "step": 0, "loss_sum": 0.0}
    order, done = position["order"].to(images.device), position["step"]  # N, steps done
    total = torch.tensor(position["loss_sum"], device=images.device)  # on the device: no sync
    step, (rank, processes) = done, share
    for step, idx in enumerate(data.batches(order, batch_size, done), done + 1):
        idx = idx[rank::processes]  # B / processes: this process's part (alone: all of it)
        total += train_step(net, optimizer, images[idx], noise, generator, amp=amp,
                            loss=loss) * len(idx)
        if scheduler is not None:
            scheduler.step()
        if progress is not None:
            progress.update(1)
        stop = should_stop is not None and should_stop()
        if (stop or step % FINITE_CHECK_EVERY == 0) and not torch.isfinite(total):
            raise NonFiniteLoss(step)  # before a stop: NaN weights are never saved as resumable
        if stop:
            raise Interrupted({"order": order.cpu(), "step": step, "loss_sum": total.item()})
    if not torch.isfinite(total):
        raise NonFiniteLoss(step)
    return total.item() / len(images)


def make_scheduler(optimizer, schedule, total_steps):
    """The learning-rate schedule: None for "constant"; for "onecycle", torch's OneCycleLR
    peaking at the optimizer's lr (warm-up over the first 25% of the steps, cosine decay)."""
    if schedule == "constant":
        return None
    if schedule == "onecycle":
        peak = optimizer.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=total_steps)
    raise ValueError(f"unknown lr schedule {schedule!r} (choose from {', '.join(LR_SCHEDULES)})")


# ---------------------------------------------------------------- evaluation


def psnr_per_image(pred, target):
    """PSNR in dB of each image (data range 1): N x C x H x W, N x C x H x W -> N. MSE is
    floored at 1e-10 (100 dB), so that a perfect image stays finite."""
    mse = (pred - target).square().flatten(1).mean(1)  # N
    return -10 * torch.log10(mse.clamp_min(1e-10))  # N


def psnr(pred, target):
    """Mean PSNR over images, in dB. Per image, because a pooled MSE would let the many easy
    images hide the hard ones."""
    return psnr_per_image(pred, target).mean().item()


def ssim(pred, target, batch_size=EVAL_BATCH_SIZE):
    """Mean structural similarity (Wang et al. 2004; Gaussian window 11, sigma 1.5, data range
    1) over the valid windows of each image, as scikit-image computes it, then over images.
    torchmetrics draws the SSIM map; its 5-pixel border (windows over the padding) is cut off."""
    from torchmetrics.functional.image import structural_similarity_index_measure  # slow import

    if min(pred.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, "
                         f"got {tuple(pred.shape[-2:])}")
    cut, per_image = SSIM_WINDOW // 2, []
    # oneDNN's kernel for this one-channel 11 x 11 window is slow on CPUs; None: leave the rest
    with torch.backends.mkldnn.flags(enabled=False, deterministic=None, allow_tf32=None,
                                     fp32_precision=None):
        for p, t in zip(pred.split(batch_size), target.split(batch_size)):
            _, full = structural_similarity_index_measure(
                p.float(), t.float(), data_range=1.0, reduction="none", return_full_image=True)
            per_image.append(full[..., cut:-cut, cut:-cut].flatten(1).mean(1))  # n
    return torch.cat(per_image).mean().item()


def fixed_noisy_test_set(clean, noise):
    """The test images with noise drawn once from TEST_NOISE_SEED (not --seed), so that scores
    compare across runs, seeds and epochs."""
    generator = torch.Generator(device=clean.device).manual_seed(TEST_NOISE_SEED)
    return add_noise(clean, noise, generator)  # N x C x H x W


@contextlib.contextmanager
def inference(net, device_type, amp):
    """Eval mode, no autograd and, with `amp`, bfloat16 autocast; the model's mode is restored
    on the way out (training may go on)."""
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16,
                                                    enabled=amp):
            yield
    finally:
        net.train(was_training)


def denoise(net, noisy, batch_size=EVAL_BATCH_SIZE, amp=False, multiple=1):
    """Run the model over `noisy` in batches, in eval mode: N x C x H x W -> N x C x H x W
    (float32; `amp`: computed under bfloat16 autocast). Sides that are not multiples of
    `multiple` (what the model's strides need) are padded, and cropped back."""
    with inference(net, noisy.device.type, amp):
        return torch.cat([forward_padded(net, chunk, multiple).float()
                          for chunk in noisy.split(batch_size)])  # N x C x H x W


def evaluate(net, noisy, clean, amp=False):
    """Denoise `noisy` and score it against `clean`: returns (PSNR dB, SSIM)."""
    restored = denoise(net, noisy, amp=amp)  # N x C x H x W
    return psnr(restored, clean), ssim(restored, clean)


def heldout_loss(net, noisy, loss, amp=False, draws=HELDOUT_DRAWS, batch_size=EVAL_BATCH_SIZE):
    """A self-supervised `loss` on held-out noisy images (N x C x H x W), in eval mode, averaged
    over `draws` of its random choices (which pixels hide) drawn from TEST_NOISE_SEED, so that
    epochs compare: the score of a run with no clean images. For noise2self and zero-mean
    noise independent between pixels, its expectation is the masked prediction's error against
    the unseen clean images plus the noise's variance (Batson & Royer 2019)."""
    generator = torch.Generator(device=noisy.device).manual_seed(TEST_NOISE_SEED)
    total = 0.0
    with inference(net, noisy.device.type, amp):
        for _ in range(draws):
            for chunk in noisy.split(batch_size):
                total += loss(net, chunk, None, generator).item() * len(chunk)
    return total / (draws * len(noisy))


# ---------------------------------------------------------------- checkpoints and resume

# The config keys every script reads; the rest of a config records how the run was made.
CONFIG_KEYS = ("arch", "channels", "widths", "dataset", "data_dir", "noise", "noise_level")
RESUME_KEYS = ("optimizer", "rng", "epoch", "history", "position")


class TrainState(NamedTuple):
    """What training changes, all of it saved for an exact resume."""

    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object  # None for a constant learning rate
    generator: torch.Generator  # draws the data order and the noise


def save_checkpoint(checkpoint, path):
    """Write `checkpoint` atomically: a crash mid-write leaves the previous file whole."""
    data.atomic_write(path, lambda f: torch.save(checkpoint, f))


def make_checkpoint(state, config, history, position=None, generators=None):
    """What train.py saves: the model and its config for visualize.py, plus all an exact resume
    needs (optimizer, schedule, epochs done, random states, position inside an epoch).
    `generators`: the generator states of all processes under torchrun, by rank."""
    rng = {"generator": state.generator.get_state(), "torch_cpu": torch.get_rng_state(),
           "device": state.generator.device.type,  # a generator's state fits its device only
           "processes": generators or [state.generator.get_state()]}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state_all()
    weights = unwrap(state.net).state_dict()  # no "module." prefix under torchrun
    return {"model": {k: v.detach().cpu() for k, v in weights.items()},
            "config": config, "history": history, "epoch": len(history),
            "optimizer": state.optimizer.state_dict(), "rng": rng, "position": position,
            "scheduler": None if state.scheduler is None else state.scheduler.state_dict()}


def check_config(config):
    """Raise ValueError (one line) unless a run's config can work: the flags' own limits for
    its model, noise and numbers, and the crop rules. Channels None: the data set's own."""
    text = [k for k in ("arch", "dataset", "data_dir", "noise") if not isinstance(config[k], str)]
    if text:
        raise ValueError(f"{', '.join(text)} must be text")
    model.model_config(config["arch"], config["channels"] or 1, config["widths"])
    if config["channels"] not in (None, 1, 3):  # what the data sets and figures handle
        raise ValueError(f"--channels must be 1 or 3, got {config['channels']!r}")
    check_noise(config_noise(config))
    check_noise_none(config["noise"], config["dataset"], config.get("method"))
    for key, (kind, low, high, meaning) in LIMITS.items():
        if config.get(key) is not None and not within(config[key], kind, low, high):
            raise ValueError(f"--{key.replace('_', '-')} must be {meaning}, got {config[key]!r}")
    for key, choices in (("method", METHODS), ("clip", CLIPS), ("precision", PRECISIONS),
                         ("lr_schedule", LR_SCHEDULES)):
        value = config.get(key, RUN_DEFAULTS[key])  # a checkpoint older than the flag: its default
        if value not in choices:
            raise ValueError(f"--{key.replace('_', '-')} must be one of {', '.join(choices)}, "
                             f"got {value!r}")
    crop, multiple = config.get("crop"), model.size_multiple(config["widths"])
    if crop is not None and config["dataset"] != "folder":
        raise ValueError("--crop is for --dataset folder (the other data sets are used whole)")
    if crop is not None and crop % multiple:
        raise ValueError(f"--crop must be a multiple of {multiple} for --arch {config['arch']} "
                         f"with {len(config['widths'])} levels, got {crop}")


def check_noise_none(noise, dataset, method):
    """Raise ValueError (one line) unless --noise none, if asked for, can work: on a folder of
    images that are noisy already, with a method that needs neither clean images nor pairs."""
    if noise != "none":
        return
    if dataset != "folder":
        raise ValueError(f"--noise none is for --dataset folder, images that are noisy already; "
                         f"{dataset} is clean: choose a noise to add")
    if method in ("supervised", "noise2noise"):
        need = "a clean target" if method == "supervised" else "two noisy copies of each image"
        raise ValueError(f"--method {method} needs {need}, and --noise none has only the images "
                         f"as they are: use --method noise2self or neighbor2neighbor")


def score_key(config):
    """The history key of a run's score per epoch: "test_psnr", or "test_loss" (the held-out
    loss) for a run on images that are noisy already (--noise none)."""
    return "test_loss" if config["noise"] == "none" else "test_psnr"


def check_history(history, score="test_psnr"):
    """Raise ValueError unless `history` is a list of epoch records (dicts with an int "epoch"
    and numbers for "train_loss" and `score`, see score_key)."""
    if not (isinstance(history, list) and all(
            isinstance(h, dict) and type(h.get("epoch")) is int
            and all(isinstance(h.get(k), (int, float)) for k in ("train_loss", score))
            for h in history)):
        raise ValueError("its history is not a list of epoch records")


def load_checkpoint(path):
    """model.read_checkpoint, then the checks of its config and history (older files are
    upgraded). Raises model.CheckpointError with one line naming the file."""
    checkpoint = model.read_checkpoint(path)
    config = checkpoint["config"]
    if "noise_std" in config and "noise_level" not in config:  # written before --noise existed
        config.update(noise="gaussian", noise_level=config.pop("noise_std"))
    config.setdefault("lr_schedule", "constant")  # written before --lr-schedule existed
    config.setdefault("method", "supervised")  # and before --method and --clip
    config.setdefault("clip", "on")
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise model.CheckpointError(f"checkpoint {path} has no {', '.join(missing)} in its config")
    try:
        check_config(config)
        check_history(checkpoint.get("history", []), score_key(config))
    except ValueError as e:
        raise model.CheckpointError(f"checkpoint {path} has an unusable config: {e}") from e
    return checkpoint


def open_resume(path, epochs):
    """Load a checkpoint to continue to `epochs` epochs in all. Raises model.CheckpointError
    unless it holds all an exact resume needs and its lr schedule allows that many epochs."""
    checkpoint = load_checkpoint(path)
    config = checkpoint["config"]
    schedule, planned, done = config["lr_schedule"], config.get("epochs"), checkpoint.get("epoch")
    missing = [k for k in RESUME_KEYS if k not in checkpoint] + [
        f"config {k}" for k in ("batch_size", "lr", "seed") if k not in config]
    if schedule != "constant" and not (checkpoint.get("scheduler") and planned):
        missing.append("scheduler state")
    if missing:
        raise model.CheckpointError(f"checkpoint {path} cannot be resumed: it has no "
                                    f"{', '.join(missing)} (not written by this train.py)")
    if type(done) is not int or done != len(checkpoint["history"]) or not isinstance(
            checkpoint["rng"], dict):
        raise model.CheckpointError(f"checkpoint {path} cannot be resumed: its epoch, history "
                                    f"and random state do not agree")
    if schedule != "constant" and done >= planned:
        raise model.CheckpointError(f"--resume {path}: its {schedule} lr schedule ended with "
                                    f"epoch {planned} and cannot be extended; start a new run")
    if schedule != "constant" and epochs != planned:
        raise model.CheckpointError(f"--resume {path}: its {schedule} lr schedule spans "
                                    f"{planned} epochs and cannot be stretched; finish it with "
                                    f"--epochs {planned}")
    if epochs <= done:
        raise model.CheckpointError(f"--resume {path}: it has {done} epochs already; ask for "
                                    f"more with --epochs")
    return checkpoint


def restore_state(state, checkpoint, path, images_per_epoch, procs):
    """Load a checkpoint's optimizer, schedule and random states into `state`, after checking
    that they, and its interrupted epoch if any, fit this model, data and device. Under
    torchrun, each process takes its own generator if as many processes saved it. Raises
    model.CheckpointError."""
    position, rng = checkpoint["position"], checkpoint["rng"]
    steps = math.ceil(images_per_epoch / checkpoint["config"]["batch_size"])
    try:
        ran_on, runs_on = rng.get("device", "cpu"), state.generator.device.type
        if ran_on != runs_on:  # a generator's state fits only its device type
            raise ValueError(f"it was a {ran_on} run; an exact resume needs the same device "
                             f"type, not {runs_on}")
        if state.scheduler is not None and (checkpoint["scheduler"].get("total_steps")
                                            != state.scheduler.total_steps):
            raise ValueError(f"its lr schedule has {checkpoint['scheduler'].get('total_steps')} "
                             f"steps, this data gives {state.scheduler.total_steps}")
        if position is not None and not (
                type(position["step"]) is int and 0 <= position["step"] <= steps
                and isinstance(position.get("loss_sum"), float)
                and torch.equal(position["order"].sort().values, torch.arange(images_per_epoch))):
            raise ValueError(f"its interrupted epoch (step {position['step']}) does not fit this "
                             f"data ({images_per_epoch} images, {steps} steps per epoch)")
        state.optimizer.load_state_dict(checkpoint["optimizer"])
        for param, moments in state.optimizer.state.items():  # else Adam fails mid-epoch
            if any(m.shape != param.shape for m in moments.values() if m.dim() > 0):
                raise ValueError("its optimizer state does not fit the model's weights")
        if state.scheduler is not None:
            state.scheduler.load_state_dict(checkpoint["scheduler"])
        saved = rng.get("processes") or [rng["generator"]]  # by rank
        if procs.rank < len(saved):  # a new rank keeps its fresh stream
            state.generator.set_state(saved[procs.rank])
        torch.set_rng_state(rng["torch_cpu"])
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["torch_cuda"])
    except Exception as e:  # crafted or damaged states fail in many ways; none may train
        raise model.CheckpointError(f"--resume {path}: {data.one_line(e, 200)}; resume on the "
                                    f"data and device it was trained on, or start a new run") from e


# ---------------------------------------------------------------- stop signals

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, name))


class StopRequest(BaseException):
    """A stop signal that must end the program now (BaseException: no `except Exception` in
    a loader may swallow it)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_requests():
    """Handle SIGINT (Ctrl-C), SIGTERM and SIGHUP (the terminal closed). Yields a dict: while
    its "training" is true, a first signal only sets its "signal", which the training loop
    checks between steps so that it can save a resumable checkpoint; otherwise (loading, or a
    second signal) StopRequest is raised at once. Restores the handlers on exit."""
    state = {"signal": None, "training": False}

    def handler(signum, frame):
        if state["signal"] is not None or not state["training"]:
            raise StopRequest(signum)
        state["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------- several processes (torchrun)

PROCESS_TIMEOUT = 300  # seconds a process waits for the others (rank 0 scores alone) at most


class Processes(NamedTuple):
    """This process's rank among `world` training processes, and the device they exchange on."""

    rank: int
    world: int
    device: torch.device


def join_processes(device):
    """Processes(0, 1, device) when run alone; under torchrun, after joining its process group
    (gloo on a CPU, nccl on CUDA). A process that dies ends the others within PROCESS_TIMEOUT."""
    if "WORLD_SIZE" not in os.environ:
        return Processes(0, 1, device)
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"torchrun needs --device cpu or cuda, not {device.type}")
    import datetime

    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         timeout=datetime.timedelta(seconds=PROCESS_TIMEOUT))
    return Processes(torch.distributed.get_rank(), torch.distributed.get_world_size(), device)


def all_sum(value, procs):
    """A float summed over all processes (itself when alone)."""
    if procs.world == 1:
        return value
    total = torch.tensor(float(value), dtype=torch.float64, device=procs.device)
    torch.distributed.all_reduce(total)
    return total.item()


def agreed_signal(signum, procs):
    """The stop signal some process received (the largest number; 0: none), so that all
    processes stop at the same step."""
    if procs.world == 1:
        return signum or 0
    agreed = torch.tensor(signum or 0, device=procs.device)
    torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
    return int(agreed)


def same_order(order, procs):
    """Rank 0's data order, on every process."""
    if procs.world > 1:
        torch.distributed.broadcast(order, src=0)
    return order


def all_objects(value, procs):
    """Every process's `value` (picklable), by rank."""
    if procs.world == 1:
        return [value]
    values = [None] * procs.world
    torch.distributed.all_gather_object(values, value)
    return values


def all_generators(generator, procs):
    """Every process's generator state, by rank (None when alone), to save for an exact resume."""
    return all_objects(generator.get_state().cpu(), procs) if procs.world > 1 else None


def unwrap(net):
    """The model inside DistributedDataParallel's wrapper (itself when alone)."""
    return getattr(net, "module", net)


# ---------------------------------------------------------------- the training run


def main(argv=None):
    """Train, printing one line per epoch, and save a checkpoint after every epoch. Returns the
    exit code: 0; 1 (a non-finite loss, or a checkpoint that could not be written); 2 (bad
    flags, data or checkpoint: one line); 128 + the signal's number when stopped by a signal."""
    args = parse_args(argv)
    with stop_requests() as stop:
        try:
            return run_training(args, stop)
        except RuntimeError as e:  # gloo and nccl say it in RuntimeErrors of their own
            if not torch.distributed.is_initialized():
                raise
            print(f"train.py: error: the training processes lost each other (one died or stopped "
                  f"answering): {data.one_line(e, 300)}", file=sys.stderr)
            return 1
        except (UsageError, data.DataError, model.CheckpointError, BlockingIOError) as e:
            print(f"train.py: error: {data.one_line(e, 1000)}", file=sys.stderr)
            return 2
        except StopRequest as e:  # while loading: nothing new to save
            print(f"train.py: stopped by {e} before training; nothing saved", file=sys.stderr)
            return 128 + e.signum
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


def run_training(args, stop):
    """The run that the flags ask for, step by step; returns the exit code."""
    checkpoint = open_resume(args.resume, args.epochs) if args.resume else None
    config = run_config(args, checkpoint)
    path = output_path(args.checkpoint, args.resume)
    device = open_device(args.device)
    config = {**config, "precision": resolve_precision(config["precision"], device,
                                                       resumed=checkpoint is not None)}
    procs = join_processes(device)
    with (data.exclusive(path) if procs.rank == 0 else contextlib.nullcontext(),
          contextlib.redirect_stdout(None) if procs.rank else contextlib.nullcontext()):
        refuse_replacing(path, args.resume, args.overwrite)  # rank 0 alone writes, and prints
        net = model.restore_model(checkpoint, args.resume) if checkpoint else None
        if config["deterministic"]:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before any CUDA work
            torch.use_deterministic_algorithms(True)
        ds, config = load_data(config, resumed=args.resume, procs=procs)
        state, train_x = setup(config, net, ds, procs)
        history, position = [], None
        if checkpoint:
            restore_state(state, checkpoint, args.resume, data.images_per_epoch(train_x), procs)
            history, position = checkpoint["history"], checkpoint["position"]
            if position and procs.rank:  # the loss summed so far counts once, on rank 0
                position = {**position, "loss_sum": 0.0}
            say_resuming(args.resume, checkpoint, args.epochs, procs.world)
        print(f"model: {config['arch']} {config['widths']}, "
              f"{model.count_parameters(state.net):,} parameters, device {device}"
              + (f" x {procs.world} processes" if procs.world > 1 else "")
              + f", {data.images_per_epoch(train_x):,} training images per epoch, "
              f"lr {config['lr']:g} {config['lr_schedule']}, {config['method']}")
        # rank 0 alone scores: the others wait at the next exchange
        test = None if procs.rank else scored_test_set(ds.test_x.to(device), config_noise(config),
                                                        config["method"])
        stop["training"] = True
        try:
            return train_epochs(state, config, train_x=train_x, test=test, path=path,
                                history=history, position=position, stop=stop, procs=procs)
        except StopRequest as e:
            return fail(128 + e.signum, f"stopped at once by a second {e}; {path} is as the "
                                        f"last completed save left it")


def say_resuming(path, checkpoint, epochs, world):
    """Say where a resumed run continues, and if the number of processes changed, what that
    changes."""
    position, saved = checkpoint["position"], len(checkpoint["rng"].get("processes") or [1])
    where = f", step {position['step']}" if position else ""
    print(f"resuming {path}: {len(checkpoint['history'])} epochs done{where}, training to {epochs}")
    if saved != world:
        print(f"note: {saved} processes trained it and {world} continue it: the weights, optimizer "
              f"and data order continue, the noise draws differ from an uninterrupted run")


def run_config(args, checkpoint):
    """This run's config: the resumed checkpoint's, which the flags given must not contradict,
    else the flags given over RUN_DEFAULTS, checked. Raises UsageError or CheckpointError."""
    old = checkpoint["config"] if checkpoint else {}
    given = given_settings(args, config_noise(old) if checkpoint else None)
    data_dir = os.path.abspath(args.data_dir or old.get("data_dir", "data"))
    if checkpoint:
        if given.get("precision") == "auto":  # auto fits whatever the run used
            del given["precision"]
        conflicts = [f"--{k.replace('_', '-')} {v} (the checkpoint has {old[k]})"
                     for k, v in given.items() if k in old and v != old[k]]
        if conflicts:
            raise model.CheckpointError(f"--resume {args.resume}: flags contradict the "
                                        f"checkpoint: " + "; ".join(conflicts))
        # what an older checkpoint did not record: as given (--amp again), else as it ran then
        config = {"precision": "fp32", **given, **old}
    else:
        config = {**RUN_DEFAULTS, **given, "data_dir": data_dir, "test_noise_seed": TEST_NOISE_SEED,
                  "torch": str(torch.__version__),  # torchvision's without its slow import:
                  "torchvision": importlib.metadata.version("torchvision")}
        if config["dataset"] == "folder":
            config["crop"] = config["crop"] or data.DEFAULT_CROP
        try:
            config["widths"] = model.model_config(config["arch"], 1, config["widths"])["widths"]
            check_config(config)
        except ValueError as e:
            raise UsageError(str(e)) from e
    return {**config, "epochs": args.epochs,
            "deterministic": bool(args.deterministic or old.get("deterministic")),
            "data_dir": data_dir}


def given_settings(args, noise=None):
    """The run-defining flags given, as {config key: value}; the noise flags always, resolved
    against `noise` (a resumed run's) or the defaults. Raises UsageError."""
    try:
        noise = resolve_noise(args.noise, args.noise_level, args.noise_std, default=noise)
    except ValueError as e:
        raise UsageError(str(e)) from e
    given = {k: getattr(args, k) for k in RUN_DEFAULTS if getattr(args, k) is not None}
    return {**given, "noise": noise.kind, "noise_level": noise.level}


def load_data(config, resumed, procs):
    """The run's data set, and the config completed with what was loaded (the data set's name:
    mnist-sample after the offline fallback; channels, image size, fingerprint). `resumed`: the
    path of a resumed checkpoint, which refuses other data. Under torchrun, rank 0 loads (and
    downloads) first and all must load the same. Raises DataError or UsageError."""
    name, folder = config["dataset"], config["data_dir"]
    for turn in range(min(procs.world, 2)):  # alone: one turn; else rank 0's, then the others'
        if (procs.rank == 0) == (turn == 0):
            ds = data.load_dataset(name, folder, download=procs.rank == 0,
                                   channels=config["channels"], crop=config.get("crop"))
        if procs.world > 1:
            torch.distributed.barrier()
    print(ds.note)
    fingerprint, size = data.fingerprint(ds), list(ds.test_x.shape[2:])
    if len(set(all_objects((ds.name, fingerprint), procs))) > 1:
        raise data.DataError(f"the {procs.world} processes loaded different data from {folder}; "
                             f"give them all the same --data-dir, with the files in it")
    if resumed and ds.name != name:
        raise data.DataError(f"--resume {resumed} was trained on {name}, but {ds.name} was "
                             f"loaded; point --data-dir at the original data")
    if resumed and config.get("data_fingerprint", fingerprint) != fingerprint:
        raise data.DataError(f"--resume {resumed}: the images in {folder} are not the ones it "
                             f"was trained on; point --data-dir at the original data")
    multiple, levels = model.size_multiple(config["widths"]), len(config["widths"])
    if any(side % multiple for side in size):
        raise UsageError(f"{levels} widths halve the image {levels} times, so its sides must be "
                         f"multiples of {multiple}; {ds.name} is {size[0]}x{size[1]}: use fewer "
                         f"--widths")
    if min(size) < SSIM_WINDOW:
        raise UsageError(f"{ds.name}'s test images are {size[0]}x{size[1]}; scoring (SSIM) "
                         f"needs at least {SSIM_WINDOW}x{SSIM_WINDOW}")
    return ds, {**config, "dataset": ds.name, "channels": ds.test_x.shape[1],
                "image_size": size, "data_fingerprint": fingerprint}


def setup(config, net, ds, procs):
    """The model (built from the config, unless resumed), optimizer, schedule and generator of
    a run, and its training images on the device. Returns (state, train_x). Under torchrun the
    model is wrapped in DistributedDataParallel and each process draws its own noise."""
    random.seed(config["seed"])  # the weights' initialisation, and any other global draw
    np.random.seed(config["seed"])
    torch.manual_seed(config["seed"])  # seeds CUDA too
    net = model.build_model(config) if net is None else net
    net = net.to(procs.device).to(memory_format=torch.channels_last)  # oneDNN's fast kernels
    synced = procs.world > 1 and procs.device.type == "cuda"  # BatchNorm over the whole batch
    if synced:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)  # (gloo cannot: CPU)
    train_x = training_images(ds.train_x, config["method"], config_noise(config), config["seed"])
    train_x = train_x.to(procs.device) if isinstance(train_x, torch.Tensor) else train_x
    optimizer = torch.optim.Adam(net.parameters(), lr=config["lr"])
    images, batch_size = data.images_per_epoch(train_x), config["batch_size"]
    scheduler = make_scheduler(optimizer, config["lr_schedule"],
                               math.ceil(images / batch_size) * config["epochs"])
    # rank 0 draws what a lone process draws; the others' streams start far from any --seed's
    stream = config["seed"] + (procs.rank << 32)
    generator = torch.Generator(device=procs.device).manual_seed(stream)
    sides = [config["crop"]] * 2 if config.get("crop") else config["image_size"]  # training's
    check_batches(images, batch_size, procs.world,
                  deepest_pixels(sides, config["widths"], config["method"]), synced)
    if procs.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[procs.device.index] if procs.device.type == "cuda" else None)
    return TrainState(net, optimizer, scheduler, generator), train_x


def deepest_pixels(sides, widths, method):
    """Pixels per channel at the smallest level of a model of `widths` for one training image
    of `sides` (H, W): H x W over 4 ** levels (neighbor2neighbor trains on half-size images,
    padded up to what fits)."""
    if method == "neighbor2neighbor":
        sides = [side // 2 for side in sides]
    multiple = model.size_multiple(widths)
    return math.prod(-(-side // multiple) for side in sides)  # ceil: padded up


def check_batches(images, batch_size, processes, pixels, synced=False):
    """Raise UsageError unless every process's part of every batch (the last may be smaller)
    holds an image, and each BatchNorm sees more than one value per channel at the smallest
    level (`pixels` per image), which it needs to train. `synced`: SyncBatchNorm, whose
    statistics span the whole batch rather than one process's part."""
    smallest = min(batch_size, images % batch_size or batch_size)
    if smallest < processes:
        raise UsageError(f"--batch-size {batch_size} leaves a batch of fewer images than the "
                         f"{processes} processes ({images} per epoch); choose another")
    if (smallest if synced else smallest // processes) * pixels < 2:
        split = f", split between {processes} processes" if processes > 1 else ""
        raise UsageError(f"--batch-size {batch_size} leaves BatchNorm a batch of one image "
                         f"({images} per epoch{split}), which the model's smallest level shrinks "
                         f"to one pixel; choose another --batch-size, a larger --crop or fewer "
                         f"--widths")


class TestSet(NamedTuple):
    """The clean test images, their fixed noisy draw, and the noisy input's PSNR; with --noise
    none, only the noisy images and the loss that scores them."""

    clean: torch.Tensor  # N x C x H x W, or None: the images are noisy already
    noisy: torch.Tensor  # N x C x H x W
    noisy_psnr: float = None
    loss: object = None  # --noise none: the method's loss, for heldout_loss


def scored_test_set(images, noise, method):
    """The TestSet of a run; prints the noisy input's scores, the baseline."""
    if noise.kind == "none":
        print(f"held-out: {len(images):,} of the images, noisy already: scored by their {method} "
              f"loss (with no clean image there is no PSNR)")
        return TestSet(None, images, loss=METHODS[method])
    noisy = fixed_noisy_test_set(images, noise)  # N x C x H x W
    baseline = psnr(noisy, images)
    print(f"noisy input ({noise}): test PSNR {baseline:.2f} dB, SSIM {ssim(noisy, images):.4f}")
    return TestSet(images, noisy, baseline)


def train_epochs(state, config, *, train_x, test, path, history, position, stop, procs):
    """Train from len(history) to config["epochs"] epochs, scoring and saving after each (rank
    0); returns the exit code. A stop signal saves a resumable checkpoint inside the epoch."""
    from tqdm import tqdm

    noise, batch_size, epochs = config_noise(config), config["batch_size"], config["epochs"]
    amp = config["precision"] == "bf16"

    def should_stop():  # when any process got a signal, all stop after the same step
        agreed = agreed_signal(stop["signal"], procs)
        if agreed:  # (never write None: a signal may arrive while the processes agree)
            stop["signal"] = agreed
        return bool(agreed)

    for epoch in range(len(history) + 1, epochs + 1):
        start = time.perf_counter()
        images = data.epoch_images(train_x, config["crop"], config["seed"], epoch)
        images = images.to(procs.device)  # N x C x H x W
        if position is None and procs.world > 1:  # one data order for all: rank 0's
            order = same_order(data.shuffle(len(images), state.generator), procs)
            position = {"order": order, "step": 0, "loss_sum": 0.0}
        try:  # disable=None: a bar on a terminal, none in logs and CI
            with tqdm(total=math.ceil(len(images) / batch_size), desc=f"epoch {epoch}",
                      initial=position["step"] if position else 0, leave=False,
                      disable=None if procs.rank == 0 else True) as bar:
                loss = train_epoch(state.net, state.optimizer, images, state.generator,
                                   noise=noise, batch_size=batch_size, scheduler=state.scheduler,
                                   amp=amp, position=position, progress=bar,
                                   should_stop=should_stop, share=procs[:2],
                                   loss=METHODS[config["method"]])
        except NonFiniteLoss as e:
            return fail(1, f"the loss became NaN or infinite in epoch {epoch} by step {e.step} "
                           f"(lr {config['lr']:g}); stopped, {kept(path, history)}")
        except Interrupted as e:
            position = {**e.position, "loss_sum": all_sum(e.position["loss_sum"], procs)}
            generators = all_generators(state.generator, procs)  # every process takes part
            checkpoint = (make_checkpoint(state, config, history, position, generators)
                          if procs.rank == 0 else None)
            return save_stop(checkpoint, path, stop, procs, epochs,
                             f"in epoch {epoch} after step {e.position['step']}")
        position, loss = None, all_sum(loss, procs)  # the processes' parts of the mean
        if procs.rank == 0:
            history = history + [scored_epoch(unwrap(state.net), test, epoch, loss=loss,
                                              start=start, images=len(images),
                                              precision=config["precision"])]
        signum, generators = agreed_signal(stop["signal"], procs), all_generators(
            state.generator, procs)
        checkpoint = (make_checkpoint(state, config, history, None, generators)
                      if procs.rank == 0 else None)  # rank 0 alone writes
        if signum and epoch < epochs:  # came during the evaluation
            stop["signal"] = signum
            return save_stop(checkpoint, path, stop, procs, epochs, f"after epoch {epoch}")
        try:
            if procs.rank == 0:
                save_checkpoint(checkpoint, path)
        except OSError as e:
            return fail(1, f"cannot write checkpoint {path} ({data.one_line(e, 200)}); "
                           f"{kept(path, history[:-1])}")
    return finish(path, history, test) if procs.rank == 0 else 0


def scored_epoch(net, test, epoch, *, loss, start, images, precision):
    """Score the model after an epoch and print the epoch's line; returns its history record."""
    seconds, amp = time.perf_counter() - start, precision == "bf16"  # training alone: img/s
    if test.clean is None:  # --noise none
        scores = {"test_loss": heldout_loss(net, test.noisy, test.loss, amp)}
        shown = f"held-out loss {scores['test_loss']:.5f}"
    else:
        scores = dict(zip(("test_psnr", "test_ssim"), evaluate(net, test.noisy, test.clean, amp)))
        shown = f"test PSNR {scores['test_psnr']:.2f} dB  SSIM {scores['test_ssim']:.4f}"
    record = {"epoch": epoch, "train_loss": loss, **scores,
              "seconds": time.perf_counter() - start}
    say(f"epoch {epoch:3d}  train loss {loss:.5f}  {shown}  {record['seconds']:.1f} s  "
        f"{images / seconds:,.0f} img/s  {precision}")
    return record


def kept(path, history):
    """What the checkpoint file holds now, for an error line."""
    if history:
        return f"{path} keeps epoch {len(history)}"
    return f"{path} is as it was" if os.path.exists(path) else "nothing saved"


def fail(code, message):
    """Print `message` as train.py's one error line; return `code`."""
    say(f"train.py: error: {message}", sys.stderr)
    return code


def say(line, stream=None):
    """Print a line (to stdout by default); a closed terminal (SIGHUP) must not turn a saved
    stop into a traceback."""
    with contextlib.suppress(OSError):
        print(line, file=stream or sys.stdout, flush=True)


def save_stop(checkpoint, path, stop, procs, epochs, where):
    """Save a resumable checkpoint for a stop signal (rank 0) and say how to resume; returns the
    shell's code for the signal (130 for SIGINT, 143 for SIGTERM), also when the save fails."""
    name, code = signal.Signals(stop["signal"]).name, 128 + stop["signal"]
    if procs.rank:
        return code
    try:
        save_checkpoint(checkpoint, path)
    except (OSError, StopRequest) as e:
        return fail(code, f"stopped by {name} {where}, but the checkpoint could not be written "
                          f"({data.one_line(e, 200)}); {kept(path, checkpoint['history'])}")
    launch = ("python" if procs.world == 1 else
              f"torchrun --standalone --nproc_per_node={procs.world}")
    say(f"train.py: stopped by {name} {where}; saved {path}; resume with: "
        f"{launch} train.py --resume {path} --epochs {epochs}", sys.stderr)
    return code


def finish(path, history, test):
    """The closing lines of a finished run; a warning if the model made the images worse."""
    if history and test.noisy_psnr is not None and history[-1]["test_psnr"] < test.noisy_psnr:
        print(f"train.py: warning: the model scores {history[-1]['test_psnr']:.2f} dB, below the "
              f"noisy input's {test.noisy_psnr:.2f} dB: it makes images worse (--lr too high?)",
              file=sys.stderr)
    print(f"checkpoint: {path}")
    show = "" if path == DEFAULT_CHECKPOINT else f" --checkpoint {path}"
    print(f"draw the figure: python visualize.py{show}")
    return 0


# ---------------------------------------------------------------- command line


class UsageError(Exception):
    """Flags that cannot work (together, or with this data or file system): one line, exit 2."""


# Flags that define a run. They default to None, so that a resume can tell the ones given (and
# refuse those that contradict its checkpoint); a new run fills the rest from here.
RUN_DEFAULTS = {"arch": "basic", "widths": None, "dataset": "mnist", "channels": None,
                "crop": None, "batch_size": 128, "lr": 1e-3, "lr_schedule": "constant", "seed": 0,
                "precision": "auto", "method": "supervised", "clip": "on"}
# The numbers a run is defined by, as (type, smallest, largest, meaning): their flags and the
# config of a checkpoint are checked against the same limits.
LIMITS = {"epochs": (int, 1, 10 ** 6, "an integer from 1 to 10**6"),
          "batch_size": (int, 1, 2 ** 24, "an integer from 1 to 2**24"),
          "lr": (float, math.ulp(0.0), math.inf, "a positive number"),
          "seed": (int, 0, 2 ** 32 - 1, "an integer in [0, 2**32)"),
          "crop": (int, SSIM_WINDOW, 2 ** 15, f"an integer from {SSIM_WINDOW} (SSIM's window) "
                                              f"to 2**15")}


def output_path(checkpoint, resume):
    """Where this run writes: --checkpoint, else the resumed file, else the default. Raises
    UsageError, before any work, if no file can be written there."""
    path = checkpoint if checkpoint is not None else resume or DEFAULT_CHECKPOINT
    if not path.strip() or path.endswith(os.sep) or os.path.exists(path) and not os.path.isfile(
            path):
        raise UsageError(f"--checkpoint {path!r} must name a regular file")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(path))):
            pass
    except OSError as e:
        raise UsageError(f"cannot write the checkpoint {path}: {data.one_line(e, 200)}") from e
    return path


def refuse_replacing(path, resume, overwrite):
    """Raise UsageError if `path` exists and is not the file being resumed (unless --overwrite):
    a run never replaces another run's checkpoint by accident."""
    if not os.path.exists(path) or overwrite or resume and os.path.samefile(path, resume):
        return
    if resume:
        raise UsageError(f"{path} exists and is not the checkpoint being resumed; pass "
                         f"--overwrite or another --checkpoint")
    raise UsageError(f"{path} exists; continue it with --resume {path}, or pass --overwrite or "
                     f"another --checkpoint")


def open_device(name):
    """The torch device called `name` ('auto': cuda, then mps, then cpu), touched once so that
    an absent one fails now with one line (UsageError) instead of mid-run."""
    if name == "auto":
        name = ("cuda" if torch.cuda.is_available()
                else "mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
        if device.type == "cuda" and device.index is None:  # under torchrun: a GPU per process
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.ones(1, device=device).add(1).cpu()  # a device that cannot compute fails here
        if device.type == "cuda":
            torch.cuda.set_device(device)  # what NCCL and bf16 checks take as "this GPU"
    except Exception as e:  # torch says it in many ways: RuntimeError, AssertionError, ...
        raise UsageError(f"device {name!r} cannot be used: {data.one_line(e, 200)}") from e
    return device


def native_bf16(device):
    """True if `device` computes bfloat16 natively: a CPU with AMX or AVX512-BF16 (torch has no
    public test for these, so its cpuinfo flags are read), a CUDA GPU from Ampere on, or an
    Apple GPU that autocasts to it."""
    if device.type == "cpu":
        flags = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, flag, lambda: False)() for flag in flags)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            ones = torch.ones(1, 1, 3, 3, device=device)
            F.conv2d(ones, ones).cpu()
        return device.type == "mps"
    except Exception:  # autocast or the kernel missing on this device or OS version
        return False


def resolve_precision(precision, device, resumed=False):
    """What --precision means on `device`: "bf16" (bfloat16 autocast for the forward pass) or
    "fp32". auto: bf16 on a CPU that computes it natively, where it is faster and as accurate
    (docs/speed.md), else fp32. Raises UsageError for bf16 where it is not native: it would
    only be slower. `resumed`: the precision is a resumed run's."""
    if precision == "auto":
        return "bf16" if device.type == "cpu" and native_bf16(device) else "fp32"
    if precision == "bf16" and not native_bf16(device):
        way_out = ("continue this bf16 run on such hardware, or start a new one" if resumed
                   else "use --precision fp32")
        raise UsageError(f"--precision bf16 needs bfloat16 hardware (a CPU with AMX or "
                         f"AVX512-BF16, a CUDA GPU from Ampere on), and {device} has none: "
                         f"it would only be slower; {way_out}")
    return precision


def resolve_noise(kind, level, std, default=None):
    """The Noise that --noise, --noise-level and --noise-std ask for (None: not given).

    --noise-std S is the Gaussian spelling of --noise gaussian --noise-level S. What is not
    given comes from `default` (a Noise, such as a checkpoint's), else from NOISES' default
    level for the type. Raises ValueError with one line.
    """
    if std is not None:
        if level is not None:
            raise ValueError("give --noise-level or --noise-std (its Gaussian spelling), not both")
        if kind == "none":
            raise ValueError("--noise none adds nothing, so it takes no --noise-std")
        if kind not in (None, "gaussian"):
            raise ValueError(f"--noise-std is the Gaussian level; for --noise {kind} "
                             f"use --noise-level")
        kind, level = "gaussian", std
    kind = kind or (default.kind if default else "gaussian")
    if level is None:
        level = default.level if default and default.kind == kind else NOISES[kind][1]
    noise = Noise(kind, level, default.clip if default else True)
    check_noise(noise)
    return noise


def within(value, kind, low, high):
    """True if `value` is a finite number of type `kind` (an int passes as a float) in
    [low, high]."""
    return is_number(value) and (kind is float or isinstance(value, int)) and low <= value <= high


def number(kind, low, high, meaning):
    """An argparse type: the text as a `kind` from `low` to `high`, else the error `meaning`."""
    def parse(text):
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            value = None
        if not within(value, kind, low, high):
            raise argparse.ArgumentTypeError(f"must be {meaning}, got {text}")
        return value
    return parse


positive_int = number(int, 1, 10 ** 9, "an integer from 1 to 10**9")
nonnegative_float = number(float, 0, math.inf, "a number >= 0")


def noise_level(text):
    """argparse type for --noise-level: 'S' (a number >= 0) or 'LO:HI' (0 <= LO <= HI), which
    gives the [LO, HI] list that add_noise draws one level per image from."""
    if ":" not in text:
        return nonnegative_float(text)
    lo, hi = (nonnegative_float(part) for part in text.split(":", 1))
    if lo > hi:
        raise argparse.ArgumentTypeError(f"range LO:HI needs LO <= HI, got {text}")
    return [lo, hi]


def widths_list(text):
    """argparse type for --widths: '32,64' -> [32, 64], one positive channel count per level."""
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        widths = []
    if not widths or not all(1 <= w <= model.MAX_WIDTH for w in widths):
        raise argparse.ArgumentTypeError(f"must be positive integers separated by commas "
                                         f"(e.g. 32,64; each at most {model.MAX_WIDTH}), "
                                         f"got {text!r}")
    return widths


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except where it is None: those say what they mean."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def add_shared_flags(parser, checkpoint_default):
    """Declare the flags train.py and visualize.py share: --checkpoint, --data-dir and the
    noise flags (visualize.py: None means the checkpoint's)."""
    parser.add_argument("--checkpoint", default=checkpoint_default,
                        help=f"checkpoint file; train.py writes it after every epoch, "
                             f"visualize.py reads it (default: {DEFAULT_CHECKPOINT}; train.py "
                             f"--resume: the resumed file)" if checkpoint_default is None else
                        "the checkpoint to read")
    add_data_dir_flag(parser)
    meanings = "; ".join(f"{k}: {m} (default {d:g})" for k, (m, d, _) in NOISES.items()
                         if k != "none")
    parser.add_argument("--noise", choices=NOISES, default=None,
                        help="noise type; none: add nothing, for a --dataset folder of images "
                             "that are noisy already, with --method noise2self or "
                             "neighbor2neighbor (default: gaussian, or the checkpoint's)")
    parser.add_argument("--noise-level", type=noise_level, default=None,
                        help=f"noise strength, or a range LO:HI (one level per image, drawn "
                             f"uniformly: blind training). {meanings}. Noisy pixels are "
                             f"clipped to [0, 1], unless training used --clip off")
    parser.add_argument("--noise-std", type=noise_level, default=None,
                        help="the Gaussian spelling: --noise-std S is --noise gaussian "
                             "--noise-level S")


def add_data_dir_flag(parser):
    """Declare --data-dir (train.py, visualize.py and benchmarks/speed.py)."""
    parser.add_argument("--data-dir", default=None,
                        help="folder holding data sets in torchvision's layout "
                             "(DATA_DIR/MNIST/raw/*-ubyte), where downloads go; with --dataset "
                             "folder, the folder of images (default: data, or the checkpoint's)")


def add_batch_size_flag(parser, default=None):
    """Declare --batch-size (shared by train.py and benchmarks/speed.py)."""
    parser.add_argument("--batch-size", type=number(*LIMITS["batch_size"]), default=default,
                        help="images per optimizer step" + (
                            f" (default: {RUN_DEFAULTS['batch_size']})" if default is None else ""))


def add_model_flags(parser):
    """Declare --arch and --widths (shared by train.py and benchmarks/speed.py)."""
    parser.add_argument("--arch", choices=model.ARCHS, default=None,
                        help="model architecture (default: basic)")
    parser.add_argument("--widths", type=widths_list, default=None,
                        help="channels per level, comma-separated; each level halves the image, "
                             "so MNIST's 28 x 28 takes at most 2 (default: " + "; ".join(
                                 f"{a} {','.join(map(str, c.default_widths))}"
                                 for a, c in model.ARCHS.items()) + ")")


def parse_args(argv=None):
    """Flags of train.py (the run-defining ones default to None: see RUN_DEFAULTS)."""
    p = argparse.ArgumentParser(description="Train a convolutional denoising autoencoder.",
                                formatter_class=HelpFormatter)
    p.add_argument("--epochs", type=number(*LIMITS["epochs"]), default=10,
                   help="passes over the training set (with --resume: the total to reach)")
    add_batch_size_flag(p)
    p.add_argument("--lr", type=number(*LIMITS["lr"]), default=None,
                   help="Adam learning rate; with --lr-schedule onecycle, the peak (default: 1e-3)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None,
                   help="constant, or onecycle: warm up to --lr over the first 25%% of the "
                        "run's steps, then decay to almost 0 (try --lr 3e-3) (default: constant)")
    p.add_argument("--dataset", choices=data.DATASETS, default=None,
                   help="mnist falls back to mnist-sample (5,000 digits) when offline; folder: "
                        "every PNG/JPEG/TIFF under --data-dir, recursively (default: mnist)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="1 (gray) or 3 (colour): converts the images (default: the data set's "
                        "own; colour for a folder)")
    p.add_argument("--crop", type=number(*LIMITS["crop"]), default=None,
                   help=f"--dataset folder only: train on random CROP x CROP crops, test on "
                        f"centre crops (default: {data.DEFAULT_CROP})")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="supervised: learn from clean images with noise added per batch; "
                        "noise2noise (pairs of noisy images), noise2self or neighbor2neighbor "
                        "(single noisy images): learn from noisy images alone, drawn once from "
                        "--seed (default: supervised)")
    p.add_argument("--clip", choices=CLIPS, default=None,
                   help="clip noisy pixels to [0, 1]; the self-supervised methods assume "
                        "zero-mean noise, which clipping breaks near black and white (default: on)")
    add_model_flags(p)
    p.add_argument("--seed", type=number(*LIMITS["seed"]), default=None,
                   help="seeds the weights, the data order and the noise (default: 0)")
    add_shared_flags(p, checkpoint_default=None)
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a name")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--precision", choices=PRECISIONS, default=None,
                           help="bf16: bfloat16 autocast for the forward pass (loss and weights "
                                "stay float32), where the hardware has it; auto: bf16 on CPUs "
                                "with AMX or AVX512-BF16, else fp32 (default: auto, or the "
                                "checkpoint's)")
    precision.add_argument("--amp", dest="precision", action="store_const", const="bf16",
                           help="the same as --precision bf16")
    p.add_argument("--deterministic", action="store_true",
                   help="use only deterministic algorithms (matters on CUDA; see "
                        "docs/reference.md)")
    p.add_argument("--overwrite", action="store_true",
                   help="let this run replace an existing --checkpoint file")
    p.add_argument("--resume", metavar="CHECKPOINT",
                   help="continue this checkpoint's run, exactly, up to --epochs in total")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
