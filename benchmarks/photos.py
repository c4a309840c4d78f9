"""Photo denoising: the classical filters a photographer would use, and this project's models.

    python benchmarks/photos.py                            # the filters (and BM3D if installed)
    python benchmarks/photos.py --with checkpoints/a.pt    # and models that train.py trained
    pip install bm3d                                       # optional (non-commercial licence)

Held out: camera (gray), coffee and the left view of the stereo motorcycle (colour), as
scikit-image ships them, the photos that `train.py --dataset photos` holds out; the gray tables
take the colour ones' luminance too, and the gray-as-RGB tables give those gray photos as three
equal planes with noise equal in each (a scan kept as RGB). Gaussian noise of sigma 5, 15, 25
and 50 out of 255, drawn once per image and clipped to [0, 1] as train.py draws its test noise.
The blur's width and the TV weight are tuned on three training photos, never on held-out ones.
Per method: PSNR and SSIM per image, averaged; seconds per half a megapixel; `grid`, the
largest spread of the mean error over the 16 phases (row mod 4, column mod 4), in grey levels
of 255; `cast`, the mean error of each channel, in grey levels.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF
from skimage import restoration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import train  # noqa: E402
import visualize  # noqa: E402

TUNING = ("astronaut", "chelsea", "rocket")  # training photos of train.py's, never scored
KINDS = {"gray": (1, 1, data.PHOTOS_TEST), "colour": (3, 3, ("coffee", "stereo_motorcycle")),
         "gray as RGB": (1, 3, data.PHOTOS_TEST)}  # (channels of the photo, planes given, photos)
TV_WEIGHTS = (0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3)


def load(names, channels, planes, crop=None):
    """scikit-image's photos `names` with `channels` channels, given as `planes` planes (gray
    repeated), 1 x planes x H x W floats in [0, 1], centre-cropped to `crop` pixels if given."""
    images = [data.convert_channels(data.photo(name, channels), planes)[None] for name in names]
    return images if crop is None else [TF.center_crop(x, [crop, crop]) for x in images]


def as_array(image):
    """1 x C x H x W tensor -> what scikit-image and bm3d take: H x W (x C) float64."""
    return image[0].permute(1, 2, 0).squeeze(2).double().numpy()


def as_tensor(array):
    """The inverse of as_array: H x W (x C) -> 1 x C x H x W float32."""
    return torch.from_numpy(np.atleast_3d(array)).permute(2, 0, 1)[None].float()


def skimage_filter(function, image, **kwargs):
    """Run a scikit-image filter on a 1 x C x H x W tensor."""
    array = as_array(image)
    return as_tensor(function(array, channel_axis=-1 if array.ndim == 3 else None, **kwargs))


def nl_means(image):
    """Non-local means with the noise level scikit-image estimates (h = 0.8 sigma)."""
    array = as_array(image)
    sigma = restoration.estimate_sigma(array, average_sigmas=True,
                                       channel_axis=-1 if array.ndim == 3 else None)
    return skimage_filter(restoration.denoise_nl_means, image, h=0.8 * sigma, sigma=sigma,
                          patch_size=5, patch_distance=6, fast_mode=True)


def bm3d_filter(sigma):
    """BM3D (the `bm3d` package) at the true noise level, or None when it is not installed."""
    try:
        import bm3d
    except ImportError:
        return None

    def run(image):
        array = as_array(image)
        return as_tensor((bm3d.bm3d_rgb if array.ndim == 3 else bm3d.bm3d)(array, sigma_psd=sigma))
    return run


def tuned(candidates, make, clean, noisy):
    """The candidate whose filter make(candidate) gives the tuning photos the best mean PSNR."""
    return max(candidates, key=lambda c: np.mean([
        train.psnr(make(c)(x), y) for x, y in zip(noisy, clean)]))


def methods(sigma, tune_clean, tune_noisy, nets):
    """{name: function of a 1 x C x H x W noisy image}, the tuned ones tuned at this sigma."""
    blur = tuned(visualize.BLUR_SIGMAS, lambda s: lambda x: visualize.gaussian_blur(x, s),
                 tune_clean, tune_noisy)
    weight = tuned(TV_WEIGHTS, lambda w: lambda x: skimage_filter(
        restoration.denoise_tv_chambolle, x, weight=w), tune_clean, tune_noisy)
    found = {"noisy input": lambda x: x,
             f"Gaussian blur ({blur:g} px)": lambda x: visualize.gaussian_blur(x, blur),
             "wavelet (BayesShrink)": lambda x: skimage_filter(
                 restoration.denoise_wavelet, x, method="BayesShrink", rescale_sigma=True),
             f"TV (weight {weight:g})": lambda x: skimage_filter(
                 restoration.denoise_tv_chambolle, x, weight=weight),
             "non-local means": nl_means, "BM3D": bm3d_filter(sigma)}
    for name, (net, config) in nets.items():
        found[name] = lambda x, net=net, c=config["channels"]: visualize.denoise_planes(
            net, x[0], c)[None]
    return {name: run for name, run in found.items() if run is not None}


def score(run, noisy, clean):
    """(PSNR, SSIM, seconds per half megapixel, grid, cast) of one method, averaged over the
    images."""
    rows = []
    for x, y in zip(noisy, clean):
        start = time.perf_counter()
        out = run(x).clamp(0, 1)  # 1 x C x H x W
        seconds = (time.perf_counter() - start) * 0.5e6 / y[0, 0].numel()
        h, w = (side - side % 4 for side in y.shape[-2:])
        err = (out - y)[..., :h, :w]  # 1 x C x h x w
        phases = F.pixel_unshuffle(err, 4).mean((0, 2, 3)).view(-1, 16)  # C x 16
        rows.append((train.psnr(out, y), train.ssim(out, y), seconds,
                     255 * (phases.amax(1) - phases.amin(1)).max().item(),
                     255 * err.mean((0, 2, 3))))
    cast = torch.stack([r[4] for r in rows]).mean(0)
    return [np.mean([r[i] for r in rows]) for i in range(4)] + [
        " / ".join(f"{v:+.1f}" for v in cast.tolist())]


def main(argv=None):
    """Print one markdown table per kind of photo (gray, colour) and noise level."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--with", dest="others", nargs="*", default=[], metavar="CHECKPOINT",
                   help="models trained by train.py to score beside the filters")
    p.add_argument("--sigmas", type=lambda t: [float(s) for s in t.split(",")],
                   default=[5, 15, 25, 50], help="noise levels out of 255 (default: 5,15,25,50)")
    p.add_argument("--crop", type=int, help="score centre crops of this size (a quick look)")
    args = p.parse_args(argv)
    nets = {}
    for path in args.others:
        checkpoint, net = train.restore(path, "cpu")[:2]
        nets[f"{visualize.model_name(checkpoint['config'])} ({os.path.basename(path)})"] = (
            net, checkpoint["config"])
    for kind, (channels, planes, names) in KINDS.items():
        clean, tune_clean = (load(n, channels, planes, args.crop) for n in (names, TUNING))
        for sigma in args.sigmas:
            noise = train.Noise("gaussian", sigma / 255)
            noisy, tune_noisy = ([train.fixed_noisy_test_set(x, noise) for x in images]
                                 for images in (clean, tune_clean))
            print(f"\n{kind}, sigma {sigma:g}/255, {len(clean)} held-out photos\n\n"
                  f"| method | PSNR dB | SSIM | s/0.5 MP | grid | cast |\n"
                  f"|---|---:|---:|---:|---:|---:|", flush=True)
            for name, run in methods(sigma / 255, tune_clean, tune_noisy, nets).items():
                psnr, ssim, seconds, grid, cast = score(run, noisy, clean)
                print(f"| {name} | {psnr:.2f} | {ssim:.3f} | {seconds:.2f} | {grid:.2f} | "
                      f"{cast} |", flush=True)


if __name__ == "__main__":
    main()
