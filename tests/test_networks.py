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


def test_init_is_normal_0_05_with_zero_bias():
    torch.manual_seed(0)
    disc = Discriminator(CONFIGS["mnist"])
    w = torch.cat([m.weight.flatten() for m in disc.modules() if isinstance(m, nn.Conv2d)])
    assert abs(w.std().item() - 0.05) < 0.002 and abs(w.mean().item()) < 0.002
    assert all((m.bias == 0).all() for m in disc.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


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


def test_classifier_shapes():
    assert Classifier(16, 10)(torch.randn(5, 16)).shape == (5, 10)
