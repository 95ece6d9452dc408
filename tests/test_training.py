"""The training iteration: the gate, the 2:1 schedule, equivalence with the reference's
straightforward form, exact resume."""
import copy
import csv
import json
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from benchmarks import reference_style as ref
from conftest import SHARED_DATA, make_fake_mnist, needs_mnist
from data_loader import ImageSet
from networks import get_config
from utils import rng_state, seed_everything, set_rng_state


def tiny_set(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8),
                    torch.arange(n) % 4, 4)


def make_trainer(*argv):
    args = train.get_args_parser().parse_args(["--batch-size", "8", *argv])
    torch.manual_seed(0)
    return train.Trainer(get_config("mnist"), args, tiny_set(), torch.device("cpu"))


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_generator_steps_twice_and_reconstruction_once_per_iteration():
    t = make_trainer()
    train.train_iteration(t)
    p = t.ae_params[0]
    assert int(t.opt_gen.state[p]["step"]) == 2
    assert int(t.opt_ae.state[p]["step"]) == 1
    t = make_trainer("--gen-steps", "3")
    train.train_iteration(t)
    assert int(t.opt_gen.state[t.ae_params[0]]["step"]) == 3


def test_no_adversary_updates_only_encoder_and_decoder_by_reconstruction():
    """--gen-steps 0 --disc-steps 0: the ablation without generator and discriminator updates."""
    t = make_trainer("--gen-steps", "0", "--disc-steps", "0")
    disc, ae = snapshot(t.discriminator), snapshot(t.encoder)
    m = train.train_iteration(t)
    assert same(disc, snapshot(t.discriminator)) and not same(ae, snapshot(t.encoder))
    assert not t.opt_gen.state and not t.opt_disc.state and len(t.opt_ae.state) > 0
    assert m["gen_loss"] == m["disc_loss"] == m["disc_acc"] == m["disc_stepped"] == 0 and m["recon_loss"] > 0
    with pytest.raises(train.UserError, match="--gen-steps must be >= 0"):
        train.check_args(train.get_args_parser().parse_args(["--gen-steps", "-1"]))


def test_closed_gate_leaves_discriminator_bit_for_bit_unchanged(monkeypatch):
    t = make_trainer()  # default gate 0.8
    real = train.discriminator_loss

    def winning(t_, *xs):  # a discriminator that is right on exactly 80% of the batch
        loss, _ = real(t_, *xs)
        return loss, torch.tensor(0.8)

    monkeypatch.setattr(train, "discriminator_loss", winning)
    before = snapshot(t.discriminator)
    m = train.train_iteration(t)
    assert m["disc_stepped"] == 0 and m["disc_acc"] == pytest.approx(0.8)
    assert same(before, snapshot(t.discriminator))
    assert len(t.opt_disc.state) == 0  # no optimiser work at all
    assert all(p.grad is None for p in t.discriminator.parameters())  # and no backward pass


def test_open_gate_steps_the_discriminator(monkeypatch):
    t = make_trainer()
    real = train.discriminator_loss
    monkeypatch.setattr(train, "discriminator_loss", lambda t_, *xs: (real(t_, *xs)[0], torch.tensor(0.79)))
    before = snapshot(t.discriminator)
    m = train.train_iteration(t)
    assert m["disc_stepped"] == 1
    assert not same(before, snapshot(t.discriminator))


def test_gate_zero_never_steps():
    t = make_trainer("--disc-gate", "0")
    before = snapshot(t.discriminator)
    for _ in range(3):
        assert train.train_iteration(t)["disc_stepped"] == 0
    assert same(before, snapshot(t.discriminator))


def indexed_trainer():
    """A trainer on 64 images whose first pixel is the image's own index, labels i % 4."""
    t = make_trainer()
    t.images[:, 0, 0, 0] = torch.arange(len(t.images), dtype=torch.uint8)
    return t


def indices(x):
    return (x[:, 0, 0, 0] * 255).round().long()


def test_iteration_pairs_same_class_images(monkeypatch):
    """The reconstruction's partner x2 and the discriminator's real pair (x2, x3) share the anchor's
    class (Mathieu et al. 2016, sec. 3): drawn by the sampler's pairs(), not as independent batches."""
    t = indexed_trainer()
    labels, seen = t.sampler.labels, {"rec": [], "disc": []}
    real_rec, real_disc = train.reconstruction_step, train.discriminator_loss

    def rec_spy(t_, x1, x2):
        seen["rec"].append((indices(x1), indices(x2)))
        return real_rec(t_, x1, x2)

    def disc_spy(t_, x1, x2, x3):
        seen["disc"].append((indices(x2), indices(x3)))
        return real_disc(t_, x1, x2, x3)

    monkeypatch.setattr(train, "reconstruction_step", rec_spy)
    monkeypatch.setattr(train, "discriminator_loss", disc_spy)
    for _ in range(3):
        train.train_iteration(t)
    assert len(seen["rec"]) == len(seen["disc"]) == 3
    for a, b in seen["rec"] + seen["disc"]:
        assert torch.equal(labels[a], labels[b])
        assert (a != b).any()  # a partner is another image of the class, not the anchor repeated


