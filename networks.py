"""Encoder, decoder and pairwise discriminator of Mathieu et al. (2016).

Pure nn.Module code, no I/O. Every network is built from a config, one per dataset
(ModelConfig: image size, channels, code sizes, layer widths), so a new dataset is a
new config rather than a copy of the networks. Also here: the evaluation's classifiers and,
at the end, the networks of the authors' recipe (AuthorsConfig).

Normalisation (reference recipe): instance norm without affine parameters or running statistics.
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


class Config:
    """Round trip of a config dataclass through a checkpoint (JSON-like dicts: tuples come back as lists)."""

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class ModelConfig(Config):
    recipe = "reference"  # a class attribute, not a field: reference configs serialise as they always did
    image_size: int = 28
    channels: int = 1
    style_dim: int = 16   # z: the unspecified factors
    class_dim: int = 16   # s: the specified factors
    # encoder: 5x5 stride-2 convolutions, one per entry, with these widths
    enc_channels: tuple = (16, 32, 64)
    enc_padding: int = 1  # of the encoder's and also the discriminator's convolutions
    # decoder: the code is reshaped to dec_channels[0] x S x S (S = the encoder's last
    # spatial size), then 4x4 stride-2 transposed convolutions to each later width and
    # finally to `channels`; one padding / output padding per transposed convolution
    dec_channels: tuple = (128, 32, 16)
    dec_padding: tuple = (0, 0, 1)
    dec_output_padding: tuple = (0, 0, 0)
    # discriminator: 5x5 stride-2 convolutions over the channel-concatenated pair, padding enc_padding
    disc_channels: tuple = (32, 64, 128)


# One config per dataset. MNIST is the reference's architecture (tests/test_networks.py::
# test_reference_mnist_architecture, tests/test_import_reference.py).
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


def get_config(dataset, recipe="reference", **overrides):
    """The dataset's config of a recipe with e.g. style_dim / class_dim replaced."""
    base = AUTHORS_CONFIGS[dataset] if recipe == "authors" else CONFIGS[dataset]
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


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
    nn.InstanceNorm2d(affine=False, track_running_stats=False) (test_instance_norm_equals_torch_instance_norm),
    but PyTorch's group-norm kernel is about four times faster on the CPU.
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
    """KL(q(z|x) || N(0, I)) summed over batch and code, divided by batch x pixels: the reference's scaling."""
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


# ----------------------------------------------------------------------------- the authors' recipe
#
# The networks of the paper authors' own Torch code (MichaelMathieu/factors-variation, the "big"
# model), ported: batch norm instead of instance norm, images in [-1, 1] and at most 32 x 32
# (smaller ones are zero-padded to 32 x 32 inside the networks, the decoder crops back), a
# discriminator that sees one image and its label instead of an image pair.

@dataclass(frozen=True)
class AuthorsConfig(Config):
    recipe: str = "authors"
    image_size: int = 28     # the images the networks take and give (MNIST 28; Sprites resized to 32)
    channels: int = 1
    style_dim: int = 512     # z
    class_dim: int = 64      # s
    nf: int = 16             # feature planes of the first layer; the widths are nf, 2nf, 4nf, 8nf
    padded_size: int = 32    # the networks' working size: three stride-2 stages take it to 4 x 4
    # values of each label the discriminator is conditioned on: (10,) for the MNIST digit; Sprites
    # one entry per layer (body, shoes, ...), filled in from the training set
    label_sizes: tuple = (10,)
    disc_dropout: float = 0.5


AUTHORS_CONFIGS = {
    "mnist": AuthorsConfig(),
    "sprites": AuthorsConfig(image_size=32, channels=3, label_sizes=()),
}


def config_from_dict(d):
    """The config of either recipe from its to_dict() (a checkpoint's model_config)."""
    return AuthorsConfig.from_dict(d) if d.get("recipe") == "authors" else ModelConfig.from_dict(d)


