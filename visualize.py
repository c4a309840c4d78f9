"""Draw noisy / clean / denoised test images for a trained checkpoint.

    python visualize.py                    # reads checkpoints/autoencoder.pt, writes denoising.png
"""

import argparse
import sys

import matplotlib.pyplot as plt
import torch

import data
import train


def _one_line(error):
    return " ".join(str(error).split())[:200]


def pick_indices(total, n, seed):
    """`n` distinct test indices, the same for the same seed (seed 0 is the default figure)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:n]  # n


def _as_image(tensor):
    """C x H x W in [0, 1] -> what imshow wants: H x W (gray) or H x W x C (colour)."""
    image = tensor[0] if tensor.shape[0] == 1 else tensor.permute(1, 2, 0)  # H x W (x C)
    return image.numpy()


def draw_comparison(noisy, clean, denoised, title):
    """Three rows: noisy (top), clean (middle), denoised (bottom), PSNR under noisy and denoised.

    Images are N x C x H x W in [0, 1], drawn on a fixed 0..1 scale so brightness is comparable
    across columns. Returns the matplotlib Figure.
    """
    noisy_psnr = train.psnr_per_image(noisy, clean)  # N
    denoised_psnr = train.psnr_per_image(denoised, clean)  # N
    n = len(clean)
    fig, axes = plt.subplots(3, n, figsize=(1.25 * n + 0.9, 4.6), squeeze=False)
    rows = [("noisy", noisy, noisy_psnr), ("clean", clean, None),
            ("denoised", denoised, denoised_psnr)]
    for r, (label, images, scores) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(_as_image(images[c]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if scores is not None:
                ax.set_xlabel(f"{scores[c]:.1f} dB", fontsize=9)
        axes[r, 0].set_ylabel(label, fontsize=11)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def parse_args(argv=None):
    """Flags of visualize.py."""
    p = argparse.ArgumentParser(description="Draw noisy / clean / denoised test images.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_checkpoint_flag(p)
    p.add_argument("--out", default="denoising.png", help="where to save the figure (PNG)")
    p.add_argument("--n", type=train.positive_int, default=8, help="number of test images")
    p.add_argument("--seed", type=train.seed_int, default=0,
                   help="picks which test images are shown")
    data.add_noise_flag(p, default=None)
    data.add_data_dir_flag(p, default=None)
    p.add_argument("--show", action="store_true", help="also open the figure in a window")
    return p, p.parse_args(argv)


def main(argv=None):
    """Load the checkpoint, denoise a few fixed test images and save the comparison figure."""
    parser, args = parse_args(argv)
    try:
        checkpoint = train.load_checkpoint(args.checkpoint)
        net = train.restore_model(checkpoint, args.checkpoint)
    except train.CheckpointError as e:
        parser.exit(2, f"visualize.py: error: {e}\n")
    config = checkpoint["config"]
    noise_std = config["noise_std"] if args.noise_std is None else args.noise_std
    try:
        ds = data.load_dataset(config["dataset"], args.data_dir or config["data_dir"])
    except data.DataError as e:
        parser.exit(2, f"visualize.py: error: {e}\n")
    print(ds.note)

    # The same noise draw as train.py's test metrics, so the numbers under the images agree.
    noisy_all = train.fixed_noisy_test_set(ds.test_x, noise_std)  # N x C x H x W
    idx = pick_indices(len(ds.test_x), min(args.n, len(ds.test_x)), args.seed)  # n
    clean, noisy = ds.test_x[idx], noisy_all[idx]  # n x C x H x W each
    denoised = train.denoise(net, noisy)  # n x C x H x W
    sigma = data.format_noise(noise_std)
    title = (f"{config['arch']} autoencoder, {config['dataset']}, noise sigma {sigma}: "
             f"mean PSNR {train.psnr(noisy, clean):.1f} dB noisy -> "
             f"{train.psnr(denoised, clean):.1f} dB denoised")
    if not args.show:
        plt.switch_backend("Agg")  # draw to a file: no display needed
    fig = draw_comparison(noisy, clean, denoised, title)
    try:
        fig.savefig(args.out, dpi=120)
    except (OSError, ValueError) as e:  # ValueError: a file type matplotlib cannot write
        parser.exit(2, f"visualize.py: error: cannot write {args.out}: {_one_line(e)}\n")
    print(f"figure: {args.out} ({title})")
    if args.show:
        plt.show()
    plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