# ---------------------------------------------------------------- fewer operators and host reads (issue 29)

def test_an_iteration_gathers_its_images_once_and_reuses_its_loss_targets(monkeypatch):
    """One gather for the 9 batches of a default iteration (7 of anchors, 2 of partners); the
    cross-entropy targets are the tensors made at the first iteration, not new ones."""
    t = make_trainer()
    gathers, targets, real_batch, real_ce = [], [], t.batch, F.cross_entropy
    monkeypatch.setattr(t, "batch", lambda idx: gathers.append(len(idx)) or real_batch(idx))
    monkeypatch.setattr(F, "cross_entropy", lambda logits, target: targets.append(target) or real_ce(logits, target))
    for _ in range(2):
        train.train_iteration(t)
    assert gathers == [9 * 8, 9 * 8]
    ones, disc = t.constants[("ones", 8)], t.constants[("disc_target", 8, 1)]
    assert torch.equal(ones, torch.ones(8, dtype=torch.long))
    assert torch.equal(disc, torch.cat([torch.ones(8, dtype=torch.long), torch.zeros(8, dtype=torch.long)]))
    assert len(targets) == 12  # per iteration: two generator updates of two terms, the discriminator's two
    for it in (targets[:6], targets[6:]):
        assert all(x is ones for x in it[:4]) and all(x._base is disc for x in it[4:])


def test_optimisers_keep_the_fast_path_after_loading_a_state(monkeypatch):
    """Adam runs foreach on the CPU (bit for bit the per-parameter default, in fewer operators), also
    after loading a state saved with other flags (an older checkpoint: foreach None); a state saved by
    fused Adam (on CUDA, its step counts on the device) loads onto the host's foreach path and back."""
    t = make_trainer()
    train.train_iteration(t)
    opts = lambda tr: [getattr(tr, n) for n in tr.OPTIMIZERS]  # noqa: E731
    assert all(g["foreach"] is True and not g["fused"] for o in opts(t) for g in o.param_groups)
    old = copy.deepcopy(t.state_dict())  # a loaded state shares its tensors with the one it came from
    for name in t.OPTIMIZERS:
        for g in old[name]["param_groups"]:
            g["foreach"] = None
    u = make_trainer()
    u.load_state_dict({**old, "path": "x"})
    assert all(g["foreach"] is True and not g["fused"] for o in opts(u) for g in o.param_groups)
    assert train.train_iteration(u) == train.train_iteration(t)
    for a, b in zip(t.nets(), u.nets()):
        assert same(snapshot(a), snapshot(b))

    monkeypatch.setattr(train.Trainer, "adam_path", lambda self: {"fused": True})  # CUDA's path, on the CPU
    u.keep_optimizer_paths()
    assert all(g["fused"] is True and g["foreach"] is None for o in opts(u) for g in o.param_groups)
    train.train_iteration(u)  # fused Adam takes the state as it is now
    assert int(u.opt_gen.state[u.ae_params[0]]["step"]) == 6


def count_syncs(t, n=1):
    """Host syncs by kind per iteration, after a first one that makes the optimiser states."""
    from benchmarks import train_throughput as bench
    train.train_iteration(t)
    host = bench.optimizer_host_tensors([getattr(t, name) for name in t.OPTIMIZERS])
    return bench.count_ops(lambda: train.train_iteration(t), n, host)[2]


def test_on_nan_skip_reads_each_loss_once():
    """--on-nan skip reads the reconstruction's and each generator update's loss on the host before its
    step; the discriminator's rides in the metrics' one read, which the gate needs anyway."""
    assert count_syncs(make_trainer("--on-nan", "skip")) == {"item": 3, "tolist": 1}
    assert count_syncs(make_trainer()) == {"tolist": 1}