def torch7_init(m):
    """Torch7's default initialisation, which the authors' code kept: weights and biases
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in counted on the input planes also for
    transposed convolutions (PyTorch counts output planes there), batch-norm scales U(0, 1)."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        fan_in = m.in_features if isinstance(m, nn.Linear) else m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        bound = fan_in ** -0.5
        nn.init.uniform_(m.weight, -bound, bound)
        nn.init.uniform_(m.bias, -bound, bound)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.uniform_(m.weight, 0.0, 1.0)
        nn.init.zeros_(m.bias)


def authors_conv(cin, cout, k, up=False):
    """3x3 stride 1 (size kept), 2x2 stride 2 (size halved), or with up=True a 2x2 stride-2
    transposed convolution (size doubled)."""
    if up:
        return nn.ConvTranspose2d(cin, cout, 2, stride=2)
    return nn.Conv2d(cin, cout, k, stride=1 if k == 3 else 2, padding=1 if k == 3 else 0)


def authors_block(cin, cout, k, up=False):
    return nn.Sequential(authors_conv(cin, cout, k, up), nn.BatchNorm2d(cout), nn.ReLU())


def pad_amounts(size, padded):
    if size > padded:
        raise ValueError(f"the authors' networks take images up to {padded} x {padded}, got {size}")
    lo = (padded - size) // 2
    return lo, padded - size - lo


class AuthorsEncoder(nn.Module):
    """x in [-1, 1] -> (style mean, second style head, class code s).

    The second head is what their sampler reads as a log-variance (sigma = exp(v / 2));
    their KL criterion's gradient treats it as a log-sigma (see authors_kl)."""

    def __init__(self, cfg: AuthorsConfig):
        super().__init__()
        self.pad = pad_amounts(cfg.image_size, cfg.padded_size)
        f = cfg.nf
        # (in, out, kernel): kernel 3 keeps the size, kernel 2 halves it: 32 -> 16 -> 8 -> 4
        spec = [(cfg.channels, f, 3), (f, f, 3), (f, 2 * f, 2), (2 * f, 2 * f, 3),
                (2 * f, 4 * f, 2), (4 * f, 4 * f, 3), (4 * f, 8 * f, 2), (8 * f, 8 * f, 3)]
        self.convs = nn.Sequential(*[authors_block(*c) for c in spec])
        n_feat = 8 * f * (cfg.padded_size // 8) ** 2  # 128 x 4 x 4 = 2048 for nf = 16
        self.style_mu = nn.Linear(n_feat, cfg.style_dim)
        self.style_logvar = nn.Linear(n_feat, cfg.style_dim)
        self.class_code = nn.Linear(n_feat, cfg.class_dim)
        self.apply(torch7_init)

    def forward(self, x):
        lo, hi = self.pad
        h = self.convs(F.pad(x, (lo, hi, lo, hi))).flatten(1)  # zeros: mid-grey on the [-1, 1] scale
        return self.style_mu(h), self.style_logvar(h), self.class_code(h)


class AuthorsDecoder(nn.Module):
    """(z, s) -> image in [-1, 1]: linear maps of z and s are added (not concatenated) into an
    8nf x 4 x 4 map, then the encoder's blocks mirrored with transposed convolutions, tanh."""

    def __init__(self, cfg: AuthorsConfig):
        super().__init__()
        f, self.side = cfg.nf, cfg.padded_size // 8
        self.start_ch = 8 * f
        self.style_in = nn.Linear(cfg.style_dim, self.start_ch * self.side ** 2)
        self.class_in = nn.Linear(cfg.class_dim, self.start_ch * self.side ** 2)
        spec = [(8 * f, 8 * f, 3, False), (8 * f, 4 * f, 2, True), (4 * f, 4 * f, 3, False), (4 * f, 2 * f, 2, True),
                (2 * f, 2 * f, 3, False), (2 * f, f, 2, True), (f, f, 3, False)]
        self.deconvs = nn.Sequential(*[authors_block(*c) for c in spec], authors_conv(f, cfg.channels, 3))
        self.crop = pad_amounts(cfg.image_size, cfg.padded_size)
        self.apply(torch7_init)

    def forward(self, z, s):
        h = (self.style_in(z) + self.class_in(s)).view(-1, self.start_ch, self.side, self.side)
        y = self.deconvs(h)  # (B, C, 32, 32)
        lo, hi = self.crop
        return torch.tanh(y[:, :, lo:y.shape[2] - hi, lo:y.shape[3] - hi])


class LabelMaps(nn.Module):
    """Learned per-label feature maps added to the discriminator's activations.

    One lookup table per label; their rows are concatenated into a (planes, side, side) map
    (each label owns a contiguous share of it, as near equal as the size allows: their code
    demanded exact division) and upsampled (nearest) to the activations' size."""

    def __init__(self, label_sizes, planes, side, scale):
        super().__init__()
        total, n = planes * side * side, len(label_sizes)
        widths = [total // n + (j < total % n) for j in range(n)]
        self.tables = nn.ModuleList(nn.Embedding(k, w) for k, w in zip(label_sizes, widths))
        self.shape, self.scale = (planes, side, side), scale

    def forward(self, labels):  # labels: (B, number of labels), int64
        m = torch.cat([t(labels[:, j]) for j, t in enumerate(self.tables)], 1).view(-1, *self.shape)
        return F.interpolate(m, scale_factor=self.scale, mode="nearest") if self.scale > 1 else m


class AuthorsDiscriminator(nn.Module):
    """(image, its labels) -> logit of "real": convolutions with LeakyReLU(0.2) and batch norm,
    label maps added at 16 x 16, 8 x 8 and 4 x 4, dropout, one linear output."""

    def __init__(self, cfg: AuthorsConfig):
        super().__init__()
        if not cfg.label_sizes:
            raise ValueError("the authors' discriminator needs label_sizes (values of each label)")
        self.pad = pad_amounts(cfg.image_size, cfg.padded_size)
        f, side = cfg.nf, cfg.padded_size // 8
        bn = nn.BatchNorm2d
        self.conv1, self.conv2 = authors_conv(cfg.channels, f, 3), authors_conv(f, f, 2)       # 32, 16
        self.lut1, self.bn2 = LabelMaps(cfg.label_sizes, f, side, 4), bn(f)
        self.conv3, self.bn3 = authors_conv(f, 2 * f, 2), bn(2 * f)                            # 8
        self.conv4, self.bn4 = authors_conv(2 * f, 2 * f, 3), bn(2 * f)
        self.lut2, self.bn5 = LabelMaps(cfg.label_sizes, 2 * f, side, 2), bn(2 * f)
        self.conv6, self.bn6 = authors_conv(2 * f, 4 * f, 2), bn(4 * f)                        # 4
        self.conv7 = authors_conv(4 * f, 4 * f, 3)
        self.lut3, self.bn7 = LabelMaps(cfg.label_sizes, 4 * f, side, 1), bn(4 * f)
        self.conv8, self.bn8 = authors_conv(4 * f, 4 * f, 3), bn(4 * f)
        self.dropout = nn.Dropout(cfg.disc_dropout)
        self.out = nn.Linear(4 * f * side * side, 1)
        self.apply(torch7_init)

    def forward(self, x, labels):
        """x (B, C, H, W) in [-1, 1]; labels (B,) or (B, number of labels). Returns (B,) logits."""
        labels = labels.view(len(x), -1)
        act = leaky_relu
        lo, hi = self.pad
        h = act(self.conv1(F.pad(x, (lo, hi, lo, hi))))
        h = act(self.bn2(self.conv2(h) + self.lut1(labels)))
        h = act(self.bn3(self.conv3(h)))
        h = act(self.bn4(self.conv4(h)))
        h = act(self.bn5(h + self.lut2(labels)))
        h = act(self.bn6(self.conv6(h)))
        h = act(self.bn7(self.conv7(h) + self.lut3(labels)))
        h = act(self.bn8(self.conv8(h)))
        return self.out(self.dropout(h.flatten(1))).squeeze(1)


def leaky_relu(t):
    return F.leaky_relu(t, 0.2)


def authors_kl(mu, v):
    """The objective whose gradient the authors' KL criterion returns: 0.5 * sum(mu^2 + exp(2v)
    - 2v - 1) averaged over the batch, i.e. KL(q || N(0, I)) with v read as log-sigma (its printed
    value is another expression). Their sampler reads the same v as a log-variance."""
    return 0.5 * torch.sum(mu.pow(2) + torch.exp(2 * v) - 2 * v - 1) / mu.shape[0]


def network_classes(cfg):
    """(Encoder, Decoder, Discriminator) classes of cfg's recipe."""
    if cfg.recipe == "authors":
        return AuthorsEncoder, AuthorsDecoder, AuthorsDiscriminator
    return Encoder, Decoder, Discriminator
