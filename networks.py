"""Encoder, decoder and pairwise discriminator of Mathieu et al. (2016).

Pure nn.Module code, no I/O. Every network is built from a ModelConfig, one per
dataset (image size, channels, code sizes, layer widths), so a new dataset is a
new config rather than a copy of the networks.

Normalisation: every layer uses instance norm without affine parameters or running statistics.
The reference built its instance norms with track_running_stats=True, so in eval mode
they switched to running averages and evaluation codes differed from training codes.
Here an image is always normalised with its own statistics, in training and in
evaluation alike, so its codes never depend on the rest of its batch or on the mode.
"""
import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ModelConfig:
    image_size: int = 28
    channels: int = 1
    style_dim: int = 16   # z: the unspecified factors
    class_dim: int = 16   # s: the specified factors
    # encoder: 5x5 stride-2 convolutions, one per entry, with these widths
    enc_channels: tuple = (16, 32, 64)
    enc_padding: int = 1
    # decoder: the code is reshaped to dec_channels[0] x S x S (S = the encoder's last
    # spatial size), then 4x4 stride-2 transposed convolutions to each later width and
    # finally to `channels`; one padding / output padding per transposed convolution
    dec_channels: tuple = (128, 32, 16)
    dec_padding: tuple = (0, 0, 1)
    dec_output_padding: tuple = (0, 0, 0)
    # discriminator: 5x5 stride-2 convolutions over the channel-concatenated pair
    disc_channels: tuple = (32, 64, 128)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# One config per dataset. MNIST is the reference architecture exactly.
CONFIGS = {
    "mnist": ModelConfig(),
}
# LINEMOD crops, 64 x 64 RGB: five 5x5 stride-2 convolutions (padding 2) take 64 to 2
# (64 -> 32 -> 16 -> 8 -> 4 -> 2); five 4x4 stride-2 transposed convolutions (padding 1) double
# 2 back to 64. Codes z 64 / s 256 by default; the larger setting is --style-dim 256 --class-dim 512.
CONFIGS["linemod"] = ModelConfig(image_size=64, channels=3, style_dim=64, class_dim=256,
                                 enc_channels=(32, 64, 128, 256, 256), enc_padding=2,
                                 dec_channels=(256, 256, 128, 64, 32), dec_padding=(1, 1, 1, 1, 1),
                                 dec_output_padding=(0, 0, 0, 0, 0), disc_channels=(32, 64, 128, 256, 256))
# 2D Sprites, 60 x 60 RGB: one more stride-2 layer than MNIST, 60 -> 29 -> 14 -> 6 -> 2, and a
# decoder 2 -> 6 -> 14 -> 29 -> 60 (padding / output padding 1 where 29 must come out). The code
# sizes are the paper's first sprites setting (z 512, s 64); the second is --style-dim 1024
# --class-dim 512. The widths are modest so that a short run fits a CPU.
CONFIGS["sprites"] = ModelConfig(image_size=60, channels=3, style_dim=512, class_dim=64,
                                 enc_channels=(32, 64, 128, 256), dec_channels=(256, 128, 64, 32),
                                 dec_padding=(0, 0, 1, 0), dec_output_padding=(0, 0, 1, 0),
                                 disc_channels=(32, 64, 128, 256))


def get_config(dataset, **overrides):
    """The dataset's config with e.g. style_dim / class_dim replaced."""
    return replace(CONFIGS[dataset], **{k: v for k, v in overrides.items() if v is not None})


def conv_out_size(size, n_layers, padding, kernel=5, stride=2):
    for _ in range(n_layers):
        size = (size + 2 * padding - kernel) // stride + 1
    return size


def weights_init(m):
    """The reference's initialisation (tests/test_networks.py checks every parameter against it).

    Its weights_init draws Conv2d and Linear weights N(0, 0.05) with zero biases. It does not
    match ConvTranspose2d (not a subclass of Conv2d), so the transposed convolutions keep the
    default of the PyTorch it ran on (0.4): weight and bias uniform in +-1/sqrt(fan), fan =
    in_channels x kH x kW with the transposed convolution's own in_channels. Current PyTorch's
    default differs (kaiming-uniform over out_channels x kH x kW), hence the explicit rule.
    """
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.05)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.ConvTranspose2d):
        bound = 1.0 / math.sqrt(m.in_channels * m.kernel_size[0] * m.kernel_size[1])
        nn.init.uniform_(m.weight, -bound, bound)
        nn.init.uniform_(m.bias, -bound, bound)


