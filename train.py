"""Train a convolutional denoising autoencoder: noisy image in, clean image out.

    python train.py --epochs 10            # MNIST, Gaussian noise of std 0.5, then:
    python visualize.py                    # noisy / clean / denoised test images

Top-down: the noise, the losses (supervised, and three that learn from noisy images alone), one
step and one epoch, the metrics; then the checkpoint, the run and the command line.
"""

import argparse
import math
import os
import pickle
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
TILE, TILE_MARGIN = 512, 64  # large images: tiles of bounded memory, context wider than models see
USEFUL_GAIN_DB = 0.5  # a model less than this above the noisy input is warned about
MAX_NOISE_LEVEL = 1e6  # above any useful level of any type; float32 holds it (1e39 is infinite)
HELDOUT_DRAWS = 16  # a self-supervised held-out loss is averaged over this many random masks
SHOWN = {"test_psnr": "test PSNR {:.2f} dB", "test_ssim": "SSIM {:.4f}",
         "test_loss": "held-out loss {:.5f}"}  # how an epoch's line shows its scores

# ---------------------------------------------------------------- noise

# What --noise-level means for each type, and its default. Poisson is the only type where a
# larger level means less noise: it is the photon count of a white pixel.
NOISES = {
    "gaussian": ("standard deviation on the [0, 1] scale", 0.5),
    "salt-pepper": ("fraction of pixel values replaced, half by 0 and half by 1", 0.2),
    "poisson": ("photons a white pixel collects (larger is cleaner)", 10.0),
    "speckle": ("standard deviation of the multiplicative noise", 0.5),
    "none": ("nothing is added: the images of a folder are noisy already", 0.0),
}


class Noise(NamedTuple):
    """A type (a key of NOISES), a level (or [lo, hi]: one per image), clipping to [0, 1]."""

    kind: str
    level: object
    clip: bool = True

    def __str__(self):  # 'gaussian 0.5', 'gaussian 0.1:0.5 unclipped', 'none'
        level = ":".join(f"{v:g}" for v in np.atleast_1d(self.level))
        return "none" if self.kind == "none" else (
            f"{self.kind} {level}" + ("" if self.clip else " unclipped"))


def add_noise(images, noise, generator):
    """Noisy copies of `images` (N x C x H x W in [0, 1]), clipped to [0, 1] if noise.clip:
    "gaussian" adds N(0, level^2); "speckle" adds images * N(0, level^2); "salt-pepper" sets a
    fraction `level` of the values to 0 or 1; "poisson" counts Poisson(images * level) photons
    and divides by `level`; "none" adds nothing. The same generator state, the same draw. A
    colour image whose channels are equal (a gray photo kept as RGB) gets gaussian or speckle
    noise equal in each channel too: it was gray when it became noisy."""
    level, draw = noise.level, {"generator": generator, "device": images.device}
    if isinstance(level, (list, tuple)):  # one level per image: N x 1 x 1 x 1
        level = torch.rand(len(images), 1, 1, 1, **draw) * (level[1] - level[0]) + level[0]
    if noise.kind == "none":
        return images.clone()
    if noise.kind == "salt-pepper":
        u = torch.rand(images.shape, **draw)  # N x C x H x W, uniform in [0, 1)
        return torch.where(u < level, (u >= level / 2).to(images.dtype), images)
    if noise.kind == "poisson":
        noisy = torch.poisson(images * level, generator=generator) / level  # N x C x H x W
    else:  # gaussian, speckle: in place, one allocation per batch
        noisy = torch.randn(images.shape, **draw)  # N x C x H x W
        gray = (images == images[:, :1]).flatten(1).all(1).view(-1, 1, 1, 1)  # N x 1 x 1 x 1
        noisy = torch.where(gray, noisy[:, :1], noisy).mul_(level)  # equal channels, equal noise
        noisy = (noisy.mul_(images) if noise.kind == "speckle" else noisy).add_(images)
    return noisy.clamp_(0, 1) if noise.clip else noisy


def seeded(*key, device="cpu"):
    """A torch generator seeded by integers that numpy's SeedSequence mixes: (seed, epoch) for
    an epoch's order and crops, (seed, epoch, rank + 1) for a process's noise (not rank: the
    sequence pads with zeros, so (seed, epoch, 0) would repeat (seed, epoch))."""
    state = np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state))


# ---------------------------------------------------------- losses: with and without clean images