def test_on_nan_skip_skips_a_non_finite_discriminator_update(monkeypatch):
    t = make_trainer("--on-nan", "skip")
    real = train.discriminator_loss

    def nan_loss(t_, *xs):
        loss, _ = real(t_, *xs)
        return loss * float("nan"), torch.tensor(0.0)  # an open gate: the update would step

    monkeypatch.setattr(train, "discriminator_loss", nan_loss)
    before = snapshot(t.discriminator)
    m = train.train_iteration(t)
    assert m["disc_stepped"] == 1 and t.skipped_updates == 1 and same(before, snapshot(t.discriminator))
    assert len(t.opt_disc.state) == 0


# ---------------------------------------------------------------- equivalence with the reference form
# The reference encodes x1 and x2 in separate passes, decodes each code pair separately and calls
# backward once per loss term with retain_graph=True. train.py concatenates batches and calls
# backward once per update. Instance norm is per-sample, so both must give the same losses and
# gradients. lr = 0 keeps the weights fixed, so the gradients left in .grad can be compared.

def grads(params):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def zero(params):
    for p in params:
        p.grad = None


def assert_all_close(xs, ys, atol=1e-6):
    for x, y in zip(xs, ys):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=atol)


def batches(t, n):
    return [t.batch(t.sampler.anchors(8)) for _ in range(n)]


def double_trainer(*argv):
    """A trainer in float64: the two forms sum in different orders, and in float32 that alone moves
    single gradient entries by ~1e-6; in float64 any real difference stands far above rounding."""
    t = make_trainer(*argv)
    for net in t.nets():
        net.double()
    t.batch = lambda idx, batch=t.batch: batch(idx).double()
    t.randn = lambda n, randn=t.randn: randn(n).double()
    return t


def test_reconstruction_step_matches_reference_form():
    t = double_trainer("--lr", "1e-30")
    x1, x2 = batches(t, 2)
    state = t.noise.get_state()
    rec, kl = train.reconstruction_step(t, x1, x2)
    ours = grads(t.ae_params)

    zero(t.ae_params)
    eps = torch.randn(8, t.cfg.style_dim, generator=torch.Generator().set_state(state)).double()
    rec_ref, kl_ref = ref.reconstruction_losses(t.encoder, t.decoder, x1, x2, eps, 28 * 28)
    torch.testing.assert_close(rec, rec_ref, check_dtype=False)
    torch.testing.assert_close(kl, kl_ref, check_dtype=False)
    assert_all_close(ours, grads(t.ae_params))


def test_generator_step_matches_reference_form():
    t = double_trainer("--lr", "1e-30")
    x1, x3 = batches(t, 2)
    state = t.noise.get_state()
    gen = train.generator_step(t, x1, x3)
    ours = grads(t.ae_params)
    assert all(p.grad is None for p in t.discriminator.parameters())  # D is not updated here

    zero(t.ae_params)
    g = torch.Generator().set_state(state)
    eps1, eps2 = (torch.randn(8, t.cfg.style_dim, generator=g).double() for _ in range(2))
    gen_ref = ref.generator_losses(t.encoder, t.decoder, t.discriminator, x1, x3, eps1, eps2, 28 * 28)
    torch.testing.assert_close(gen, gen_ref, check_dtype=False)
    assert_all_close(ours, grads(t.ae_params))


def test_discriminator_step_matches_reference_form():
    t = double_trainer("--lr", "1e-30")
    x1, x2, x3 = batches(t, 3)
    loss, acc = train.discriminator_loss(t, x1, x2, x3)
    t.update(t.opt_disc, loss)
    dparams = list(t.discriminator.parameters())
    ours = grads(dparams)

    zero(dparams)
    loss_ref, acc_ref = ref.discriminator_losses(t.encoder, t.decoder, t.discriminator, x1, x2, x3)
    torch.testing.assert_close(loss, loss_ref, check_dtype=False)
    assert acc.item() == acc_ref.item()
    assert_all_close(ours, grads(dparams))


def test_reference_style_iteration_runs():
    """The speed baseline of benchmarks/ runs and updates all three optimisers' parameters."""
    t = make_trainer()
    nets = [ref.with_running_stat_norms(n) for n in t.nets()]
    opts = (t.opt_ae, t.opt_gen, torch.optim.Adam(nets[2].parameters()))
    # parameters only: the running statistics of the reference's norms move on every forward pass
    before = [[p.detach().clone() for p in n.parameters()] for n in nets]
    stream = ref.batches(ref.PairedImages(t.images, t.sampler.labels), 8)
    ref.reference_iteration(*nets, opts, stream, t.cfg, gate=1.01)
    for net, old in zip(nets, before):
        assert not all(torch.equal(p, q) for p, q in zip(net.parameters(), old))
    # one reconstruction, two generator and one discriminator step
    assert [max((int(st["step"]) for st in o.state.values()), default=0) for o in opts] == [1, 2, 1]
    assert isinstance(next(m for m in nets[0].modules() if isinstance(m, torch.nn.InstanceNorm2d)),
                      torch.nn.InstanceNorm2d)


