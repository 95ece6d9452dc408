"""Train the model of Mathieu et al. (2016), "Disentangling factors of variation in deep
representations using adversarial training".

One iteration = one reconstruction update, `--gen-steps` (2) generator updates and
`--disc-steps` (1) discriminator updates, the discriminator stepping only when its
accuracy on the batch is below `--disc-gate` (0.8). With `--recipe authors` an iteration is
instead the paper authors' own recipe (authors_iteration): one encoder/decoder update and one
discriminator update on a triplet batch.

    python train.py --dataset mnist --data-root DIR --run-dir runs/mnist
    python train.py --resume runs/mnist/checkpoints/last.pt
"""
import argparse
import csv
import json
import math
import os
import shutil
import signal
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary
from tqdm import tqdm

from data_loader import (DATA_ROOT_ENV, LINEMOD_EVAL_SPLIT, LINEMOD_MIN_VISIBILITY, LINEMOD_TRAIN_SPLIT, PairSampler,
                         TripletSampler, conditioning_labels, dataset_options, default_data_root, load_dataset)
from distributed import World, rank_seed, setup_distributed
from networks import (AUTHORS_CONFIGS, CONFIGS, authors_kl, config_from_dict, get_config, kl_divergence,
                      network_classes, reparameterize)
from utils import (CHECKPOINT_FORMAT, CheckpointError, HelpFormatter, UserError, WriteError, atomic_save,
                   atomic_write, device_info, display_images, library_versions, load_checkpoint, load_state, model_images,
                   rng_state, run_cli, save_grid_png, seed_everything, set_rng_state, swap_grid, to_float, writing)

METRICS = ["recon_loss", "kl", "gen_loss", "disc_loss", "disc_acc"]
AUTHORS_METRICS = ["recon_loss", "swap_loss", "kl", "gen_loss", "disc_loss", "disc_acc"]
TB_TAGS = {"recon_loss": "losses/reconstruction", "kl": "losses/kl", "gen_loss": "losses/generator",
           "disc_loss": "losses/discriminator", "disc_acc": "charts/discriminator_accuracy",
           "swap_loss": "losses/swap"}
RECIPES = ("reference", "authors")
BATCH_SIZE = {"reference": 64, "authors": 16}  # --batch-size default of each recipe
KL_WEIGHT = {"reference": 1.0, "authors": 0.1}  # --kl-weight default of each recipe
# Flags that only one recipe reads: giving one to the other recipe is an error, not a silent no-op.
REFERENCE_ONLY = ("lr", "gen_steps", "disc_steps", "disc_gate", "pairs", "disc_fakes")
AUTHORS_ONLY = ("lr_gen", "lr_disc", "nf", "rec_weight", "swap_weight", "adv_weight", "real_target")
# Arguments a resumed run may change; all others are taken from the checkpoint.
RESUMABLE = {"resume", "run_dir", "data_root", "epochs", "max_steps", "device", "checkpoint_every",
             "keep_checkpoints", "log_every", "sample_every", "progress", "overwrite", "compile", "amp",
             "channels_last", "on_nan", "tf32", "deterministic", "dist_timeout"}


class DivergenceError(UserError):
    exit_code = 3