class InstanceNorm(nn.Module):
    """Instance normalisation without affine parameters or running statistics.

    Computed as group norm with one group per channel: the same function as
    nn.InstanceNorm2d(affine=False, track_running_stats=False) (tests check this), but
    PyTorch's group-norm kernel is about four times faster on the CPU.
    """

    def __init__(self, eps=1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return F.group_norm(x, x.shape[1], eps=self.eps)


def conv_stack(in_ch, widths, padding, act):
    layers = []
    for w in widths:
        layers += [nn.Conv2d(in_ch, w, 5, stride=2, padding=padding), InstanceNorm(), act()]
        in_ch = w
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """x -> (style mean, style log-variance, class code)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.convs = conv_stack(cfg.channels, cfg.enc_channels, cfg.enc_padding, nn.ReLU)
        side = conv_out_size(cfg.image_size, len(cfg.enc_channels), cfg.enc_padding)
        if side < 1:
            raise ValueError(f"image_size {cfg.image_size} too small for {len(cfg.enc_channels)} conv layers")
        n_feat = cfg.enc_channels[-1] * side * side  # 64 * 2 * 2 = 256 for MNIST
        self.style_mu = nn.Linear(n_feat, cfg.style_dim)
        self.style_logvar = nn.Linear(n_feat, cfg.style_dim)
        self.class_code = nn.Linear(n_feat, cfg.class_dim)
        self.apply(weights_init)

    def forward(self, x):
        h = self.convs(x).flatten(1)  # (B, n_feat)
        return self.style_mu(h), self.style_logvar(h), self.class_code(h)


class Decoder(nn.Module):
    """(z, s) -> image in [0, 1]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.side = conv_out_size(cfg.image_size, len(cfg.enc_channels), cfg.enc_padding)
        self.start_ch = cfg.dec_channels[0]
        half = self.start_ch * self.side * self.side // 2  # z and s each fill half the map
        if 2 * half != self.start_ch * self.side * self.side:
            raise ValueError("dec_channels[0] * side * side must be even")
        self.style_in = nn.Linear(cfg.style_dim, half)
        self.class_in = nn.Linear(cfg.class_dim, half)
        widths = list(cfg.dec_channels) + [cfg.channels]
        layers, size = [], self.side
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            p, op = cfg.dec_padding[i], cfg.dec_output_padding[i]
            layers.append(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=p, output_padding=op))
            size = (size - 1) * 2 - 2 * p + 4 + op
            if i < len(widths) - 2:
                layers += [InstanceNorm(), nn.LeakyReLU(0.2)]
        if size != cfg.image_size:
            raise ValueError(f"decoder produces {size}x{size} images, config says {cfg.image_size}")
        self.deconvs = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, z, s):
        h = torch.cat([F.leaky_relu(self.style_in(z), 0.2), F.leaky_relu(self.class_in(s), 0.2)], 1)
        h = h.view(-1, self.start_ch, self.side, self.side)  # (B, 128, 2, 2) for MNIST
        return torch.sigmoid(self.deconvs(h))


class Discriminator(nn.Module):
    """(image a, image b) -> 2 logits: index 1 = real same-class pair, 0 = pair with a generated image."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.convs = conv_stack(2 * cfg.channels, cfg.disc_channels, cfg.enc_padding,
                                lambda: nn.LeakyReLU(0.2))
        side = conv_out_size(cfg.image_size, len(cfg.disc_channels), cfg.enc_padding)
        self.out = nn.Linear(cfg.disc_channels[-1] * side * side, 2)
        self.apply(weights_init)

    def forward(self, a, b):
        return self.out(self.convs(torch.cat([a, b], 1)).flatten(1))


def reparameterize(mu, logvar, eps):
    """z = mu + sigma * eps, with eps ~ N(0, I) drawn by the caller."""
    return mu + torch.exp(0.5 * logvar) * eps


def kl_divergence(mu, logvar, n_pixels):
    """KL(q(z|x) || N(0, I)) summed over batch and code, divided by batch x pixels (as the reference)."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / (mu.shape[0] * n_pixels)


class Classifier(nn.Module):
    """The reference's latent classifier: linear 256, BN, LeakyReLU(0.2), linear 256, BN, LeakyReLU(0.2), linear."""

    def __init__(self, in_dim, num_classes, hidden=256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)


class ImageClassifier(nn.Module):
    """A plain CNN on images: the judge that labels swapped images (swap accuracy).

    Two 5x5 stride-2 convolutions with ReLU, then a linear layer; no normalisation, so a
    label depends on the image alone. Small on purpose: it trains in a minute on a CPU.
    """

    def __init__(self, cfg: ModelConfig, num_classes, widths=(32, 64)):
        super().__init__()
        layers, in_ch = [], cfg.channels
        for w in widths:
            layers += [nn.Conv2d(in_ch, w, 5, stride=2, padding=2), nn.ReLU()]
            in_ch = w
        self.convs = nn.Sequential(*layers)
        side = cfg.image_size
        for _ in widths:
            side = (side + 1) // 2  # 5x5, stride 2, padding 2: ceil(side / 2)
        self.out = nn.Linear(widths[-1] * side * side, num_classes)

    def forward(self, x):
        return self.out(self.convs(x).flatten(1))
