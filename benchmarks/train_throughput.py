"""Training throughput of train.py's real iteration, per dataset config, on one device.

For each config it times `train.train_iteration` (the function train.py runs) after a
warm-up, as the median of several timed windows, and reports iterations/s, images/s
(batch size x iterations/s, so dataset size / images/s = seconds per epoch) and peak memory
(RSS; allocated GPU memory on CUDA). Each measurement runs in its own subprocess, so peak
memory is per configuration. With --baseline it also times the reference implementation's
form of the same iteration (benchmarks/reference_style.py: per-item Python pairing in a
DataLoader, separate passes, one backward per loss term, running-statistics instance norm).

    python benchmarks/train_throughput.py --data-root ../shared/data --baseline --json results/throughput.json

With --flops it also counts the floating-point operations of an iteration (torch's FlopCounterMode:
convolutions and matrix products, forward and backward), the rate they run at, and, for scale, the
rate of one large fp32 matrix product on the same device and threads: how far the iteration is from
what this machine's matrix units can do.

Beside it/s it counts, over --count-iterations iterations, the aten operators an iteration
dispatches (all, and those that are not views: on a GPU each non-view one is roughly a kernel
launch) and its host syncs: the points where the host waits for the device's results on a GPU
(values read on the host by .item()/.tolist()/bool(), copies to the CPU, tensors made from Python
data, which become pageable host-to-device copies, and operators whose output size depends on values). The counts are those of the device it runs on: the
CPU's show what a GPU iteration would launch and wait for, except that on CUDA Adam takes its fused
path (one kernel per step where the CPU's foreach path dispatches several).
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import train  # noqa: E402
from benchmarks import reference_style as ref  # noqa: E402
from data_loader import ImageSet, load_dataset  # noqa: E402
from networks import CONFIGS, get_config  # noqa: E402
from utils import HelpFormatter, UserError, pick_device  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(description="Benchmark training iterations per second.", formatter_class=HelpFormatter)
    p.add_argument("--datasets", nargs="+", default=sorted(CONFIGS), choices=sorted(CONFIGS))
    p.add_argument("--data-root", default=None,
                   help="use the real training set where it loads from here (else random images of the config's size)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=False,
                   help="also time the reference implementation's form of the iteration")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--windows", type=int, default=5, help="timed windows; the median is reported")
    p.add_argument("--window-seconds", type=float, default=1.0, help="length of each timed window")
    p.add_argument("--repeats", type=int, default=1,
                   help="processes per configuration, alternating ours/reference; the median process is reported")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--flops", action=argparse.BooleanOptionalAction, default=False,
                   help="also count GFLOP per iteration and compare the achieved rate with a large matrix product's")
    p.add_argument("--count-iterations", type=int, default=10,
                   help="iterations over which dispatched operators and host syncs are counted (0: none)")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    p.add_argument("--single", nargs=2, metavar=("DATASET", "IMPL"), help=argparse.SUPPRESS)
    return p


def training_set(name, data_root, n=4096):
    """The real training set where it loads, else random images of the config's size in 10 classes."""
    if data_root:
        try:
            return load_dataset(name, data_root, "train"), "real"
        except UserError:
            pass
    cfg = CONFIGS[name]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, cfg.channels, cfg.image_size, cfg.image_size), generator=g, dtype=torch.uint8)
    return ImageSet(images, torch.arange(n) % 10, 10), "synthetic"