# ---------------------------------------------------------------- whole runs

def run(argv):
    return train.main(train.get_args_parser().parse_args(argv + ["--no-progress"]))


def common(data, run_dir):
    return ["--data-root", data, "--run-dir", str(run_dir), "--batch-size", "16", "--seed", "3",
            "--sample-every", "4", "--log-every", "2"]


def load(path):
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("pairs", ["fresh", "frozen"])
def test_resume_is_exact(fake_mnist, tmp_path, pairs):
    # 256 images, batch 16: 16 batches per epoch, 7 per iteration, so 10 iterations span 4+ epochs
    run(common(fake_mnist, tmp_path / "a") + ["--max-steps", "10", "--pairs", pairs])
    run(common(fake_mnist, tmp_path / "b") + ["--max-steps", "5", "--pairs", pairs])
    run(["--resume", str(tmp_path / "b" / "checkpoints" / "last.pt"), "--max-steps", "10"])
    a, b = load(tmp_path / "a" / "checkpoints" / "last.pt"), load(tmp_path / "b" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 10
    for name in ("encoder", "decoder", "discriminator"):
        assert same(a[name], b[name]), name
    for name in ("opt_ae", "opt_gen", "opt_disc"):
        sa, sb = a[name]["state"], b[name]["state"]
        assert sa.keys() == sb.keys() and all(same(sa[k], sb[k]) for k in sa)
    with open(tmp_path / "a" / "metrics.csv") as f:
        rows_a = list(csv.reader(f))
    with open(tmp_path / "b" / "metrics.csv") as f:
        rows_b = list(csv.reader(f))
    assert rows_a == rows_b  # same per-step losses, no duplicated or missing steps


def test_checkpoint_is_complete_and_loads_weights_only(fake_mnist, tmp_path):
    run(common(fake_mnist, tmp_path) + ["--max-steps", "6", "--checkpoint-every", "2",
                                        "--keep-checkpoints", "2"])
    ck = sorted(os.listdir(tmp_path / "checkpoints"))
    assert ck == ["last.pt", "step_0000004.pt", "step_0000006.pt"]
    c = load(tmp_path / "checkpoints" / "last.pt")  # weights_only=True: plain values and tensors
    for key in ("encoder", "decoder", "discriminator", "opt_ae", "opt_gen", "opt_disc", "step", "epoch",
                "rng", "sampler", "noise", "args", "model_config", "versions"):
        assert key in c
    assert set(c["rng"]) >= {"python", "numpy", "torch"}
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in c["encoder"])


def test_run_directory_refuses_to_be_reused(fake_mnist, tmp_path):
    run(common(fake_mnist, tmp_path) + ["--max-steps", "2"])
    with pytest.raises(train.UserError, match="already holds a run"):
        run(common(fake_mnist, tmp_path) + ["--max-steps", "2"])
    run(common(fake_mnist, tmp_path) + ["--max-steps", "3", "--overwrite"])
    assert load(tmp_path / "checkpoints" / "last.pt")["step"] == 3


def test_epochs_set_the_schedule_checkpoints_and_epoch_column(tmp_path):
    """Without --max-steps: epochs x floor(N / batch) iterations, a checkpoint every epoch, and the
    epoch column counting completed epochs. 44 images in batches of 16 make 2 iterations per epoch
    (rounding or ceiling would make 3)."""
    data = make_fake_mnist(tmp_path / "data", n_train=44)
    run(["--data-root", data, "--run-dir", str(tmp_path / "r"), "--batch-size", "16", "--epochs", "4"])
    with open(tmp_path / "r" / "config.json") as f:
        assert json.load(f)["steps_per_epoch"] == 2
    with open(tmp_path / "r" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 1, 2, 2, 3, 3, 4]
    # checkpoints at steps 2, 4, 6, 8; the default --keep-checkpoints 3 dropped step 2's
    assert sorted(os.listdir(tmp_path / "r" / "checkpoints")) == \
        ["last.pt", "step_0000004.pt", "step_0000006.pt", "step_0000008.pt"]
    c = load(tmp_path / "r" / "checkpoints" / "last.pt")
    assert (c["step"], c["epoch"]) == (8, 4)