def get_args_parser():
    p = argparse.ArgumentParser(description="Train the disentangling autoencoder of Mathieu et al. (2016).",
                                formatter_class=HelpFormatter)
    # The groups only order --help; what a flag does and its default do not depend on its group.
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="mnist", choices=sorted(CONFIGS), help="dataset and network config")
    data.add_argument("--data-root", default=None,
                      help="data folder (default: $DISENTANGLE_DATA_ROOT, else ./data)")
    model = p.add_argument_group("model")
    model.add_argument("--recipe", default="reference", choices=RECIPES,
                       help="reference: the PyTorch reference implementation's networks, losses and schedule; "
                            "authors: the paper authors' own Torch recipe (MNIST and Sprites; see docs/authors.md)")
    model.add_argument("--style-dim", type=int, default=None, help="size of z (default: the dataset config's)")
    model.add_argument("--class-dim", type=int, default=None, help="size of s (default: the dataset config's)")
    sched = p.add_argument_group("schedule and optimisation")
    sched.add_argument("--epochs", type=int, default=50, help="epochs of floor(N / global batch) iterations")
    sched.add_argument("--max-steps", type=int, default=None, help="stop after this many iterations in all")
    sched.add_argument("--batch-size", type=int, default=None,
                       help="images per batch of each process (default: 64 reference, 16 authors' triplets); "
                            "under torchrun the global batch is this x WORLD_SIZE")
    sched.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (both recipes)")
    sched.add_argument("--beta2", type=float, default=0.999, help="Adam beta2 (both recipes)")
    sched.add_argument("--kl-weight", type=float, default=None,
                       help="multiplies the KL term (default: 1 reference, 0.1 authors). The reference's KL is "
                            "summed over batch and code and divided by batch x pixels, the MSE's per-pixel scale; the "
                            "authors' is multiplied by 6 / pixels")
    sched.add_argument("--seed", type=int, default=0)
    sched.add_argument("--lr", type=float, default=1e-4, help="reference recipe: Adam learning rate of all three optimisers")
    sched.add_argument("--gen-steps", type=int, default=2,
                       help="reference recipe: generator updates per iteration (0: none)")
    sched.add_argument("--disc-steps", type=int, default=1,
                       help="reference recipe: discriminator updates per iteration (0: none; with --gen-steps 0 "
                            "no adversary at all)")
    sched.add_argument("--disc-gate", type=float, default=0.8,
                       help="reference recipe: the discriminator steps only when its batch accuracy is below this")
    sched.add_argument("--pairs", default="fresh", choices=["fresh", "frozen"],
                       help="reference recipe: fresh = a new order and new partners every epoch; frozen = the "
                            "reference's stream (one order and one partner per image drawn at the start, replayed "
                            "every epoch)")
    sched.add_argument("--disc-fakes", default="posterior", choices=["posterior", "posterior+prior"],
                       help="reference recipe: fake pairs of the discriminator update: posterior = (x3, dec(mu1, s3)) "
                            "only, the reference's; posterior+prior = also (x3, dec(z ~ N(0, I), s3)), one more "
                            "cross-entropy term, and the --disc-gate accuracy is then over all its 3B pairs")
    run = p.add_argument_group("run and checkpoints")
    run.add_argument("--run-dir", default=None,
                     help="output folder (default: runs/{dataset}__z{Z}_s{S}__seed{SEED}__{time})")
    run.add_argument("--overwrite", action="store_true", help="replace a run already in --run-dir")
    run.add_argument("--resume", default=None, help="checkpoint file (or run directory) to continue from")
    run.add_argument("--checkpoint-every", type=int, default=None,
                     help="iterations between kept checkpoints step_N.pt (default: one epoch); last.pt "
                          "is written at least every epoch")
    run.add_argument("--keep-checkpoints", type=int, default=3,
                     help="periodic checkpoints kept besides last.pt (0 = keep all)")
    run.add_argument("--log-every", type=int, default=50, help="iterations between progress-bar/log updates")
    run.add_argument("--sample-every", type=int, default=1000, help="iterations between swap grids")
    run.add_argument("--on-nan", default="stop", choices=["stop", "skip"],
                     help="on a NaN/inf loss: stop the run (checks the iteration's logged losses), or skip "
                          "that update (checks every update's loss)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")
    speed = p.add_argument_group("device and speed")
    speed.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    speed.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="torch.compile the networks")
    speed.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                       help="bf16 autocast for the forward passes")
    speed.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                       help="channels-last memory format (opt-in: no GPU measurement has shown a gain yet)")
    speed.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=False,
                       help="TF32 matrix products and convolutions on CUDA GPUs from Ampere on (a 10-bit "
                            "mantissa: faster, less exact); off: full fp32, as PyTorch 0.4, the reference's, "
                            "computed. The CPU is not affected")
    speed.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=False,
                       help="deterministic CUDA kernels (cuDNN, cuBLAS with CUBLAS_WORKSPACE_CONFIG=:4096:8, "
                            "torch.use_deterministic_algorithms), so that two runs on one GPU, or a run and its "
                            "resume, give the same weights bit for bit; costs speed (no cuDNN autotuning, slower "
                            "deterministic kernels) and newly allocated memory is filled. The CPU is "
                            "deterministic without it")
    speed.add_argument("--dist-timeout", type=float, default=60,
                       help="torchrun: minutes a rank waits in a collective before the run fails; long enough "
                            "for rank 0 alone to download, render or crop the data while the others wait")
    au = p.add_argument_group("the authors' recipe (--recipe authors): one generator and one discriminator "
                              "update per iteration; defaults are their train.lua's")
    au.add_argument("--lr-gen", type=float, default=0.01, help="Adam learning rate of encoder and decoder")
    au.add_argument("--lr-disc", type=float, default=0.01, help="SGD learning rate of the discriminator")
    au.add_argument("--nf", type=int, default=None, help="feature planes of the first layer (default: 16)")
    au.add_argument("--rec-weight", type=float, default=0.5, help="weight of MSE(dec(z_i, s_i), x_i), i = 1, 2, 3")
    au.add_argument("--swap-weight", type=float, default=1.0,
                    help="weight of MSE(dec(z1, s2), x1) and MSE(dec(z2, s1), x2), same-class swaps")
    au.add_argument("--adv-weight", type=float, default=0.01,
                    help="weight of the adversarial term on dec(z3, s2) and dec(z2, s3)")
    au.add_argument("--real-target", type=float, default=0.95, help="BCE target of 'real' (one-sided label smoothing)")
    lm = p.add_argument_group("LINEMOD (BOP layout <data-root>/lm/<split>/)")
    lm.add_argument("--linemod-train-split", default=LINEMOD_TRAIN_SPLIT,
                    help="BOP split trained on (train_pbr: PBR renders; train: BOP'18 renders; test: real photos)")
    lm.add_argument("--linemod-eval-split", default=LINEMOD_EVAL_SPLIT,
                    help="BOP split of the swap grids and evaluation; when it equals the training split, "
                         "images with id %% 10 == 0 are held out of training for it")
    lm.add_argument("--min-visibility", type=float, default=LINEMOD_MIN_VISIBILITY,
                    help="skip object instances whose visible fraction (visib_fract) is below this")
    return p


