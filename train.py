"""Train the model of Mathieu et al. (2016), "Disentangling factors of variation in deep
representations using adversarial training".

One iteration = one reconstruction update, `--gen-steps` (2) generator updates and
`--disc-steps` (1) discriminator updates, the discriminator stepping only when its
accuracy on the batch is below `--disc-gate` (0.8).

    python train.py --dataset mnist --data-root ../shared/data --run-dir runs/mnist
    python train.py --resume runs/mnist/checkpoints/last.pt
"""
import argparse
import csv
import json
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary
from tqdm import tqdm

from data_loader import (LINEMOD_EVAL_SPLIT, LINEMOD_MIN_VISIBILITY, LINEMOD_TRAIN_SPLIT, PairSampler,
                         dataset_options, default_data_root, load_dataset)
from distributed import World, rank_seed, setup_distributed
from networks import CONFIGS, Decoder, Discriminator, Encoder, ModelConfig, get_config, kl_divergence, reparameterize
from utils import (CHECKPOINT_FORMAT, CheckpointError, HelpFormatter, UserError, atomic_save, library_versions,
                   load_checkpoint, load_state, rng_state, run_cli, save_grid_png,
                   seed_everything, set_rng_state, swap_grid, to_float)

METRICS = ["recon_loss", "kl", "gen_loss", "disc_loss", "disc_acc"]
TB_TAGS = {"recon_loss": "losses/reconstruction", "kl": "losses/kl", "gen_loss": "losses/generator",
           "disc_loss": "losses/discriminator", "disc_acc": "charts/discriminator_accuracy"}
# Arguments a resumed run may change; all others are taken from the checkpoint.
RESUMABLE = {"resume", "run_dir", "data_root", "epochs", "max_steps", "device", "checkpoint_every",
             "keep_checkpoints", "log_every", "sample_every", "progress", "overwrite", "compile", "amp",
             "channels_last", "on_nan"}


class DivergenceError(UserError):
    exit_code = 3