def test_last_checkpoint_is_written_every_epoch_when_kept_ones_are_rarer(tmp_path, monkeypatch):
    """--checkpoint-every longer than an epoch (issue #14's 9370) spaces the kept step_N.pt files,
    not last.pt: a hard kill loses at most an epoch. 2 iterations per epoch, kept ones every 4."""
    data = make_fake_mnist(tmp_path / "data", n_train=44)
    steps, save = [], train.save_checkpoint

    def spy(t, run_dir, step, *rest):  # every write of last.pt goes through save_checkpoint
        steps.append(step)
        return save(t, run_dir, step, *rest)

    monkeypatch.setattr(train, "save_checkpoint", spy)
    run(["--data-root", data, "--run-dir", str(tmp_path / "r"), "--batch-size", "16", "--epochs", "5",
         "--checkpoint-every", "4", "--keep-checkpoints", "0"])
    assert steps == [2, 4, 6, 8, 10]  # last.pt at every epoch's end
    assert sorted(os.listdir(tmp_path / "r" / "checkpoints")) == \
        ["last.pt", "step_0000004.pt", "step_0000008.pt", "step_0000010.pt"]


def test_checkpoint_refuses_non_finite_weights_and_keep_zero_keeps_all(tmp_path):
    t = make_trainer()
    ckdir = tmp_path / "checkpoints"
    ckdir.mkdir()
    for step in range(1, 6):
        train.save_checkpoint(t, str(tmp_path), step, 0, keep=0)
    assert sorted(os.listdir(ckdir)) == ["last.pt"] + [f"step_{s:07d}.pt" for s in range(1, 6)]
    with torch.no_grad():
        t.decoder.deconvs[0].weight[0, 0, 0, 0] = float("inf")  # finite losses could still come out
    before = tree_bytes(ckdir)
    # The guard every rank runs before a checkpoint (train.run_training's checkpoint(); its wiring
    # under torchrun: tests/test_devices.py::test_nonfinite_weights_stop_every_rank_promptly_with_the_same_message)
    with pytest.raises(train.DivergenceError, match=r"NaN/inf by step 6 \(deconvs.0.weight\)"):
        train.check_weights_finite(t, 6)
    assert tree_bytes(ckdir) == before  # the last good checkpoint is kept, nothing else written


def tree_bytes(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_a_run_directory_resumes_like_its_last_checkpoint(fake_mnist, tmp_path):
    run(common(fake_mnist, tmp_path / "a") + ["--max-steps", "4"])
    run(common(fake_mnist, tmp_path / "b") + ["--max-steps", "2"])
    run(["--resume", str(tmp_path / "b"), "--max-steps", "4"])  # the folder, not its checkpoints/last.pt
    a, b = load(tmp_path / "a" / "checkpoints" / "last.pt"), load(tmp_path / "b" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 4
    for name in ("encoder", "decoder", "discriminator"):
        assert same(a[name], b[name]), name
    with pytest.raises(train.CheckpointError, match="is a directory without checkpoints/last.pt"):
        run(["--resume", str(tmp_path)])


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    """python, numpy (with its cached Gaussian) and torch continue exactly where they were saved."""
    def draws():
        return random.random(), np.random.standard_normal(), np.random.randint(1 << 30), torch.rand(3)

    outside = rng_state()
    try:
        seed_everything(5)
        np.random.standard_normal()  # an odd number of legacy normals leaves one cached: has_gauss = 1
        torch.save(rng_state(), tmp_path / "rng.pt")
        expected = draws()
        draws()
        seed_everything(6)  # anything in between
        set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
        got = draws()
    finally:
        set_rng_state(outside)  # the other tests' random streams as they were
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


@needs_mnist
def test_a_few_steps_on_real_mnist(tmp_path):
    run(["--data-root", SHARED_DATA, "--run-dir", str(tmp_path), "--max-steps", "3", "--batch-size", "32"])
    c = load(tmp_path / "checkpoints" / "last.pt")
    assert c["step"] == 3 and c["args"]["dataset"] == "mnist"
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(float(r["recon_loss"]) > 0 for r in rows)


def conv_outputs(t):
    """Records the output of every (transposed) convolution of t's networks: a list it fills."""
    seen = []
    for net in t.nets():
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                m.register_forward_hook(lambda mod, inp, out: seen.append(out.detach()))
    return seen


@pytest.mark.parametrize("flag", ["--channels-last", "--amp"])
def test_speed_options_compute_the_same_iteration(flag):
    """channels-last changes only the memory layout; bf16 autocast only the precision."""
    plain, fast = make_trainer(), make_trainer(flag)
    fast.load_state_dict({**plain.state_dict(), "path": "x"})
    plain_out, fast_out = conv_outputs(plain), conv_outputs(fast)
    m1, m2 = train.train_iteration(plain), train.train_iteration(fast)
    # Here channels-last losses differ from the plain ones by under 1e-6 (relative): a margin of
    # two orders below the tolerance for other CPUs' kernels. bf16 ones differ by about 1e-3.
    tol = 0.05 if flag == "--amp" else 1e-4
    for k in ("recon_loss", "kl", "gen_loss", "disc_loss"):
        assert m2[k] == pytest.approx(m1[k], rel=tol, abs=1e-6), k
    # ... and the flag did take effect:
    if flag == "--channels-last":
        cl = [o.is_contiguous(memory_format=torch.channels_last) for o in fast_out]
        assert len(fast_out) == len(plain_out) > 0 and all(cl)
        assert not all(o.is_contiguous(memory_format=torch.channels_last) for o in plain_out)
    else:
        assert {o.dtype for o in fast_out} == {torch.bfloat16} and {o.dtype for o in plain_out} == {torch.float32}
        assert any(m2[k] != m1[k] for k in ("recon_loss", "kl", "gen_loss", "disc_loss"))


def test_compile_computes_the_same_iteration(monkeypatch):
    """--compile wraps the three networks in torch.compile. Traced with the aot_eager backend
    (dynamo capture and AOT autograd, no C++ compiler needed), the iteration matches eager."""
    from torch._dynamo.backends.registry import lookup_backend
    real_compile, aot_eager, graphs = torch.compile, lookup_backend("aot_eager"), []

    def counting_backend(gm, example_inputs):  # aot_eager, counting the graphs dynamo hands it
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend=counting_backend, **kw))
    plain, compiled = make_trainer(), make_trainer("--compile")
    compiled.load_state_dict({**plain.state_dict(), "path": "x"})
    # the hot loop's callables are the compiled modules, around the very networks a checkpoint saves
    wrapped = [getattr(c, "_orig_mod", None) for c in (compiled.enc, compiled.dec, compiled.disc)]
    assert wrapped == list(compiled.nets())
    assert (plain.enc, plain.dec, plain.disc) == plain.nets()
    for _ in range(2):
        m1, m2 = train.train_iteration(plain), train.train_iteration(compiled)
        for k in ("recon_loss", "kl", "gen_loss", "disc_loss", "disc_acc"):
            assert m2[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-6), k
        assert graphs  # the iteration ran through dynamo: its graphs were compiled
    for a, b in zip(plain.nets(), compiled.nets()):
        assert_all_close(list(a.parameters()), list(b.parameters()))


