"""The CUDA, MPS and NCCL paths, checked on the CPU: device states are simulated (generator states of
the size a CUDA or MPS generator writes, monkeypatched torch.cuda functions, the meta device, and two
gloo processes standing in for NCCL ones)."""
import gc
import os
import socket
import subprocess
import sys
import weakref

import pytest
import torch

import distributed
import train
import utils
from benchmarks import reference_style as ref
from benchmarks import train_throughput as bench
from conftest import ROOT, make_fake_mnist
from networks import Decoder, Discriminator, Encoder, get_config

STATE_BYTES = {"cuda": 16, "mps": 44}  # what get_state() of a CUDA / MPS generator returns (CPU: 5056)


def run(argv):
    return train.main(train.get_args_parser().parse_args(argv + ["--no-progress"]))


def load(path):
    return torch.load(path, weights_only=True)


# ---------------------------------------------------------------- 1. resume on another device type

@pytest.fixture(scope="module")
def cpu_checkpoint(tmp_path_factory):
    base = tmp_path_factory.mktemp("cpu_run")
    data = make_fake_mnist(base / "data")
    run(["--data-root", data, "--run-dir", str(base / "run"), "--max-steps", "2", "--batch-size", "16"])
    return data, base / "run" / "checkpoints" / "last.pt"


def as_if_written_on(ckpt, device_type, recorded=True):
    """The checkpoint as a run on `device_type` would have written it: its generators' states have
    that device's size (the bytes do not matter: they cannot load on the CPU either way)."""
    state = torch.zeros(STATE_BYTES[device_type], dtype=torch.uint8)
    ckpt = {**ckpt, "sampler": {**ckpt["sampler"], "gen": state}, "noise": state.clone()}
    if recorded:
        ckpt["stream_device"] = device_type
    else:  # a checkpoint from before the device type was recorded
        ckpt.pop("stream_device", None)
    return ckpt


@pytest.mark.parametrize("device_type,recorded", [("cuda", True), ("mps", False)])
def test_resume_from_another_device_type_reseeds_the_streams_and_says_so_once(
        cpu_checkpoint, tmp_path, device_type, recorded):
    data, path = cpu_checkpoint
    foreign = tmp_path / "foreign.pt"
    torch.save(as_if_written_on(load(path), device_type, recorded), foreign)
    for run_dir in ("a", "b"):
        assert run(["--resume", str(foreign), "--run-dir", str(tmp_path / run_dir), "--max-steps", "4"]) == 0
    with open(tmp_path / "a" / "log.txt") as f:
        log = f.read()
    assert log.count("re-seeded from (seed, rank, step 2)") == 1
    assert (device_type if recorded else "another device type") in log
    a, b = load(tmp_path / "a" / "checkpoints" / "last.pt"), load(tmp_path / "b" / "checkpoints" / "last.pt")
    assert a["step"] == 4 and a["stream_device"] == "cpu"
    for name in ("encoder", "noise"):  # the re-seeded streams are deterministic
        assert _same(a[name], b[name]), name


def test_resume_on_the_same_device_type_does_not_reseed(cpu_checkpoint, tmp_path):
    _, path = cpu_checkpoint
    assert load(path)["stream_device"] == "cpu"
    assert run(["--resume", str(path), "--run-dir", str(tmp_path / "r"), "--max-steps", "3"]) == 0
    with open(tmp_path / "r" / "log.txt") as f:
        assert "re-seeded" not in f.read()


def _same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return torch.equal(a, b)


# ---------------------------------------------------------------- 2. resume with fewer GPUs

def test_cuda_rng_states_of_more_gpus_than_visible_restore_those_that_exist(monkeypatch):
    """A 2-GPU run's checkpoint holds two CUDA RNG states; resumed with one GPU visible, the one is restored."""
    restored = []

    def set_rng_state(state, device="cuda"):
        if device >= torch.cuda.device_count():
            raise IndexError(f"no CUDA device {device}")
        restored.append((device, state))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)  # what set_rng_state_all calls
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.zeros(16, dtype=torch.uint8)] * 2)
    state = utils.rng_state()
    cuda = [torch.full((16,), i, dtype=torch.uint8) for i in range(2)]
    utils.set_rng_state({**state, "cuda": cuda})
    assert len(restored) == 1 and restored[0][0] == 0 and torch.equal(restored[0][1], cuda[0])


# ---------------------------------------------------------------- 3. the benchmark's baseline off the CPU