# Each loss takes (model, batch, noise, generator). Supervised batches are clean images; the
# self-supervised ones never see a clean image: their batches are noisy images drawn once.
N2S_GRID = 4  # noise2self hides every 4th pixel in both directions: 16 phases
NEIGHBOR_GAMMA = 2.0  # neighbor2neighbor's regulariser weight (Huang et al. 2021)


def supervised_loss(net, clean, noise, generator):
    """MSE between the model's output for a noisy copy of `clean` (B x C x H x W) and `clean`;
    the model sees only the noisy batch (fed the clean one, it would learn the identity)."""
    noisy = add_noise(clean, noise, generator)  # B x C x H x W
    return F.mse_loss(net(noisy).float(), clean)


def noise2noise_loss(net, pairs, noise=None, generator=None):
    """Noise2Noise (Lehtinen et al. 2018): map one noisy copy of an image to another (pairs:
    B x 2 x C x H x W); for zero-mean noise the minimiser is that of clean targets."""
    return F.mse_loss(net(pairs[:, 0].contiguous()).float(), pairs[:, 1])


def noise2self_loss(net, noisy, noise, generator):
    """Noise2Self (Batson & Royer 2019): hide one phase of an N2S_GRID x N2S_GRID grid of pixels
    (each replaced by the mean of its 8 neighbours) and score the output only there, against
    the noisy input (B x C x H x W): a pixel's own noise cannot be copied."""
    c, (h, w) = noisy.shape[1], noisy.shape[-2:]
    row, col = torch.randint(0, N2S_GRID, (2,), generator=generator,
                             device=generator.device).tolist()
    hidden = torch.zeros(h, w, dtype=torch.bool, device=noisy.device)  # H x W
    hidden[row::N2S_GRID, col::N2S_GRID] = True
    ring = torch.full((c, 1, 3, 3), 1 / 8, device=noisy.device, dtype=noisy.dtype)
    ring[:, :, 1, 1] = 0  # the 8 neighbours, not the pixel itself
    mean = F.conv2d(F.pad(noisy, (1, 1, 1, 1), mode="reflect"), ring, groups=c)  # B x C x H x W
    restored = net(torch.where(hidden, mean, noisy)).float()  # B x C x H x W
    return F.mse_loss(restored[..., hidden], noisy[..., hidden])


def neighbor2neighbor_loss(net, noisy, noise, generator):
    """Neighbor2Neighbor (Huang et al. 2021): one pixel of each 2x2 cell and one of its side
    neighbours give two half-size images with independent noise (B x C x H/2 x W/2); the model
    maps one to the other. The regulariser asks the same of its output for the whole image,
    which corrects for the two pixels not sharing one clean value."""
    b, _, h, w = noisy.shape
    first = torch.randint(0, 4, (b, 1, h // 2, w // 2), generator=generator,
                          device=noisy.device)  # cell index 0..3
    side = torch.randint(0, 2, first.shape, generator=generator, device=noisy.device)
    second = torch.where(side.bool(), first ^ 1, first ^ 2)  # 0-1 and 2-3 row, 0-2 and 1-3 column

    def pick(images, index):  # B x C x H x W -> B x C x H/2 x W/2
        cells = F.pixel_unshuffle(images, 2).unflatten(1, (-1, 4))  # B x C x 4 x H/2 x W/2
        return cells.gather(2, index.unsqueeze(1).expand(-1, cells.shape[1], -1, -1, -1))[:, :, 0]

    g1, g2 = pick(noisy, first), pick(noisy, second)  # B x C x H/2 x W/2 each
    out = net(g1).float()  # B x C x H/2 x W/2
    with torch.no_grad():
        whole = net(noisy).float()  # B x C x H x W
    gap = pick(whole, first) - pick(whole, second)  # B x C x H/2 x W/2
    return F.mse_loss(out, g2) + NEIGHBOR_GAMMA * F.mse_loss(out - g2, gap)


METHODS = {"supervised": supervised_loss, "noise2noise": noise2noise_loss,
           "noise2self": noise2self_loss, "neighbor2neighbor": neighbor2neighbor_loss}


def training_images(images, method, noise, seed):
    """What a method trains on: the clean images for "supervised" (noise is added per batch);
    else noisy copies drawn once from (seed, 0) (noise2noise: two, N x 2 x C x H x W), so that
    no clean image and no second draw of an image is ever seen. `images`: a tensor or a list."""
    if method == "supervised":
        return images
    generator, draws = seeded(seed, 0), 2 if method == "noise2noise" else 1

    def noisy(x):  # N x C x H x W -> N x C x H x W, or N x 2 x C x H x W
        return torch.stack([add_noise(x, noise, generator) for _ in range(draws)], 1).squeeze(1)

    return noisy(images) if isinstance(images, torch.Tensor) else [noisy(x[None])[0]
                                                                   for x in images]


# ---------------------------------------------------------------- one step, one epoch


def train_step(net, optimizer, batch, noise, generator, *, loss=supervised_loss, amp=False):
    """One optimizer step on a batch's loss; returns the loss (0-dim, not synced). `amp`:
    bfloat16 autocast for the forward pass; loss and weights stay float32."""
    with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=amp):
        value = loss(net, batch, noise, generator)
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    optimizer.step()
    return value.detach()


