"""Several processes, one run: the launch (torchrun's environment: NCCL on GPUs, gloo on CPU),
the data order every rank agrees on, node_first, and the stop signals all ranks obey after the
same step. The data order is a function of (seed, epoch), an image's augmentation of (seed,
epoch, index), and a global batch is cut into world x accum micro-batches: any layout with the
same world x accum reads the same images, and a resume starts mid-epoch where it left.
"""
import datetime
import os
import signal
import threading

import torch
import torch.distributed as dist

from util import decode, files
from util.cli import UserError


# ---- The data order ---------------------------------------------------------------------------
def mix_seed(*xs):
    """A 63-bit seed from a few ints (FNV-style; no Python hash randomisation involved)."""
    h = 0xCBF29CE484222325
    for x in xs:
        h = ((h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) % 2**64
    return h % 2**63


class Indexed(torch.utils.data.Dataset):
    """Keys are (epoch, index); the image's augmentation is drawn from the CPU RNG seeded by
    (seed, epoch, index): the same in any worker, on any rank, and after a mid-epoch resume."""

    def __init__(self, base, seed):
        self.base, self.seed = base, seed

    def __getitem__(self, key):
        with torch.random.fork_rng(devices=[]):   # torchvision transforms use the global CPU RNG
            # the CPU generator alone: torch.manual_seed would seed every device too, 20x slower
            torch.default_generator.manual_seed(mix_seed(self.seed, 1, *key))
            return self.base[key[1]]


class GlobalBatchSampler:
    """DistributedSampler's job (set_epoch, a slice per rank), but each global batch is cut into
    world x accum contiguous micro-batches (rank r owns k = r x accum + a) and an epoch can start
    at any step. Permutation = f(seed, epoch); the incomplete last global batch is dropped."""

    def __init__(self, n, global_batch, world, rank, accum, seed):
        self.n, self.global_batch, self.rank, self.accum = n, global_batch, rank, accum
        self.seed, self.micro = seed, global_batch // (world * accum)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start = epoch, start_step

    def __iter__(self):
        order = torch.Generator().manual_seed(mix_seed(self.seed, 2, self.epoch))
        perm = torch.randperm(self.n, generator=order)
        for step in range(self.start, self.n // self.global_batch):
            for a in range(self.accum):
                first = step * self.global_batch + (self.rank * self.accum + a) * self.micro
                yield [(self.epoch, int(i)) for i in perm[first:first + self.micro]]


def ignore_stop_signals(worker_id):
    """DataLoader workers leave SIGTERM / SIGINT to the main process, which finishes the step,
    saves and then shuts them down (a worker killed first would fail the step being finished)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(train_set, args, world, rank, device):
    """The DataLoader of this rank's micro-batches: its batch_sampler a GlobalBatchSampler, its
    dataset the Indexed training set."""
    sampler = GlobalBatchSampler(len(train_set), args.batch_size, world, rank, args.accum_iter,
                                 args.seed)
    return torch.utils.data.DataLoader(
        Indexed(train_set, args.seed), batch_sampler=sampler, num_workers=args.num_workers,
        collate_fn=decode.collate,                    # --decode gpu: a batch of JPEG bytes
        worker_init_fn=ignore_stop_signals, pin_memory=device.type == "cuda",
        persistent_workers=args.num_workers > 0)


def first_images(loader, n, device):
    """The first n training images (epoch 0's augmentation) on the device: for pictures."""
    indexed = loader.dataset
    items = [indexed[(0, i)] for i in range(min(n, len(indexed.base)))]
    return decode.batch_to_images(decode.collate(items)[0], device)


def check_layout(args, world):
    if args.batch_size % (world * args.accum_iter):
        raise UserError(f"--batch-size {args.batch_size} (the global batch) must be a positive "
                        f"multiple of world size {world} x --accum-iter {args.accum_iter}")


def cap_batch(args, n, world, is_main):
    """A default batch (the paper's 2048) on a small set becomes one global batch of the whole
    set (a multiple of world x accum), so the defaults run on any data; said, not silent."""
    layout = world * args.accum_iter
    if args.batch_size <= n:
        return
    capped = n // layout * layout
    if capped == 0:
        raise UserError(f"the training set ({n} images) is smaller than world size {world} x "
                        f"--accum-iter {args.accum_iter}")
    if is_main:
        print(f"[train] note: --batch-size {args.batch_size} exceeds the training set ({n} "
              f"images); using a global batch of {capped}", flush=True)
    args.batch_size = capped


# ---- Processes -------------------------------------------------------------------------------
def setup_distributed():
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE: NCCL on GPUs, gloo on CPU; else one process."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # long timeout: rank 0 may fit the PCA while the others wait at a barrier
        timeout = datetime.timedelta(minutes=60)
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun keeps its store across an elastic restart (--max-restarts): keys of this
        # attempt's own, or a restarted worker may read the previous attempt's addresses and hang
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"attempt_{attempt}/", store),
                                rank=rank, world_size=world, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    return rank, world, device


def node_first(build, world):
    """build() on each node's local rank 0 first, then on the node's other ranks: what the ranks
    of a node share (a --download into one folder) is prepared once, not by all of them at the
    same time. -> build()'s result. Every rank passes the one barrier."""
    if world == 1:
        return build()
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    result = None
    if first:
        result = build()
    dist.barrier()
    if not first:
        result = build()
    return result


def run_distributed(train_fn, args):
    """main() of a training script: set up, train, always tear the process group down."""
    rank, world, device = setup_distributed()
    try:
        return train_fn(args, rank, world, device)
    finally:
        files.release_locks()
        if dist.is_initialized():
            dist.destroy_process_group()


class StopSignal:
    """SIGTERM (a cluster's notice before it kills a job) or SIGINT (Ctrl-C) asks the run to stop:
    it finishes the step, saves a resumable checkpoint and exits. Under torchrun all ranks must
    stop after the same step, so each step all-reduces the flag (max) on a CPU gloo group,
    asynchronously, and uses the result one step later: no rank waits for its GPU. A second
    signal stops at once, the default way."""

    def __init__(self, world):
        self.world, self.received, self.previous = world, 0, {}
        self.group = None
        if world > 1:
            self.group = dist.new_group(backend="gloo")
        self.flag, self.pending = None, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():   # signal.signal's rule
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc):
        if self.pending is not None:
            self.pending.wait()                    # every rank launched it: it completes
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame):
        if self.received:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.received = signum

    def agreed(self):
        """Call once per step on every rank -> the signal all ranks stop on now (0: go on)."""
        if self.world == 1:
            return self.received
        signum = 0
        if self.pending is not None:
            self.pending.wait()
            signum = int(self.flag.item())         # a CPU tensor: no device sync
        self.flag = torch.tensor([self.received], dtype=torch.int64)
        self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group,
                                       async_op=True)
        return signum
