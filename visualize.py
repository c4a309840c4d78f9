"""Look at a trained checkpoint: test images, a noise-level sweep, training curves, your own image.

    python visualize.py                    # noisy / clean / denoised test images -> denoising.png
    python visualize.py --sweep            # model vs median filter vs Gaussian blur -> sweep.png
    python visualize.py --curves           # train loss and test PSNR per epoch -> curves.png
    python visualize.py --image photo.jpg  # denoise your own image -> photo_denoised.png
"""

import argparse
import math
import os
import sys

import matplotlib.pyplot as plt
import numpy as np
import torch

import data
import train

# Sweep levels per noise type, mildest first (Poisson: fewer photons is noisier).
SWEEP_LEVELS = {"gaussian": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                "speckle": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                "salt-pepper": [0.05, 0.1, 0.2, 0.3, 0.4, 0.5], "poisson": [100, 50, 20, 10, 5, 2]}
BLUR_SIGMAS = (0.3, 0.5, 0.7, 1.0, 1.4, 2.0, 3.0)  # Gaussian blur widths (pixels) tried per level
TUNE_IMAGES = 500  # training images (never scored) on which each level's blur width is chosen
FIGURE_SIDE = 256  # photos are denoised and scored whole, and shown as centre crops this size


def draw_comparison(noisy, clean, denoised, title, inches=1.25):
    """Rows of N x C x H x W images in [0, 1], `inches` wide each: noisy, clean, denoised, with
    PSNR under the noisy and denoised ones; input and denoised only when `clean` is None. On a
    fixed 0..1 scale, so brightness compares across columns. Returns the matplotlib Figure."""
    rows = ([("input", noisy, None), ("denoised", denoised, None)] if clean is None else
            [("noisy", noisy, train.psnr_per_image(noisy, clean)), ("clean", clean, None),
             ("denoised", denoised, train.psnr_per_image(denoised, clean))])
    aspect = noisy.shape[-2] / noisy.shape[-1]
    fig, axes = plt.subplots(len(rows), len(noisy), squeeze=False, figsize=(
        inches * len(noisy) + 0.9, (inches * aspect + 0.3) * len(rows) + 0.3))
    for r, (label, images, scores) in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            image = images[c].permute(1, 2, 0).squeeze(2)  # H x W (gray) or H x W x 3
            ax.imshow(image.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if scores is not None:
                ax.set_xlabel(f"{scores[c]:.1f} dB", fontsize=9)
        axes[r, 0].set_ylabel(label, fontsize=11)
    fig.suptitle(title, fontsize=9, wrap=True)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- classical filters, the sweep


def median_filter(images, size=3):
    """scipy's median of each `size` x `size` window, per image and channel, edges reflected."""
    from scipy import ndimage

    window = (1,) * (images.dim() - 2) + (size, size)  # ... x H x W
    return torch.from_numpy(ndimage.median_filter(images.numpy(), size=window, mode="reflect"))


def gaussian_blur(images, sigma):
    """torchvision's Gaussian blur of width `sigma` pixels, the kernel cut at 3 sigma."""
    from torchvision.transforms.v2 import functional as TF

    size = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(images, [size, size], [sigma, sigma])


def sweep(nets, test_clean, tune_clean, kind, levels, clip=True):
    """Score the noisy input, a 3x3 median filter, a Gaussian blur (its width tuned on
    `tune_clean`) and each of `nets` ({name: model}) at each level, on one noise draw of
    `test_clean` (a batch, or a list of images): a dict per level, {"level", "blur_sigma",
    "scores": {name: (PSNR, SSIM)}}."""
    def each(f, images):  # a filter of a batch, or of each image of a list
        return f(images) if isinstance(images, torch.Tensor) else [f(x) for x in images]

    rows = []
    for level in levels:
        noise = train.Noise(kind, level, clip)
        noisy = train.fixed_noisy_test_set(test_clean, noise)  # N x C x H x W
        tune_noisy = train.fixed_noisy_test_set(tune_clean, noise)
        sigma = max(BLUR_SIGMAS, key=lambda s: train.psnr(gaussian_blur(tune_noisy, s),
                                                          tune_clean))
        outputs = {"noisy input": noisy, "median 3x3": each(median_filter, noisy),
                   "Gaussian blur": each(lambda x: gaussian_blur(x, sigma), noisy),
                   **{name: train.denoise(net, noisy) for name, net in nets.items()}}
        scores = {name: (train.psnr(out, test_clean), train.ssim(out, test_clean))
                  for name, out in outputs.items()}
        rows.append({"level": level, "blur_sigma": sigma, "scores": scores})
    return rows


def sweep_table(rows, kind):
    """The sweep as a markdown table: PSNR (dB) / SSIM of each method at each level."""
    methods = list(rows[0]["scores"])
    lines = [f"| {kind} level | " + " | ".join(methods) + " | blur sigma |",
             "|---:|" + "---:|" * (len(methods) + 1)]
    for row in rows:
        cells = [f"{row['scores'][m][0]:.2f} / {row['scores'][m][1]:.3f}" for m in methods]
        lines.append(f"| {row['level']:g} | " + " | ".join(cells) + f" | {row['blur_sigma']:g} |")
    return "\n".join(lines)


def draw_sweep(rows, kind, title):
    """PSNR against noise level, one line per method: filters as squares, models as dots."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    levels = [row["level"] for row in rows]
    for method in rows[0]["scores"]:
        style = {"noisy input": "kx--", "median 3x3": "s:", "Gaussian blur": "s:"}.get(method,
                                                                                   "o-")
        ax.plot(levels, [row["scores"][method][0] for row in rows], style, label=method)
    if kind == "poisson":
        ax.set_xscale("log")
        ax.invert_xaxis()  # noisier to the right, as for the other types
    ax.set(xlabel=f"{kind} noise level ({train.NOISES[kind][0]})", ylabel="test PSNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9, wrap=True)
    fig.tight_layout()
    return fig


def draw_curves(history, title):
    """Training loss and test PSNR (--noise none: held-out loss) per epoch, from a history."""
    score = "test_psnr" if "test_psnr" in history[0] else "test_loss"
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.plot(epochs, [h["train_loss"] for h in history], "o-")
    left.set(yscale="log", ylabel="training loss")
    right.plot(epochs, [h[score] for h in history], "o-", color="C1")
    right.set_ylabel("test PSNR (dB)" if score == "test_psnr" else "held-out loss (the method's)")
    for ax in (left, right):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- your own image


def denoise_planes(net, image, channels):
    """Denoise a C x H x W image in its own channels with a model of `channels`: a gray model
    denoises each colour plane; a colour model sees a gray image in all three, turned back."""
    if len(image) == channels:
        return train.denoise_tiled(net, image)
    if channels == 1:
        return torch.cat([train.denoise_tiled(net, plane[None]) for plane in image])
    return data.convert_channels(train.denoise_tiled(net, image.expand(3, -1, -1)), 1)


# ---------------------------------------------------------------- the commands


def model_name(config):
    """How figures name a model: 'basic 32/64 (gaussian 0.5)', 'unet 16/32 noise2self (...)'."""
    noise = train.config_noise(config)
    return (f"{config['arch']} {'/'.join(map(str, config['widths']))}" + (
        "" if config["method"] == "supervised" else f" {config['method']}")
        + ("" if noise.kind == "none" else f" ({noise})"))


def save_figure(fig, path):
    """Write `fig` to `path` (.png, .pdf or .svg) atomically. Raises UserError."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".png", ".pdf", ".svg") or os.path.exists(path) and not os.path.isfile(path):
        raise data.UserError(f"--out {path}: name a figure file ending in .png, .pdf or .svg")
    data.atomic_write(path, lambda f: fig.savefig(f, format=suffix[1:], dpi=120))
    plt.close(fig)
    return path


def figure(net, config, ds, noise, n, seed):
    """The default figure, (figure, title): `n` test images picked by `seed`, with the noise
    that train.py scores them with; images of any size are denoised and scored whole, and
    shown as centre crops of at most FIGURE_SIDE pixels."""
    from torchvision.transforms.v2.functional import center_crop

    pick = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds.test), generator=pick)[:n].tolist()
    noisy_set = train.fixed_noisy_test_set(ds.test, noise)
    clean, noisy = [ds.test[i] for i in idx], [noisy_set[i] for i in idx]  # n of C x H x W
    denoised = train.denoise(net, noisy, config["precision"] == "bf16")  # as train.py scores
    if noise.kind == "none":  # nothing clean to show or score
        title = f"{ds.name} held-out images as they are, and denoised"
    else:
        title = (f"{ds.name}, noise {noise}: mean PSNR {train.psnr(noisy, clean):.1f} dB noisy "
                 f"-> {train.psnr(denoised, clean):.1f} dB denoised")
    side = min(FIGURE_SIDE, *(min(image.shape[-2:]) for image in clean))
    noisy, clean, denoised = (torch.stack([center_crop(x, [side, side]) for x in images])
                              for images in (noisy, clean, denoised))  # n x C x side x side
    title += f" by {model_name(config)}"
    return draw_comparison(noisy, None if noise.kind == "none" else clean, denoised,
                           title), title


