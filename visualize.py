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
import textwrap

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import data
import model
import train

# Sweep levels per noise type, mildest first (Poisson: fewer photons is noisier).
SWEEP_LEVELS = {
    "gaussian": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
    "speckle": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
    "salt-pepper": [0.05, 0.1, 0.2, 0.3, 0.4, 0.5],
    "poisson": [100.0, 50.0, 20.0, 10.0, 5.0, 2.0],
}
BLUR_SIGMAS = (0.3, 0.5, 0.7, 1.0, 1.4, 2.0, 3.0)  # Gaussian blur widths (pixels) tried per level
TUNE_IMAGES = 500  # training images (never scored) on which each level's blur width is chosen
CHUNK = 1000  # images per filter call: keeps the 3x3 windows of a large test set small
TILE = 512  # --image works on tiles of at most this many pixels a side: memory stays bounded
TILE_MARGIN = 64  # context around each tile, denoised and dropped: wider than the models see
TITLE_CHARACTERS_PER_INCH = 12  # of a 10-point title: where draw_comparison wraps it
# What a figure file starts with: an existing --out is replaced only if it is one of these.
FIGURE_MAGIC = {".png": (b"\x89PNG",), ".pdf": (b"%PDF",), ".svg": (b"<?xml", b"<svg")}


def pick_indices(total, n, seed):
    """`n` distinct test indices, the same for the same seed (seed 0 is the default figure)."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]  # n


def _as_image(tensor):
    """C x H x W in [0, 1] -> what imshow wants: H x W (gray) or H x W x C (colour)."""
    return (tensor[0] if tensor.shape[0] == 1 else tensor.permute(1, 2, 0)).numpy()


def draw_comparison(noisy, clean, denoised, title):
    """Three rows: noisy (top), clean (middle), denoised (bottom), PSNR under noisy and denoised.
    With clean None (images that are noisy already): two rows, input and denoised.

    Images are N x C x H x W in [0, 1], drawn on a fixed 0..1 scale so brightness is comparable
    across columns. Returns the matplotlib Figure.
    """
    rows = ([("input", noisy, None), ("denoised", denoised, None)] if clean is None else
            [("noisy", noisy, train.psnr_per_image(noisy, clean)), ("clean", clean, None),
             ("denoised", denoised, train.psnr_per_image(denoised, clean))])
    n = len(noisy)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.25 * n + 0.9, 1.55 * len(rows)),
                             squeeze=False)
    for r, (label, images, scores) in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            ax.imshow(_as_image(images[c]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if scores is not None:
                ax.set_xlabel(f"{scores[c]:.1f} dB", fontsize=9)
        axes[r, 0].set_ylabel(label, fontsize=11)
    fig.suptitle(textwrap.fill(title, int(TITLE_CHARACTERS_PER_INCH * fig.get_figwidth())),
                 fontsize=10)  # a title wider than one column would be cut off
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- classical filters, the sweep


def median_filter(images, size=3):
    """Median of each `size` x `size` window, per channel, edges reflected:
    N x C x H x W -> N x C x H x W."""
    pad, out = size // 2, []
    for chunk in images.split(CHUNK):
        padded = F.pad(chunk, (pad, pad, pad, pad), mode="reflect")  # n x C x H+2p x W+2p
        windows = padded.unfold(2, size, 1).unfold(3, size, 1)  # n x C x H x W x size x size
        out.append(windows.flatten(-2).median(-1).values)  # n x C x H x W
    return torch.cat(out)


def gaussian_blur(images, sigma):
    """torchvision's Gaussian blur of width `sigma` pixels, kernel cut at 3 sigma:
    N x C x H x W -> N x C x H x W."""
    from torchvision.transforms.v2 import functional as TF

    size = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(images, [size, size], [sigma, sigma])


def tune_blur(noisy, clean, sigmas=BLUR_SIGMAS):
    """The blur width from `sigmas` that gives these images the best mean PSNR."""
    return max(sigmas, key=lambda s: train.psnr(gaussian_blur(noisy, s), clean))


def sweep(nets, test_clean, tune_clean, kind, levels, clip=True):
    """Score the noisy input, a 3x3 median filter, a tuned Gaussian blur and each model of
    `nets` ({name: model}) at each level of noise `kind` (clipped to [0, 1] if `clip`), all on
    the same noise draw (TEST_NOISE_SEED) of `test_clean`; the blur width is chosen on
    `tune_clean` (never scored). Returns one dict per level: {"level", "blur_sigma",
    "scores": {method: (PSNR, SSIM)}}."""
    rows = []
    for level in levels:
        noise = train.Noise(kind, level, clip)
        noisy = train.fixed_noisy_test_set(test_clean, noise)  # N x C x H x W
        tune_noisy = train.fixed_noisy_test_set(tune_clean, noise)
        sigma = tune_blur(tune_noisy, tune_clean)
        outputs = {"noisy input": noisy, "median 3x3": median_filter(noisy),
                   "Gaussian blur": gaussian_blur(noisy, sigma),
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
    ax.set_xlabel(f"{kind} noise level ({train.NOISES[kind][0]})", fontsize=9)
    ax.set_ylabel("test PSNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def draw_curves(history, title, score="test_psnr"):
    """Training loss (log scale) and test PSNR against epoch, from a checkpoint's history (a
    run with --noise none: its held-out loss, score "test_loss", instead of PSNR)."""
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.plot(epochs, [h["train_loss"] for h in history], "o-")
    left.set_yscale("log")
    left.set_ylabel("training loss (MSE)")
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


def denoise_image(net, image, multiple):
    """Denoise one C x H x W image of any size (H and W padded up to `multiple`, what the
    strides need, then cropped back). Returns C x H x W."""
    return train.denoise(net, image[None], multiple=multiple)[0]


def denoise_tiled(net, image, multiple, tile=TILE, margin=TILE_MARGIN):
    """Denoise a C x H x W image of any size in bounded memory: tile by tile, each with
    `margin` pixels of context on every side that are denoised and dropped, so that the kept
    centres join without seams. Tiles start on multiples of `multiple` (the model's strides
    then see the same pixel grid as on the whole image), so the result equals
    denoise_image's wherever the margin covers what the model sees. Returns C x H x W."""
    h, w = image.shape[-2:]
    if h <= tile + 2 * margin and w <= tile + 2 * margin:
        return denoise_image(net, image, multiple)
    tile, margin = (math.ceil(n / multiple) * multiple for n in (tile, margin))
    out = torch.empty_like(image)  # C x H x W
    for top in range(0, h, tile):
        for left in range(0, w, tile):
            t0, l0 = max(0, top - margin), max(0, left - margin)
            piece = denoise_image(net, image[:, t0:top + tile + margin, l0:left + tile + margin],
                                  multiple)  # C x h' x w'
            out[:, top:top + tile, left:left + tile] = piece[:, top - t0:top - t0 + tile,
                                                             left - l0:left - l0 + tile]
    return out


