import pytest
import torch
import torch.nn as nn

from networks import CONFIGS, Classifier, Decoder, Discriminator, Encoder, InstanceNorm, get_config


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shapes_for_every_config(name):
    cfg = CONFIGS[name]
    enc, dec, disc = Encoder(cfg), Decoder(cfg), Discriminator(cfg)
    x = torch.rand(3, cfg.channels, cfg.image_size, cfg.image_size)
    mu, logvar, s = enc(x)
    assert mu.shape == logvar.shape == (3, cfg.style_dim)
    assert s.shape == (3, cfg.class_dim)
    y = dec(mu, s)
    assert y.shape == x.shape
    assert 0 <= y.min() and y.max() <= 1  # sigmoid output
    assert disc(x, y).shape == (3, 2)


def test_reference_mnist_architecture():
    cfg = CONFIGS["mnist"]
    enc = Encoder(cfg)
    assert enc.style_mu.in_features == 256  # 64 channels x 2 x 2
    convs = [m for m in enc.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == \
        [(16, (5, 5), (2, 2), (1, 1)), (32, (5, 5), (2, 2), (1, 1)), (64, (5, 5), (2, 2), (1, 1))]
    dec = Decoder(cfg)
    deconvs = [m for m in dec.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(d.in_channels, d.out_channels, d.padding) for d in deconvs] == \
        [(128, 32, (0, 0)), (32, 16, (0, 0)), (16, 1, (1, 1))]
    assert dec.style_in.out_features == dec.class_in.out_features == 256
    disc = Discriminator(cfg)
    assert [m.out_channels for m in disc.modules() if isinstance(m, nn.Conv2d)] == [32, 64, 128]
    assert disc.out.in_features == 512


def test_code_sizes_come_from_the_config():
    cfg = get_config("mnist", style_dim=5, class_dim=7)
    mu, _, s = Encoder(cfg)(torch.rand(2, 1, 28, 28))
    assert mu.shape == (2, 5) and s.shape == (2, 7)


def check_normal(t, std, name):
    """t looks like a sample of N(0, std): mean and std within 5 standard errors."""
    n = t.numel()
    assert abs(t.mean().item()) < 5 * std / n ** 0.5, name
    assert abs(t.std().item() - std) < 5 * std / (2 * n) ** 0.5, name


def check_uniform(t, bound, name):
    """t looks like a sample of U(-bound, bound): inside the bounds, mean 0 and std bound/sqrt(3)."""
    assert t.abs().max().item() <= bound, name
    if t.numel() >= 16:  # too few values say nothing about the moments
        n, std = t.numel(), bound / 3 ** 0.5
        assert abs(t.mean().item()) < 5 * std / n ** 0.5, name
        assert abs(t.std().item() - std) < 5 * 0.9 * std / n ** 0.5, name  # sd of the sample sd ~ 0.89 std / sqrt(n)
        assert t.abs().max().item() > 0.5 * bound, name


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_init_follows_the_reference_rule_for_every_parameter(name):
    """Conv2d and Linear: N(0, 0.05) weights, zero biases (the reference's weights_init).
    ConvTranspose2d: PyTorch 0.4's default, weight and bias U(+-1/sqrt(in_channels x kH x kW))."""
    torch.manual_seed(0)
    cfg = CONFIGS[name]
    checked = 0
    for net in (Encoder(cfg), Decoder(cfg), Discriminator(cfg)):
        for mname, m in net.named_modules():
            params = list(m.parameters(recurse=False))
            if not params:
                continue
            where = f"{name} {type(net).__name__}.{mname}"
            if isinstance(m, nn.ConvTranspose2d):
                bound = 1 / (m.in_channels * m.kernel_size[0] * m.kernel_size[1]) ** 0.5
                assert m.weight.shape[0] == m.in_channels  # the transposed convolution's own in_channels
                check_uniform(m.weight, bound, where + ".weight")
                check_uniform(m.bias, bound, where + ".bias")
                assert (m.bias != 0).all(), where
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                check_normal(m.weight, 0.05, where + ".weight")
                assert (m.bias == 0).all(), where
            else:
                raise AssertionError(f"{where}: no init rule for {type(m).__name__}")
            checked += len(params)
    assert checked == sum(len(list(n.parameters())) for n in (Encoder(cfg), Decoder(cfg), Discriminator(cfg)))


def test_instance_norm_equals_torch_instance_norm():
    x = torch.randn(4, 8, 6, 6)
    ref = nn.InstanceNorm2d(8, affine=False, track_running_stats=False)(x)
    torch.testing.assert_close(InstanceNorm()(x), ref, rtol=1e-5, atol=1e-5)


def test_eval_encodes_an_image_the_same_whatever_its_batch():
    torch.manual_seed(0)
    enc = Encoder(CONFIGS["mnist"])
    x = torch.rand(1, 1, 28, 28)
    enc.train()
    alone_train = enc(x)
    for _ in range(3):  # training passes must not leave running statistics behind
        enc(torch.rand(16, 1, 28, 28) * 5)
    enc.eval()
    alone = enc(x)
    in_batch = enc(torch.cat([torch.rand(7, 1, 28, 28), x, torch.zeros(4, 1, 28, 28)]))
    for a, b, c in zip(alone, in_batch, alone_train):
        torch.testing.assert_close(a[0], b[7], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_classifier_has_the_reference_layers():
    """The reference's networks.Classifier: Linear 256, BatchNorm1d, LeakyReLU(0.2), twice, then Linear."""
    layers = list(Classifier(16, 10).net)
    assert [type(m).__name__ for m in layers] == ["Linear", "BatchNorm1d", "LeakyReLU"] * 2 + ["Linear"]
    assert [(m.in_features, m.out_features) for m in layers if isinstance(m, nn.Linear)] == [(16, 256), (256, 256), (256, 10)]
    assert all(m.negative_slope == 0.2 for m in layers if isinstance(m, nn.LeakyReLU))


def test_classifier_shapes():
    assert Classifier(16, 10)(torch.randn(5, 16)).shape == (5, 10)