def denoise_file(net, config, path, out, overwrite):
    """--image PATH: the denoised image in the file's channels and bit depth (NAME_denoised.png,
    or .tif), and a figure of both beside it (NAME_denoised_compare.png)."""
    pixels = data.read_image(path)  # C x H x W, the file's own channels and bit depth
    name, suffix = os.path.splitext(os.path.basename(path))
    out = out or name + "_denoised" + (".tif" if suffix.lower() in data.TIFF_SUFFIXES else ".png")
    compare = f"{os.path.splitext(out)[0]}_compare.png"
    for target in (out, compare):
        if os.path.exists(target) and (os.path.samefile(target, path) or not overwrite):
            raise data.UserError(f"{target} exists; pass --overwrite to replace it (never the "
                                 f"input), or choose another --out")
    image = data.to_float(pixels)
    denoised = denoise_planes(net, image, config["channels"])  # C x H x W
    data.write_image(out, data.to_pixels(denoised, pixels.dtype))
    title = f"{path} ({image.shape[-1]}x{image.shape[-2]}), {model_name(config)}"
    inches = 6 * min(1, image.shape[-1] / image.shape[-2])  # a tall image: narrower
    save_figure(draw_comparison(image[None], None, denoised[None], title, inches), compare)
    print(f"denoised: {out} ({8 if pixels.dtype == torch.uint8 else 16}-bit, {len(pixels)} "
          f"channels); both: {compare}")


