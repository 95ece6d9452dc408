"""The straightforward form of one training iteration, written the way the reference
implementation computes it: a separate encoder pass per image batch, a separate decoder and
discriminator call per code pair, one backward call per loss term (retain_graph=True),
instance norm with running statistics, and pairs drawn by per-item Python in a DataLoader.

Used twice: by the tests, to show that train.py's regrouped computation gives the same losses
and gradients, and by benchmarks/train_throughput.py (--baseline) as the speed baseline.
"""
import random

import torch
import torch.nn as nn
import torch.nn.functional as F

from networks import InstanceNorm


def reconstruction_losses(enc, dec, x1, x2, eps, n_pixels):
    """Accumulates the reconstruction update's gradients; returns (reconstruction, KL)."""
    mu1, lv1, s1 = enc(x1)
    z1 = mu1 + torch.exp(0.5 * lv1) * eps
    kl = -0.5 * torch.sum(1 + lv1 - mu1.pow(2) - lv1.exp()) / (len(x1) * n_pixels)
    kl.backward(retain_graph=True)
    _, _, s2 = enc(x2)
    r1 = F.mse_loss(dec(z1, s1), x1)
    r1.backward(retain_graph=True)
    r2 = F.mse_loss(dec(z1, s2), x1)
    r2.backward()
    return (r1 + r2).detach(), kl.detach()


def generator_losses(enc, dec, disc, x1, x3, eps1, eps2, n_pixels):
    """Accumulates the generator update's gradients (into D too, as the reference's backward does); returns
    the GAN loss."""
    real = torch.ones(len(x1), dtype=torch.long, device=x1.device)
    mu1, lv1, _ = enc(x1)
    z1 = mu1 + torch.exp(0.5 * lv1) * eps1
    kl = -0.5 * torch.sum(1 + lv1 - mu1.pow(2) - lv1.exp()) / (len(x1) * n_pixels)
    kl.backward(retain_graph=True)
    _, _, s3 = enc(x3)
    g1 = F.cross_entropy(disc(x3, dec(z1, s3)), real)
    g1.backward(retain_graph=True)
    g2 = F.cross_entropy(disc(x3, dec(eps2, s3)), real)
    g2.backward()
    return (g1 + g2).detach()


def discriminator_losses(enc, dec, disc, x1, x2, x3):
    """Accumulates the discriminator's gradients; returns (loss, accuracy)."""
    B = len(x1)
    ones = torch.ones(B, dtype=torch.long, device=x1.device)
    real_out = disc(x2, x3)
    l_real = F.cross_entropy(real_out, ones)
    l_real.backward()
    mu1, _, _ = enc(x1)
    _, _, s3 = enc(x3)
    fake_out = disc(x3, dec(mu1, s3))
    l_fake = F.cross_entropy(fake_out, 0 * ones)
    l_fake.backward()
    pred = torch.cat([real_out, fake_out]).argmax(1)
    acc = (pred == torch.cat([ones, 0 * ones])).float().mean()
    return (l_real + l_fake).detach(), acc


def with_running_stat_norms(net):
    """Swap each InstanceNorm for nn.InstanceNorm2d(track_running_stats=True), as the reference built them,
    on the device of the network's weights."""
    device = next(net.parameters()).device
    for seq in [m for m in net.modules() if isinstance(m, nn.Sequential)]:
        width = None
        for i, child in enumerate(seq):
            if isinstance(child, (nn.Conv2d, nn.ConvTranspose2d)):
                width = child.out_channels
            elif isinstance(child, InstanceNorm):
                seq[i] = nn.InstanceNorm2d(width, track_running_stats=True, device=device)
    return net


class PairedImages(torch.utils.data.Dataset):
    """Per-item pairing as the reference did it: each item is (image, random same-class image)."""

    def __init__(self, images_u8, labels):
        self.images, self.labels = images_u8, labels.tolist()
        self.by_class = {}
        for i, c in enumerate(self.labels):
            self.by_class.setdefault(c, []).append(i)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        j = random.choice(self.by_class[self.labels[i]])
        return self.images[i].float() / 255, self.images[j].float() / 255, self.labels[i]


def batches(dataset, batch_size):
    """An endless stream of shuffled batches (re-iterating the loader, so pairs are re-drawn)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
    while True:
        yield from loader


def reference_iteration(enc, dec, disc, opts, stream, cfg, gen_steps=2, gate=0.8, device="cpu"):
    """One iteration in the reference's form; opts = (autoencoder, generator, discriminator) optimisers."""
    opt_ae, opt_gen, opt_disc = opts
    n_pixels = cfg.channels * cfg.image_size ** 2
    x1, x2, _ = next(stream)
    x1, x2 = x1.to(device), x2.to(device)
    B = len(x1)
    opt_ae.zero_grad()
    reconstruction_losses(enc, dec, x1, x2, torch.randn(B, cfg.style_dim, device=device), n_pixels)
    opt_ae.step()
    for _ in range(gen_steps):
        x1, x3 = next(stream)[0].to(device), next(stream)[0].to(device)
        opt_gen.zero_grad()
        generator_losses(enc, dec, disc, x1, x3, torch.randn(B, cfg.style_dim, device=device),
                         torch.randn(B, cfg.style_dim, device=device), n_pixels)
        opt_gen.step()
    opt_disc.zero_grad()
    x1 = next(stream)[0].to(device)
    x2, x3, _ = next(stream)
    _, acc = discriminator_losses(enc, dec, disc, x1, x2.to(device), x3.to(device))
    if acc.item() < gate:
        opt_disc.step()