def check_args(args):
    """Reject impossible arguments with one clear line."""
    for name in ("epochs", "log_every", "sample_every"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("gen_steps", "disc_steps"):  # 0 turns the update off (the no-adversary ablation: both 0)
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("max_steps", "batch_size", "style_dim", "class_dim", "checkpoint_every", "nf", "dist_timeout"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.keep_checkpoints < 0:
        raise UserError(f"--keep-checkpoints must be >= 0, got {args.keep_checkpoints}")
    if not 0.0 <= args.disc_gate <= 1.0:
        raise UserError(f"--disc-gate must lie in [0, 1], got {args.disc_gate}")
    if args.kl_weight is not None and args.kl_weight < 0:
        raise UserError(f"--kl-weight must be >= 0, got {args.kl_weight}")
    if args.lr <= 0 or not (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1):
        raise UserError("--lr must be positive and --beta1/--beta2 in [0, 1)")
    if args.lr_gen <= 0 or args.lr_disc <= 0 or not 0 < args.real_target <= 1:
        raise UserError("--lr-gen and --lr-disc must be positive and --real-target in (0, 1]")


def check_recipe_args(args):
    """Flags of the other recipe left at their defaults, a dataset the recipe has (after resume's merge)."""
    defaults = vars(get_args_parser().parse_args([]))
    other = AUTHORS_ONLY if args.recipe == "reference" else REFERENCE_ONLY
    given = [k for k in other if getattr(args, k, defaults[k]) != defaults[k]]
    if given:
        flag = f"--{given[0].replace('_', '-')}"
        raise UserError(f"{flag} belongs to the other recipe: it does nothing with --recipe {args.recipe}")
    if args.recipe == "authors" and args.dataset not in AUTHORS_CONFIGS:
        raise UserError(f"the authors' recipe is ported for {' and '.join(sorted(AUTHORS_CONFIGS))}, "
                        f"not {args.dataset}")


def fill_recipe_defaults(args):
    """The defaults that depend on the recipe (--batch-size, --kl-weight), where not given."""
    if args.batch_size is None:
        args.batch_size = BATCH_SIZE[args.recipe]
    if args.kl_weight is None:
        args.kl_weight = KL_WEIGHT[args.recipe]


# ----------------------------------------------------------------------------- the model state

class Trainer:
    """Networks, optimisers, pair sampler and noise generator of one run: what a checkpoint holds."""

    OPTIMIZERS = ("opt_ae", "opt_gen", "opt_disc")

    def __init__(self, cfg, args, train_set, device, world=None):
        fill_recipe_defaults(args)
        self.cfg, self.args, self.device = cfg, args, device
        self.world = world or World()
        self.encoder, self.decoder, self.discriminator = (net(cfg).to(device) for net in network_classes(cfg))
        # Opt-in everywhere: group norm returns contiguous tensors, so each norm layer would pay two
        # layout conversions, and the few-channel first layers gain nothing.
        self.channels_last = bool(args.channels_last)
        if self.channels_last:
            for net in self.nets():
                net.to(memory_format=torch.channels_last)
        self.ae_params = list(self.encoder.parameters()) + list(self.decoder.parameters())
        self.make_optimizers(args)
        # Callables used in the hot loop: compiled if asked, the plain modules otherwise.
        self.enc, self.dec, self.disc = self.nets()
        if args.compile:
            self.enc, self.dec, self.disc = (torch.compile(n) for n in self.nets())
        # The generator update reads the discriminator but never updates it, so under DDP it calls
        # the bare module: DDP's hooks would wait for discriminator gradients that never come.
        self.disc_local = self.disc
        if self.world.distributed:  # one forward and one backward per network per update: DDP's rule
            self.enc, self.dec, self.disc = (self.world.wrap(n) for n in self.nets())
            if args.compile:
                self.enc, self.dec, self.disc = (torch.compile(n) for n in (self.enc, self.dec, self.disc))
        self.images = train_set.images.to(device)  # the whole set, uint8, on the training device
        seed = rank_seed(args.seed, self.world.rank)  # each rank its own pairs and noise; rank 0: args.seed
        self.sampler = self.make_sampler(train_set, seed, device)
        self.noise = torch.Generator(device=device)  # eps of the reparameterisation, z ~ N(0, I)
        self.noise.manual_seed(seed + 1)
        self.rank_streams = None  # every rank's sampler/noise states, gathered for rank 0's checkpoint
        self.reseeded_from = None  # the device type of a checkpoint whose streams could not carry over
        self.n_pixels = cfg.channels * cfg.image_size * cfg.image_size
        self.skipped_updates = 0
        self.constants = {}  # see constant()

    def make_optimizers(self, args):
        # Reconstruction and generator updates share the encoder/decoder parameters but keep separate
        # Adam states, like the reference's auto_encoder_optimizer and generator_optimizer.
        adam = dict(lr=args.lr, betas=(args.beta1, args.beta2), **self.adam_path())
        self.opt_ae = torch.optim.Adam(self.ae_params, **adam)
        self.opt_gen = torch.optim.Adam(self.ae_params, **adam)
        self.opt_disc = torch.optim.Adam(self.discriminator.parameters(), **adam)

    def adam_path(self):
        """Adam's implementation on this device. The CPU's default runs ~9 operators per parameter and
        step; foreach runs ~8 per step for all parameters, bit for bit the same numbers (fused is faster
        still but rounds differently). On CUDA fused: one kernel per step, its step counts on the
        device (foreach keeps them on the host and reads each one there)."""
        return {"fused": True} if self.device.type == "cuda" else {"foreach": True}

    def keep_optimizer_paths(self):
        """After loading optimiser states: a state keeps the path of the device that saved it (its
        flags and where its step counts live); set this device's path again."""
        for name in self.OPTIMIZERS:
            opt = getattr(self, name)
            path = self.adam_path() if isinstance(opt, torch.optim.Adam) else {"foreach": True}
            for group in opt.param_groups:
                group.update(foreach=path.get("foreach"), fused=path.get("fused"))
                for p in group["params"]:
                    state = opt.state.get(p, {})
                    if "step" in state:  # on the device for fused, on the host for foreach
                        state["step"] = state["step"].to(p.device if path.get("fused") else "cpu", torch.float32)

    def make_sampler(self, train_set, seed, device):
        return PairSampler(train_set.labels, seed, device, frozen=self.args.pairs == "frozen")

    def nets(self):
        return self.encoder, self.decoder, self.discriminator

    def batch(self, idx):
        x = to_float(self.images[idx])
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def constant(self, key, make):
        """The tensor make() returns, made on the first call with `key` only: the targets of the
        losses are the same every iteration."""
        if key not in self.constants:
            self.constants[key] = make()
        return self.constants[key]

    def randn(self, n):
        return torch.randn(n, self.cfg.style_dim, generator=self.noise, device=self.device)

    def autocast(self):
        if not self.args.amp:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def update(self, opt, loss, inputs=None, finite=None):
        """One optimiser step on `loss` (one backward per update); with --on-nan skip, skip non-finite ones.
        `finite`: whether the loss is finite on every rank, where the caller has read it already."""
        if finite is None and self.args.on_nan == "skip":  # one host read; all ranks skip or none
            finite = self.world.all_true(torch.isfinite(loss))
        if finite is False:
            self.skipped_updates += 1
            return
        opt.zero_grad(set_to_none=True)
        loss.backward(inputs=inputs)
        opt.step()

    def state_dict(self):
        return {"encoder": self.encoder.state_dict(), "decoder": self.decoder.state_dict(),
                "discriminator": self.discriminator.state_dict(),
                **{name: getattr(self, name).state_dict() for name in self.OPTIMIZERS},
                "sampler": self.sampler.state_dict(), "noise": self.noise.get_state(),
                "stream_device": self.device.type, "world_size": self.world.size,
                **({"rank_streams": self.rank_streams} if self.world.distributed else {})}

    def gather_streams(self):
        """Collective (every rank calls it): every rank's sampler and noise states, in rank order,
        so that rank 0's checkpoint resumes each rank's own stream."""
        self.rank_streams = self.world.all_gather_object(
            {"sampler": self.sampler.state_dict(), "noise": self.noise.get_state(), "device": self.device.type})

    def load_streams(self, sampler, noise, device_type, step):
        """Continue the pair and noise streams a checkpoint saved. A generator's state is specific
        to its device type (5056 bytes on the CPU, 16 on CUDA, 44 on MPS) and cannot load on
        another, so after a device-type change both streams are re-seeded from (seed, rank, step):
        deterministic, though not the draws the old device would have made (those differ across
        devices anyway). The sampler's epoch order and position carry over either way."""
        if device_type is None:  # checkpoints from before the device type was recorded
            same = noise.numel() == self.noise.get_state().numel()
            device_type = self.device.type if same else "another device type"
        if device_type == self.device.type:
            self.sampler.load_state_dict(sampler)
            self.noise.set_state(noise)
            return
        sampler_seed, noise_seed = (int(x) for x in np.random.SeedSequence(
            [self.args.seed, self.world.rank, step]).generate_state(2))
        self.sampler.load_state_dict(sampler, reseed=sampler_seed)
        self.noise.manual_seed(noise_seed)
        self.reseeded_from = device_type

    def load_rank_streams(self, ckpt):
        """After load_state_dict: this rank's own streams from a checkpoint of a run with as many ranks."""
        check_world_size(ckpt, self.world)
        if self.world.distributed:
            streams = ckpt["rank_streams"][self.world.rank]
            self.load_streams(streams["sampler"], streams["noise"], streams.get("device"), int(ckpt["step"]))

    def load_state_dict(self, ckpt):
        path = ckpt.get("path")
        for name in ("discriminator", *self.OPTIMIZERS, "sampler", "noise"):
            if name not in ckpt:
                raise CheckpointError(f"'{path}' lacks '{name}': it cannot resume training")
        for name, net in zip(("encoder", "decoder", "discriminator"), self.nets()):
            load_state(net, ckpt[name], name, path)
        try:
            for name in self.OPTIMIZERS:
                getattr(self, name).load_state_dict(ckpt[name])
            self.keep_optimizer_paths()
            self.load_streams(ckpt["sampler"], ckpt["noise"], ckpt.get("stream_device"), int(ckpt.get("step", 0)))
        except (ValueError, RuntimeError, KeyError) as e:
            raise CheckpointError(f"'{path}' does not match this run's optimiser/sampler: {e}") from None


class AuthorsTrainer(Trainer):
    """The authors' recipe: their networks, triplet batches with labels, one Adam optimiser for
    encoder and decoder and plain SGD for the discriminator."""

    OPTIMIZERS = ("opt_gen", "opt_disc")

    def __init__(self, cfg, args, train_set, device, world=None):
        super().__init__(cfg, args, train_set, device, world)
        self.labels = conditioning_labels(train_set)[0].to(device)  # (N, number of labels)

    def make_optimizers(self, args):
        self.opt_gen = torch.optim.Adam(self.ae_params, lr=args.lr_gen, betas=(args.beta1, args.beta2),
                                        **self.adam_path())
        self.opt_disc = torch.optim.SGD(self.discriminator.parameters(), lr=args.lr_disc, foreach=True)

    def make_sampler(self, train_set, seed, device):
        return TripletSampler(train_set.labels, seed, device)

    def batch(self, idx):
        x = model_images(self.images[idx], self.cfg)  # [-1, 1], resized on the device where needed
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def make_trainer(cfg, args, train_set, device, world=None):
    return (AuthorsTrainer if args.recipe == "authors" else Trainer)(cfg, args, train_set, device, world)


def check_world_size(ckpt, world):
    """A run resumes with as many processes as wrote its checkpoint."""
    saved = int(ckpt.get("world_size", 1))
    if saved != world.size:
        raise CheckpointError(f"'{ckpt.get('path')}' was written by a run of {saved} process(es), this one "
                              f"has {world.size}: resume with the same number of processes (the global "
                              f"batch and every rank's pair stream depend on it), e.g. "
                              + (f"torchrun --nproc_per_node={saved} train.py --resume ..." if saved > 1
                                 else "python train.py --resume ..."))


# ----------------------------------------------------------------------------- the three updates

def reconstruction_step(t, x1, x2):
    """Update encoder+decoder: minimise ||dec(z1, s1) - x1||^2 + ||dec(z1, s2) - x1||^2
    + --kl-weight x KL(q(z|x1) || N(0, I)), z1 ~ q(z|x1) reparameterised, x2 a same-class partner of x1."""
    B = len(x1)
    with t.autocast():
        mu, logvar, s = t.enc(torch.cat([x1, x2]))  # one encoder pass for both images (per-sample norm)
        mu1, logvar1 = mu[:B].float(), logvar[:B].float()
        z1 = reparameterize(mu1, logvar1, t.randn(B))
        recon = t.dec(torch.cat([z1, z1]), torch.cat([s[:B], s[B:]])).float()  # dec(z1,s1) ; dec(z1,s2)
    rec = F.mse_loss(recon[:B], x1) + F.mse_loss(recon[B:], x1)
    kl = kl_divergence(mu1, logvar1, t.n_pixels)
    t.update(t.opt_ae, rec + t.args.kl_weight * kl)
    return rec.detach(), kl.detach()


@contextmanager
def frozen(module):
    """The module's weights as constants for the forward passes inside: their gradients are never
    computed. backward(inputs=...) alone skips them in eager mode only; a torch.compile'd module's
    backward is one fused function that computes every weight gradient it was compiled with."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def generator_step(t, x1, x3):
    """Update encoder+decoder: the discriminator must take (x3, dec(z1, s3)) and
    (x3, dec(z ~ N(0, I), s3)) for real same-class pairs; plus --kl-weight x KL(q(z|x1) || N(0, I))."""
    B = len(x1)
    with t.autocast():
        mu, logvar, s = t.enc(torch.cat([x1, x3]))
        mu1, logvar1, s3 = mu[:B].float(), logvar[:B].float(), s[B:]
        z1 = reparameterize(mu1, logvar1, t.randn(B))
        fake = t.dec(torch.cat([z1, t.randn(B)]), torch.cat([s3, s3]))  # dec(z1,s3) ; dec(z~N(0,I),s3)
        with frozen(t.discriminator):
            logits = t.disc_local(torch.cat([x3, x3]), fake).float()
    real = t.constant(("ones", B), lambda: torch.ones(B, dtype=torch.long, device=x1.device))
    gen = F.cross_entropy(logits[:B], real) + F.cross_entropy(logits[B:], real)
    kl = kl_divergence(mu1, logvar1, t.n_pixels)
    # Gradients only for encoder/decoder: the discriminator's weights are not this update's.
    t.update(t.opt_gen, gen + t.args.kl_weight * kl, inputs=t.ae_params)
    return gen.detach()


def discriminator_loss(t, x1, x2, x3):
    """The discriminator's objective: maximise log D(x2, x3) + log(1 - D(x3, dec(mu1, s3))),
    with (x2, x3) a real same-class pair; with --disc-fakes posterior+prior also
    + log(1 - D(x3, dec(z ~ N(0, I), s3))). Returns (loss, accuracy on all these pairs)."""
    B = len(x1)
    with torch.no_grad(), t.autocast():  # the generated image is a constant for this update
        mu, _, s = t.enc(torch.cat([x1, x3]))
        z, s3 = mu[:B], s[B:]
        if t.args.disc_fakes == "posterior+prior":  # the only noise this update draws: default runs draw none
            z, s3 = torch.cat([z.float(), t.randn(B)]), torch.cat([s3, s3])
        fake = t.dec(z, s3)  # dec(mu1, s3) [; dec(z ~ N(0, I), s3)]
    n_fake = len(fake) // B
    with t.autocast():
        logits = t.disc(torch.cat([x2] + [x3] * n_fake), torch.cat([x3, fake.to(x3.dtype)])).float()  # real ; fakes
    target = t.constant(("disc_target", B, n_fake), lambda: torch.cat([
        torch.ones(B, dtype=torch.long, device=x1.device), torch.zeros(n_fake * B, dtype=torch.long, device=x1.device)]))
    loss = F.cross_entropy(logits[:B], target[:B])
    for k in range(1, n_fake + 1):  # one cross-entropy per kind of fake, as the generator's two terms
        loss = loss + F.cross_entropy(logits[k * B:(k + 1) * B], target[k * B:(k + 1) * B])
    acc = (logits.argmax(1) == target).float().mean()
    return loss, acc


def train_iteration(t):
    """One iteration of the paper's three updates, each on freshly drawn batches:
    1. reconstruction, on x1 and a same-class partner x2;
    2. the generator, --gen-steps (2) times: two generator updates per discriminator update;
    3. the discriminator, --disc-steps (1) times, stepping only while its accuracy on its own batch
       is below --disc-gate (0.8): a discriminator that wins is left alone.
    --gen-steps 0 / --disc-steps 0 turn an update off (its logged loss is then 0). Returns the metrics."""
    a, B = t.args, t.args.batch_size
    zero = t.constant("zero", lambda: torch.zeros((), device=t.device))

    # All the iteration's batches in one gather: (x1, x2) pairs for the reconstruction, (x1, x3)
    # anchors for each generator update, x1 anchors and (x2, x3) pairs for each discriminator update.
    kinds = ["pairs"] + ["anchors", "anchors"] * a.gen_steps + ["anchors", "pairs"] * a.disc_steps
    xs = iter(t.batch(t.sampler.draw(kinds, B)).split(B))
    rec, kl = reconstruction_step(t, next(xs), next(xs))

    gen_losses = []
    for _ in range(a.gen_steps):
        gen_losses.append(generator_step(t, next(xs), next(xs)))
    gen = torch.stack(gen_losses).mean() if gen_losses else zero

    logged, stepped = None, False
    for _ in range(a.disc_steps):
        d_loss, d_acc = discriminator_loss(t, next(xs), next(xs), next(xs))
        # The gate needs the accuracy on the host: one read per discriminator update, with the logged
        # losses riding along; under torchrun all are averaged over ranks first, so every rank decides alike.
        logged = t.world.average(torch.stack([rec, kl, gen, d_loss.detach(), d_acc]))
        d_acc = logged[-1]
        stepped = d_acc < a.disc_gate
        if stepped:  # a non-finite loss on any rank makes its mean over ranks non-finite: no second read
            t.update(t.opt_disc, d_loss, finite=math.isfinite(logged[3]) if a.on_nan == "skip" else None)
    if logged is None:  # no discriminator update: its loss and accuracy are logged as 0
        logged = t.world.average(torch.stack([rec, kl, gen, zero, zero]))
    return {**dict(zip(METRICS, logged)), "disc_stepped": int(stepped)}


# ----------------------------------------------------------------------------- the authors' recipe

def authors_index(B, device):
    """Rows of the encoder's 3B codes (x1 ; x2 ; x3) that make the decoder's 7B inputs:
    z1 z2 z3 | z1 z2 | z3 z2 for z, and s1 s2 s3 | s2 s1 | s2 s3 for s."""
    rows = torch.arange(3 * B, device=device).view(3, B)  # rows[i]: the codes of x_{i+1}
    return rows[[0, 1, 2, 0, 1, 2, 1]].flatten(), rows[[0, 1, 2, 1, 0, 1, 2]].flatten()


def authors_iteration(t):
    """One iteration of the authors' recipe: one encoder/decoder update, then one discriminator update
    (1:1, no gate), on one triplet batch: x1, x2 of one class, x3 of another drawn class, c their labels.

    Encoder+decoder minimise, with every z drawn afresh from q(z|x) for each decode,
      rec_weight  * MSE(dec(z_i, s_i), x_i) over i = 1, 2, 3
    + swap_weight * MSE((dec(z1, s2), dec(z2, s1)), (x1, x2))
    + adv_weight  * BCE(D(dec(z3, s2), c2) and D(dec(z2, s3), c3), real_target)
    + kl_weight * 6 / (C H W) * KL over the 3B images (authors_kl).
    The discriminator then minimises BCE(D(x2, c2) and D(x3, c3), real_target) + BCE(D(fakes), 0) on the
    same generated images (made before the encoder/decoder step), by SGD."""
    a, cfg, B = t.args, t.cfg, t.args.batch_size
    i1, i2, i3 = t.sampler.triplets(B)
    x = t.batch(torch.cat([i1, i2, i3]))                    # (3B, C, H, W) in [-1, 1]
    c23 = t.labels[torch.cat([i2, i3])]                     # (2B, number of labels)
    z_rows, s_rows = t.constant(("authors_index", B), lambda: authors_index(B, x.device))
    with t.autocast():
        mu, v, s = t.enc(x)                                 # batch norm over the 3B images, as theirs
        mu, v = mu.float(), v.float()
        z = reparameterize(mu[z_rows], v[z_rows], t.randn(7 * B))
        y = t.dec(z, s[s_rows]).float()                     # rec (3B) ; swaps (2B) ; cross-class (2B)
        fake = y[5 * B:]                                    # dec(z3, s2) ; dec(z2, s3)
        with frozen(t.discriminator):  # as generator_step: no weight gradients of the discriminator
            adv_logits = t.disc_local(fake.to(x.dtype), c23).float()
    rec = F.mse_loss(y[:3 * B], x)
    swap = F.mse_loss(y[3 * B:5 * B], x[:2 * B])
    real = t.constant(("real_target", B), lambda: torch.full_like(adv_logits, a.real_target))  # (2B, 1)
    adv = F.binary_cross_entropy_with_logits(adv_logits, real)
    kl = authors_kl(mu, v)
    kl_scale = 6 / (cfg.channels * cfg.image_size * cfg.image_size)
    loss = a.rec_weight * rec + a.swap_weight * swap + a.adv_weight * adv + a.kl_weight * kl_scale * kl
    t.update(t.opt_gen, loss, inputs=t.ae_params)  # the discriminator's weights are not this update's

    # Discriminator: real images with their labels against the generated ones, as two batches
    # (their batch norm saw real and generated images apart); the generated images are constants.
    with t.autocast():
        real_logits = t.disc(x[B:], c23).float()
        fake_logits = t.disc(fake.detach().to(x.dtype), c23).float()
    fake_target = t.constant(("fake_target", B), lambda: torch.zeros_like(fake_logits))
    d_loss = (F.binary_cross_entropy_with_logits(real_logits, real)
              + F.binary_cross_entropy_with_logits(fake_logits, fake_target))
    t.update(t.opt_disc, d_loss)
    d_acc = torch.cat([real_logits > 0, fake_logits < 0]).float().mean()
    values = torch.stack([rec, swap, kl, adv, d_loss, d_acc]).detach().tolist()  # one host read for all six
    return {**dict(zip(AUTHORS_METRICS, values)), "disc_stepped": 1}


# ----------------------------------------------------------------------------- run directory

class MetricsLog:
    """Per-iteration CSV and TensorBoard curves that stay continuous across resumes."""

    def __init__(self, run_dir, start_step, metrics=METRICS):
        self.metrics = metrics
        self.fields = ["step", "epoch"] + metrics + ["disc_stepped"]
        self.path = os.path.join(run_dir, "metrics.csv")
        self.tb_path = os.path.join(run_dir, "tb")
        if start_step > 0 and os.path.exists(self.path):
            self._truncate(start_step)
        fresh = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        with self.writing_csv():
            self.file = open(self.path, "a", newline="")
            self.csv = csv.writer(self.file)
            if fresh:
                self.csv.writerow(self.fields)
        # Events are written synchronously (tensorboardX's SummaryWriter queues them to a thread whose
        # flush does not drain the queue, so a kill -9 could lose events older than the checkpoint).
        with self.writing_tb():
            os.makedirs(self.tb_path, exist_ok=True)
            self.tb = EventsWriter(os.path.join(self.tb_path, "events"), f".{os.getpid()}")
            if start_step:  # TensorBoard drops the events a killed run wrote after its last checkpoint
                self.tb.write_event(Event(wall_time=time.time(), step=start_step + 1,
                                          session_log=SessionLog(status=SessionLog.START)))

    def writing_csv(self):
        return writing("the metrics", self.path)

    def writing_tb(self):
        return writing("the TensorBoard events", self.tb_path)

    def _truncate(self, start_step):
        """Keep the rows up to the checkpoint's step; drop later ones and any half-written line."""
        with open(self.path, newline="") as f:
            rows = [r for r in csv.reader(f)]
        keep = [rows[0]] + [r for r in rows[1:] if len(r) == len(self.fields) and r[0].isdigit()
                            and int(r[0]) <= start_step]
        with atomic_write(self.path, "the metrics", "w", newline="") as f:
            csv.writer(f).writerows(keep)

    def write(self, step, epoch, m):
        with self.writing_csv():
            self.csv.writerow([step, epoch] + [f"{m[k]:.6g}" for k in self.metrics] + [m["disc_stepped"]])
        with self.writing_tb():
            self.tb.write_event(Event(wall_time=time.time(), step=step, summary=Summary(
                value=[Summary.Value(tag=TB_TAGS[k], simple_value=m[k]) for k in self.metrics])))

    def flush(self):
        with self.writing_csv():
            self.file.flush()
            os.fsync(self.file.fileno())
        with self.writing_tb():
            self.tb.flush()

    def close(self):
        self.flush()
        self.file.close()
        self.tb.close()


def default_run_dir(args):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{args.dataset}__z{args.style_dim}_s{args.class_dim}__seed{args.seed}__{stamp}")


def prepare_run_dir(args, resuming):
    """Create the run directory; refuse to reuse one holding a run unless resuming or --overwrite."""
    run_dir = args.run_dir
    holds_run = os.path.exists(os.path.join(run_dir, "config.json")) or \
        os.path.isdir(os.path.join(run_dir, "checkpoints"))
    if holds_run and not resuming:
        if not args.overwrite:
            raise UserError(f"run directory '{run_dir}' already holds a run: pass --resume "
                            f"{os.path.join(run_dir, 'checkpoints', 'last.pt')} to continue it, "
                            f"--overwrite to replace it, or another --run-dir")
        for name in ("checkpoints", "samples", "tb"):
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
        for name in ("config.json", "metrics.csv", "log.txt"):
            if os.path.exists(os.path.join(run_dir, name)):
                os.remove(os.path.join(run_dir, name))
    for sub in ("checkpoints", "samples"):
        with writing("the run directory", os.path.join(run_dir, sub)):
            os.makedirs(os.path.join(run_dir, sub), exist_ok=True)
    return run_dir


def merge_resume_args(args, ckpt):
    """A resumed run keeps the checkpoint's hyper-parameters; only RESUMABLE ones may change."""
    defaults = vars(get_args_parser().parse_args([]))
    saved = {**defaults, **ckpt["args"]}  # options newer than the checkpoint: their defaults
    for k, v in vars(args).items():
        if v == defaults.get(k) and k != "resume":
            continue  # not given on this command line: keep the checkpoint's value
        if k in RESUMABLE:
            saved[k] = v
        elif v != saved.get(k):
            raise CheckpointError(f"--{k.replace('_', '-')} {v} differs from the checkpoint's "
                                  f"{saved.get(k)}: a resumed run keeps the checkpoint's setting")
    if args.data_root is None and os.environ.get(DATA_ROOT_ENV):  # as for evaluation: the environment, then
        saved["data_root"] = os.environ[DATA_ROOT_ENV]             # the checkpoint's folder
    if args.run_dir is None:  # continue in the checkpoint's own run directory, named as the path was given
        saved["run_dir"] = os.path.normpath(os.path.join(ckpt["path"], os.pardir, os.pardir))
    return argparse.Namespace(**saved)


def save_checkpoint(t, run_dir, step, epoch, keep, periodic=True, last_good=None):
    """last.pt always; step_XXXXXXX.pt too for periodic checkpoints, keeping the `keep` newest.
    `last_good` (a dict) is told as soon as last.pt holds this step, so that a failure to write
    the periodic copy still names the newest good checkpoint."""
    ckpt = {"format": CHECKPOINT_FORMAT, "step": step, "epoch": epoch, "args": vars(t.args),
            "model_config": t.cfg.to_dict(), "rng": rng_state(), "versions": library_versions(),
            **t.state_dict()}
    ckdir = os.path.join(run_dir, "checkpoints")
    atomic_save(ckpt, os.path.join(ckdir, "last.pt"))
    if last_good is not None:
        last_good.update(path=os.path.join(ckdir, "last.pt"), step=step)
    if periodic:
        atomic_save(ckpt, os.path.join(ckdir, f"step_{step:07d}.pt"))
        old = sorted(f for f in os.listdir(ckdir) if f.startswith("step_") and f.endswith(".pt"))
        for f in old[:-keep] if keep else []:
            with writing("the checkpoints folder", ckdir):
                os.remove(os.path.join(ckdir, f))
    return os.path.join(ckdir, "last.pt")


def check_weights_finite(t, step):
    """Collective (every rank calls it before a checkpoint): stop every rank, with the same message,
    if the weights of any rank hold a NaN/inf; a checkpoint is never written from them."""
    params = [p for net in t.nets() for p in net.parameters()]
    if t.world.all_true(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        return
    bad = [n for net in t.nets() for n, p in net.named_parameters() if not torch.isfinite(p).all()]
    first = next(b for b in t.world.all_gather_object(bad[:1]) if b)[0]  # the lowest such rank's: the same everywhere
    raise DivergenceError(f"parameters became NaN/inf by step {step} ({first}); the last good checkpoint is kept")


def set_numerics(args):
    """The precision and determinism switches of this run, set explicitly either way, before CUDA
    initialises (cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it makes its first handle)."""
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic workspace
    torch.backends.cudnn.deterministic = bool(args.deterministic)
    torch.backends.cudnn.benchmark = False  # autotuning may pick another algorithm in each run
    torch.use_deterministic_algorithms(bool(args.deterministic))
    # torch's own defaults differ: TF32 off for matrix products, on for cuDNN convolutions
    torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
    torch.backends.cudnn.allow_tf32 = bool(args.tf32)


def numerics_record(args, device):
    """What config.json and the log say of the device and the arithmetic a run used."""
    return {"device": device_info(device), "precision": {"amp": bool(args.amp), "tf32": bool(args.tf32)},
            "deterministic": bool(args.deterministic)}


def cpu_has_native_bf16():
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), as oneDNN uses them. torch.cpu's
    probes are private: where they are missing, assume it has (no warning rather than a wrong one)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe) or not any(probes)


def amp_warning(args, device):
    """A warning line when --amp is slow: bf16 on a CUDA GPU without native bf16 (compute capability
    below 8.0, before Ampere) or on a CPU without bf16 instructions is emulated, so autocast costs
    time instead of saving it (measured in benchmarks/README.md)."""
    if args.amp and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return (f"warning: --amp uses bf16, which {torch.cuda.get_device_name(device)} (compute capability "
                    f"{major}.{minor} < 8.0) only emulates: expect it to be slower than without --amp")
    if args.amp and device.type == "cpu" and not cpu_has_native_bf16():
        return ("warning: --amp uses bf16, which this CPU (no AVX512-BF16 or AMX) only emulates: expect it to "
                "be slower than without --amp")
    return None


def write_failure(e, last_good, world):
    """The one line a failed write ends the run with: what and why (from `e`), the last good
    checkpoint and the command that continues from it."""
    if not last_good:
        return WriteError(f"{e}; no checkpoint was written yet: once there is space, start the run again")
    launcher = f"torchrun --nproc_per_node={world.size} train.py" if world.distributed else "python train.py"
    return WriteError(f"{e}; last good checkpoint: {last_good['path']} (step {last_good['step']}); once there "
                      f"is space, continue with: {launcher} --resume {last_good['path']}")


def fixed_grid_batch(args, n=8, cfg=None):
    """n images for the swap grids, from the test split where there is one, chosen by the seed,
    as the networks of `cfg` take them."""
    try:
        data = load_dataset(args.dataset, args.data_root, "test", **dataset_options(args))
    except UserError:
        data = load_dataset(args.dataset, args.data_root, "train", **dataset_options(args))
    g = torch.Generator().manual_seed(args.seed)
    return model_images(data.images[torch.randperm(len(data), generator=g)[:n]], cfg)


class NullSink:
    """Stands in for the log file and the metrics log on ranks other than 0: every call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


# ----------------------------------------------------------------------------- main

def main(args):
    check_args(args)
    ckpt = load_checkpoint(args.resume, resuming=True) if args.resume else None
    if ckpt is not None:
        args = merge_resume_args(args, ckpt)
    check_recipe_args(args)
    fill_recipe_defaults(args)
    if ckpt is not None:  # the checkpoint's own model config is the truth for a resumed run
        cfg = config_from_dict(ckpt["model_config"])
    else:
        cfg = get_config(args.dataset, args.recipe, style_dim=args.style_dim, class_dim=args.class_dim,
                         **({"nf": args.nf} if args.recipe == "authors" else {}))
    args.style_dim, args.class_dim = cfg.style_dim, cfg.class_dim
    args.data_root = args.data_root or default_data_root()
    args.run_dir = args.run_dir or default_run_dir(args)
    set_numerics(args)
    world, device = setup_distributed(args.device, args.dist_timeout)  # under torchrun: this rank's place and device
    try:
        return run_training(args, ckpt, cfg, world, device)
    except BaseException as e:
        # The trainer's DistributedDataParallel wrappers hold the process group. The error's traceback
        # keeps the frames that hold the trainer alive until the interpreter exits, and a gloo group
        # freed there can abort the process ("terminate called without an active exception"): clear
        # their locals now, so that the trainer is freed before the group is destroyed.
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        world.close()


def run_training(args, ckpt, cfg, world, device):
    """The training run of main(), as one rank of `world`."""
    if ckpt is not None:
        check_world_size(ckpt, world)  # before anything is written
    if args.recipe == "authors" and world.distributed:
        raise UserError("--recipe authors runs in one process (its discriminator update takes two forward "
                        "passes, which DistributedDataParallel does not allow)")
    # Rank 0 prepares the data (a first download, render or crop) while the other ranks wait, then
    # they load what it wrote: concurrent downloads into one folder could leave half-written files.
    train_set = world.main_first(lambda: load_dataset(args.dataset, args.data_root, "train",
                                                      **dataset_options(args)))
    n_train = len(train_set)
    if args.recipe == "authors" and ckpt is None:  # the discriminator's lookup tables: one per label
        cfg = replace(cfg, label_sizes=conditioning_labels(train_set)[1])
    if args.batch_size > len(train_set):
        raise UserError(f"--batch-size {args.batch_size} is larger than the dataset ({len(train_set)} images)")
    # An epoch is floor(N / global batch) iterations, as the reference's int(len / batch_size) loop, though
    # an iteration draws several batches (the reference recipe 1 + 2 x --gen-steps + 2 x --disc-steps
    # batches of anchors, 7 by default).
    steps_per_epoch = max(1, len(train_set) // (args.batch_size * world.size))
    total = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch
    ckpt_every = args.checkpoint_every or steps_per_epoch
    grid_x = fixed_grid_batch(args, cfg=cfg).to(device) if world.is_main else None

    last_good = {"path": ckpt["path"], "step": int(ckpt["step"])} if ckpt is not None else {}

    def prepare():
        try:
            return prepare_run_dir(args, resuming=ckpt is not None)
        except WriteError as e:
            raise write_failure(e, last_good, world) from None

    # Rank 0 makes the run directory (its run name, its time stamp) while the other ranks wait.
    run_dir = args.run_dir = world.on_main(prepare)
    seed_everything(args.seed)
    t = make_trainer(cfg, args, train_set, device, world)
    del train_set  # off the CPU, training reads the device copy: free the host one (~0.9 GB for Sprites)
    step = 0
    if ckpt is not None:
        t.load_state_dict(ckpt)
        t.load_rank_streams(ckpt)
        set_rng_state(ckpt["rng"])
        step = int(ckpt["step"])

    # Rank 0's writes. The first that fails (disk full, quota, I/O error) ends the run with one line
    # naming the last good checkpoint: at once in one process; under torchrun rank 0 writes nothing
    # more and every rank stops at the next average() or at the end, so none waits for a rank that left.
    failure = {}
    world.share_failure(failure)

    def write(fn, *a):
        if not world.is_main or failure:
            return None
        try:
            return fn(*a)
        except WriteError as e:
            failure["error"] = write_failure(e, last_good, world)
            if not world.distributed:
                raise failure["error"] from None
            return None

    def end_if_failed(final=False):
        err = world.failed(final)
        if err is not None:
            raise err

    def write_config():
        with atomic_write(os.path.join(run_dir, "config.json"), "the config", "w") as f:
            json.dump({"args": vars(args), "model_config": cfg.to_dict(), "dataset_size": n_train,
                       "steps_per_epoch": steps_per_epoch, "world_size": world.size,
                       **numerics_record(args, device), "versions": library_versions()}, f, indent=2)

    def open_log():
        with writing("the log", log_path):
            return open(log_path, "a")

    if ckpt is None:
        write(write_config)
    # The other ranks only train: no log, metrics, samples or checkpoint files.
    log_path = os.path.join(run_dir, "log.txt")
    log_file = write(open_log) or NullSink()

    def log_line(msg, console):
        if console:
            tqdm.write(msg)
        with writing("the log", log_path):
            log_file.write(msg + "\n")
            log_file.flush()

    def log(msg, console=True):
        write(log_line, msg, console)

    log(f"{'resuming' if ckpt else 'training'} {args.dataset}, {args.recipe} recipe "
        f"(z={cfg.style_dim}, s={cfg.class_dim}) on {device}, {torch.get_num_threads()} CPU threads: "
        f"step {step} -> {total}, {steps_per_epoch} iterations per epoch, run dir {run_dir}"
        + (f"; {world.size} processes x batch {args.batch_size}" if world.distributed else ""))
    if t.reseeded_from:
        log(f"the checkpoint's pair and noise streams were drawn on {t.reseeded_from}, whose generator states "
            f"cannot load on {device.type}: both continue re-seeded from (seed, rank, step {step})")
    dev = device_info(device)
    log(f"device {dev['name']}, compute capability {dev['compute_capability']}; amp {bool(args.amp)}, "
        f"tf32 {bool(args.tf32)}, deterministic {bool(args.deterministic)}", console=False)
    warning = amp_warning(args, device)
    if warning:
        log(warning)
    metric_names = AUTHORS_METRICS if args.recipe == "authors" else METRICS
    iteration = authors_iteration if args.recipe == "authors" else train_iteration
    metrics_log = write(MetricsLog, run_dir, step, metric_names) or NullSink()

    # Ctrl-C / SIGTERM: finish the current iteration, save a checkpoint, exit cleanly.
    stop = {}
    handlers = {s: signal.signal(s, lambda signum, frame: stop.setdefault("signal", signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    world.share_stop(stop)  # under torchrun, a signal to any rank stops all ranks after the same iteration

    def save(periodic):
        metrics_log.flush()  # rows up to `step` are on disk before the checkpoint that claims them
        return save_checkpoint(t, run_dir, step, step // steps_per_epoch, args.keep_checkpoints, periodic, last_good)

    def checkpoint(periodic=True):
        check_weights_finite(t, step)  # collectives: every rank is here at the same step
        t.gather_streams()
        return write(save, periodic)

    def sample():
        t.encoder.eval(), t.decoder.eval()  # the authors' batch norm: running statistics, none updated
        grid = swap_grid(t.encoder, t.decoder, grid_x, grid_x)
        t.encoder.train(), t.decoder.train()
        save_grid_png(display_images(grid, cfg), os.path.join(run_dir, "samples", f"swap_{step:07d}.png"))

    bar = tqdm(total=total, initial=step, disable=not args.progress or not world.is_main, unit="it",
               dynamic_ncols=True)
    status, tick, tick_step = 0, time.perf_counter(), step
    try:
        if step == 0:
            write(sample)
        while step < total:
            m = iteration(t)
            end_if_failed()  # under torchrun: rank 0 failed to write before this iteration's average()
            step += 1
            bad = [k for k in metric_names if m[k] != m[k] or abs(m[k]) == float("inf")]
            if bad and args.on_nan == "stop":
                raise DivergenceError(f"{bad[0]} is {m[bad[0]]} at step {step}; stopped, the last good "
                                      f"checkpoint in {run_dir}/checkpoints is kept (--on-nan skip skips such updates)")
            write(metrics_log.write, step, step // steps_per_epoch, m)
            bar.update(1)
            if step % args.log_every == 0:
                bar.set_postfix(rec=f"{m['recon_loss']:.4f}", gen=f"{m['gen_loss']:.3f}",
                                disc=f"{m['disc_loss']:.3f}", acc=f"{m['disc_acc']:.2f}")
                now = time.perf_counter()
                log(f"step {step} epoch {step // steps_per_epoch} | {(step - tick_step) / (now - tick):.2f} it/s | "
                    + " ".join(f"{k} {m[k]:.4g}" for k in metric_names), console=not args.progress)
                tick, tick_step = now, step  # a resumed run's first interval is shorter than --log-every
            if step % args.sample_every == 0 or step == total:
                write(sample)
            if step % ckpt_every == 0 or step == total:
                checkpoint()
            elif step % steps_per_epoch == 0:
                checkpoint(periodic=False)  # last.pt at least every epoch, whatever --checkpoint-every
            if world.should_stop():
                signum = stop.get("signal", signal.SIGTERM)  # a rank not (yet) signalled follows the others
                path = checkpoint(periodic=False)
                log(f"{signal.Signals(signum).name} received: checkpoint of step {step} saved to {path}; "
                    f"continue with --resume {path}")
                status = 128 + signum
                break
        else:
            log(f"done: {step} iterations; checkpoint {os.path.join(run_dir, 'checkpoints', 'last.pt')}"
                + (f"; {t.skipped_updates} non-finite updates skipped" if t.skipped_updates else ""))
        end_if_failed(final=True)  # also a barrier: no rank returns before rank 0's last checkpoint is on disk
    except DivergenceError as e:
        log(f"error: {e}")
        raise
    except WriteError as e:
        try:  # the reason in the log too, where the disk still takes a line
            log_line(f"error: {e}", console=False)
        except WriteError:
            pass
        raise
    finally:
        bar.close()
        for f in (metrics_log, log_file):
            try:
                f.close()
            except (OSError, WriteError):
                pass  # all was flushed with the last checkpoint; a failure to write already ends the run
        for s, h in handlers.items():
            signal.signal(s, h)
    return status


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