def synchronizer(device):
    """Waits for the device's queued work (CUDA and MPS run asynchronously; the CPU needs no wait)."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def time_windows(step, device, warmup, windows, seconds):
    """Median iterations/s over `windows` windows of at least `seconds` each (synchronised on CUDA and MPS)."""
    sync = synchronizer(device)
    for _ in range(warmup):
        step()
    sync()
    rates = []
    for _ in range(windows):
        n, t0 = 0, time.perf_counter()
        while True:
            step()
            n += 1
            sync()
            if time.perf_counter() - t0 >= seconds:
                break
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates), rates


def count_flops(step, n):
    """Mean floating-point operations of one call of `step` over n calls (the gate varies the work)."""
    with FlopCounterMode(display=False) as counter:
        for _ in range(n):
            step()
    return counter.get_total_flops() / n


# Operators whose output size depends on tensor values: on a GPU the host waits for the device
# to learn it.
DATA_DEPENDENT = {"aten.nonzero.default", "aten.masked_select.default", "aten.unique_dim.default",
                  "aten._unique2.default", "aten.repeat_interleave.Tensor"}


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched inside it, views apart, and the host syncs (see the module
    docstring). `host` holds tensors that live on the host on every device (Adam's step counts on
    its foreach path): reading them costs no sync."""

    def __init__(self, host=()):
        super().__init__()
        self.host = {id(x) for x in host}
        self.ops, self.views, self.syncs = 0, 0, {}
        self.in_tolist = False

    def sync(self, what):
        self.syncs[what] = self.syncs.get(what, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        self.views += func.is_view
        name = str(func)
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if self.in_tolist:
            pass  # the copy a tolist() makes on a GPU: counted once, as the tolist()
        elif name == "aten._local_scalar_dense.default" and id(first) not in self.host:
            self.sync("item")
        elif name == "aten.lift_fresh.default" and first.dim() > 0:
            # On a GPU it reaches the device by a pageable copy, which waits for the stream. A 0-d
            # one (Adam's step increment) stays on the host: kernels take it as an argument.
            self.sync("tensor from Python data")
        elif name in ("aten._to_copy.default", "aten.copy_.default") and first is not None:
            dst = kwargs.get("device") if name == "aten._to_copy.default" else first.device
            src = first.device if name == "aten._to_copy.default" else args[1].device
            if src.type != "cpu" and dst is not None and torch.device(dst).type == "cpu":
                self.sync("copy to host")
        elif name in DATA_DEPENDENT or (name == "aten.index.Tensor"
                                        and any(i is not None and i.dtype == torch.bool for i in args[1])):
            self.sync("data-dependent size")
        return func(*args, **kwargs)

    def __enter__(self):
        # A CPU tensor's tolist() dispatches nothing, so it is counted here.
        self.tolist, counter = torch.Tensor.tolist, self

        def tolist(x):
            if id(x) not in counter.host:
                counter.sync("tolist")
            counter.in_tolist = True
            try:
                return counter.tolist(x)
            finally:
                counter.in_tolist = False

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self.tolist
        return super().__exit__(*exc)


def optimizer_host_tensors(optimizers):
    """The step counts Adam keeps on the host (its foreach path on every device)."""
    return [s["step"] for opt in optimizers for s in opt.state.values()
            if isinstance(s.get("step"), torch.Tensor) and s["step"].device.type == "cpu"]


def count_ops(step, n, host=()):
    """Per call of `step`, the mean over n calls: (dispatched operators, non-view ones, host syncs by kind)."""
    with OpCounter(host) as c:
        for _ in range(n):
            step()
    return c.ops / n, (c.ops - c.views) / n, {k: v / n for k, v in sorted(c.syncs.items())}


def matmul_gflops(device, size=2048, reps=10):
    """GFLOP/s of a size x size fp32 matrix product: the scale against which the iteration's rate is read."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    sync = synchronizer(device)
    for _ in range(2):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * size ** 3 * reps / (time.perf_counter() - t0) / 1e9


def measure(name, impl, args):
    """One configuration in this process: returns a dict of results."""
    device = pick_device(args.device)
    data, source = training_set(name, args.data_root)
    targs = train.get_args_parser().parse_args(
        ["--dataset", name, "--batch-size", str(args.batch_size), "--device", args.device]
        + (["--compile"] if args.compile else []) + (["--amp"] if args.amp else []))
    cfg = get_config(name)
    train.set_numerics(targs)  # the precision and determinism switches train.py sets: full fp32 by default
    torch.manual_seed(0)
    t = train.Trainer(cfg, targs, data, device)
    stepped = []
    if impl == "ours":
        opts = [getattr(t, name) for name in t.OPTIMIZERS]

        def step():
            stepped.append(train.train_iteration(t)["disc_stepped"])
    else:
        nets = [ref.with_running_stat_norms(n) for n in t.nets()]
        adam = dict(lr=targs.lr, betas=(targs.beta1, targs.beta2))
        ae = list(nets[0].parameters()) + list(nets[1].parameters())
        opts = (torch.optim.Adam(ae, **adam), torch.optim.Adam(ae, **adam), torch.optim.Adam(nets[2].parameters(), **adam))
        stream = ref.batches(ref.PairedImages(data.images, data.labels), args.batch_size)

        def step():
            ref.reference_iteration(*nets, opts, stream, cfg, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    its, rates = time_windows(step, device, args.warmup, args.windows, args.window_seconds)
    out = {"dataset": name, "impl": impl, "data": source, "device": device.type, "batch_size": args.batch_size,
           "it_per_s": round(its, 3), "images_per_s": round(its * args.batch_size, 1),
           "window_it_per_s": [round(r, 3) for r in rates],
           "epoch_minutes": round(len(data) / args.batch_size / its / 60, 2),
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "threads": torch.get_num_threads(), "compile": args.compile, "amp": args.amp}
    if device.type == "cuda":
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    if args.count_iterations > 0:  # the states exist after the warm-up: their host step counts are known
        del stepped[:]
        ops, non_view, syncs = count_ops(step, args.count_iterations, optimizer_host_tensors(opts))
        out.update(ops_per_it=round(ops, 1), non_view_ops_per_it=round(non_view, 1),
                   syncs_per_it=round(sum(syncs.values()), 2), syncs_by_kind=syncs,
                   count_iterations=args.count_iterations)
        if stepped:
            out["disc_steps_counted"] = sum(stepped)
    if args.flops:
        gflop = count_flops(step, 4) / 1e9
        out.update(gflop_per_it=round(gflop, 3), achieved_gflops=round(gflop * its, 1),
                   matmul_gflops=round(matmul_gflops(device), 1))
    return out


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": str(torch.__version__), "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_single(name, impl, args):
    """One configuration measured in a fresh subprocess (so that peak memory is its own)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--single", name, impl, "--device", args.device,
           "--batch-size", str(args.batch_size), "--warmup", str(args.warmup),
           "--windows", str(args.windows), "--window-seconds", str(args.window_seconds),
           "--count-iterations", str(args.count_iterations)]
    cmd += ["--flops"] if args.flops else []
    cmd += (["--data-root", args.data_root] if args.data_root else [])
    cmd += (["--compile"] if args.compile else []) + (["--amp"] if args.amp else [])
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise UserError(f"benchmark of {name}/{impl} failed: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def summary_line(r):
    """One printed line of a result row."""
    line = (f"{r['dataset']:8s} {r['impl']:9s} {r['it_per_s']:7.2f} it/s  {r['images_per_s']:8.1f} img/s  "
            f"{r['epoch_minutes']:6.2f} min/epoch  peak RSS {r['peak_rss_mib']:.0f} MiB")
    if "ops_per_it" in r:
        line += (f"  {r['ops_per_it']:.0f} ops/it ({r['non_view_ops_per_it']:.0f} non-view), "
                 f"{r['syncs_per_it']:g} syncs/it")
    if "peak_gpu_mib" in r:
        line += f"  GPU {r['peak_gpu_mib']:.0f} MiB"
    if "gflop_per_it" in r:
        line += (f"  {r['gflop_per_it']:.2f} GFLOP/it = {r['achieved_gflops']:.0f} GFLOP/s "
                 f"({100 * r['achieved_gflops'] / r['matmul_gflops']:.0f}% of a 2048^3 matmul's {r['matmul_gflops']:.0f})")
    if "process_it_per_s" in r:
        line += f"  (processes: {', '.join(f'{x:.2f}' for x in r['process_it_per_s'])})"
    return line


def main(args):
    if args.single:
        print(json.dumps(measure(*args.single, args)))
        return 0
    if args.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {args.repeats}")
    rows = []
    for name in args.datasets:
        impls = ["ours"] + (["reference"] if args.baseline else [])
        runs = {impl: [] for impl in impls}
        for _ in range(args.repeats):  # alternating, so that a noisy stretch of time hits both forms alike
            for impl in impls:
                runs[impl].append(run_single(name, impl, args))
        for impl in impls:
            r = sorted(runs[impl], key=lambda r: r["it_per_s"])[(len(runs[impl]) - 1) // 2]  # the median process
            if args.repeats > 1:
                r["process_it_per_s"] = [x["it_per_s"] for x in runs[impl]]
            rows.append(r)
            print(summary_line(r), flush=True)
    by = {(r["dataset"], r["impl"]): r for r in rows}
    for name in args.datasets:
        if (name, "reference") in by:
            print(f"{name}: speed-up over the reference form x{by[name, 'ours']['it_per_s'] / by[name, 'reference']['it_per_s']:.2f}")
    result = {"machine": machine(), "results": rows}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    from utils import run_cli
    sys.exit(run_cli(main, get_args_parser()))