def test_running_statistics_norms_are_made_on_the_networks_device():
    cfg = get_config("mnist")
    for net in (Encoder(cfg), Decoder(cfg), Discriminator(cfg)):
        net = ref.with_running_stat_norms(net.to("meta"))  # "meta" stands for a GPU: anything but the CPU
        assert any(isinstance(m, torch.nn.InstanceNorm2d) for m in net.modules())
        assert {t.device.type for t in [*net.parameters(), *net.buffers()]} == {"meta"}


# ---------------------------------------------------------------- 4. channels-last is opt-in

def test_channels_last_is_off_unless_asked_for():
    args = train.get_args_parser().parse_args([])
    assert args.channels_last is False
    assert "opt-in" in train.get_args_parser().format_help()
    args.channels_last = None  # the value in checkpoints of runs from before it was opt-in
    cfg = get_config("mnist")
    t = train.Trainer(cfg, args, _tiny_set(), torch.device("cpu"))
    assert not t.channels_last


def _tiny_set(n=64):
    from data_loader import ImageSet
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8), torch.arange(n) % 4, 4)


# ---------------------------------------------------------------- 5, 6. two gloo processes

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """tests/device_worker.py as ranks 0 and 1 of a gloo group: a first start (rank 0 prepares the
    data) whose weights go NaN on rank 1 only, just before the checkpoint of step 2."""
    base = tmp_path_factory.mktemp("gloo")
    data = make_fake_mnist(base / "data")
    env = dict(os.environ, DISENTANGLE_NO_DOWNLOAD="1", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "device_worker.py"), str(base), data],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=90)
        except subprocess.TimeoutExpired:  # a rank left waiting in a collective: what item 5 is about
            p.kill()
            out, err = p.communicate()
            err += "\n<timed out>"
        results.append((p.returncode, err))
    return base, results


def test_nonfinite_weights_stop_every_rank_promptly_with_the_same_message(two_processes):
    base, results = two_processes
    codes = [c for c, _ in results]
    errors = [[line for line in err.splitlines() if line.startswith("error:")] for _, err in results]
    assert codes == [3, 3], results
    assert errors[0] == errors[1] and len(errors[0]) == 1, results
    assert "parameters became NaN/inf by step 2" in errors[0][0]
    ck = load(base / "run" / "checkpoints" / "last.pt")  # the last good checkpoint: step 1
    assert ck["step"] == 1


def test_rank_zero_prepares_the_data_before_the_others_load_it(two_processes):
    base, _ = two_processes
    with open(base / "loads.txt") as f:
        events = f.read().split()
    assert events == ["rank0-start", "rank0-done", "rank1-start"]


# ---------------------------------------------------------------- 7. the host copy of the training set

def test_the_host_copy_of_the_training_set_is_freed_once_on_the_device(monkeypatch, tmp_path):
    data = make_fake_mnist(tmp_path / "data")
    real_load, refs, alive = train.load_dataset, [], []

    def load_dataset(name, root, split="train", **kw):
        s = real_load(name, root, split, **kw)
        if split == "train":
            refs.append(weakref.ref(s.images))
        return s

    class DeviceCopyTrainer(train.Trainer):  # .to(device) copies off the CPU; here a clone stands in
        def __init__(self, cfg, args, train_set, device, world=None):
            super().__init__(cfg, args, train_set, device, world)
            self.images = train_set.images.clone()

    real_iteration = train.train_iteration

    def iteration(t):
        gc.collect()
        alive.append(refs[0]() is not None)
        return real_iteration(t)

    monkeypatch.setattr(train, "load_dataset", load_dataset)
    monkeypatch.setattr(train, "Trainer", DeviceCopyTrainer)
    monkeypatch.setattr(train, "train_iteration", iteration)
    run(["--data-root", data, "--run-dir", str(tmp_path / "r"), "--max-steps", "2", "--batch-size", "16"])
    assert alive == [False, False]


# ---------------------------------------------------------------- 9. smaller ones