def batches(order, batch_size, processes=1):
    """Minibatches of `order`, without a last one too small to give each process 2 images
    (BatchNorm cannot train on one image shrunk to one pixel)."""
    return [idx for idx in order.split(batch_size) if len(idx) >= 2 * processes]


def train_epoch(net, optimizer, images, order, generator, *, noise, batch_size, scheduler=None,
                loss=supervised_loss, amp=False, share=(0, 1)):
    """One pass over `images` (N x C x H x W) in `order`, noise drawn by `generator`; with
    share=(rank, processes), on every processes-th image of each batch. Returns the mean loss."""
    net.train()
    rank, processes = share
    total, count = torch.zeros((), device=images.device), 0  # summed on the device: no sync
    for idx in batches(order.to(images.device), batch_size, processes):
        idx = idx[rank::processes]  # B / processes
        total += train_step(net, optimizer, images[idx], noise, generator, loss=loss,
                            amp=amp) * len(idx)
        count += len(idx)
        if scheduler is not None:
            scheduler.step()
    return total.item() / count


# ---------------------------------------------------------------- metrics


def psnr_per_image(pred, target):
    """PSNR in dB (data range 1) of each image, N x C x H x W twice -> N: 10 log10(1 / MSE), as
    scikit-image's peak_signal_noise_ratio, capped at 100 dB (a perfect image scores infinity)."""
    mse = (pred.float() - target.float()).square().flatten(1).mean(1)  # N
    return (-10 * torch.log10(mse)).clamp_max(100)


def image_batches(images):
    """A batch (N x C x H x W) in pieces of EVAL_BATCH_SIZE, or a list of C x H x W images of
    any sizes as batches of one."""
    if isinstance(images, torch.Tensor):
        return images.split(EVAL_BATCH_SIZE)
    return [image[None] for image in images]


def psnr(pred, target):
    """Mean PSNR over images (a batch, or lists of images): per image, so that the many easy
    ones cannot hide the hard ones."""
    return torch.cat([psnr_per_image(p, t) for p, t in zip(image_batches(pred),
                                                            image_batches(target))]).mean().item()


def ssim(pred, target):
    """Mean SSIM over images (a batch, or lists of images), each image's the mean over its
    channels: scikit-image's, with the Gaussian window of Wang et al. 2004 (sigma 1.5)."""
    from skimage.metrics import structural_similarity

    total, count = 0.0, 0
    for p, t in zip(image_batches(pred), image_batches(target)):  # n x C x H x W each
        planes = [x.flatten(0, 1).float().cpu().numpy() for x in (p, t)]  # n * C x H x W
        total += len(p) * structural_similarity(*planes, data_range=1.0, channel_axis=0,
                                                gaussian_weights=True, sigma=1.5,
                                                use_sample_covariance=False)
        count += len(p)
    return float(total / count)  # a Python float: numpy's would not load weights-only


def fixed_noisy_test_set(clean, noise):
    """The test images (a batch, or a list: each drawn alone) with noise drawn on the CPU from
    TEST_NOISE_SEED: every run, seed, epoch and device is scored on the same noisy images."""
    if isinstance(clean, list):
        return [fixed_noisy_test_set(image[None], noise)[0] for image in clean]
    noisy = add_noise(clean.cpu(), noise, torch.Generator().manual_seed(TEST_NOISE_SEED))
    return noisy.to(clean.device)  # N x C x H x W


def denoise(net, noisy, amp=False, **extra):
    """The model's output for `noisy` as float32: a batch (N x C x H x W) batch by batch, or a
    list of C x H x W images of any size, each tiled. Leaves the model in eval mode. `extra`:
    keyword arguments for the model (denoise_tiled's `level` for a dncnn's tiles)."""
    if isinstance(noisy, list):
        return [denoise_tiled(net, image, amp) for image in noisy]
    net.eval()
    with torch.no_grad(), torch.autocast(noisy.device.type, torch.bfloat16, enabled=amp):
        return torch.cat([net(chunk, **extra).float() for chunk in noisy.split(EVAL_BATCH_SIZE)])