# ---------------------------------------------------------------- opt-in flags beyond the reference
# --disc-fakes and --kl-weight each change one named update; their defaults are the reference's.

def pre_flag_reconstruction_step(t, x1, x2):
    """train.reconstruction_step as it was before --kl-weight existed (frozen copy)."""
    B = len(x1)
    mu, logvar, s = t.enc(torch.cat([x1, x2]))
    mu1, logvar1 = mu[:B].float(), logvar[:B].float()
    z1 = train.reparameterize(mu1, logvar1, t.randn(B))
    recon = t.dec(torch.cat([z1, z1]), torch.cat([s[:B], s[B:]])).float()
    rec = F.mse_loss(recon[:B], x1) + F.mse_loss(recon[B:], x1)
    kl = train.kl_divergence(mu1, logvar1, t.n_pixels)
    t.update(t.opt_ae, rec + kl)
    return rec.detach(), kl.detach()


def pre_flag_generator_step(t, x1, x3):
    """train.generator_step as it was before --kl-weight existed (frozen copy)."""
    B = len(x1)
    mu, logvar, s = t.enc(torch.cat([x1, x3]))
    mu1, logvar1, s3 = mu[:B].float(), logvar[:B].float(), s[B:]
    z1 = train.reparameterize(mu1, logvar1, t.randn(B))
    logits = t.disc_local(torch.cat([x3, x3]), t.dec(torch.cat([z1, t.randn(B)]), torch.cat([s3, s3]))).float()
    real = torch.ones(B, dtype=torch.long)
    gen = F.cross_entropy(logits[:B], real) + F.cross_entropy(logits[B:], real)
    t.update(t.opt_gen, gen + train.kl_divergence(mu1, logvar1, t.n_pixels), inputs=t.ae_params)
    return gen.detach()


def pre_flag_discriminator_loss(t, x1, x2, x3):
    """train.discriminator_loss as it was before --disc-fakes existed (frozen copy)."""
    B = len(x1)
    with torch.no_grad():
        mu, _, s = t.enc(torch.cat([x1, x3]))
        fake = t.dec(mu[:B], s[B:])
    logits = t.disc(torch.cat([x2, x3]), torch.cat([x3, fake])).float()
    target = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)])
    loss = F.cross_entropy(logits[:B], target[:B]) + F.cross_entropy(logits[B:], target[B:])
    return loss, (logits.argmax(1) == target).float().mean()