def test_benchmark_timer_synchronises_on_mps(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("mps"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("cuda"))
    for kind in ("mps", "cuda", "cpu"):
        bench.synchronizer(torch.device(kind))()
    assert calls == ["mps", "cuda"]


@pytest.mark.parametrize("capability,warns", [((7, 5), True), ((8, 0), False)])
def test_amp_on_a_gpu_without_native_bf16_warns(monkeypatch, capability, warns):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    args = train.get_args_parser().parse_args(["--amp"])
    msg = train.amp_warning(args, torch.device("cuda", 0))
    assert (msg is not None) == warns
    if warns:
        assert "7.5 < 8.0" in msg
    assert train.amp_warning(train.get_args_parser().parse_args([]), torch.device("cuda", 0)) is None


@pytest.mark.parametrize("avx512_bf16,amx,warns", [(False, False, True), (True, False, False), (False, True, False)])
def test_amp_on_a_cpu_without_bf16_instructions_warns(monkeypatch, avx512_bf16, amx, warns):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    args = train.get_args_parser().parse_args(["--amp"])
    msg = train.amp_warning(args, torch.device("cpu"))
    assert (msg is not None) == warns
    if warns:
        assert "AVX512-BF16" in msg
    assert train.amp_warning(train.get_args_parser().parse_args([]), torch.device("cpu")) is None


def test_amp_on_a_cpu_whose_torch_has_no_bf16_probes_does_not_warn(monkeypatch):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    assert train.amp_warning(train.get_args_parser().parse_args(["--amp"]), torch.device("cpu")) is None


def test_average_makes_one_host_read_for_the_values_and_the_stop_flag(monkeypatch):
    """Under torchrun the iteration's losses, accuracy and stop flag come back in one device-to-host read."""
    world = distributed.World(rank=0, size=2)
    world.share_stop({"signal": 15})
    # The other rank sends the same values and no stop request: the sum is values x 2, flag 1.
    monkeypatch.setattr(distributed.dist, "all_reduce",
                        lambda buf, op: buf.copy_(torch.cat([buf[:-1] * 2, buf[-1:]])))
    reads = []
    for name in ("tolist", "item", "__bool__", "__float__", "numpy"):
        def counted(self, *a, _real=getattr(torch.Tensor, name), _name=name):
            reads.append(_name)
            return _real(self, *a)
        monkeypatch.setattr(torch.Tensor, name, counted)
    values = world.average(torch.tensor([0.5, 0.25, 0.75]))
    monkeypatch.undo()
    assert values == [0.5, 0.25, 0.75] and world.stop_agreed
    assert reads == ["tolist"]


def test_generator_update_computes_no_discriminator_weight_gradients_when_compiled():
    """backward(inputs=encoder/decoder weights) skips D's weight gradients in eager mode only; a compiled
    D's backward is one function computing every gradient it was traced with, unless D's weights are
    constants (frozen) in the generator update. Traced here with AOT autograd and the eager backend."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    graphs = []

    def backward_compiler(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=lambda gm, ex: make_boxed_func(gm.forward), bw_compiler=backward_compiler)
    args = train.get_args_parser().parse_args(["--batch-size", "8"])
    t = train.Trainer(get_config("mnist"), args, _tiny_set(), torch.device("cpu"))
    t.disc_local = torch.compile(t.discriminator, backend=backend)  # what --compile gives the generator update
    x1, x3 = t.batch(t.sampler.anchors(8)), t.batch(t.sampler.anchors(8))
    train.generator_step(t, x1, x3)
    convs = [n for gm in graphs for n in gm.graph.nodes if "convolution_backward" in str(n.target)]
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in t.discriminator.modules())
    assert len(convs) == n_convs > 0
    assert [n.args[-1][1:] for n in convs] == [[False, False]] * n_convs  # (weight, bias) gradients: none
    assert all(p.grad is None for p in t.discriminator.parameters())
    assert all(p.requires_grad for p in t.discriminator.parameters())  # unfrozen again for its own update
    torch._dynamo.reset()


# ---------------------------------------------------------------- 10. tests run on the CPU unless marked gpu

def test_tests_resolve_auto_to_the_cpu_where_cuda_is_reported(monkeypatch):
    """conftest.py: with CUDA (and MPS) reported available, `--device auto` still means the CPU here,
    under torchrun's device choice too, and in a script a test starts."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert utils.pick_device("auto") == torch.device("cpu")
    assert distributed.setup_distributed("auto")[1] == torch.device("cpu")
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); torch.cuda.is_available = lambda: True; "
            "import utils; print(utils.pick_device('auto'))")
    p = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == "cpu", p.stderr
    # Outside the tests (the variable unset) `auto` takes the GPU.
    monkeypatch.delenv("DISENTANGLE_AUTO_DEVICE")
    assert utils.pick_device("auto") == torch.device("cuda")


def test_a_test_without_the_gpu_marker_sees_no_cuda():
    assert not torch.cuda.is_available()
    assert utils.rng_state().keys() == {"python", "numpy", "torch"}  # no CUDA state touched


def test_the_auto_device_variable_refuses_a_device_it_does_not_know(monkeypatch):
    monkeypatch.setenv("DISENTANGLE_AUTO_DEVICE", "gpu")
    with pytest.raises(utils.UserError, match="must be cpu, cuda or mps, got 'gpu'"):
        utils.pick_device("auto")