def get_args_parser():
    p = argparse.ArgumentParser(description="Train the disentangling autoencoder of Mathieu et al. (2016).",
                                formatter_class=HelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=sorted(CONFIGS), help="dataset and network config")
    p.add_argument("--data-root", default=None,
                   help="data folder (default: $DISENTANGLE_DATA_ROOT, else ./data)")
    p.add_argument("--run-dir", default=None,
                   help="output folder (default: runs/{dataset}__z{Z}_s{S}__seed{SEED}__{time})")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --run-dir")
    p.add_argument("--resume", default=None, help="checkpoint file (or run directory) to continue from")
    p.add_argument("--epochs", type=int, default=50, help="epochs of floor(N / batch) iterations")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many iterations in all")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per batch of each process; under torchrun the global batch is this x WORLD_SIZE")
    p.add_argument("--style-dim", type=int, default=None, help="size of z (default: the dataset config's)")
    p.add_argument("--class-dim", type=int, default=None, help="size of s (default: the dataset config's)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate of all three optimisers")
    p.add_argument("--beta1", type=float, default=0.5)
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--gen-steps", type=int, default=2, help="generator updates per iteration")
    p.add_argument("--disc-steps", type=int, default=1, help="discriminator updates per iteration")
    p.add_argument("--disc-gate", type=float, default=0.8,
                   help="the discriminator steps only when its batch accuracy is below this")
    p.add_argument("--disc-fakes", default="posterior", choices=["posterior", "posterior+prior"],
                   help="fake pairs of the discriminator update: posterior = (x3, dec(mu1, s3)) only, as the "
                        "reference; posterior+prior = also (x3, dec(z ~ N(0, I), s3)), one more cross-entropy "
                        "term, and the --disc-gate accuracy is then over all its 3B pairs (B real, 2B fake)")
    p.add_argument("--kl-weight", type=float, default=1.0,
                   help="multiplies the KL term of the reconstruction and generator updates; the reference's KL "
                        "(weight 1) is summed over the code and divided by batch x pixels, the MSE's per-pixel scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="iterations between checkpoints (default: one epoch)")
    p.add_argument("--keep-checkpoints", type=int, default=3,
                   help="periodic checkpoints kept besides last.pt (0 = keep all)")
    p.add_argument("--log-every", type=int, default=50, help="iterations between progress-bar/log updates")
    p.add_argument("--sample-every", type=int, default=1000, help="iterations between swap grids")
    p.add_argument("--on-nan", default="stop", choices=["stop", "skip"],
                   help="on a NaN/inf loss: stop the run, or skip that update (checks every update)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the networks")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast for the forward passes")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default: on for CUDA)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")
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
    for name in ("epochs", "batch_size", "gen_steps", "disc_steps", "log_every", "sample_every"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("max_steps", "style_dim", "class_dim", "checkpoint_every"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.keep_checkpoints < 0:
        raise UserError(f"--keep-checkpoints must be >= 0, got {args.keep_checkpoints}")
    if not 0.0 <= args.disc_gate <= 1.0:
        raise UserError(f"--disc-gate must lie in [0, 1], got {args.disc_gate}")
    if args.kl_weight < 0:
        raise UserError(f"--kl-weight must be >= 0, got {args.kl_weight}")
    if args.lr <= 0 or not (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1):
        raise UserError("--lr must be positive and --beta1/--beta2 in [0, 1)")


# ----------------------------------------------------------------------------- the model state

class Trainer:
    """Networks, optimisers, pair sampler and noise generator of one run: what a checkpoint holds."""

    def __init__(self, cfg, args, train_set, device, world=None):
        self.cfg, self.args, self.device = cfg, args, device
        self.world = world or World()
        self.encoder, self.decoder, self.discriminator = (
            Encoder(cfg).to(device), Decoder(cfg).to(device), Discriminator(cfg).to(device))
        self.channels_last = args.channels_last if args.channels_last is not None else device.type == "cuda"
        if self.channels_last:
            for net in self.nets():
                net.to(memory_format=torch.channels_last)
        # Reconstruction and generator updates share the encoder/decoder parameters but, as in
        # the reference, keep separate Adam states.
        ae_params = list(self.encoder.parameters()) + list(self.decoder.parameters())
        adam = dict(lr=args.lr, betas=(args.beta1, args.beta2))
        self.ae_params = ae_params
        self.opt_ae = torch.optim.Adam(ae_params, **adam)
        self.opt_gen = torch.optim.Adam(ae_params, **adam)
        self.opt_disc = torch.optim.Adam(self.discriminator.parameters(), **adam)
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
        self.sampler = PairSampler(train_set.labels, seed, device)
        self.noise = torch.Generator(device=device)  # eps of the reparameterisation, z ~ N(0, I)
        self.noise.manual_seed(seed + 1)
        self.rank_streams = None  # every rank's sampler/noise states, gathered for rank 0's checkpoint
        self.n_pixels = cfg.channels * cfg.image_size * cfg.image_size
        self.skipped_updates = 0

    def nets(self):
        return self.encoder, self.decoder, self.discriminator

    def batch(self, idx):
        x = to_float(self.images[idx])
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def randn(self, n):
        return torch.randn(n, self.cfg.style_dim, generator=self.noise, device=self.device)

    def autocast(self):
        if not self.args.amp:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def update(self, opt, loss, inputs=None):
        """One optimiser step on `loss` (one backward per update); with --on-nan skip, skip non-finite ones."""
        if self.args.on_nan == "skip" and not self.world.all_true(torch.isfinite(loss)):  # all ranks skip or none
            self.skipped_updates += 1
            return
        opt.zero_grad(set_to_none=True)
        loss.backward(inputs=inputs)
        opt.step()

    def state_dict(self):
        return {"encoder": self.encoder.state_dict(), "decoder": self.decoder.state_dict(),
                "discriminator": self.discriminator.state_dict(), "opt_ae": self.opt_ae.state_dict(),
                "opt_gen": self.opt_gen.state_dict(), "opt_disc": self.opt_disc.state_dict(),
                "sampler": self.sampler.state_dict(), "noise": self.noise.get_state(),
                "world_size": self.world.size,
                **({"rank_streams": self.rank_streams} if self.world.distributed else {})}

    def gather_streams(self):
        """Collective (every rank calls it): every rank's sampler and noise states, in rank order,
        so that rank 0's checkpoint resumes each rank's own stream."""
        self.rank_streams = self.world.all_gather_object(
            {"sampler": self.sampler.state_dict(), "noise": self.noise.get_state()})

    def load_rank_streams(self, ckpt):
        """After load_state_dict: this rank's own streams from a checkpoint of a run with as many ranks."""
        check_world_size(ckpt, self.world)
        if self.world.distributed:
            streams = ckpt["rank_streams"][self.world.rank]
            self.sampler.load_state_dict(streams["sampler"])
            self.noise.set_state(streams["noise"])

    def load_state_dict(self, ckpt):
        path = ckpt.get("path")
        for name in ("discriminator", "opt_ae", "opt_gen", "opt_disc", "sampler", "noise"):
            if name not in ckpt:
                raise CheckpointError(f"'{path}' lacks '{name}': it cannot resume training")
        for name, net in zip(("encoder", "decoder", "discriminator"), self.nets()):
            load_state(net, ckpt[name], name, path)
        try:
            for name in ("opt_ae", "opt_gen", "opt_disc"):
                getattr(self, name).load_state_dict(ckpt[name])
            self.sampler.load_state_dict(ckpt["sampler"])
            self.noise.set_state(ckpt["noise"])
        except (ValueError, RuntimeError, KeyError) as e:
            raise CheckpointError(f"'{path}' does not match this run's optimiser/sampler: {e}") from None


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


def generator_step(t, x1, x3):
    """Update encoder+decoder: the discriminator must take (x3, dec(z1, s3)) and
    (x3, dec(z ~ N(0, I), s3)) for real same-class pairs; plus --kl-weight x KL(q(z|x1) || N(0, I))."""
    B = len(x1)
    with t.autocast():
        mu, logvar, s = t.enc(torch.cat([x1, x3]))
        mu1, logvar1, s3 = mu[:B].float(), logvar[:B].float(), s[B:]
        z1 = reparameterize(mu1, logvar1, t.randn(B))
        fake = t.dec(torch.cat([z1, t.randn(B)]), torch.cat([s3, s3]))  # dec(z1,s3) ; dec(z~N(0,I),s3)
        logits = t.disc_local(torch.cat([x3, x3]), fake).float()
    real = torch.ones(B, dtype=torch.long, device=x1.device)
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
    target = torch.cat([torch.ones(B, dtype=torch.long, device=x1.device),
                        torch.zeros(n_fake * B, dtype=torch.long, device=x1.device)])
    loss = F.cross_entropy(logits[:B], target[:B])
    for k in range(1, n_fake + 1):  # one cross-entropy per kind of fake, as the generator's two terms
        loss = loss + F.cross_entropy(logits[k * B:(k + 1) * B], target[k * B:(k + 1) * B])
    acc = (logits.argmax(1) == target).float().mean()
    return loss, acc


def train_iteration(t):
    """One iteration: reconstruction, then gen_steps generator updates, then disc_steps gated
    discriminator updates, each on freshly drawn batches. Returns the iteration's metrics."""
    a, B = t.args, t.args.batch_size
    i1, i2 = t.sampler.pairs(B)
    rec, kl = reconstruction_step(t, t.batch(i1), t.batch(i2))
    gen = torch.stack([generator_step(t, t.batch(t.sampler.anchors(B)), t.batch(t.sampler.anchors(B)))
                       for _ in range(a.gen_steps)]).mean()
    for _ in range(a.disc_steps):
        x1 = t.batch(t.sampler.anchors(B))
        i2, i3 = t.sampler.pairs(B)
        d_loss, d_acc = discriminator_loss(t, x1, t.batch(i2), t.batch(i3))
        # The iteration's one host read: the gate needs the accuracy; the other losses ride along.
        # Under torchrun they are averaged over ranks first, so every rank takes the same decision.
        values = t.world.average(torch.stack([rec, kl, gen, d_loss.detach(), d_acc])).tolist()
        stepped = values[-1] < a.disc_gate  # the 80% rule: a discriminator that wins is left alone
        if stepped:
            t.update(t.opt_disc, d_loss)
    metrics = dict(zip(METRICS, values))
    metrics["disc_stepped"] = int(stepped)
    return metrics


# ----------------------------------------------------------------------------- run directory

class MetricsLog:
    """Per-iteration CSV and TensorBoard curves that stay continuous across resumes."""

    FIELDS = ["step", "epoch"] + METRICS + ["disc_stepped"]

    def __init__(self, run_dir, start_step):
        self.path = os.path.join(run_dir, "metrics.csv")
        if start_step > 0 and os.path.exists(self.path):
            self._truncate(start_step)
        fresh = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        self.file = open(self.path, "a", newline="")
        self.csv = csv.writer(self.file)
        if fresh:
            self.csv.writerow(self.FIELDS)
        # Events are written synchronously (tensorboardX's SummaryWriter queues them to a thread whose
        # flush does not drain the queue, so a kill -9 could lose events older than the checkpoint).
        os.makedirs(os.path.join(run_dir, "tb"), exist_ok=True)
        self.tb = EventsWriter(os.path.join(run_dir, "tb", "events"), f".{os.getpid()}")
        if start_step:  # TensorBoard drops the events a killed run wrote after its last checkpoint
            self.tb.write_event(Event(wall_time=time.time(), step=start_step + 1,
                                      session_log=SessionLog(status=SessionLog.START)))

    def _truncate(self, start_step):
        """Keep the rows up to the checkpoint's step; drop later ones and any half-written line."""
        with open(self.path, newline="") as f:
            rows = [r for r in csv.reader(f)]
        keep = [rows[0]] + [r for r in rows[1:] if len(r) == len(self.FIELDS) and r[0].isdigit()
                            and int(r[0]) <= start_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(keep)
        os.replace(tmp, self.path)

    def write(self, step, epoch, m):
        self.csv.writerow([step, epoch] + [f"{m[k]:.6g}" for k in METRICS] + [m["disc_stepped"]])
        self.tb.write_event(Event(wall_time=time.time(), step=step, summary=Summary(
            value=[Summary.Value(tag=tag, simple_value=m[k]) for k, tag in TB_TAGS.items()])))

    def flush(self):
        self.file.flush()
        os.fsync(self.file.fileno())
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
    if args.run_dir is None:  # continue in the checkpoint's own run directory
        saved["run_dir"] = os.path.dirname(os.path.dirname(os.path.abspath(ckpt["path"])))
    return argparse.Namespace(**saved)


def save_checkpoint(t, run_dir, step, epoch, keep, periodic=True):
    """last.pt always; step_XXXXXXX.pt too for periodic checkpoints, keeping the `keep` newest."""
    bad = [n for n, p in ((n, p) for net in t.nets() for n, p in net.named_parameters())
           if not torch.isfinite(p).all()]
    if bad:
        raise DivergenceError(f"parameters became NaN/inf by step {step} ({bad[0]}); "
                              f"the last good checkpoint is kept")
    ckpt = {"format": CHECKPOINT_FORMAT, "step": step, "epoch": epoch, "args": vars(t.args),
            "model_config": t.cfg.to_dict(), "rng": rng_state(), "versions": library_versions(),
            **t.state_dict()}
    ckdir = os.path.join(run_dir, "checkpoints")
    atomic_save(ckpt, os.path.join(ckdir, "last.pt"))
    if periodic:
        atomic_save(ckpt, os.path.join(ckdir, f"step_{step:07d}.pt"))
        old = sorted(f for f in os.listdir(ckdir) if f.startswith("step_") and f.endswith(".pt"))
        for f in old[:-keep] if keep else []:
            os.remove(os.path.join(ckdir, f))
    return os.path.join(ckdir, "last.pt")


def fixed_grid_batch(args, n=8):
    """n images for the swap grids, from the test split where there is one, chosen by the seed."""
    try:
        data = load_dataset(args.dataset, args.data_root, "test", **dataset_options(args))
    except UserError:
        data = load_dataset(args.dataset, args.data_root, "train", **dataset_options(args))
    g = torch.Generator().manual_seed(args.seed)
    return to_float(data.images[torch.randperm(len(data), generator=g)[:n]])


class NullSink:
    """Stands in for the log file and the metrics log on ranks other than 0: every call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


# ----------------------------------------------------------------------------- main

def main(args):
    check_args(args)
    ckpt = load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None:
        args = merge_resume_args(args, ckpt)
    if ckpt is not None:  # the checkpoint's own model config is the truth for a resumed run
        cfg = ModelConfig.from_dict(ckpt["model_config"])
    else:
        cfg = get_config(args.dataset, style_dim=args.style_dim, class_dim=args.class_dim)
    args.style_dim, args.class_dim = cfg.style_dim, cfg.class_dim
    args.data_root = args.data_root or default_data_root()
    args.run_dir = args.run_dir or default_run_dir(args)
    world, device = setup_distributed(args.device)  # under torchrun: this rank's place and device
    try:
        return run_training(args, ckpt, cfg, world, device)
    finally:
        world.close()


def run_training(args, ckpt, cfg, world, device):
    """The training run of main(), as one rank of `world`."""
    if ckpt is not None:
        check_world_size(ckpt, world)  # before anything is written
    train_set = load_dataset(args.dataset, args.data_root, "train", **dataset_options(args))
    if args.batch_size > len(train_set):
        raise UserError(f"--batch-size {args.batch_size} is larger than the dataset ({len(train_set)} images)")
    # An epoch is N images seen over all ranks: floor(N / global batch) iterations.
    steps_per_epoch = max(1, len(train_set) // (args.batch_size * world.size))
    total = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch
    ckpt_every = args.checkpoint_every or steps_per_epoch
    grid_x = fixed_grid_batch(args).to(device) if world.is_main else None

    # Rank 0 makes the run directory (its run name, its time stamp) while the other ranks wait.
    run_dir = args.run_dir = world.on_main(lambda: prepare_run_dir(args, resuming=ckpt is not None))
    seed_everything(args.seed)
    t = Trainer(cfg, args, train_set, device, world)
    step = 0
    if ckpt is not None:
        t.load_state_dict(ckpt)
        t.load_rank_streams(ckpt)
        set_rng_state(ckpt["rng"])
        step = int(ckpt["step"])
    elif world.is_main:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({"args": vars(args), "model_config": cfg.to_dict(), "dataset_size": len(train_set),
                       "steps_per_epoch": steps_per_epoch, "world_size": world.size,
                       "versions": library_versions()}, f, indent=2)
    # The other ranks only train: no log, metrics, samples or checkpoint files.
    log_file = open(os.path.join(run_dir, "log.txt"), "a") if world.is_main else NullSink()

    def log(msg, console=True):
        if not world.is_main:
            return
        if console:
            tqdm.write(msg)
        log_file.write(msg + "\n")
        log_file.flush()

    log(f"{'resuming' if ckpt else 'training'} {args.dataset} (z={cfg.style_dim}, s={cfg.class_dim}) on {device}: "
        f"step {step} -> {total}, {steps_per_epoch} iterations per epoch, run dir {run_dir}"
        + (f"; {world.size} processes x batch {args.batch_size}" if world.distributed else ""))
    metrics_log = MetricsLog(run_dir, step) if world.is_main else NullSink()

    # Ctrl-C / SIGTERM: finish the current iteration, save a checkpoint, exit cleanly.
    stop = {}
    handlers = {s: signal.signal(s, lambda signum, frame: stop.setdefault("signal", signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    world.share_stop(stop)  # under torchrun, a signal to any rank stops all ranks after the same iteration

    def checkpoint(periodic=True):
        t.gather_streams()  # a collective: every rank is here at the same step
        if not world.is_main:
            return None
        metrics_log.flush()  # rows up to `step` are on disk before the checkpoint that claims them
        return save_checkpoint(t, run_dir, step, step // steps_per_epoch, args.keep_checkpoints, periodic)

    def sample():
        if not world.is_main:
            return
        save_grid_png(swap_grid(t.encoder, t.decoder, grid_x, grid_x),
                      os.path.join(run_dir, "samples", f"swap_{step:07d}.png"))

    bar = tqdm(total=total, initial=step, disable=not args.progress or not world.is_main, unit="it",
               dynamic_ncols=True)
    status, tick, tick_step = 0, time.perf_counter(), step
    try:
        if step == 0:
            sample()
        while step < total:
            m = train_iteration(t)
            step += 1
            bad = [k for k in METRICS if m[k] != m[k] or abs(m[k]) == float("inf")]
            if bad and args.on_nan == "stop":
                raise DivergenceError(f"{bad[0]} is {m[bad[0]]} at step {step}; stopped, the last good "
                                      f"checkpoint in {run_dir}/checkpoints is kept (--on-nan skip skips such updates)")
            metrics_log.write(step, step // steps_per_epoch, m)
            bar.update(1)
            if step % args.log_every == 0:
                bar.set_postfix(rec=f"{m['recon_loss']:.4f}", gen=f"{m['gen_loss']:.3f}",
                                disc=f"{m['disc_loss']:.3f}", acc=f"{m['disc_acc']:.2f}")
                now = time.perf_counter()
                log(f"step {step} epoch {step // steps_per_epoch} | {(step - tick_step) / (now - tick):.2f} it/s | "
                    + " ".join(f"{k} {m[k]:.4g}" for k in METRICS), console=not args.progress)
                tick, tick_step = now, step  # a resumed run's first interval is shorter than --log-every
            if step % args.sample_every == 0 or step == total:
                sample()
            if step % ckpt_every == 0 or step == total:
                checkpoint()
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
        world.barrier()  # no rank returns before rank 0's last checkpoint is on disk
    except DivergenceError as e:
        log(f"error: {e}")
        raise
    finally:
        bar.close()
        metrics_log.close()
        log_file.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    return status


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