def pre_issue29_train_iteration(t):
    """train.train_iteration as it was before issue 29 (frozen copy): each batch drawn and gathered
    on its own, the discriminator's targets made in each call (in pre_flag_discriminator_loss)."""
    a, B = t.args, t.args.batch_size
    i1, i2 = t.sampler.pairs(B)
    rec, kl = train.reconstruction_step(t, t.batch(i1), t.batch(i2))
    gen_losses = []
    for _ in range(a.gen_steps):
        x1 = t.batch(t.sampler.anchors(B))
        x3 = t.batch(t.sampler.anchors(B))
        gen_losses.append(train.generator_step(t, x1, x3))
    gen = torch.stack(gen_losses).mean()
    for _ in range(a.disc_steps):
        x1 = t.batch(t.sampler.anchors(B))
        i2, i3 = t.sampler.pairs(B)
        d_loss, d_acc = train.discriminator_loss(t, x1, t.batch(i2), t.batch(i3))
        logged = torch.stack([rec, kl, gen, d_loss.detach(), d_acc]).tolist()
        stepped = logged[-1] < a.disc_gate
        if stepped:
            t.update(t.opt_disc, d_loss)
    return {**dict(zip(train.METRICS, logged)), "disc_stepped": int(stepped)}


def test_default_flags_train_bit_for_bit_as_before(monkeypatch):
    """Against frozen copies of the code before the flags and before issue 29: the updates, the
    iteration (4 iterations of 7 batches of 8 from 64 images: an epoch ends inside an iteration)
    and Adam's per-parameter default path."""
    new = make_trainer()
    m_new = [train.train_iteration(new) for _ in range(4)]
    monkeypatch.setattr(train, "reconstruction_step", pre_flag_reconstruction_step)
    monkeypatch.setattr(train, "generator_step", pre_flag_generator_step)
    monkeypatch.setattr(train, "discriminator_loss", pre_flag_discriminator_loss)
    monkeypatch.setattr(train, "train_iteration", pre_issue29_train_iteration)
    monkeypatch.setattr(train.Trainer, "adam_path", lambda self: {})
    old = make_trainer()
    assert old.opt_gen.param_groups[0]["foreach"] is None and new.opt_gen.param_groups[0]["foreach"]
    m_old = [train.train_iteration(old) for _ in range(4)]
    assert m_new == m_old and any(m["disc_stepped"] for m in m_new)
    for a, b in zip(new.nets(), old.nets()):
        assert same(snapshot(a), snapshot(b))
    assert torch.equal(new.noise.get_state(), old.noise.get_state())  # no extra noise drawn
    assert torch.equal(new.sampler.gen.get_state(), old.sampler.gen.get_state()) and new.sampler.pos == old.sampler.pos


