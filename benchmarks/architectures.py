"""Photo denoisers at equal training time: which design a laptop's minutes buy the most from.

    python benchmarks/architectures.py --minutes 15                  # every candidate, gray
    python benchmarks/architectures.py --minutes 15 --only dncnn unet

Each candidate trains for the same wall-clock minutes on this machine, on what train.py's
photo recipe feeds a model: batches of 64 random 48 x 48 crops of the 13 training photos, each
turned one of 8 ways, Gaussian noise drawn per image from 0:0.2 (blind), Adam with a one-cycle
learning rate that follows the elapsed fraction of the time (up to --lr in the first 30%, then
down as a cosine). Then it is scored as benchmarks/photos.py scores: the held-out photos whole,
at sigma 15, 25 and 50 out of 255. Run nothing else meanwhile: the time is the budget.

The candidates: `dncnn` as model.py has it, and two designs that see more of the image for the
same arithmetic, defined here: `ffdnet` (Zhang, Zuo & Zhang 2018: a plain conv-ReLU stack at
half resolution, on the four 2x2 sub-images and the noise-level plane) and `unet` (a U-Net of
residual blocks at half, quarter and eighth resolution, skips added, as DRUNet, Zhang et al.
2021, at a laptop's size).
"""

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402

CROP, BATCH, WARMUP = 48, 64, 0.3


class HalfResolution(nn.Module):
    """What FFDNet and the U-Net share: the image as its four 2x2 sub-images plus the noise
    level plane in, `body` at half resolution, the predicted noise out and subtracted."""

    def __init__(self, channels, width, body, multiple):
        super().__init__()
        self.head = nn.Conv2d(4 * channels + 1, width, 3, padding=1)
        self.body, self.multiple = body, multiple
        self.tail = nn.Conv2d(width, 4 * channels, 3, padding=1)

    def forward(self, x, level=None):  # N x C x H x W -> N x C x H x W
        level = model.estimate_noise_level(x) if level is None else level
        (h, w), m = x.shape[-2:], self.multiple
        x = F.pad(x, (0, -w % m, 0, -h % m), mode="reflect")
        sub = F.pixel_unshuffle(x, 2)  # N x 4C x H/2 x W/2
        plane = level.to(x).view(-1, 1, 1, 1).expand(-1, 1, *sub.shape[-2:])
        noise = F.pixel_shuffle(self.tail(self.body(self.head(torch.cat([sub, plane], 1)))), 2)
        out = (x - noise)[..., :h, :w]
        return out if self.training else out.clamp(0, 1)


def ffdnet(channels, depth=10, width=64):
    """FFDNet's body: depth - 2 conv-ReLU layers between head and tail, He-initialised (with
    PyTorch's default init a 12-layer stack of ReLUs did not train in 5 minutes)."""
    layers = [nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
    for conv in layers[1::2]:
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.zeros_(conv.bias)
    return HalfResolution(channels, width, nn.Sequential(*layers), 2)


def block(width):
    """x + conv(ReLU(conv(x))): DRUNet's residual block, as model.Residual."""
    return model.Residual(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(width, width, 3, padding=1))


class UBody(nn.Module):
    """A U-Net of `blocks` residual blocks per level and way; 2x2 stride-2 convolutions down,
    2x2 transposed ones up, the skips added."""

    def __init__(self, widths, blocks):
        super().__init__()
        self.enc = nn.ModuleList(nn.Sequential(*[block(w) for _ in range(blocks)])
                                 for w in widths)
        self.dec = nn.ModuleList(nn.Sequential(*[block(w) for _ in range(blocks)])
                                 for w in widths[:-1])
        self.down = nn.ModuleList(nn.Conv2d(a, b, 2, stride=2) for a, b in zip(widths, widths[1:]))
        self.up = nn.ModuleList(nn.ConvTranspose2d(b, a, 2, stride=2)
                                for a, b in zip(widths, widths[1:]))

    def forward(self, h):
        skips = []
        for enc, down in zip(self.enc, self.down):
            skips.append(enc(h))
            h = down(skips[-1])
        h = self.enc[-1](h)
        for dec, up, skip in reversed(list(zip(self.dec, self.up, skips))):
            h = dec(up(h) + skip)
        return h


def unet(channels, widths=(32, 64, 128), blocks=2):
    """The residual U-Net at half, quarter and eighth resolution."""
    return HalfResolution(channels, widths[0], UBody(widths, blocks), 2 ** len(widths))


CANDIDATES = {"dncnn": lambda c: model.DnCNN(c), "ffdnet": ffdnet, "unet": unet}


def lr_at(fraction, peak):
    """One cycle over the time: linear warm-up to `peak` in WARMUP of it, then a cosine down."""
    if fraction < WARMUP:
        return peak * (0.04 + 0.96 * fraction / WARMUP)
    return peak * 0.5 * (1 + math.cos(math.pi * (fraction - WARMUP) / (1 - WARMUP)))


def train_for(net, photos, seconds, peak, seed=0):
    """Train `net` for `seconds` of wall time; returns the number of crops it saw."""
    optimizer = torch.optim.Adam(net.parameters(), lr=peak)
    noise, seen, epoch, start = train.Noise("gaussian", [0, 0.2]), 0, 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        epoch += 1
        generator = train.seeded(seed, epoch)
        crops = data.epoch_images(photos, CROP, generator)  # N x C x 48 x 48
        noise_draws = train.seeded(seed, epoch, 1)
        for idx in torch.randperm(len(crops), generator=generator).split(BATCH):
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(elapsed / seconds, peak)
            train.train_step(net.train(), optimizer, crops[idx], noise, noise_draws)
            seen += len(idx)
    return seen


def main(argv=None):
    """Train each candidate for --minutes, then print a markdown table of their scores."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=15, help="training time each (default 15)")
    p.add_argument("--only", nargs="+", choices=CANDIDATES, default=list(CANDIDATES))
    p.add_argument("--channels", type=int, choices=(1, 3), default=1)
    p.add_argument("--lr", type=float, default=1e-3, help="the one cycle's peak (default 1e-3)")
    args = p.parse_args(argv)
    photos = data.load_photos(args.channels)
    print(f"| {args.minutes:g} min each | parameters | crops seen | sigma 15 | sigma 25 | "
          "sigma 50 |\n|---|---:|---:|---:|---:|---:|", flush=True)
    for name in args.only:
        torch.manual_seed(0)
        net = CANDIDATES[name](args.channels).to(memory_format=torch.channels_last)
        seen = train_for(net, photos.train, 60 * args.minutes, args.lr)
        cells = []
        for sigma in (15, 25, 50):
            noisy = train.fixed_noisy_test_set(photos.test, train.Noise("gaussian", sigma / 255))
            out = train.denoise(net, noisy)
            cells.append(f"{train.psnr(out, photos.test):.2f} / {train.ssim(out, photos.test):.3f}")
        print(f"| {name} | {sum(p.numel() for p in net.parameters()):,} | {seen:,} | "
              + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