def denoise_tiled(net, image, amp=False, tile=TILE, margin=TILE_MARGIN):
    """Denoise a C x H x W image in bounded memory, tile by tile, each with `margin` pixels of
    context that are dropped, so that tiles join without seams; they start on multiples of the
    model's size multiple, so each sees the pixel grid the whole image would."""
    (h, w), multiple = image.shape[-2:], net.multiple
    if h <= tile + 2 * margin and w <= tile + 2 * margin:
        return denoise(net, image[None], amp)[0]
    # dncnn takes the noise level of the whole image: tiles estimating their own would not agree
    extra = ({"level": model.estimate_noise_level(image[None])}
             if isinstance(net, model.DnCNN) else {})
    tile, margin = (math.ceil(n / multiple) * multiple for n in (tile, margin))
    out = torch.empty_like(image)  # C x H x W
    for top in range(0, h, tile):
        for left in range(0, w, tile):
            t0, l0 = max(0, top - margin), max(0, left - margin)
            piece = denoise(net, image[None, :, t0:top + tile + margin,
                                       l0:left + tile + margin], amp, **extra)[0]  # C x h' x w'
            out[:, top:top + tile, left:left + tile] = piece[:, top - t0:top - t0 + tile,
                                                             left - l0:left - l0 + tile]
    return out


def heldout_loss(net, noisy, loss, amp=False):
    """A self-supervised `loss` on held-out noisy images (N x C x H x W), in eval mode, averaged
    over HELDOUT_DRAWS fixed draws of its hidden pixels: the score of a run with no clean image."""
    generator, chunks = torch.Generator(noisy.device), noisy.split(EVAL_BATCH_SIZE)
    generator.manual_seed(TEST_NOISE_SEED)
    net.eval()
    with torch.no_grad(), torch.autocast(noisy.device.type, torch.bfloat16, enabled=amp):
        total = sum(loss(net, chunk, None, generator).item() * len(chunk)
                    for chunk in chunks * HELDOUT_DRAWS)
    return total / (HELDOUT_DRAWS * len(noisy))


# ---------------------------------------------------------------- checkpoints and the run


def make_optimizer(net, config, steps_per_epoch):
    """Adam, and the lr schedule: None ("constant"), or torch's OneCycleLR peaking at lr."""
    optimizer = torch.optim.Adam(net.parameters(), lr=config["lr"])
    if config["lr_schedule"] == "constant":
        return optimizer, None
    return optimizer, torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config["lr"], total_steps=config["epochs"] * steps_per_epoch)


