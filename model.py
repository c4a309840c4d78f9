"""Convolutional denoisers, and how to get one back from a checkpoint.

    net = model.load_model("checkpoints/autoencoder.pt")   # weights-only load, build, strict load
    clean = net(noisy)                                     # N x C x H x W in [0, 1], any H, W
"""

import torch
import torch.nn.functional as F
from torch import nn

# The output starts at sigmoid(-2) = 0.12, about MNIST's mean pixel, instead of 0.5. With bias 0,
# Adam's first steps drive every output towards the black background, the decoder's ReLUs die
# and the sigmoid saturates: the network collapses to an all-black image (README: "collapse").
OUTPUT_BIAS_INIT = -2.0
MAX_CHANNELS, MAX_WIDTH = 4, 512  # with each arch's max_levels: a config cannot ask for gigabytes


def conv_bn_relu(c_in, c_out, stride=1):
    """3x3 convolution, BatchNorm, ReLU. No conv bias: BatchNorm's shift replaces it."""
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def up_bn_relu(c_in, c_out, kernel=3):
    """A stride-2 transposed convolution (twice the size), BatchNorm, ReLU."""
    pad, extra = (1, 1) if kernel == 3 else (0, 0)  # output exactly twice the input
    return [nn.ConvTranspose2d(c_in, c_out, kernel, stride=2, padding=pad, output_padding=extra,
                               bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def subpixel_head(c_in, channels):
    """The output layer at twice the input's size: a 3x3 conv to 4 x channels, PixelShuffle(2)
    and a sigmoid (a transposed convolution's faster form); its bias starts at OUTPUT_BIAS_INIT."""
    conv = nn.Conv2d(c_in, 4 * channels, 3, padding=1)
    nn.init.constant_(conv.bias, OUTPUT_BIAS_INIT)
    return nn.Sequential(conv, nn.PixelShuffle(2), nn.Sigmoid())


class Denoiser(nn.Module):
    """What the architectures share: `widths` (channels per level), and any input size."""

    max_levels = 4  # each level halves the image: 2 ** levels is the padding multiple

    @property
    def multiple(self):
        """What the height and width of an input must be a multiple of: each level halves them."""
        return 2 ** len(self.widths)

    def forward(self, x):  # N x C x H x W -> N x C x H x W in [0, 1]
        """Denoise a batch of any H, W: padded to what the strides need, then cropped back."""
        (h, w), multiple = x.shape[-2:], self.multiple
        pad_h, pad_w = -h % multiple, -w % multiple
        if pad_h or pad_w:  # reflect needs pad < size
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect" if pad_h < h and pad_w < w
                      else "replicate")
        return self.run(x)[..., :h, :w]


class Residual(nn.Module):
    """x + f(x): the block can start as (almost) the identity, so depth does not make the
    gradient vanish on its way to the first layers."""

    def __init__(self, *layers):
        super().__init__()
        self.f = nn.Sequential(*layers)

    def forward(self, x):  # N x C x H x W -> N x C x H x W
        """Add the block's output to its input."""
        return x + self.f(x)


class DeepAutoencoder(Denoiser):
    """Stride-2 convolutions down, transposed ones up, each with BatchNorm and ReLU, a sigmoid
    out, and `blocks` residual conv-BN-ReLU blocks at every scale, on both ways."""

    default_widths, blocks = (16, 32), 2

    def __init__(self, channels=1, widths=None):
        super().__init__()
        self.widths, layers, c = tuple(widths or self.default_widths), [], channels
        for w in self.widths:  # each level halves H and W
            layers += conv_bn_relu(c, w, stride=2)
            layers += [Residual(*conv_bn_relu(w, w)) for _ in range(self.blocks)]
            c = w
        for w in reversed(self.widths[:-1]):  # mirror image: each level doubles H and W
            layers += [Residual(*conv_bn_relu(c, c)) for _ in range(self.blocks)]
            layers += up_bn_relu(c, w)
            c = w
        layers += [Residual(*conv_bn_relu(c, c)) for _ in range(self.blocks)]
        self.run = nn.Sequential(*layers, subpixel_head(c, channels))


class BasicAutoencoder(DeepAutoencoder):
    """The deep autoencoder without residual blocks: 28 -> 14 -> 7 -> 14 -> 28 with two levels."""

    default_widths, blocks = (32, 64), 0


class UNet(Denoiser):
    """An encoder-decoder whose decoder also sees the encoder's features at each scale (skip
    connections), so detail lost on the way down comes back. The first level works on 2x2
    pixel blocks (PixelUnshuffle) and the sub-pixel head draws the output back: no convolution
    runs at full resolution, which keeps a CPU epoch short."""

    default_widths = (16, 32)

    def __init__(self, channels=1, widths=default_widths):
        super().__init__()
        self.widths, self.down, c = tuple(widths), nn.ModuleList(), 4 * channels
        for i, w in enumerate(self.widths):  # level 0 is already at half size: stride 1
            self.down.append(nn.Sequential(*conv_bn_relu(c, w, 1 if i == 0 else 2),
                                           *conv_bn_relu(w, w)))
            c = w
        self.up, self.merge = nn.ModuleList(), nn.ModuleList()
        for w in reversed(widths[:-1]):
            # 2x2 kernels, stride 2: each input pixel paints its own 2x2 block, no checkerboard
            self.up.append(nn.Sequential(*up_bn_relu(c, w, kernel=2)))
            self.merge.append(nn.Sequential(*conv_bn_relu(2 * w, w), *conv_bn_relu(w, w)))
            c = w
        self.head = subpixel_head(c, channels)

    def run(self, x):  # N x C x H x W -> N x C x H x W
        """The U-Net's pass, without the size check."""
        h, skips = F.pixel_unshuffle(x, 2), []  # N x 4C x H/2 x W/2
        for level in self.down:
            h = level(h)  # N x w_i x H/2^(i+1) x W/2^(i+1)
            skips.append(h)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            h = merge(torch.cat([up(h), skip], dim=1))  # N x w_i x (size of level i)
        return self.head(h)


def estimate_noise_level(x):
    """Each image's noise standard deviation, N x C x H x W -> N, by Donoho's rule as
    scikit-image's estimate_sigma applies it: the median absolute diagonal Haar detail
    coefficient / 0.6745. White noise of std s gives those coefficients std s; edges are few.
    One median over all channels (scikit-image averages one per channel: the same for noise
    alike in every channel)."""
    x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2), mode="replicate")  # even H, W
    a, b, c, d = (x[..., i::2, j::2] for i in (0, 1) for j in (0, 1))  # N x C x H/2 x W/2 each
    detail = (a - b - c + d) / 2  # N x C x H/2 x W/2
    return detail.abs().flatten(1).median(1).values / 0.6745  # N


