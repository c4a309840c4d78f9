"""Models: convolutional denoising autoencoders, rebuilt from a plain config dict.

A checkpoint stores `config`; `build_model(ckpt["config"])` gives back the same network, so no
script needs the user to repeat architecture flags.
"""

import torch
from torch import nn

# Chosen by measurement: full MNIST, sigma 0.5, 10 epochs, batch 128 (README, Results).
# basic: the narrowest widths that passed 20 dB (32/32: 19.96 dB). deep and unet: wider gains
# little for the time (unet 16/32: 20.59 dB in 13-14 s per epoch, 32/64: 20.92 dB in 36-47 s),
# so they default to the fast end.
DEFAULT_WIDTHS = {"basic": (32, 64), "deep": (16, 32), "unet": (16, 32)}
# The output starts at sigmoid(-2) = 0.12, about MNIST's mean pixel, instead of 0.5. With the
# default bias 0, Adam's first steps drive every output towards the black background, the
# decoder's ReLUs die and the sigmoid saturates: the network collapses to an all-black image.
# Measured on this architecture without BatchNorm, 1 epoch on 20,000 MNIST digits, seeds 0-4:
# 4 of 5 seeds collapsed (about 9.7 dB) with bias 0, none with this start.
OUTPUT_BIAS_INIT = -2.0
ARCHS = tuple(DEFAULT_WIDTHS)


class BasicAutoencoder(nn.Module):
    """Stride-2 3x3 convolutions down, stride-2 transposed convolutions up, sigmoid out.

    Each hidden convolution is followed by BatchNorm and ReLU. Fully convolutional: any channel
    count, and any H, W divisible by 2 ** len(widths) (two levels: 28 -> 14 -> 7 -> 14 -> 28).
    The last upsampling is written in its sub-pixel form (a 3x3 convolution to 4 x C channels,
    then PixelShuffle(2)): a stride-2 transposed convolution is a special case of it, and on a
    CPU it is 2.4x faster than nn.ConvTranspose2d with one output channel (measured).
    """

    def __init__(self, channels=1, widths=DEFAULT_WIDTHS["basic"]):
        super().__init__()
        layers, c = [], channels
        for w in widths:  # each level halves H and W
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.BatchNorm2d(w),
                       nn.ReLU(inplace=True)]
            c = w
        for w in reversed(widths[:-1]):  # mirror image: each level doubles H and W
            # output_padding=1 makes the output exactly twice the input (k=3, s=2, p=1)
            layers += [nn.ConvTranspose2d(c, w, 3, stride=2, padding=1, output_padding=1),
                       nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        last = nn.Conv2d(c, 4 * channels, 3, padding=1)  # N x 4C x H/2 x W/2
        nn.init.constant_(last.bias, OUTPUT_BIAS_INIT)
        layers += [last, nn.PixelShuffle(2), nn.Sigmoid()]  # N x C x H x W, pixels in [0, 1]
        self.net = nn.Sequential(*layers)
        self.factor = 2 ** len(widths)

    def forward(self, x):  # N x C x H x W -> N x C x H x W in [0, 1]
        """Denoise a batch; H and W must be multiples of 2 ** len(widths)."""
        _check_size(x, self.factor)
        return self.net(x)


def conv_bn_relu(c_in, c_out, stride=1):
    """3x3 convolution, BatchNorm, ReLU. No conv bias: BatchNorm's shift replaces it."""
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def subpixel_head(c_in, channels):
    """The output layer at twice the input's resolution: 3x3 conv to 4 x channels logits,
    PixelShuffle(2), sigmoid. Its bias starts at OUTPUT_BIAS_INIT (see there)."""
    conv = nn.Conv2d(c_in, 4 * channels, 3, padding=1)
    nn.init.constant_(conv.bias, OUTPUT_BIAS_INIT)
    return nn.Sequential(conv, nn.PixelShuffle(2), nn.Sigmoid())


class Residual(nn.Module):
    """x + f(x): the block can start as (almost) the identity, so depth does not make the
    gradient vanish on its way to the first layers."""

    def __init__(self, *layers):
        super().__init__()
        self.f = nn.Sequential(*layers)

    def forward(self, x):  # N x C x H x W -> N x C x H x W
        """Add the block's output to its input."""
        return x + self.f(x)


def _check_size(x, factor):
    if x.shape[-2] % factor or x.shape[-1] % factor:
        raise ValueError(f"height and width must be multiples of {factor}, "
                         f"got {tuple(x.shape[-2:])}")


class DeepAutoencoder(nn.Module):
    """The basic autoencoder with BLOCKS residual conv-BN-ReLU blocks at every scale, on both
    the way down and the way up (no skip connections between them).

    28 -> 14 -> 7 -> 14 -> 28 for two widths; any H, W divisible by 2 ** len(widths).
    """

    def __init__(self, channels=1, widths=(32, 64), blocks=2):
        super().__init__()
        layers, c = [], channels
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
        self.factor = 2 ** len(widths)

    def forward(self, x):  # N x C x H x W -> N x C x H x W in [0, 1]
        """Denoise a batch; H and W must be multiples of 2 ** len(widths)."""
        _check_size(x, self.factor)
        return self.net(x)


class UNet(nn.Module):
    """An encoder-decoder whose decoder also sees the encoder's features at each scale (skip
    connections, concatenated), so detail lost on the way down can come back.

    The first level works on 2x2 pixel blocks (PixelUnshuffle: lossless, 4 x C channels at half
    the size) and the output is drawn back by the sub-pixel head: no convolution runs at full
    resolution, which keeps a CPU epoch short. Any H, W divisible by 2 ** len(widths).
    """

    def __init__(self, channels=1, widths=(32, 64)):
        super().__init__()
        self.down = nn.ModuleList()
        c = 4 * channels  # after PixelUnshuffle(2)
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
        self.factor = 2 ** len(widths)

    def forward(self, x):  # N x C x H x W -> N x C x H x W in [0, 1]
        """Denoise a batch; H and W must be multiples of 2 ** len(widths)."""
        _check_size(x, self.factor)
        h = self.unshuffle(x)  # N x 4C x H/2 x W/2
        skips = []
        for level in self.down:
            h = level(h)  # N x w_i x H/2^(i+1) x W/2^(i+1)
            skips.append(h)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            h = merge(torch.cat([up(h), skip], dim=1))  # N x w_i x (size of level i)
        return self.head(h)  # N x C x H x W


def _check_arch(arch):
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r} (choose from {', '.join(ARCHS)})")


def model_config(arch="basic", channels=1, widths=None):
    """The part of a checkpoint's config that describes the network, as plain Python values."""
    _check_arch(arch)
    return {"arch": arch, "channels": int(channels),
            "widths": [int(w) for w in (widths or DEFAULT_WIDTHS[arch])]}


def size_multiple(config):
    """What the height and width of an input must be a multiple of for this config's model."""
    return 2 ** len(config["widths"])


def build_model(config):
    """Rebuild a model from a checkpoint's whole config dict (reads arch, channels, widths)."""
    _check_arch(config["arch"])
    cls = {"basic": BasicAutoencoder, "deep": DeepAutoencoder, "unet": UNet}[config["arch"]]
    return cls(config["channels"], tuple(config["widths"]))


def count_parameters(model):
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

