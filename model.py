"""Convolutional denoising autoencoders, and how to get one back from a checkpoint.

    net = model.load_model("checkpoints/autoencoder.pt")   # weights-only load, build, strict load
    clean = net(noisy)                                     # N x C x H x W in [0, 1]

A checkpoint stores `config` ({"arch", "channels", "widths", ...}); build_model(config) gives back
the same network, so no script needs the user to repeat architecture flags.
"""

import os
import re

import torch
from torch import nn

# The output starts at sigmoid(-2) = 0.12, about MNIST's mean pixel, instead of 0.5. With bias 0,
# Adam's first steps drive every output towards the black background, the decoder's ReLUs die
# and the sigmoid saturates: the network collapses to an all-black image (README: "collapse").
OUTPUT_BIAS_INIT = -2.0
MAX_CHANNELS, MAX_WIDTH, MAX_LEVELS = 4, 4096, 8  # what a checkpoint may ask for


def conv_bn_relu(c_in, c_out, stride=1):
    """3x3 convolution, BatchNorm, ReLU. No conv bias: BatchNorm's shift replaces it."""
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def subpixel_head(c_in, channels):
    """The output layer at twice the input's resolution: a 3x3 conv to 4 x channels logits,
    PixelShuffle(2), sigmoid. A stride-2 transposed convolution is a special case of this form,
    which runs faster on a CPU. Its bias starts at OUTPUT_BIAS_INIT."""
    conv = nn.Conv2d(c_in, 4 * channels, 3, padding=1)
    nn.init.constant_(conv.bias, OUTPUT_BIAS_INIT)
    return nn.Sequential(conv, nn.PixelShuffle(2), nn.Sigmoid())


def check_size(x, widths):
    """Raise ValueError unless x's height and width are multiples of 2 ** len(widths)."""
    factor = size_multiple(widths)
    if x.shape[-2] % factor or x.shape[-1] % factor:
        raise ValueError(f"height and width must be multiples of {factor}, "
                         f"got {tuple(x.shape[-2:])}")