def run(args):
    """Load the checkpoint (and the --with ones) and draw what the flags ask for."""
    checkpoint, net = train.restore(args.checkpoint, "cpu")[:2]
    config = checkpoint["config"]
    if args.image:
        return denoise_file(net, config, args.image, args.out, args.overwrite)
    if args.curves:
        return print("figure:", save_figure(draw_curves(checkpoint["history"], model_name(
            config)), args.out or "curves.png"))
    if args.noise == "none" or config["noise"] == "none" and (
            args.sweep or args.noise or args.noise_level is not None):
        raise data.UserError("--noise none is how a model of images that are noisy already "
                             "learnt; it has no clean images to add noise to or score against")
    kind = args.noise or config["noise"]
    level = args.noise_level if args.noise_level is not None else (
        config["noise_level"] if kind == config["noise"] else train.NOISES[kind][1])
    train.check_levels(kind, [*np.atleast_1d(level), *(args.levels or [])])
    ds = data.load_dataset(config["dataset"], args.data_dir or config["data_dir"],
                           config["channels"], config["crop"])
    print(ds.note)
    if args.sweep:
        nets = {model_name(config): net}
        for path in args.others:  # more models to score beside it
            other, other_net = train.restore(path, "cpu")[:2]
            if other["config"]["channels"] != config["channels"]:
                raise data.UserError(f"--with {path}: a model of other channels than the data's")
            nets[f"{model_name(other['config'])} ({os.path.basename(path)})"] = other_net
        tune = data.epoch_images(ds.train, config["crop"], train.seeded(0, 0))[:TUNE_IMAGES]
        rows = sweep(nets, ds.test, tune, kind, args.levels or SWEEP_LEVELS[kind],
                     config["clip"] == "on")
        print(sweep_table(rows, kind))
        title = (f"{ds.name}, {kind} noise, {len(ds.test):,} test images, one noise draw for "
                 f"all; blur width tuned on {len(tune)} training images")
        fig = draw_sweep(rows, kind, title)
    else:
        noise = train.Noise(kind, level, config["clip"] == "on")
        fig, title = figure(net, config, ds, noise, args.n, args.seed)
    out = save_figure(fig, args.out or ("sweep.png" if args.sweep else "denoising.png"))
    print(f"figure: {out} ({title})")


def parse_args(argv=None):
    """Flags of visualize.py."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=train.DEFAULT_CHECKPOINT, help="the checkpoint to "
                   f"read (default: {train.DEFAULT_CHECKPOINT})")
    command = p.add_mutually_exclusive_group()
    command.add_argument("--sweep", action="store_true", help="score the model, a 3x3 median "
                         "filter and a tuned Gaussian blur across noise levels: a markdown "
                         "table and a PSNR-vs-level figure")
    command.add_argument("--curves", action="store_true", help="training loss and test PSNR "
                         "per epoch, from the checkpoint")
    command.add_argument("--image", metavar="PATH", help="denoise this image file (PNG, JPEG, "
                         "WebP, TIFF, ...; any size, gray or colour, 8 or 16 bits), keeping "
                         "its bit depth")
    train.add_noise_flags(p)
    p.add_argument("--out", help="output file (default: denoising.png, sweep.png or curves.png; "
                   "--image NAME.EXT: NAME_denoised.png, or .tif for a TIFF)")
    p.add_argument("--overwrite", action="store_true",
                   help="--image: let the outputs replace existing files (never the input)")
    p.add_argument("--n", type=train.number(int, 1, 64), default=8, help="test images shown")
    p.add_argument("--seed", type=train.number(int, 0, 2 ** 32 - 1), default=0,
                   help="picks the figure's test images")
    p.add_argument("--levels", type=lambda t: [train.number(float, 0, train.MAX_NOISE_LEVEL)(x)
                                         for x in t.split(",")],
                   help="--sweep: noise levels, comma-separated (default: 6-8 from mild to heavy)")
    p.add_argument("--with", dest="others", nargs="+", default=[], metavar="CHECKPOINT",
                   help="--sweep: more checkpoints of the same data set to score beside it")
    return p.parse_args(argv)


def main(argv=None):
    """Draw what the flags ask for. Returns the exit code: 0; 2 (a mistake, one line); 130."""
    args = parse_args(argv)
    plt.switch_backend("Agg")  # draw to a file: no display needed
    try:
        run(args)
        return 0
    except data.UserError as e:
        print(f"visualize.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("visualize.py: stopped by SIGINT; no file was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