def denoise_planes(net, image, channels, multiple):
    """Denoise a C x H x W image in its own channels with a model of `channels` channels: a gray
    model denoises each colour plane as a gray image; a colour model sees a gray image in all
    three, and its output is turned back to gray. Returns C x H x W."""
    if len(image) == channels:
        return denoise_tiled(net, image, multiple)
    if channels == 1:
        return torch.cat([denoise_tiled(net, plane[None], multiple) for plane in image])
    colour = denoise_tiled(net, image.expand(3, -1, -1), multiple)  # 3 x H x W
    return data.convert_channels(colour[None], 1)[0]  # 1 x H x W


def draw_side_by_side(noisy, denoised, title):
    """Input | denoised, side by side, on a fixed 0..1 scale."""
    h, w = noisy.shape[-2:]
    fig, axes = plt.subplots(1, 2, figsize=(min(12, 2 * 5 * w / max(h, w) + 0.6), 5.4))
    for ax, image, label in zip(axes, (noisy, denoised), ("input", "denoised")):
        ax.imshow(_as_image(image), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(label)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def image_outputs(image_path, out, force):
    """(denoised image, side-by-side figure) paths for --image: `out`, else NAME_denoised.png
    (or .tif) here for NAME.png (.tif; a JPEG gives .png), and the figure beside it as
    ..._compare.png. Raises UsageError if one would replace the input, or an existing file
    without `force`."""
    if not os.path.isfile(image_path):  # a missing file, a folder, or a FIFO that would block
        raise train.UsageError(f"cannot read image {image_path}: not a regular file")
    name, suffix = os.path.splitext(os.path.basename(image_path))
    keep = suffix.lower() in (".png",) + data.TIFF_SUFFIXES  # JPEG would lose detail again
    denoised = out or f"{name}_denoised{suffix if keep else '.png'}"
    try:
        data.check_writable(denoised, torch.uint8)  # the bit depth is checked once read
    except ValueError as e:
        raise train.UsageError(f"--out {denoised}: {e}") from e
    paths = denoised, f"{os.path.splitext(denoised)[0]}_compare.png"
    for path in paths:
        if os.path.exists(path) and os.path.samefile(path, image_path):
            raise train.UsageError(f"{path} is the input image; choose another --out")
        if os.path.exists(path) and not force:
            raise train.UsageError(f"{path} exists; pass --force to replace it, or choose "
                                   f"another --out")
    return paths


# ---------------------------------------------------------------- command line


def check_figure_path(path):
    """Raise UsageError unless a figure can go to `path`: a .png, .pdf or .svg file name, and
    if the file exists, a figure of that kind (never replace anything else)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FIGURE_MAGIC or os.path.isdir(path):
        raise train.UsageError(f"--out {path}: name a figure file ending in "
                               f"{', '.join(FIGURE_MAGIC)}")
    if os.path.exists(path):
        with open(path, "rb") as f:
            start = f.read(8) if os.path.isfile(path) else b""
        if not start.startswith(FIGURE_MAGIC[suffix]):
            raise train.UsageError(f"{path} exists and is not a {suffix[1:].upper()} figure; "
                                   f"choose another --out")


def save_figure(fig, path, show):
    """Write `fig` to `path` atomically (a kill or a full disk leaves the old file whole)."""
    try:
        data.atomic_write(path, lambda f: fig.savefig(f, format=os.path.splitext(path)[1][1:],
                                                      dpi=120))
    except OSError as e:
        raise train.UsageError(f"cannot write {path}: {data.one_line(e, 200)}") from e
    if show:
        plt.show()
    plt.close(fig)


def levels_list(text):
    """argparse type for --levels: comma-separated numbers >= 0, e.g. 0.1,0.3,0.5."""
    return [train.nonnegative_float(part) for part in text.split(",")]


# flags that only some commands read, (flag, its dest, those commands); any other flag is read
# by all. Given to another command, such a flag is refused rather than ignored without a word.
COMMAND_FLAGS = (("--levels", "levels", ("--sweep",)),
                 ("--max-images", "max_images", ("--sweep",)),
                 ("--with", "others", ("--sweep",)),
                 ("--force", "force", ("--image",)),
                 ("--n", "n", ("the default figure",)),
                 ("--seed", "seed", ("the default figure",)),
                 ("--noise-level", "noise_level", ("the default figure",)),  # --sweep: --levels
                 ("--noise-std", "noise_std", ("the default figure",)),
                 ("--noise", "noise", ("the default figure", "--sweep")),
                 ("--data-dir", "data_dir", ("the default figure", "--sweep")))


def parse_args(argv=None):
    """Flags of visualize.py."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=train.HelpFormatter)
    train.add_shared_flags(p, checkpoint_default=train.DEFAULT_CHECKPOINT)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--sweep", action="store_true",
                      help="score the model, a 3x3 median filter and a tuned Gaussian blur "
                           "across noise levels: a markdown table and a PSNR-vs-level figure")
    what.add_argument("--curves", action="store_true",
                      help="draw training loss and test PSNR (--noise none: held-out loss) per "
                           "epoch from the checkpoint")
    what.add_argument("--image", metavar="PATH",
                      help="denoise this PNG, JPEG or TIFF file (any size, gray or colour, 8 or "
                           "16 bits) as it is; the result keeps its channels and bit depth")
    p.add_argument("--out", default=None,
                   help="output file (default: denoising.png, sweep.png or curves.png here; "
                        "for --image NAME.png or .tif, NAME_denoised.png or .tif (from a JPEG: "
                        ".png) and NAME_denoised_compare.png)")
    p.add_argument("--force", action="store_true",
                   help="--image: let the outputs replace existing files (never the input)")
    p.add_argument("--n", type=train.positive_int, default=8,
                   help="the default figure: number of test images")
    p.add_argument("--seed", type=train.number(*train.LIMITS["seed"]), default=0,
                   help="the default figure: picks which test images are shown")
    p.add_argument("--levels", type=levels_list, default=None,
                   help="--sweep: noise levels, comma-separated (default per noise type: "
                        + "; ".join(f"{k} {','.join(f'{v:g}' for v in lv)}"
                                    for k, lv in SWEEP_LEVELS.items()) + ")")
    p.add_argument("--max-images", type=train.positive_int, default=None,
                   help="--sweep: score only the first N test images (default: all)")
    p.add_argument("--with", dest="others", nargs="+", default=[], metavar="CHECKPOINT",
                   help="--sweep: more checkpoints of the same data set to score beside "
                        "--checkpoint's model")
    p.add_argument("--show", action="store_true", help="also open the figure in a window")
    args = p.parse_args(argv)
    command = ("--image" if args.image else "--curves" if args.curves
               else "--sweep" if args.sweep else "the default figure")
    for flag, dest, commands in COMMAND_FLAGS:
        if getattr(args, dest) != p.get_default(dest) and command not in commands:
            p.error(f"{flag} is for {' and '.join(commands)}, not {command}")
    return args