def hand_kl(mu, logvar):
    """The reference's KL: summed over batch and code, divided by batch x pixels."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / (len(mu) * 28 * 28)


def test_kl_weight_scales_only_the_kl_term_of_reconstruction_and_generator():
    W = 40.0  # large enough that a dropped weight shows in the gradients
    t = make_trainer("--lr", "1e-30", "--kl-weight", str(W))
    x1, x2 = batches(t, 2)
    g = torch.Generator().set_state(t.noise.get_state())
    rec, kl = train.reconstruction_step(t, x1, x2)
    ours = grads(t.ae_params)
    zero(t.ae_params)
    mu1, lv1, s1 = t.encoder(x1)
    _, _, s2 = t.encoder(x2)
    z1 = mu1 + torch.exp(0.5 * lv1) * torch.randn(8, t.cfg.style_dim, generator=g)
    rec_ref = F.mse_loss(t.decoder(z1, s1), x1) + F.mse_loss(t.decoder(z1, s2), x1)
    (rec_ref + W * hand_kl(mu1, lv1)).backward()
    torch.testing.assert_close(rec, rec_ref.detach())
    torch.testing.assert_close(kl, hand_kl(mu1, lv1).detach())  # the logged KL stays unweighted
    assert_all_close(ours, grads(t.ae_params), atol=1e-5)

    t = make_trainer("--lr", "1e-30", "--kl-weight", str(W))  # a fresh state, as the reference-form tests
    x1, x3 = batches(t, 2)
    g = torch.Generator().set_state(t.noise.get_state())
    gen = train.generator_step(t, x1, x3)
    ours = grads(t.ae_params)
    zero(t.ae_params)
    mu1, lv1, _ = t.encoder(x1)
    _, _, s3 = t.encoder(x3)
    z1 = mu1 + torch.exp(0.5 * lv1) * torch.randn(8, t.cfg.style_dim, generator=g)
    prior = torch.randn(8, t.cfg.style_dim, generator=g)
    real = torch.ones(8, dtype=torch.long)
    gen_ref = (F.cross_entropy(t.discriminator(x3, t.decoder(z1, s3)), real)
               + F.cross_entropy(t.discriminator(x3, t.decoder(prior, s3)), real))
    (gen_ref + W * hand_kl(mu1, lv1)).backward()
    torch.testing.assert_close(gen, gen_ref.detach())
    assert_all_close(ours, grads(t.ae_params), atol=1e-5)

    # the discriminator update has no KL term: bit-for-bit the default's
    x2 = batches(t, 1)[0]
    d = make_trainer("--lr", "1e-30")
    d.load_state_dict({**t.state_dict(), "path": "x"})
    assert [v.item() for v in train.discriminator_loss(t, x1, x2, x3)] == \
        [v.item() for v in train.discriminator_loss(d, x1, x2, x3)]


def test_disc_fakes_prior_matches_hand_written_form():
    t = make_trainer("--lr", "1e-30", "--disc-fakes", "posterior+prior")
    x1, x2, x3 = batches(t, 3)
    g = torch.Generator().set_state(t.noise.get_state())
    loss, acc = train.discriminator_loss(t, x1, x2, x3)
    t.update(t.opt_disc, loss)
    dparams = list(t.discriminator.parameters())
    ours = grads(dparams)
    assert all(p.grad is None for p in t.ae_params)  # the fakes are constants of this update

    zero(dparams)
    eps = torch.randn(8, t.cfg.style_dim, generator=g)
    assert torch.equal(g.get_state(), t.noise.get_state())  # it drew exactly B prior codes from the trainer's noise
    with torch.no_grad():
        mu1, _, _ = t.encoder(x1)
        _, _, s3 = t.encoder(x3)
        post, prior = t.decoder(mu1, s3), t.decoder(eps, s3)
    ones, zeros = torch.ones(8, dtype=torch.long), torch.zeros(8, dtype=torch.long)
    out = [t.discriminator(x2, x3), t.discriminator(x3, post), t.discriminator(x3, prior)]
    loss_ref = F.cross_entropy(out[0], ones) + F.cross_entropy(out[1], zeros) + F.cross_entropy(out[2], zeros)
    loss_ref.backward()
    acc_ref = (torch.cat(out).argmax(1) == torch.cat([ones, zeros, zeros])).float().mean()  # over all 3B pairs
    torch.testing.assert_close(loss, loss_ref.detach())
    assert acc.item() == acc_ref.item()
    assert_all_close(ours, grads(dparams), atol=1e-5)  # float rounding of one layout against the other


def test_disc_fakes_changes_only_the_discriminator_update():
    """The discriminator steps last in an iteration: with posterior+prior the reconstruction and
    generator updates (and so the encoder and decoder) are bit-for-bit the default's."""
    plain, prior = make_trainer(), make_trainer("--disc-fakes", "posterior+prior")
    m1, m2 = train.train_iteration(plain), train.train_iteration(prior)
    assert m1["disc_stepped"] and m2["disc_stepped"]
    assert [m1[k] for k in ("recon_loss", "kl", "gen_loss")] == [m2[k] for k in ("recon_loss", "kl", "gen_loss")]
    for a, b in zip(plain.nets()[:2], prior.nets()[:2]):
        assert same(snapshot(a), snapshot(b))
    assert not same(snapshot(plain.discriminator), snapshot(prior.discriminator))


def test_resume_of_a_checkpoint_older_than_the_flags_uses_their_defaults():
    parser = train.get_args_parser()
    saved = vars(parser.parse_args([]))
    del saved["kl_weight"], saved["disc_fakes"]
    ckpt = {"args": saved, "path": "runs/a/checkpoints/last.pt"}
    merged = train.merge_resume_args(parser.parse_args(["--resume", "x"]), ckpt)
    train.fill_recipe_defaults(merged)  # as main() does next
    assert merged.kl_weight == 1.0 and merged.disc_fakes == "posterior"
    with pytest.raises(train.CheckpointError, match="--kl-weight 0.5 differs"):
        train.merge_resume_args(parser.parse_args(["--resume", "x", "--kl-weight", "0.5"]), ckpt)
