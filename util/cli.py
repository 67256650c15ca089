"""What every script's command line shares: a fixable mistake is one `error: ...` line, exit 2."""
import argparse
import contextlib
import math
import os
import sys
import threading
import traceback

import torch


class UserError(Exception):
    """A problem the user can fix: one line, no traceback (even out of a DataLoader worker)."""

    def __init__(self, msg=""):
        msg = str(msg)
        if "Original Traceback" in msg and "UserError: " in msg:
            msg = msg.rsplit("UserError: ", 1)[1].strip()
        super().__init__(msg)


class Interrupted(Exception):
    """A run a signal (SIGTERM, Ctrl-C) stopped after saving what resumes it: exit 128 + signal."""

    def __init__(self, msg, signum):
        super().__init__(msg)
        self.exit_code = 128 + signum


def quiet_fd_sharing(args):
    """No traceback from multiprocessing's fd-sharing thread when Ctrl-C stops a worker mid-send."""
    frames = traceback.extract_tb(args.exc_traceback)
    handover = any(f.filename.endswith("resource_sharer.py") for f in frames)
    if not (handover and issubclass(args.exc_type, (EOFError, ConnectionError))):
        threading.__excepthook__(args)


def run_cli(main, parser, argv=None):
    """Parse argv, run main(args); a UserError, a stopped run or Ctrl-C: one line, no traceback."""
    threading.excepthook = quiet_fd_sharing
    try:
        return main(parser.parse_args(argv))
    except UserError as e:
        message, code = f"error: {e}", 2
    except Interrupted as e:
        message, code = str(e), e.exit_code
    except KeyboardInterrupt:
        message, code = "interrupted (Ctrl-C)", 130
    bars = getattr(sys.modules.get("tqdm"), "tqdm", None)
    for bar in list(getattr(bars, "_instances", ())):     # the message gets a line of its own
        bar.close()
    print(message, file=sys.stderr)
    sys.exit(code)


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's default in --help once (unless its text says it), and a numeric flag's range."""

    def _get_help_string(self, action):
        text = action.help or ""
        rule = getattr(action.type, "rule", None)
        if rule:
            text = f"{text} (must be {rule})"
        shown = action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
        if action.required or "(default:" in text or action.default is argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)" if shown else text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the house rules: defaults in --help, a bad flag one `error:` line, exit 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"error: {message} (see python {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def bounded(kind, low, high=None, low_open=False, high_open=False):
    """An argparse type: finite `kind` in [low, high] (*_open: end excluded), checked at parse."""
    rule = f"> {low}" if low_open else f">= {low}"
    if high is not None:
        rule = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def parse(text):
        value = kind(text)                                 # ValueError: argparse says "invalid"
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        too_low = value <= low if low_open else value < low
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    parse.__name__ = kind.__name__                         # argparse's "invalid int value" text
    parse.rule = rule
    return parse


def number_list(kind, low, high=None, low_open=False):
    """An argparse type: comma-separated numbers, each checked as bounded() checks one."""
    one = bounded(kind, low, high, low_open)

    def parse(text):
        values = []
        for item in text.split(","):
            try:
                values.append(one(item.strip()))
            except (ValueError, argparse.ArgumentTypeError) as e:
                raise argparse.ArgumentTypeError(f"{item!r} in {text!r}: {e or 'not a number'}")
        return values
    parse.__name__ = f"list of {kind.__name__}"
    parse.rule = f"comma-separated, each {one.rule}"
    return parse


def device(text):
    """An argparse type: a torch device this machine has (cpu, cuda, cuda:1, mps)."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; pass cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available() or \
            dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no such device; pass cpu")
    return dev


device.rule = "cpu, or a cuda / mps device this machine has"
SEED = bounded(int, 0, 2**63 - 1)                         # any seed torch.manual_seed takes


def flag(dest):
    return "--" + dest.replace("_", "-")


def refuse_ignored(args, defaults, rules):
    """Refuse, with the reason, a flag the chosen settings would ignore. rules: (ignored?, [dests],
    why); a flag is given when it differs from `defaults` (the parser's for this model, preset)."""
    for ignored, dests, why in rules:
        given = [flag(d) for d in dests if getattr(args, d) != getattr(defaults, d)]
        if ignored and given:
            raise UserError(f"{', '.join(given)} would be ignored {why}; drop it")


def available_memory():
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(nbytes, what, fix, device=None):
    """Refuse up front what needs more memory than the machine (or the CUDA `device`) has free."""
    free = available_memory()
    if device is not None and device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    if nbytes > free:
        raise UserError(f"{what} needs about {nbytes / 1e9:.1f} GB of memory, {free / 1e9:.1f} GB "
                        f"is available; {fix}")


def print_settings(stage, lines):
    print(f"[{stage}] effective settings\n  " + "\n  ".join(lines), flush=True)


def progress(**kwargs):
    """A tqdm bar; in a file (a cluster log) it redraws once a minute, not per step (27 MB/run)."""
    from tqdm import tqdm
    interactive = sys.stderr.isatty()
    return tqdm(mininterval=0.1 if interactive else 60, dynamic_ncols=interactive, **kwargs)


@contextlib.contextmanager
def torch_threads(n):
    """n intra-op threads for a while (rendering small images on many threads is slower)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
