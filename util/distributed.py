"""Several processes, one run: the launch, node_first, stop signals all ranks obey at one step, and
a data order f(seed, epoch) in world x accum micro-batches (the same for any equal product)."""
import datetime
import os
import signal
import threading

import torch
import torch.distributed as dist

from util import decode, files
from util.cli import UserError


def mix_seed(*xs):
    """A 63-bit seed from a few ints (FNV-style; no Python hash randomisation involved)."""
    h = 0xCBF29CE484222325
    for x in xs:
        h = ((h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) % 2**64
    return h % 2**63


class Indexed(torch.utils.data.Dataset):
    """Keys (epoch, index): augmentation seeded by (seed, epoch, index), the same on every rank."""

    def __init__(self, base, seed):
        self.base, self.seed = base, seed

    def __getitem__(self, key):
        with torch.random.fork_rng(devices=[]):   # torchvision transforms use the global CPU RNG
            # the CPU generator alone: torch.manual_seed would seed every device too, 20x slower
            torch.default_generator.manual_seed(mix_seed(self.seed, 1, *key))
            return self.base[key[1]]


class GlobalBatchSampler:
    """DistributedSampler's job, but a global batch is world x accum contiguous micro-batches (rank
    r owns k = r x accum + a), from any step; order = f(seed, epoch), the last partial dropped."""

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
    """Workers leave SIGTERM / SIGINT to the main process: it ends the step, saves, stops them."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(train_set, args, world, rank, device):
    sampler = GlobalBatchSampler(len(train_set), args.batch_size, world, rank, args.accum_iter,
                                 args.seed)
    return torch.utils.data.DataLoader(
        Indexed(train_set, args.seed), batch_sampler=sampler, num_workers=args.num_workers,
        collate_fn=decode.collate, worker_init_fn=ignore_stop_signals,   # collate: JPEG bytes too
        pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0)


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
    """A batch over the set's size (the default 2048) -> the set, cut to whole world x accum."""
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


def setup_distributed():
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=60)   # rank 0 may fit the PCA while others wait
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        # the store outlives an elastic restart: own keys, or a worker reads old ones and hangs
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"attempt_{attempt}/", store),
                                rank=rank, world_size=world, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    return rank, world, device


def node_first(build, world):
    """build() on each node's local rank 0, then its other ranks: a shared --download runs once."""
    if world == 1:
        return build()
    if int(os.environ.get("LOCAL_RANK", 0)) != 0:
        dist.barrier()                          # local rank 0 has built
        return build()
    result = build()
    dist.barrier()
    return result


def run_distributed(train_fn, args):
    rank, world, device = setup_distributed()
    try:
        return train_fn(args, rank, world, device)
    finally:
        files.release_locks()
        if dist.is_initialized():
            dist.destroy_process_group()


class StopSignal:
    """SIGTERM / SIGINT: finish the step, save, exit; all ranks stop after the same step (the flag's
    async gloo all-reduce, read a step later: no GPU wait). A second signal stops at once."""

    def __init__(self, world):
        self.world, self.received, self.previous = world, 0, {}
        self.group = dist.new_group(backend="gloo") if world > 1 else None
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
