"""The command-line conventions every script shares: a mistake the user can fix is one
`error: ...` line and exit 2, no traceback (UserError, run_cli, ArgumentParser, bounded); a run a
signal stopped says what it saved (Interrupted); one settings block (print_settings); the
progress bar. A script's entry point is `cli.run_cli(main, get_args_parser())`.
"""
import argparse
import contextlib
import math
import os
import sys

import torch


class UserError(Exception):
    """A problem the user can fix (bad path, missing file, bad flag): printed without traceback.
    A DataLoader worker re-raises it as "Caught UserError in DataLoader worker ... Original
    Traceback ... UserError: <msg>": the message is recovered."""

    def __init__(self, msg=""):
        msg = str(msg)
        if "Original Traceback" in msg and "UserError: " in msg:
            msg = msg.rsplit("UserError: ", 1)[1].strip()
        super().__init__(msg)


class Interrupted(Exception):
    """A run stopped on purpose by a signal (SIGTERM from a cluster, Ctrl-C) after saving what
    lets it resume: run_cli prints the message and exits with 128 + the signal number."""

    def __init__(self, msg, signum):
        super().__init__(msg)
        self.exit_code = 128 + signum


def run_cli(main, parser, argv=None):
    """Parse argv, run main(args): a UserError is one `error: msg` line and exit 2; a stopped run
    says what it saved; Ctrl-C anywhere else exits 130, no traceback."""
    try:
        args = parser.parse_args(argv)
        return main(args)
    except UserError as e:
        close_bars()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        close_bars()
        print(str(e), file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        close_bars()
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)


def close_bars():
    """Close the progress bars still open, so that the last message has a line of its own."""
    bars = getattr(sys.modules.get("tqdm"), "tqdm", None)
    for bar in list(getattr(bars, "_instances", ())):
        bar.close()


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's default in --help, once (a help text that says its default in words is left
    as it is), and every numeric flag's valid range (the rule of its bounded type)."""

    def _get_help_string(self, action):
        text = action.help or ""
        rule = getattr(action.type, "rule", None)
        if rule:
            text = f"{text} (must be {rule})"
        optional = (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
        shown = action.option_strings or action.nargs in optional
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
    """An argparse type: `kind` (int or float) in [low, high] (*_open: the end excluded), the rule
    shown in --help. NaN and infinity are refused for every float; `--epochs -3` stops at parse
    time, not mid-run."""
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


SEED = bounded(int, 0, 2**63 - 1)                         # any seed torch.manual_seed takes


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


def flag(dest):
    """An argparse dest as the user typed it: latent_dim -> --latent-dim."""
    return "--" + dest.replace("_", "-")


def refuse_ignored(args, defaults, rules):
    """A flag the chosen settings would ignore is refused with the reason, never dropped. rules:
    (ignored?, [dests], why); a flag counts as given when its value differs from `defaults`
    (the parser's defaults for this run's model and preset)."""
    for ignored, dests, why in rules:
        given = [flag(d) for d in dests if getattr(args, d) != getattr(defaults, d)]
        if ignored and given:
            raise UserError(f"{', '.join(given)} would be ignored {why}; drop it")


def available_memory():
    """Bytes this machine can still allocate (MemAvailable; elsewhere its physical memory)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(nbytes, what, fix, device=None):
    """Refuse before any work a request that needs more memory than the machine (or the CUDA
    `device`) has free."""
    free = available_memory()
    if device is not None and device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    if nbytes > free:
        raise UserError(f"{what} needs about {nbytes / 1e9:.1f} GB of memory, {free / 1e9:.1f} GB "
                        f"is available; {fix}")


def print_settings(stage, lines):
    """The effective settings of a run in one block, as MAE prints them: what this run does."""
    print(f"[{stage}] effective settings\n  " + "\n  ".join(lines), flush=True)


def progress(**kwargs):
    """A tqdm bar. Written to a file (a cluster log) rather than a terminal, it redraws once a
    minute instead of several times a second: ~100 bytes per step would be ~27 MB per run."""
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
