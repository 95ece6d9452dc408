"""Data-parallel training across processes launched by torchrun.

    torchrun --nproc_per_node=4 train.py --dataset mnist ...

torchrun starts one process per GPU (or CPU worker) and tells each its place through the
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `setup_distributed`
reads it and returns a `World`: this process's rank, the number of processes, and the
few collective operations train.py needs. A plain `python train.py` gets a World of one
process whose operations do nothing, so the single-process code path is unchanged.
"""
import datetime
import gc
import os

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from utils import UserError, WriteError, auto_device_name, pick_device


def launched_by_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_seed(seed, rank):
    """The seed of rank `rank`'s own pair and noise streams. Rank 0 keeps `seed` itself, so a
    single-process run draws what it always drew; other ranks get seeds spread by numpy's
    SeedSequence, far from seed + small k, so seed sweeps never share a stream with a rank."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])  # uint32: seed + 1 stays valid


class World:
    """This process's place among the training processes; one process when not under torchrun."""

    def __init__(self, rank=0, size=1, local_rank=0, device=None, owns_group=False):
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.device = device
        self.owns_group = owns_group  # destroy the process group on close() only if we made it
        self._stop = None             # the caller's stop-request dict, see share_stop()
        self.stop_agreed = False
        self._failure = None          # the caller's write-failure dict, see share_failure()
        self.failure_agreed = False

    @property
    def distributed(self):
        return self.size > 1

    @property
    def is_main(self):
        """Rank 0 alone writes logs, TensorBoard events, swap grids and checkpoints."""
        return self.rank == 0

    def wrap(self, module):
        """DistributedDataParallel around `module` (gradients averaged over ranks in backward).

        find_unused_parameters stays off: every update's one backward reaches every parameter
        of every wrapped network it runs through (all encoder heads feed each loss), so DDP
        need not search the graph. The networks hold no buffers, so DDP has none to broadcast."""
        if not self.distributed:
            return module
        ids = [self.device] if self.device is not None and self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def share_stop(self, stop):
        """Watch `stop` (a dict the signal handler fills): each average() carries this rank's
        stop request to all ranks, so every rank stops after the same iteration."""
        self._stop = stop

    def share_failure(self, failure):
        """Watch `failure` (a dict holding rank 0's first WriteError under "error"): each average()
        carries it to all ranks, so no rank is left waiting in a collective for a rank that stopped."""
        self._failure = failure

    def failed(self, final=False):
        """The WriteError that ends the run, the same on every rank, or None. One process: its own
        at once. Under torchrun: rank 0's, once an average() has carried its flag, or at final=True,
        which every rank calls at the end of the run (it also waits for rank 0, like a barrier)."""
        local = (self._failure or {}).get("error")
        if not self.distributed:
            return local
        if not (final or self.failure_agreed):
            return None
        msg = [str(local) if local is not None else None]
        dist.broadcast_object_list(msg, src=0)
        return WriteError(msg[0]) if msg[0] is not None else None

    def should_stop(self):
        if not self.distributed:
            return bool(self._stop)
        return self.stop_agreed  # decided at the last average(), the same on every rank

    def average(self, values):
        """The mean over ranks of a 1-D float tensor, as a list of floats: one all-reduce and one
        host read, the iteration's stop and write-failure flags riding along in both. All ranks
        receive the same bits, so decisions taken on the result (the discriminator's gate) are the
        same everywhere."""
        if not self.distributed:
            return values.tolist()
        # The flags are set on the device (a fill takes its value as a kernel argument): a tensor
        # made from Python data would reach a GPU by a pageable copy, which waits for the stream.
        buf = torch.nn.functional.pad(values.float(), (0, 2))
        if self._stop:
            buf[-2].fill_(1.0)
        if (self._failure or {}).get("error"):
            buf[-1].fill_(1.0)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)  # gloo has no AVG
        *mean, stop, failed = (buf / self.size).tolist()  # a flag's mean is > 0 iff some rank raised it
        self.stop_agreed, self.failure_agreed = stop > 0, failed > 0
        return mean

    def all_true(self, flag):
        """True on every rank iff `flag` (a 0-d bool tensor) is true on every rank."""
        if not self.distributed:
            return bool(flag)
        buf = flag.reshape(1).float()
        dist.all_reduce(buf, op=dist.ReduceOp.MIN)
        return bool(buf[0] > 0)

    def all_gather_object(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn):
        """Run fn() on rank 0 only and hand its result to every rank; a UserError it raises is
        raised on every rank (with its exit status), so no rank is left waiting for a rank that has stopped."""
        if not self.distributed:
            return fn()
        msg = [None, None, None]
        if self.is_main:
            try:
                msg = [fn(), None, None]
            except UserError as e:
                msg = [None, str(e), getattr(e, "exit_code", 2)]
        dist.broadcast_object_list(msg, src=0)
        if msg[1] is not None:
            err = UserError(msg[1])
            err.exit_code = msg[2]
            raise err
        return msg[0]

    def main_first(self, fn):
        """fn() on rank 0, then on the other ranks once rank 0 has finished (for work that writes
        shared files, such as a first download, that the others then read). A UserError rank 0
        raises is raised on every rank, so no rank is left waiting."""
        if not self.distributed:
            return fn()
        msg = [None]
        if self.is_main:
            try:
                result = fn()
            except UserError as e:
                msg = [str(e)]
        dist.broadcast_object_list(msg, src=0)  # the others wait here for rank 0
        if msg[0] is not None:
            raise UserError(msg[0])
        return result if self.is_main else fn()

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def close(self):
        """Destroy the process group we made. Objects that hold it and are only kept by reference
        cycles (a compiled DDP module, an exception's traceback) are freed first, while the group and
        the interpreter are whole, rather than at interpreter exit."""
        if self.owns_group and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()
            self.owns_group = False


def setup_distributed(device_name="auto", timeout_minutes=60):
    """(World, device) of this process. Under torchrun (WORLD_SIZE > 1): join the process group,
    on cuda:LOCAL_RANK with NCCL when CUDA is there (or asked for), else on the CPU with gloo.
    A collective fails after `timeout_minutes` of waiting: the others wait for rank 0 to prepare
    the data, which can take longer than torch's default (10 minutes with NCCL).
    A process group the caller already made (tests) is joined as it is."""
    if not dist.is_initialized() and (not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1):
        return World(), pick_device(device_name)
    if device_name == "mps":
        raise UserError("torchrun training runs on CUDA (NCCL) or on the CPU (gloo), not on MPS")
    if device_name == "auto":  # CUDA where there is one (or $DISENTANGLE_AUTO_DEVICE says so), else the CPU
        device_name = "cuda" if auto_device_name() == "cuda" else "cpu"
    device = pick_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices: "
                            f"--nproc_per_node must not exceed the GPUs of a node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    world = World(dist.get_rank(), dist.get_world_size(), local_rank, device, owns_group=owns)
    if not world.distributed:  # a group of one (torchrun --nproc_per_node=1): plain training
        world.close()
        return World(), device
    return world, device
