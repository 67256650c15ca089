"""The conventions every l-DAE script shares: a user's mistake is one `error: ...` line and exit 2
(UserError, run_cli, ArgumentParser, bounded), a file is written in one way (atomic_write: its own
temporary name, fsync, rename; a full disk said plainly) and a user's torch file is read in one way
(load_torch: weights only, a file that would run code refused by name).

A script's entry point is `cli.run_cli(main, get_args_parser())`; its main(args) raises UserError
for anything the user can fix, Interrupted when a signal stopped it after saving. Also here: the
progress bar (throttled off a terminal), check_writable_dir and torch_threads.
"""
import argparse
import contextlib
import errno
import os
import shutil
import sys
import uuid

import torch
from tqdm import tqdm


# ---- The CLI convention: a user's mistake is one `error: ...` line and exit 2, no traceback.
class UserError(Exception):
    """A problem the user can fix (bad path, missing files, bad flag): printed without traceback.
    A DataLoader worker's exception is re-raised as type("Caught UserError in DataLoader worker
    ... Original Traceback ... UserError: <msg>") (torch/_utils.py ExceptionWrapper): we recover
    <msg>."""

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
    """Parse argv, run main(args). House rule: a UserError is one `error: msg` line and exit 2; a
    signal-stopped run says what it saved; Ctrl-C outside a training loop exits 130, no
    traceback."""
    args = parser.parse_args(argv)
    try:
        return main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in --help, once: a help text that already says its default in words
    ("(default: the model's own level)") is left as it is."""

    def _get_help_string(self, action):
        if action.required or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the house conventions: every flag's default shown in --help, and a bad flag
    reported as one `error: ...` line with exit 2 (argparse's own format adds a usage block)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"error: {message} (see python {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def bounded(kind, low, high=None, low_open=False, high_open=False):
    """An argparse type: `kind` (int or float) checked to lie in [low, high]; *_open excludes the
    end. `--epochs -3` then stops at parse time with one line instead of running a step."""
    rule = f"> {low}" if low_open else f">= {low}"
    if high is not None:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        rule = f"in {left}{low}, {high}{right}"

    def parse(text):
        value = kind(text)                                 # ValueError: argparse says "invalid"
        too_low = value <= low if low_open else value < low
        too_high = False
        if high is not None:
            too_high = value >= high if high_open else value > high
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    parse.__name__ = kind.__name__                         # argparse's "invalid int value" text
    return parse


# ---- Files: one way to write them (atomic, durable, a full disk said plainly) and one way to
# read the torch files a user names (missing, unreadable and code-running files refused by name).
def temp_name(path):
    """A temporary name beside `path` that no other process uses (pid + random): any number of
    processes may write the same file at once, and each rename puts a complete file in place."""
    return f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def clean_stale_temps(folder, names):
    """Remove the temporary files (temp_name's) a killed writer left in `folder` for the files
    whose names start with one of `names` -> their names."""
    stale = [entry for entry in os.listdir(folder)
             if entry.endswith(".tmp") and any(entry.startswith(n) for n in names)]
    for entry in stale:
        os.remove(os.path.join(folder, entry))
    return stale


def _fsync(path, directory=False):
    flags = os.O_RDONLY
    if directory:
        flags |= os.O_DIRECTORY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def nbytes(obj):
    """Bytes of the tensors in a nested dict/list (what torch.save of it needs, about)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def write_error(e, path, size_hint=None):
    """An OSError while writing `path` -> the UserError a user can act on."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(path):
        kept = f"the previous {os.path.basename(path)} is intact"
    else:
        kept = "nothing was written"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        need = f"it needs about {size_hint / 1e6:.1f} MB, " if size_hint else ""
        free = shutil.disk_usage(folder).free / 1e6
        return UserError(f"no space left on the device writing {path} ({need}{free:.1f} MB free "
                         f"in {folder}); {kept}. Free some space or write elsewhere")
    return UserError(f"cannot write {path} ({e.strerror or e}); {kept}. Choose a writable folder")


def atomic_write(path, write, size_hint=None):
    """write(tmp) fills a temporary file beside `path`; it is fsync'ed, renamed over `path`, and
    the folder fsync'ed. So `path` always holds the old file or the whole new one, even after a
    kill or a power loss; no temporary file is left; an OSError (full disk, read-only folder)
    becomes a UserError naming the file and saying the old one is intact."""
    tmp = temp_name(path)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(os.path.dirname(os.path.abspath(path)), directory=True)
    except OSError as e:
        raise write_error(e, path, size_hint) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_torch(obj, path):
    """torch.save through atomic_write: the one way this project writes a .pt file."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), nbytes(obj))


def load_torch(path, what, fix, mmap=False):
    """torch.load(weights_only=True) of a file the user named. A missing or unreadable file, or
    one that holds pickled Python objects (loading those would run code), is one UserError that
    names `what` and the path and ends with `fix`. mmap: map the tensors, do not read them."""
    if not path or not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated, not a torch file, pickled objects
        if "Weights only load failed" in str(e):
            raise UserError(f"refused {what} {path}: it holds pickled Python objects, and loading "
                            f"them would run their code; only tensors and plain containers are "
                            f"read. {fix}") from None
        raise UserError(f"cannot read {what} {path} ({type(e).__name__}: {str(e)[:200]}); "
                        f"{fix}") from None


def write_lines(path, lines):
    with open(path, "w") as f:
        f.writelines(lines)


def progress(**kwargs):
    """A tqdm bar. Written to a file (a cluster log) rather than a terminal, it redraws once a
    minute instead of several times a second: ~100 bytes per step would be ~27 MB per run."""
    interactive = sys.stderr.isatty()
    return tqdm(mininterval=0.1 if interactive else 60, dynamic_ncols=interactive, **kwargs)


def check_writable_dir(folder, flag):
    """Create `folder` if needed and prove it takes a file, before any work is done."""
    probe = os.path.join(folder, f".write_test_{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag} {folder} is not writable ({e.strerror}); "
                        f"pass another {flag}") from None


@contextlib.contextmanager
def torch_threads(n):
    """n intra-op threads for a while (on a loaded 2-core box 2 threads made render 200x slower)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