class DnCNN(Denoiser):
    """Residual learning at full resolution, for photos (Zhang et al., IEEE TIP 2017): a stack
    of 3x3 conv-ReLU layers, one per entry of `widths`, predicts the noise, which is taken from
    the input. No striding, so no grid in the output; no sigmoid, so no pull to black. No
    BatchNorm: trained blind (a noise level per image) its batch statistics mix the levels,
    and it scored 0.9 dB lower on held-out photos in the same time (docs/results.md). Its
    input has one more plane, the image's estimated noise level (as FFDNet's has the true
    one): a 19-pixel receptive field cannot tell weak noise from texture; the whole image can."""

    default_widths, max_levels, multiple = (32,) * 8, 20, 1

    def __init__(self, channels=1, widths=None):
        super().__init__()
        self.widths, layers, c = tuple(widths or self.default_widths), [], channels + 1
        for w in self.widths:  # each layer from the one before
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(inplace=True)]
            c = w
        self.noise = nn.Sequential(*layers, nn.Conv2d(c, channels, 3, padding=1))

    def forward(self, x, level=None):  # N x C x H x W -> N x C x H x W
        """The input less the predicted noise; in eval mode clamped to [0, 1]. `level`: each
        image's noise level (N), estimated from x if not given (denoise_tiled gives the tiles
        of an image the level of the whole, so that they agree)."""
        level = estimate_noise_level(x) if level is None else level
        plane = level.to(x).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:])  # N x 1 x H x W
        out = x - self.noise(torch.cat([x, plane], 1))
        return out if self.training else out.clamp(0, 1)


ARCHS = {"basic": BasicAutoencoder, "deep": DeepAutoencoder, "unet": UNet, "dncnn": DnCNN}


def build_model(config):
    """The untrained network of a config's arch, channels and widths (capped: ValueError)."""
    arch, channels, widths = ARCHS[config["arch"]], config["channels"], list(config["widths"])
    if not (1 <= channels <= MAX_CHANNELS and 1 <= len(widths) <= arch.max_levels
            and all(1 <= w <= MAX_WIDTH for w in widths)):
        raise ValueError(f"a model of {channels} channels and widths {widths} is out of range "
                         f"(channels 1-{MAX_CHANNELS}, 1-{arch.max_levels} widths of "
                         f"1-{MAX_WIDTH})")
    return arch(channels, tuple(widths))


def load_model(path):
    """The denoiser in checkpoint `path`, in eval mode. weights_only=True builds only tensors
    and plain values: a file that would run code when unpickled is refused."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    net = build_model(checkpoint["config"])
    net.load_state_dict(checkpoint["model"])
    return net.eval()
