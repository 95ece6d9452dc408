"""The throughput benchmark runs (its numbers are recorded by running it, not by tests)."""
import json

import pytest
import torch

import train
from benchmarks import reference_style as ref
from benchmarks import train_throughput as bench
from data_loader import ImageSet
from networks import ModelConfig


def test_benchmark_measures_both_forms_on_synthetic_data(monkeypatch):
    """Each form times its own iteration: train.train_iteration for ours, the reference form's for the baseline."""
    calls = {"ours": 0, "reference": 0}

    def spy(impl, real):
        def wrapped(*a, **kw):
            calls[impl] += 1
            return real(*a, **kw)
        return wrapped

    monkeypatch.setattr(train, "train_iteration", spy("ours", train.train_iteration))
    monkeypatch.setattr(ref, "reference_iteration", spy("reference", ref.reference_iteration))
    args = bench.get_args_parser().parse_args(["--warmup", "1", "--windows", "2", "--window-seconds", "0.01",
                                               "--batch-size", "8", "--device", "cpu"])
    for impl in ("ours", "reference"):
        before = dict(calls)
        r = bench.measure("mnist", impl, args)
        assert r["data"] == "synthetic" and r["impl"] == impl
        assert r["it_per_s"] > 0 and len(r["window_it_per_s"]) == 2
        assert r["images_per_s"] == pytest.approx(r["it_per_s"] * 8, abs=0.1) and r["peak_rss_mib"] > 0
        other = "reference" if impl == "ours" else "ours"
        assert calls[impl] - before[impl] >= 3 and calls[other] == before[other]  # warm-up + 2 windows


# FLOPs as torch's FlopCounterMode counts them: matrix products and convolutions only (2 per
# multiply-add), forward and backward. With E, D, C one image's forward FLOPs through encoder,
# decoder and discriminator, and e1, c1 those of their first convolution (whose input, an image,
# needs no gradient, so its backward computes the weight gradient only), one iteration of batch B
# whose discriminator steps counts B x (20 E + 19 D + 14 C - 6 e1 - 2 c1):
#   reconstruction   encoder and decoder on 2B images, forward + backward (2 x forward, less e1):
#                    2B (E + D) + 2B (2 E - e1) + 2B (2 D)                = B (6 E + 6 D - 2 e1)
#   generator (x2)   the same, plus the discriminator on 2B pairs, forward and, with inputs= the
#                    autoencoder's parameters, a backward to its input only: + 2B C + 2B C
#                                                                         = B (6 E + 6 D + 4 C - 2 e1)
#   discriminator    no-grad encoder on 2B, decoder on B; discriminator on 2B pairs, forward and
#                    backward to its weights only: 2B E + B D + 2B C + 2B (2 C - c1)
#                                                                         = B (2 E + D + 6 C - 2 c1)
# Dropping inputs= adds D's weight gradients in the generator updates (+4B C); dropping the
# discriminator update's no_grad adds a backward through decoder and encoder.

def test_flops_are_counted_and_reported_as_a_rate():
    """MNIST, batch 8: E = 1,490,976 (convolutions 135,200 + 921,600 + 409,600, the three linear heads
    24,576), D = 1,230,848 (linear 16,384, transposed convolutions 524,288 + 589,824 + 100,352),
    C = 5,867,648 (convolutions 540,800 + 3,686,400 + 1,638,400, linear 2,048); e1 = 135,200 and
    c1 = 540,800, so 8 x 133,459,904 = 1.0677 GFLOP per iteration (the discriminator steps in every
    counted iteration: a fresh discriminator is right on about half the pairs, below the 0.8 gate)."""
    args = bench.get_args_parser().parse_args(["--warmup", "1", "--windows", "1", "--window-seconds", "0.01",
                                               "--batch-size", "8", "--device", "cpu", "--flops"])
    r = bench.measure("mnist", "ours", args)
    assert r["gflop_per_it"] == 1.068 and r["matmul_gflops"] > 0
    assert r["achieved_gflops"] == pytest.approx(r["gflop_per_it"] * r["it_per_s"], rel=0.05, abs=0.1)


# A config small enough that every term above is a short sum: a 7 x 7 image, one 5x5 stride-2
# convolution (no padding, 7 -> 2) of width 2 in encoder and discriminator, codes of size 1, and
# a decoder of one 4x4 stride-2 transposed convolution (2 -> 7, output padding 1).
TINY = ModelConfig(image_size=7, channels=1, style_dim=1, class_dim=1, enc_channels=(2,), enc_padding=0,
                   dec_channels=(2,), dec_padding=(0,), dec_output_padding=(1,), disc_channels=(2,))