def restore(path, device, resume=False):
    """(checkpoint, model, optimizer, lr schedule) from the file at `path`, read with
    torch.load(weights_only=True), which builds tensors and plain values only: a file that
    would run code when unpickled is refused. With `resume`, the optimizer and schedule are
    as the run left them. Everything that uses the file is in one try: one UserError."""
    if not os.path.isfile(path):  # a FIFO would block
        raise data.UserError(f"checkpoint {path} is not a file; run python train.py first")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != data.CHECKPOINT_FORMAT:
            raise ValueError("not written by this version of train.py: train the model again")
        config, history = checkpoint["config"], checkpoint["history"]
        if {*RUN_DEFAULTS, "epochs", "steps_per_epoch"} - set(config) or not is_history(
                history) or config["method"] not in METHODS or config["noise"] not in NOISES:
            raise ValueError("its config or history is incomplete, or not this project's")
        net = model.build_model(config).to(device, memory_format=torch.channels_last)
        net.load_state_dict(checkpoint["model"])
        optimizer, scheduler = make_optimizer(net, config, config["steps_per_epoch"])
        if resume and checkpoint.get("optimizer") is None:
            raise ValueError("it holds weights only (a shipped model), not a run to resume")
        if resume:
            optimizer.load_state_dict(checkpoint["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(checkpoint["scheduler"])
        return checkpoint, net.train(resume), optimizer, scheduler
    except Exception as e:  # damaged or crafted files fail in many ways; none may run on
        why = ("damaged, or it would run code when loaded: refused" if isinstance(
            e, pickle.UnpicklingError) else f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")
        raise data.UserError(f"checkpoint {path} cannot be used ({why})") from e


def is_history(history):
    """Whether `history` is as train_epochs writes it: a non-empty list of records alike, each
    of numbers only, with the epoch, the training loss, the seconds and a test score."""
    return bool(isinstance(history, list) and history and all(
        isinstance(r, dict) and r.keys() == history[0].keys() and all(
            isinstance(v, (int, float)) for v in r.values()) for r in history) and (
        {"epoch", "train_loss", "seconds"} <= history[0].keys() and SHOWN.keys() & history[0]))


def join_processes(name):
    """(rank, processes, device) for --device `name` (auto: the accelerator if there is one);
    under torchrun, after joining the process group (gloo on CPUs, nccl and a GPU each on CUDA)."""
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    device = torch.device((accelerator or "cpu") if name == "auto" else name)
    if device.type not in ("cpu", getattr(accelerator, "type", "cpu")):
        raise data.UserError(f"--device {name}: this machine has none")
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":  # a GPU each
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        if device.index >= torch.cuda.device_count():
            raise data.UserError(f"{os.environ['WORLD_SIZE']} processes, "
                                 f"{torch.cuda.device_count()} GPUs: one process per GPU")
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def setup(config, resumed, procs):
    """(data set, config completed by it, (model, optimizer, schedule, training images)),
    fresh from --seed or from a checkpoint; under torchrun, the model wrapped in DDP."""
    rank, processes, device = procs
    if rank > 0:
        torch.distributed.barrier()  # rank 0 loads (and downloads) first
    try:  # if it fails, the others fail in the same way, silently
        ds = data.load_dataset(*(config[k] for k in ("dataset", "data_dir", "channels", "crop")))
    finally:
        if rank == 0 and processes > 1:
            torch.distributed.barrier()
    config = {**config, "dataset": ds.name, "channels": ds.test[0].shape[0]}
    torch.manual_seed(config["seed"])  # the initial weights
    train = training_images(ds.train, config["method"], config_noise(config), config["seed"])
    size = len(data.epoch_images(train, config["crop"], seeded(config["seed"], 1)))
    steps = len(batches(torch.arange(size), config["batch_size"], processes))
    if steps == 0:
        raise data.UserError(f"--batch-size {config['batch_size']} cannot give each of "
                             f"{processes} processes 2 images")
    if resumed:
        _, net, optimizer, scheduler = resumed
        if steps != config["steps_per_epoch"]:
            raise data.UserError(f"this data gives {steps} steps per epoch, the resumed run took "
                                 f"{config['steps_per_epoch']}: point --data-dir at its data")
    else:
        net = model.build_model(config).to(device, memory_format=torch.channels_last)
        optimizer, scheduler = make_optimizer(net, config, steps)
        config = {**config, "steps_per_epoch": steps}
    if processes > 1:
        if device.type == "cuda":  # BatchNorm statistics over the whole batch (gloo cannot)
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = torch.nn.parallel.DistributedDataParallel(net)
    if rank == 0:
        print(f"{ds.note}\nmodel: {config['arch']} {config['widths']}, "
              f"{sum(p.numel() for p in net.parameters()):,} parameters, {device} x {processes}, "
              f"{steps} steps per epoch, {config['method']}, lr {config['lr']:g} "
              f"{config['lr_schedule']}, {config['precision']}")
    return ds, config, (net, optimizer, scheduler, train.to(device) if isinstance(
        train, torch.Tensor) else train)


def test_scores(images, config):
    """score(net): a model's scores on the fixed noisy test set, score(None): the noisy input's;
    with --noise none, the method's own loss on centre crops of the held-out images as they are.
    `images`: a batch, or a list of images (photos, a folder), each scored whole."""
    amp, noise = config["precision"] == "bf16", config_noise(config)
    if noise.kind == "none":  # no clean image, no PSNR
        from torchvision.transforms.v2.functional import center_crop

        crops = torch.stack([center_crop(image, [config["crop"]] * 2) for image in images])
        return lambda net: net and {"test_loss": heldout_loss(net, crops,
                                                              METHODS[config["method"]], amp)}
    noisy = fixed_noisy_test_set(images, noise)  # N x C x H x W, or a list of C x H x W

    def score(net):
        restored = noisy if net is None else denoise(net, noisy, amp)  # N x C x H x W
        return {"test_psnr": psnr(restored, images), "test_ssim": ssim(restored, images)}
    return score


def train_epochs(run, config, score, path, history, procs):
    """Train to config["epochs"]; rank 0 scores, saves, appends to `history` and prints after
    each epoch. Raises FloatingPointError if the loss becomes NaN or infinite."""
    (net, optimizer, scheduler, train), (rank, processes, device) = run, procs
    for epoch in range(len(history) + 1, config["epochs"] + 1):
        start, generator = time.perf_counter(), seeded(config["seed"], epoch)
        images = data.epoch_images(train, config["crop"], generator).to(device)  # N x C x H x W
        order = torch.randperm(len(images), generator=generator)  # the same on every rank
        loss = train_epoch(net, optimizer, images, order,
                           seeded(config["seed"], epoch, rank + 1, device=device),
                           noise=config_noise(config), batch_size=config["batch_size"],
                           scheduler=scheduler, loss=METHODS[config["method"]],
                           amp=config["precision"] == "bf16", share=(rank, processes))
        if processes > 1:  # the mean of the processes' means
            loss = torch.tensor(loss, device=device)
            torch.distributed.all_reduce(loss)
            loss = loss.item() / processes
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss} in epoch {epoch} (--lr "
                                     f"{config['lr']:g} too high?)")
        if rank == 0:
            seconds, unwrapped = time.perf_counter() - start, getattr(net, "module", net)
            scores = score(unwrapped)
            record = {"epoch": epoch, "train_loss": loss, **scores,
                      "seconds": time.perf_counter() - start}
            data.save_checkpoint(path, {
                "config": config, "history": history + [record],
                "model": {k: v.cpu() for k, v in unwrapped.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler else None})
            history.append(record)  # once saved: what the file holds, a stop reports
            print(f"epoch {epoch:3d}  train loss {loss:.5f}  {shown(scores)}  "
                  f"{record['seconds']:.1f} s  {len(images) / seconds:,.0f} img/s")
    if processes > 1:  # the others wait for rank 0's last save: gloo aborts a process that leaves
        torch.distributed.barrier()  # while a peer is still connected


def shown(scores):
    """Scores as the epoch lines show them: 'test PSNR 20.07 dB  SSIM 0.8530'."""
    return "  ".join(SHOWN[k].format(v) for k, v in scores.items())


def finish(path, history, baseline):
    """The closing lines; a warning if the model scores less than USEFUL_GAIN_DB above the noisy
    input (a run that diverged may settle on the identity, just above it, with no error)."""
    gain = history[-1]["test_psnr"] - baseline["test_psnr"] if baseline else math.inf
    if gain < USEFUL_GAIN_DB:
        verdict = "makes images worse" if gain < 0 else "hardly denoises"
        print(f"train.py: warning: the model scores {history[-1]['test_psnr']:.2f} dB, the noisy "
              f"input {baseline['test_psnr']:.2f} dB: it {verdict} (--lr too high? too few "
              f"--epochs?)", file=sys.stderr)
    print(f"checkpoint: {path}\ndraw the figure: python visualize.py"
          + ("" if path == DEFAULT_CHECKPOINT else f" --checkpoint {path}"))
    return 0


# ---------------------------------------------------------------- command line

# Flags that define a run default to None, so that a resume can tell the ones given (and refuse
# those that contradict its checkpoint); a new run fills the rest from here.
RUN_DEFAULTS = {"arch": "basic", "widths": None, "dataset": "mnist", "channels": None,
                "crop": None, "batch_size": 128, "lr": 1e-3, "lr_schedule": "constant", "seed": 0,
                "precision": "fp32", "method": "supervised", "clip": "on", "noise": "gaussian",
                "noise_level": None, "data_dir": "data"}


def config_noise(config):
    """The Noise a config records."""
    return Noise(config["noise"], config["noise_level"], config["clip"] == "on")


def run_config(given, epochs, checkpoint=None, path=None):
    """The run's config: a resumed checkpoint's, which the flags `given` must not contradict
    (--data-dir may move); else `given` over RUN_DEFAULTS, checked. Raises UserError."""
    if checkpoint:
        old = checkpoint["config"]
        conflicts = [f"--{k.replace('_', '-')} {v} (it has {old.get(k)})"
                     for k, v in given.items() if v != old.get(k) and k != "data_dir"]
        if conflicts:
            raise data.UserError(f"--resume {path}: flags contradict it: " + "; ".join(conflicts))
        if epochs <= len(checkpoint["history"]):
            raise data.UserError(f"--resume {path}: it has {len(checkpoint['history'])} epochs "
                                 f"already; ask for more with --epochs")
        if old["lr_schedule"] == "onecycle" and epochs != old["epochs"]:
            raise data.UserError(f"--resume {path}: its onecycle lr schedule spans "
                                 f"{old['epochs']} epochs and cannot be stretched")
        return {**old, "epochs": epochs, "data_dir": given.get("data_dir", old["data_dir"])}
    config = {**RUN_DEFAULTS, **given, "epochs": epochs}
    kind, folder = config["noise"], config["dataset"] == "folder"
    cropped = config["dataset"] in ("photos", "folder")  # lists of images of any size
    level = NOISES[kind][1] if config["noise_level"] is None else config["noise_level"]
    if kind == "none" and (not folder or config["method"] in ("supervised", "noise2noise")):
        raise data.UserError("--noise none is for a --dataset folder of images that are noisy "
                             "already, with --method noise2self or neighbor2neighbor")
    check_levels(kind, np.atleast_1d(level))
    if config["crop"] is not None and (not cropped or config["crop"] % 2):
        raise data.UserError("--crop is for --dataset photos or folder, an even number of pixels")
    if len(config["widths"] or []) > model.ARCHS[config["arch"]].max_levels:
        raise data.UserError(f"--widths: at most {model.ARCHS[config['arch']].max_levels} levels")
    return {**config, "noise_level": level, "crop": (config["crop"] or data.DEFAULT_CROP)
            if cropped else None, "widths": config["widths"] or list(
                model.ARCHS[config["arch"]].default_widths)}


def check_levels(kind, levels):
    """Raise UserError for noise levels that cannot work: a poisson level of 0 photons."""
    if kind == "poisson" and min(levels) <= 0:
        raise data.UserError("a poisson noise level (photons) must be above 0")


def output_path(path, resume, overwrite):
    """`path`, once it is clear that this run may write it and can. Raises UserError."""
    if os.path.exists(path) and not overwrite and not (resume and os.path.samefile(path, resume)):
        raise data.UserError(f"{path} exists; continue it with --resume {path}, or pass "
                             f"--overwrite or another --checkpoint")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(path))).close()
    except OSError as e:
        raise data.UserError(f"cannot write the checkpoint {path}: {e}") from e
    return path


def number(kind, low, high):
    """An argparse type: the text as a `kind` from `low` to `high` (every flag is bounded: an
    absurd value is one line here, not a traceback or an overflow later)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (low <= value <= high and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a {kind.__name__} from {low:g} to "
                                             f"{high:g}, got {text}")
        return value
    return parse


def noise_level(text):
    """argparse type for --noise-level: 'S' or 'LO:HI' (a range: one level per image)."""
    levels = [number(float, 0, MAX_NOISE_LEVEL)(part) for part in text.split(":", 1)]
    if levels != sorted(levels):
        raise argparse.ArgumentTypeError(f"a range LO:HI needs LO <= HI, got {text}")
    return levels if len(levels) == 2 else levels[0]


def add_noise_flags(parser):
    """--data-dir, --noise and --noise-level: train.py's and visualize.py's (None: not given)."""
    parser.add_argument("--data-dir", help="data sets in torchvision's layout (DATA_DIR/MNIST/"
                        "raw/*-ubyte), where downloads go; with --dataset folder, the folder of "
                        "images (default: data, or the checkpoint's)")
    parser.add_argument("--noise", choices=NOISES, help="noise type (default: gaussian); none: "
                        "add nothing, for a folder of images that are noisy already")
    parser.add_argument("--noise-level", type=noise_level, help="noise strength, or LO:HI for "
                        "one level per image (blind training): " + "; ".join(
                            f"{k}: {m} (default {d:g})" for k, (m, d) in NOISES.items()))


def parse_args(argv=None):
    """Flags of train.py (the run-defining ones default to None: see RUN_DEFAULTS)."""
    p = argparse.ArgumentParser(description="Train a convolutional denoising autoencoder.")
    p.add_argument("--epochs", type=number(int, 1, 10 ** 6), default=10,
                   help="passes over the training set; with --resume, the total (default: 10)")
    p.add_argument("--batch-size", type=number(int, 2, 10 ** 6),
                   help="images per step (default: 128)")
    p.add_argument("--lr", type=number(float, 1e-12, 10),
                   help="Adam's learning rate (default: 1e-3)")
    p.add_argument("--lr-schedule", choices=("constant", "onecycle"), help="onecycle: torch's "
                   "OneCycleLR, up to --lr in 30%% of the steps, then down; try --lr 3e-3 "
                   "(dncnn on photos: 1e-3)")
    p.add_argument("--dataset", choices=data.DATASETS, help="mnist falls back to mnist-sample "
                   "offline; photos: scikit-image's; folder: every image file under "
                   "--data-dir (default: mnist)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="1 (gray) or 3 (colour) "
                   "(default: the data set's; colour for a folder)")
    p.add_argument("--crop", type=number(int, 16, 10 ** 4), help="--dataset photos or folder: "
                   f"train on random crops of this size (default: {data.DEFAULT_CROP})")
    p.add_argument("--method", choices=METHODS, help="supervised (default): clean images, noise "
                   "added per batch; the others learn from noisy images alone, drawn once")
    p.add_argument("--clip", choices=("on", "off"), help="clip noisy pixels to [0, 1] (default: "
                   "on; off for the self-supervised methods: they need zero-mean noise)")
    p.add_argument("--arch", choices=model.ARCHS, help="model (default: basic; dncnn for photos)")
    p.add_argument("--widths", type=lambda t: [number(int, 1, model.MAX_WIDTH)(w) for w in
                                               t.split(",")], help="channels per level, e.g. "
                   "32,64 (default: basic 32,64; deep and unet 16,32; dncnn 8 of 32)")
    p.add_argument("--seed", type=number(int, 0, 2 ** 32 - 1), help="seeds weights, data order "
                   "and noise (default: 0)")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="bf16: bfloat16 autocast for "
                   "the forward pass; pays on CPUs with AMX and on recent GPUs (default: fp32)")
    add_noise_flags(p)
    p.add_argument("--checkpoint", help=f"written after every epoch (default: "
                   f"{DEFAULT_CHECKPOINT}, or the --resume file)")
    p.add_argument("--resume", metavar="FILE", help="continue its run, exactly, to --epochs")
    p.add_argument("--overwrite", action="store_true", help="let a new run replace --checkpoint")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="auto: cuda or mps if there is one, else cpu (default: auto)")
    return p.parse_args(argv)


def main(argv=None):
    """Train, one line per epoch, a checkpoint after each. Returns the exit code: 0; 1 (the loss
    became NaN); 2 (a mistake: one line); 130 / 143 (stopped by Ctrl-C / SIGTERM)."""
    args = parse_args(argv)

    def stop_on_sigterm(signum, frame):  # a job scheduler, kill: stop as Ctrl-C does
        raise KeyboardInterrupt("SIGTERM")

    previous, history, path, done = signal.signal(signal.SIGTERM, stop_on_sigterm), [], None, 0
    speak = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for all
    try:
        procs = join_processes(args.device)
        resumed = restore(args.resume, procs[2], resume=True) if args.resume else None
        checkpoint = resumed[0] if resumed else None
        history = checkpoint["history"] if checkpoint else []  # train_epochs appends
        done = len(history)  # the epochs before this run
        given = {k: v for k, v in vars(args).items() if k in RUN_DEFAULTS and v is not None}
        config = run_config(given, args.epochs, checkpoint, args.resume)
        path = output_path(args.checkpoint or args.resume or DEFAULT_CHECKPOINT, args.resume,
                           args.overwrite)
        ds, config, run = setup(config, resumed, procs)
        test = ds.test.to(procs[2]) if isinstance(ds.test, torch.Tensor) else [
            image.to(procs[2]) for image in ds.test]
        score = test_scores(test, config) if procs[0] == 0 else None
        baseline = score(None) if score else None  # what "do nothing" scores
        if baseline:
            print(f"noisy input ({config_noise(config)}): {shown(baseline)}")
        train_epochs(run, config, score, path, history, procs)
        return finish(path, history, baseline) if speak else 0
    except data.UserError as e:
        if speak:
            print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, FloatingPointError) as e:  # the last saved epoch is whole
        stopped = isinstance(e, KeyboardInterrupt)
        last = path if len(history) > done else args.resume  # the file with the last epoch
        why = f"stopped by {e.args[0] if e.args else 'SIGINT'}" if stopped else f"error: {e}"
        kept = f"{last} keeps epoch {len(history)}" if last else "nothing saved"
        resume = (f"; resume with: train.py --resume {last} --epochs {args.epochs}"
                  if stopped and last else "")
        if speak:
            print(f"train.py: {why}; {kept}{resume}", file=sys.stderr)
        return 1 if not stopped else 143 if e.args == ("SIGTERM",) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