class BasicAutoencoder(nn.Module):
    """Stride-2 3x3 convolutions down, stride-2 transposed convolutions up, sigmoid out.

    Each hidden convolution is followed by BatchNorm and ReLU. Fully convolutional: any channel
    count, and any H, W divisible by 2 ** len(widths) (two levels: 28 -> 14 -> 7 -> 14 -> 28).
    """

    default_widths = (32, 64)

    def __init__(self, channels=1, widths=default_widths):
        super().__init__()
        self.widths, layers, c = tuple(widths), [], channels
        for w in widths:  # each level halves H and W
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.BatchNorm2d(w),
                       nn.ReLU(inplace=True)]
            c = w
        for w in reversed(widths[:-1]):  # mirror image: each level doubles H and W
            # output_padding=1 makes the output exactly twice the input (k=3, s=2, p=1)
            layers += [nn.ConvTranspose2d(c, w, 3, stride=2, padding=1, output_padding=1),
                       nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        # subpixel_head's layers, written out: flat in self.net, they keep the weight names
        # (net.N.*) that checkpoints of this model have always had
        last = nn.Conv2d(c, 4 * channels, 3, padding=1)
        nn.init.constant_(last.bias, OUTPUT_BIAS_INIT)
        self.net = nn.Sequential(*layers, last, nn.PixelShuffle(2), nn.Sigmoid())

    def forward(self, x):  # N x C x H x W -> N x C x H x W in [0, 1]
        """Denoise a batch; H and W must be multiples of 2 ** len(widths)."""
        check_size(x, self.widths)
        return self.net(x)


class Residual(nn.Module):
    """x + f(x): the block can start as (almost) the identity, so depth does not make the
    gradient vanish on its way to the first layers."""

    def __init__(self, *layers):
        super().__init__()
        self.f = nn.Sequential(*layers)

    def forward(self, x):  # N x C x H x W -> N x C x H x W
        """Add the block's output to its input."""
        return x + self.f(x)


class DeepAutoencoder(nn.Module):
    """The basic autoencoder with `blocks` residual conv-BN-ReLU blocks at every scale, on both
    the way down and the way up (no skip connections between them)."""

    default_widths = (16, 32)

    def __init__(self, channels=1, widths=default_widths, blocks=2):
        super().__init__()
        self.widths, layers, c = tuple(widths), [], channels
        for w in widths:
            layers += conv_bn_relu(c, w, stride=2)
            layers += [Residual(*conv_bn_relu(w, w)) for _ in range(blocks)]
            c = w
        for w in reversed(widths[:-1]):
            layers += [Residual(*conv_bn_relu(c, c)) for _ in range(blocks)]
            layers += [nn.ConvTranspose2d(c, w, 3, stride=2, padding=1, output_padding=1,
                                          bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        layers += [Residual(*conv_bn_relu(c, c)) for _ in range(blocks)]
        self.net = nn.Sequential(*layers, subpixel_head(c, channels))

    def forward(self, x):  # N x C x H x W -> N x C x H x W in [0, 1]
        """Denoise a batch; H and W must be multiples of 2 ** len(widths)."""
        check_size(x, self.widths)
        return self.net(x)


class UNet(nn.Module):
    """An encoder-decoder whose decoder also sees the encoder's features at each scale (skip
    connections, concatenated), so detail lost on the way down can come back.

    The first level works on 2x2 pixel blocks (PixelUnshuffle: lossless, 4 x C channels at half
    the size) and the output is drawn back by the sub-pixel head: no convolution runs at full
    resolution, which keeps a CPU epoch short.
    """

    default_widths = (16, 32)

    def __init__(self, channels=1, widths=default_widths):
        super().__init__()
        self.widths, self.down, c = tuple(widths), nn.ModuleList(), 4 * channels
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2  # level 0 is already at half size
            self.down.append(nn.Sequential(*conv_bn_relu(c, w, stride), *conv_bn_relu(w, w)))
            c = w
        self.up, self.merge = nn.ModuleList(), nn.ModuleList()
        for w in reversed(widths[:-1]):
            # a 2x2 stride-2 transposed conv: each input pixel paints its own 2x2 block,
            # so no checkerboard from overlapping kernels
            self.up.append(nn.Sequential(nn.ConvTranspose2d(c, w, 2, stride=2, bias=False),
                                         nn.BatchNorm2d(w), nn.ReLU(inplace=True)))
            self.merge.append(nn.Sequential(*conv_bn_relu(2 * w, w), *conv_bn_relu(w, w)))
            c = w
        self.unshuffle = nn.PixelUnshuffle(2)
        self.head = subpixel_head(c, channels)

    def forward(self, x):  # N x C x H x W -> N x C x H x W in [0, 1]
        """Denoise a batch; H and W must be multiples of 2 ** len(widths)."""
        check_size(x, self.widths)
        h = self.unshuffle(x)  # N x 4C x H/2 x W/2
        skips = []
        for level in self.down:
            h = level(h)  # N x w_i x H/2^(i+1) x W/2^(i+1)
            skips.append(h)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            h = merge(torch.cat([up(h), skip], dim=1))  # N x w_i x (size of level i)
        return self.head(h)  # N x C x H x W


ARCHS = {"basic": BasicAutoencoder, "deep": DeepAutoencoder, "unet": UNet}


def model_config(arch="basic", channels=1, widths=None):
    """The part of a checkpoint's config that describes the network, as plain Python values.
    Raises ValueError (one line) for an unknown arch or out-of-range channels or widths."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r} (choose from {', '.join(ARCHS)})")
    widths = ARCHS[arch].default_widths if widths is None else widths
    if not (_is_int(channels) and 1 <= channels <= MAX_CHANNELS):
        raise ValueError(f"channels must be an integer from 1 to {MAX_CHANNELS}, got {channels!r}")
    if not (isinstance(widths, (list, tuple)) and 1 <= len(widths) <= MAX_LEVELS
            and all(_is_int(w) and 1 <= w <= MAX_WIDTH for w in widths)):
        raise ValueError(f"widths must be 1 to {MAX_LEVELS} integers from 1 to {MAX_WIDTH}, "
                         f"got {widths!r}")
    return {"arch": arch, "channels": channels, "widths": list(widths)}


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def size_multiple(widths):
    """What the height and width of an input must be a multiple of: each level halves them."""
    return 2 ** len(widths)


def build_model(config):
    """Build the network a checkpoint's config describes (reads arch, channels, widths)."""
    spec = model_config(config["arch"], config["channels"], config["widths"])
    return ARCHS[spec["arch"]](spec["channels"], tuple(spec["widths"]))


def count_parameters(net):
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


# ---------------------------------------------------------------- loading a checkpoint


class CheckpointError(Exception):
    """A checkpoint that cannot be used. The message is one line naming the file."""


def read_checkpoint(path):
    """Load a checkpoint on the CPU with torch.load(weights_only=True): the unpickler builds
    only tensors and plain containers, so a file that would call a function (os.system, ...)
    is refused instead of run. Returns the dict; raises CheckpointError with one line."""
    hint = "run python train.py first"
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist; {hint}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} is not a regular file; {hint}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, random bytes, or a pickle that wants to run code
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {_load_failure(e)}") from e
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict)
            and isinstance(checkpoint.get("config"), dict)):
        raise CheckpointError(f"{path} is not a checkpoint of this project "
                              f"(expected a dict with 'model' and 'config'); {hint}")
    return checkpoint


def _load_failure(error):
    """A short reason for a failed weights-only torch.load (torch's own messages run to pages)."""
    text = " ".join(str(error).split())
    found = re.search(r"unsupported GLOBAL (\S+)", text)
    if found:  # the pickle names a function or class to call: refused, never run
        return f"it asks to call {found.group(1)} when loaded; refused, only tensors are loaded"
    if isinstance(error, EOFError) or "PytorchStreamReader" in text or "zip" in text.lower():
        return "empty, truncated or not a torch file"
    return "not a torch checkpoint of tensors and plain values"


def restore_model(checkpoint, path):
    """Build the checkpoint's model from its config and load its weights strictly; raises
    CheckpointError with one line (a bad config, or weights that do not fit it)."""
    config = checkpoint["config"]
    try:
        net = build_model(config)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} has an unusable model config ({e})") from e
    try:
        net.load_state_dict(checkpoint["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        first = re.split(r"\.\s+(?=size mismatch|Missing key|Unexpected key)",
                         re.sub(r"^Error\(s\) in loading state_dict for \w+: ", "",
                                " ".join(str(e).split())))
        more = f" (and {len(first) - 1} more)" if len(first) > 1 else ""
        raise CheckpointError(f"checkpoint {path}: weights do not fit its config "
                              f"({config['arch']}, {config['channels']} channels, widths "
                              f"{config['widths']}): {first[0].rstrip('.')}{more}") from e
    return net


def load_model(path):
    """The denoiser saved in checkpoint `path`, ready to use (eval mode, on the CPU)."""
    return restore_model(read_checkpoint(path), path).eval()