def test_our_iteration_does_no_more_arithmetic_than_the_reference_form():
    """Regrouping saves work, it never adds any: with the discriminator stepping in both, our
    iteration counts exactly the FLOPs above, fewer than the reference form's (it skips D's weight
    gradients in the generator updates, which the reference computes and throws away)."""
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (16, 1, 7, 7), generator=g, dtype=torch.uint8), torch.arange(16) % 4, 4)
    targs = train.get_args_parser().parse_args(["--batch-size", "2", "--device", "cpu"])
    targs.disc_gate = 2.0  # accuracy is always below: D steps every iteration
    t = train.Trainer(TINY, targs, data, torch.device("cpu"))
    # One image's forward FLOPs: E = conv 2*2*1*25*4 = 400 (= e1) + three 8 -> 1 linear heads 3*2*8 = 48;
    # D = two 1 -> 4 linears 2*2*4 = 16 + transposed conv 2*(2*1*16)*4 = 256; C = conv 2*2*2*25*4 = 800
    # (= c1) + an 8 -> 2 linear 32.
    x = torch.rand(1, 1, 7, 7)
    mu, _, s = t.encoder(x)
    assert [bench.count_flops(f, 1) for f in (lambda: t.encoder(x), lambda: t.decoder(mu, s),
                                              lambda: t.discriminator(x, x))] == [448, 272, 832]
    nets = [ref.with_running_stat_norms(n) for n in t.nets()]
    ae = list(nets[0].parameters()) + list(nets[1].parameters())
    opts = (torch.optim.Adam(ae), torch.optim.Adam(ae), torch.optim.Adam(nets[2].parameters()))
    stream = ref.batches(ref.PairedImages(data.images, data.labels), 2)
    ours = bench.count_flops(lambda: train.train_iteration(t), 1)
    theirs = bench.count_flops(lambda: ref.reference_iteration(*nets, opts, stream, TINY, gate=2.0), 1)
    assert ours == 2 * (20 * 448 + 19 * 272 + 14 * 832 - 6 * 400 - 2 * 800) == 43552
    assert ours < theirs


def test_repeats_report_the_median_process(tmp_path, capsys):
    out = tmp_path / "b.json"
    args = bench.get_args_parser().parse_args(["--datasets", "mnist", "--warmup", "1", "--windows", "1",
                                               "--window-seconds", "0.01", "--batch-size", "8", "--device", "cpu",
                                               "--repeats", "3", "--json", str(out)])
    assert bench.main(args) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert len(r["process_it_per_s"]) == 3 and r["it_per_s"] == sorted(r["process_it_per_s"])[1]
    assert "processes:" in capsys.readouterr().out


def test_op_counter_counts_views_and_each_kind_of_host_sync():
    """Each read of a device value on the host is one sync; reading a host-resident tensor is none."""
    x, host = torch.arange(4.0), torch.ones(())
    with bench.OpCounter(host=[host]) as c:
        x.sum().item()                    # sum, _local_scalar_dense: 1 sync
        bool(x[0] > 0)                    # select (a view), gt, _local_scalar_dense: 1 sync
        x.tolist()                        # dispatches nothing on the CPU: 1 sync
        torch.tensor([1.0, 2.0])          # lift_fresh: on a GPU a pageable host-to-device copy
        torch.tensor(1.0)                 # a 0-d one stays on the host (kernels take it as an argument)
        x[x > 1]                          # gt, index with a boolean mask: its size needs the values
        host.item()                       # Adam's host step count: no sync
    assert c.syncs == {"item": 2, "tolist": 1, "tensor from Python data": 1, "data-dependent size": 1}
    assert c.views >= 1 and c.ops - c.views >= 7
    assert torch.Tensor.tolist is c.tolist  # put back on exit


def test_benchmark_reports_ops_and_syncs_per_iteration():
    """The default iteration: at most 1,100 dispatched operators (issue 29's goal) and one host read,
    the metrics' tolist() whose accuracy the gate needs."""
    args = bench.get_args_parser().parse_args(["--warmup", "1", "--windows", "1", "--window-seconds", "0.01",
                                               "--batch-size", "8", "--device", "cpu", "--count-iterations", "2"])
    r = bench.measure("mnist", "ours", args)
    assert r["count_iterations"] == 2 and r["disc_steps_counted"] == 2  # the most work: D steps in both
    assert 1100 >= r["ops_per_it"] > r["non_view_ops_per_it"] > 0
    assert r["syncs_by_kind"] == {"tolist": 1.0} and r["syncs_per_it"] == 1
    assert "ops/it" in bench.summary_line(r)


def test_the_benchmark_sets_the_numerics_train_py_sets(monkeypatch):
    """A process that had TF32 on measures full fp32, as `python train.py` would train (no --tf32)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    args = bench.get_args_parser().parse_args(["--warmup", "1", "--windows", "1", "--window-seconds", "0.01",
                                               "--batch-size", "8", "--device", "cpu"])
    bench.measure("mnist", "ours", args)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
