import os

import pytest
import torch

from conftest import SHARED_DATA, needs_mnist
from data_loader import DataError, PairSampler, load_dataset


def test_fake_mnist_loads(fake_mnist):
    ds = load_dataset("mnist", fake_mnist, "train")
    assert ds.images.shape == (256, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.shape == (256,) and ds.num_classes == 10
    assert len(load_dataset("mnist", fake_mnist, "test")) == 64


def test_pairs_share_their_label_and_are_redrawn():
    labels = torch.arange(200) % 7
    sampler = PairSampler(labels, seed=0)
    partners_of = {}
    for _ in range(20):  # 640 anchors: each image about three times
        a, b = sampler.pairs(32)
        assert (labels[a] == labels[b]).all()
        for i, j in zip(a.tolist(), b.tolist()):
            partners_of.setdefault(i, set()).add(j)
    # pairs() gives an anchor met again a new partner (its class has 28 or 29 images), not the first one
    again = [p for i, p in partners_of.items() if len(p) > 1]
    assert len(again) > 0.9 * len(partners_of)
    # the same anchors get new partners: pairs are drawn afresh, not cached from the first epoch
    sampler2 = PairSampler(labels, seed=0)
    a0, _ = sampler2.pairs(32)
    partners = {tuple(sampler2.partners(a0).tolist()) for _ in range(5)}
    assert len(partners) == 5


def test_every_image_is_an_anchor_once_per_epoch():
    sampler = PairSampler(torch.arange(100) % 3, seed=1)
    seen = torch.cat([sampler.anchors(20) for _ in range(5)])
    assert sorted(seen.tolist()) == list(range(100))


def draw_epoch(sampler, n_batches, batch_size):
    """n_batches draws alternating pairs() and anchors(), as an iteration mixes them."""
    out = []
    for k in range(n_batches):
        out.append(torch.cat(sampler.pairs(batch_size)) if k % 2 == 0 else sampler.anchors(batch_size))
    return out


def test_frozen_stream_replays_epoch_one():
    """--pairs frozen: epoch 2 sees epoch 1's index stream again, partners included (the reference's
    itertools.cycle); the default stream draws a new one."""
    labels = torch.arange(50) % 4
    frozen, fresh = PairSampler(labels, seed=1, frozen=True), PairSampler(labels, seed=1)
    epoch1 = draw_epoch(frozen, 6, 8)  # floor(50 / 8) = 6 batches an epoch, 2 images dropped
    assert torch.equal(torch.cat(epoch1[1::2] + [b[:8] for b in epoch1[::2]]).sort().values.unique(),
                       torch.cat(epoch1[1::2] + [b[:8] for b in epoch1[::2]]).sort().values)  # no anchor twice
    for epoch in range(2):
        assert all(torch.equal(a, b) for a, b in zip(epoch1, draw_epoch(frozen, 6, 8)))
    assert all(torch.equal(labels[b[:8]], labels[b[8:]]) for b in epoch1[::2])  # partners share the class
    fresh1 = draw_epoch(fresh, 6, 8)
    assert torch.equal(fresh1[0][:8], epoch1[0][:8])  # the same first order from the same seed ...
    assert not all(torch.equal(a, b) for a, b in zip(fresh1, draw_epoch(fresh, 6, 8)))  # ... not replayed
    state = frozen.state_dict()
    again = PairSampler(labels, seed=99, frozen=True)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(draw_epoch(frozen, 9, 8), draw_epoch(again, 9, 8)))
    with pytest.raises(ValueError):
        PairSampler(labels, seed=1).load_state_dict(state)


def test_sampler_is_seeded_and_resumable():
    labels = torch.arange(90) % 9
    s1, s2 = PairSampler(labels, 3), PairSampler(labels, 3)
    for _ in range(4):
        assert all(torch.equal(u, v) for u, v in zip(s1.pairs(16), s2.pairs(16)))
    state = s1.state_dict()
    expected = [s1.pairs(16) for _ in range(6)]
    s3 = PairSampler(labels, 99)
    s3.load_state_dict(state)
    for (a, b), (c, d) in zip(expected, (s3.pairs(16) for _ in range(6))):
        assert torch.equal(a, c) and torch.equal(b, d)


@pytest.mark.parametrize("frozen", [False, True])
def test_one_draw_gives_the_batches_of_successive_calls(frozen):
    """draw() (one index tensor for all of an iteration's batches) returns what the anchors()/pairs()
    calls in the same order return, and leaves the generator where they do: also when an epoch ends
    between a pair's anchors and a later pair (50 images, batches of 8: a new order every 6 batches)."""
    labels = torch.arange(50) % 3
    kinds = ["pairs", "anchors", "anchors", "anchors", "anchors", "anchors", "pairs"]
    one, calls = PairSampler(labels, 1, frozen=frozen), PairSampler(labels, 1, frozen=frozen)
    for _ in range(5):  # 45 batches: seven epochs, ends at every place in the list
        expected = []
        for kind in kinds:
            expected.extend(calls.pairs(8) if kind == "pairs" else [calls.anchors(8)])
        assert torch.equal(one.draw(kinds, 8), torch.cat(expected))
        assert torch.equal(one.gen.get_state(), calls.gen.get_state()) and one.pos == calls.pos
        assert torch.equal(one.perm, calls.perm)


def test_partner_offsets_stay_inside_their_class(monkeypatch):
    labels = torch.tensor([0] * 3 + [1] * 50000)
    sampler = PairSampler(labels, 0)
    for _ in range(50):
        a, b = sampler.pairs(1000)
        assert (labels[a] == labels[b]).all()
    # The rounding case forced: u * count can round up to count (u just below 1 in low precision, or
    # a count beyond float's exact integers); the offset must still be the class's last image.
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 0])
    sampler = PairSampler(labels, 0)
    monkeypatch.setattr(torch, "rand", lambda n, **kw: torch.ones(n))
    idx = torch.arange(7)
    assert sampler.partners(idx).tolist() == [4, 6, 5, 6, 4, 5, 6]  # the last image of each class


def test_missing_files_give_one_clear_message(tmp_path):
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*MNIST/raw"):
        load_dataset("mnist", str(tmp_path), "train")


def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", str(tmp_path / "nope"), "train")


def test_truncated_file_is_an_error(fake_mnist):
    path = os.path.join(fake_mnist, "MNIST", "raw", "train-images-idx3-ubyte")
    with open(path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DataError, match="truncated or corrupted"):
        load_dataset("mnist", fake_mnist, "train")


@needs_mnist
def test_real_mnist_loads():
    ds = load_dataset("mnist", SHARED_DATA, "train")
    assert ds.images.shape == (60000, 1, 28, 28)
    assert torch.bincount(ds.labels).tolist()[0] == 5923