def main(argv=None):
    """Load the checkpoint and draw what the flags ask for (see the module docstring). Returns
    the exit code: 0; 2 (bad flags, checkpoint, data or output: one line); 130 on Ctrl-C."""
    args = parse_args(argv)
    if not args.show:
        plt.switch_backend("Agg")  # draw to a file: no display needed
    try:
        checkpoint = train.load_checkpoint(args.checkpoint)
        net = model.restore_model(checkpoint, args.checkpoint)
        if args.image:
            return image_command(args.image, net, checkpoint["config"], args.out, args.force,
                                 args.show)
        if args.curves:
            return curves_command(checkpoint, args.out or "curves.png", args.show)
        return figure_command(args, net, checkpoint["config"])
    except (train.UsageError, data.DataError, model.CheckpointError) as e:
        print(f"visualize.py: error: {data.one_line(e, 1000)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("visualize.py: stopped by SIGINT; no file was left half-written", file=sys.stderr)
        return 130


def figure_command(args, net, config):
    """The default figure, or --sweep: the test set under the checkpoint's noise (or --noise)."""
    out = args.out or ("sweep.png" if args.sweep else "denoising.png")
    check_figure_path(out)
    noise = figure_noise(config, args.noise, args.noise_level, args.noise_std, sweep=args.sweep)
    for level in args.levels or []:
        try:
            train.check_noise(train.Noise(noise.kind, level))
        except ValueError as e:
            raise train.UsageError(f"--levels: {e}") from e
    ds = data.load_dataset(config["dataset"], args.data_dir or config["data_dir"],
                           channels=config["channels"], crop=config.get("crop"))
    print(ds.note)
    if args.sweep:
        return sweep_command(net, config, ds, noise.kind, levels=args.levels, out=out,
                             others=args.others, max_images=args.max_images, show=args.show)
    # The same noise draw as train.py's test metrics, so the numbers under the images agree.
    noisy_all = train.fixed_noisy_test_set(ds.test_x, noise)  # N x C x H x W
    idx = pick_indices(len(ds.test_x), min(args.n, len(ds.test_x)), args.seed)  # n
    clean, noisy = ds.test_x[idx], noisy_all[idx]  # n x C x H x W each
    denoised = train.denoise(net, noisy)  # n x C x H x W
    title = f"{arch_name(config)}{method_note(config)} autoencoder, {ds.name}, noise {noise}"
    if noise.kind == "none":  # the held-out images as they are: nothing clean to score against
        clean, title = None, f"{title}: held-out images as they are, and denoised"
    else:
        title += (f": mean PSNR {train.psnr(noisy, clean):.1f} dB noisy -> "
                  f"{train.psnr(denoised, clean):.1f} dB denoised")
    save_figure(draw_comparison(noisy, clean, denoised, title), out, args.show)
    print(f"figure: {out} ({title})")
    return 0


def figure_noise(config, kind, level, std, sweep):
    """The Noise of the figure or sweep: the --noise flags', else the checkpoint's. Raises
    UsageError where nothing clean exists to show or score: images that are noisy already
    (--noise none) go with a model that learnt from such images, and are never swept."""
    try:
        noise = train.resolve_noise(kind, level, std, default=train.config_noise(config))
    except ValueError as e:
        raise train.UsageError(str(e)) from e
    if "none" not in (noise.kind, config["noise"]):
        return noise
    if sweep:
        raise train.UsageError("--sweep scores against clean images, and --noise none means "
                               "images that are noisy already, with no clean version")
    if config["noise"] == "none" and noise.kind != "none":
        raise train.UsageError("this model learnt from images that are noisy already (--noise "
                               "none): its figure shows them as they are; drop --noise")
    if noise.kind == "none" and config["noise"] != "none":
        raise train.UsageError(f"--noise none is for a model that learnt from images that are "
                               f"noisy already; this one learnt from clean images with "
                               f"{config['noise']} noise added: drop --noise")
    return noise


def arch_name(config):
    """The architecture, with its widths when they are not the default: 'unet', 'unet 32/64'."""
    if list(config["widths"]) == list(model.ARCHS[config["arch"]].default_widths):
        return config["arch"]
    return f"{config['arch']} {'/'.join(map(str, config['widths']))}"


def model_name(config):
    """How a sweep names a model: its architecture, method unless supervised, and training
    noise, e.g. 'unet, sigma 0.5' or 'unet noise2self, sigma 0.5 unclipped'."""
    return f"{arch_name(config)}{method_note(config)}, {train.config_noise(config)}"


def method_note(config):
    """' noise2self' for a model trained without clean images, '' for a supervised one (a
    config from train.load_checkpoint, which fills in the method of older checkpoints)."""
    return "" if config["method"] == "supervised" else f" {config['method']}"


def load_others(paths, config, size):
    """The models of the --with checkpoints, {name: model}; each must have been trained on the
    data set and channels of `config` and fit images of `size` (H, W). Raises CheckpointError
    with one line."""
    nets = {}
    for path in paths:
        other = train.load_checkpoint(path)
        theirs = (other["config"]["dataset"], other["config"]["channels"])
        if theirs != (config["dataset"], config["channels"]):
            raise model.CheckpointError(f"--with {path} was trained on {theirs[0]} ({theirs[1]} "
                                        f"channels), not on {config['dataset']} "
                                        f"({config['channels']})")
        multiple = model.size_multiple(other["config"]["widths"])
        if any(side % multiple for side in size):
            raise model.CheckpointError(f"--with {path}: its model needs image sides that are "
                                        f"multiples of {multiple}, and these are "
                                        f"{size[0]}x{size[1]}")
        name = model_name(other["config"])
        nets[name if name not in nets and name != model_name(config)
             else f"{name} ({os.path.basename(path)})"] = model.restore_model(other, path)
    return nets


def sweep_command(net, config, ds, kind, *, levels, out, others, max_images, show):
    """--sweep: print the markdown table and save the PSNR-vs-level figure."""
    nets = {model_name(config): net, **load_others(others, config, ds.test_x.shape[-2:])}
    test_clean = ds.test_x[:max_images]  # N x C x H x W
    # a folder's training images are cropped as in training
    tune_clean = data.epoch_images(ds.train_x, config.get("crop"), 0, 0)[:TUNE_IMAGES]
    rows = sweep(nets, test_clean, tune_clean, kind, levels or SWEEP_LEVELS[kind],
                 clip=train.config_noise(config).clip)
    print(f"{ds.name}: {len(test_clean):,} test images, the same noise draw for every "
          f"method; blur width tuned per level on {len(tune_clean)} training images")
    print(sweep_table(rows, kind))
    title = f"{ds.name}, {kind} noise, {len(test_clean):,} test images"
    save_figure(draw_sweep(rows, kind, title), out, show)
    print(f"figure: {out}")
    return 0


def curves_command(checkpoint, out, show):
    """--curves: training loss and test PSNR per epoch, from the checkpoint's history."""
    check_figure_path(out)
    config, history = checkpoint["config"], checkpoint.get("history") or []
    if not history:
        raise train.UsageError("the checkpoint has no training history")
    title = (f"{arch_name(config)}{method_note(config)} autoencoder, {config['dataset']}, noise "
             f"{train.config_noise(config)}")
    save_figure(draw_curves(history, title, train.score_key(config)), out, show)
    print(f"figure: {out} ({len(history)} epochs)")
    return 0


def image_command(image_path, net, config, out, force, show):
    """--image PATH: denoise the file, save the result in its channels and at its bit depth,
    and an input | denoised figure."""
    out, compare = image_outputs(image_path, out, force)
    pixels = data.read_image(image_path)  # C x H x W: the file's own channels and bit depth
    try:
        data.check_writable(out, pixels.dtype)  # before the work, not after
    except ValueError as e:
        raise train.UsageError(f"--out {out}: {e}") from e
    image = data.to_float(pixels)  # C x H x W in [0, 1]
    multiple = model.size_multiple(config["widths"])
    denoised = denoise_planes(net, image, config["channels"], multiple)  # C x H x W
    try:
        data.write_image(out, data.to_pixels(denoised, pixels.dtype))
    except (OSError, ValueError) as e:
        raise train.UsageError(f"cannot write {out}: {data.one_line(e, 200)}") from e
    noise = train.config_noise(config)
    title = (f"{image_path} ({image.shape[-1]}x{image.shape[-2]}), {arch_name(config)}"
             f"{method_note(config)} trained on {config['dataset']} at noise {noise}")
    save_figure(draw_side_by_side(image, denoised, title), compare, show)
    kind = ("8-bit " if pixels.dtype == torch.uint8 else "16-bit ") + (
        "gray" if len(pixels) == 1 else "colour")
    print(f"denoised: {out} ({kind}); side by side: {compare}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
