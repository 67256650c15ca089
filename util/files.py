"""One way to write a file and one way to read a user's torch file. A write is atomic and durable
(its own temporary name, fsync, rename, a full disk said plainly) and never replaces a file this
run did not create unless told to (claim_outputs); a run folder has one owner at a time (lock);
a read takes tensors only (a file that would run code is refused by name)."""
import atexit
import contextlib
import errno
import os
import shutil
import socket
import time
import uuid

import torch

from util.cli import UserError


def temp_name(path):
    """A temporary name beside `path` that no other process uses (pid + random): any number of
    processes may write the same file at once, and each rename puts a complete file in place."""
    return f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def clean_stale_temps(folder, names):
    """Remove the temporary files a killed writer left in `folder` for the files whose names
    start with one of `names` -> their names."""
    stale = [entry for entry in os.listdir(folder)
             if entry.endswith(".tmp") and any(entry.startswith(n) for n in names)]
    for entry in stale:
        os.remove(os.path.join(folder, entry))
    return stale


def fsync(path, directory=False):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def nbytes(obj):
    """Bytes of the tensors in a nested dict/list (about what torch.save of it needs)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def write_error(e, path, size_hint=None):
    """An OSError (or torch's writer's RuntimeError) while writing `path` -> the UserError a user
    can act on."""
    folder = os.path.dirname(os.path.abspath(path))
    kept = "nothing was written"
    if os.path.exists(path):
        kept = f"the previous {os.path.basename(path)} is intact"
    full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(e, RuntimeError):             # torch's writer: "... unexpected pos ..."
        full = shutil.disk_usage(folder).free < (size_hint or 0) + 2**20
    if full:
        need = f"it needs about {size_hint / 1e6:.1f} MB, " if size_hint else ""
        free = shutil.disk_usage(folder).free / 1e6
        return UserError(f"no space left on the device writing {path} ({need}{free:.1f} MB free "
                         f"in {folder}); {kept}. Free some space or write elsewhere")
    return UserError(f"cannot write {path} ({e.strerror or e}); {kept}. Choose a writable folder")


def atomic_write(path, write, size_hint=None):
    """write(tmp) fills a temporary file beside `path`; it is fsync'ed, renamed over `path`, and
    the folder fsync'ed. So `path` holds the old file or the whole new one, even after a kill or
    a power loss; no temporary file is left; an OSError becomes a UserError naming the file."""
    tmp = temp_name(path)
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
        fsync(os.path.dirname(os.path.abspath(path)), directory=True)
    except OSError as e:
        if e.errno is None or e.filename not in (None, tmp, path):    # not this write's: a read
            raise
        raise write_error(e, path, size_hint) from None
    except RuntimeError as e:                   # torch's writer says a full disk this way
        if "write" not in str(e).lower() and "unexpected pos" not in str(e):
            raise
        raise write_error(e, path, size_hint) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_torch(obj, path):
    """torch.save through atomic_write: the one way this project writes a .pt file."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), nbytes(obj))


def write_lines(path, lines):
    """A text file of `lines`, atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(lines)
    return atomic_write(path, write)


def load_torch(path, what, fix, mmap=False):
    """torch.load(weights_only=True) of a file the user named. A missing or unreadable file, or
    one holding pickled Python objects (loading them would run their code), is one UserError
    naming `what` and the path and ending with `fix`. mmap: map the tensors, do not read them."""
    if not path or not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:                        # truncated, not a torch file, pickled objects
        if "Weights only load failed" in str(e):
            raise UserError(f"refused {what} {path}: it holds pickled Python objects, and loading "
                            f"them would run their code; only tensors and plain containers are "
                            f"read. {fix}") from None
        raise UserError(f"cannot read {what} {path} ({type(e).__name__}: {str(e)[:200]}); "
                        f"{fix}") from None


def field_problem(obj, required, optional=None):
    """What is wrong with a loaded file's top level: not a dict, a `required` key missing, or a
    key (required or optional) of the wrong type ({key: type}) -> a phrase, or None."""
    if not isinstance(obj, dict):
        return f"it holds a {type(obj).__name__}, not a dict"
    for key, kind in {**(optional or {}), **required}.items():
        if key not in obj and key in required:
            return f"no {key!r}"
        if key in obj and not isinstance(obj[key], kind):
            return f"its {key!r} is a {type(obj[key]).__name__}"
    return None


def nonfinite(tensors):
    """The names of the floating-point tensors of a state dict that hold NaN or infinity."""
    return [name for name, value in tensors.items() if isinstance(value, torch.Tensor)
            and value.is_floating_point() and not bool(torch.isfinite(value).all())]


CREATED_DIRS = []    # folders check_writable_dir made: removed at exit if the run left them empty


def check_writable_dir(folder, flag):
    """Create `folder` if needed and prove it takes a file, before any work is done. A folder
    made here that is still empty when the process exits (a refused run) is removed again."""
    probe = os.path.join(folder, f".write_test_{os.getpid()}")
    missing = []
    parent = os.path.abspath(folder)
    while not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(folder, exist_ok=True)
        CREATED_DIRS.extend(missing)                        # deepest first
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag} {folder} is not writable ({e.strerror}); "
                        f"pass another {flag}") from None


# ---- Outputs: nothing replaced that this run did not write, one run per folder ---------------
def claim_outputs(paths, overwrite, inputs=(), flag="--overwrite"):
    """Before any work: every output path that exists was not written by this run, so it is
    refused unless `flag` says to replace it; an output that is one of the run's own inputs is
    refused always."""
    for path in paths:
        for source in inputs:
            if source and os.path.exists(source) and os.path.exists(path) and \
                    os.path.samefile(source, path):
                raise UserError(f"{path} is this run's own input; write the output elsewhere")
        if os.path.lexists(path) and not overwrite:
            raise UserError(f"{path} exists and this run did not write it; pass {flag} to "
                            f"replace it, or write elsewhere")


HELD_LOCKS = []                             # released at the run's end, error or exit


def lock(folder):
    """Own `folder` for this run: FOLDER/.lock holds the owner's pid and host. A lock whose
    process is gone (same host, pid not running: a killed run) is taken over and said; a live
    one, or one of another host, is refused with its owner named."""
    path = os.path.join(folder, ".lock")
    me = f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = open(path).read().split()
            if len(owner) < 2 and time.time() - os.path.getmtime(path) < 5:
                break                           # its owner is writing it now
            pid, host = 0, socket.gethostname()     # empty: its owner was killed writing it
            if len(owner) > 1:
                pid, host = int(owner[0]), owner[1]
            if pid == os.getpid() and host == socket.gethostname():
                HELD_LOCKS.append(path)         # this process's own earlier run
                return path
            if host != socket.gethostname() or pid_alive(pid):
                raise UserError(f"{folder} is in use by the run of pid {pid} on {host} (its lock "
                                f"{path}, since {' '.join(owner[2:])}); wait for it, or delete "
                                f"the lock if that run is gone") from None
            print(f"[run] taking over {path} of a run that is gone (pid {pid})", flush=True)
            os.remove(path)
            continue
        except OSError as e:
            raise write_error(e, path) from None
        try:
            with os.fdopen(fd, "w") as out:
                out.write(me)
        except OSError as e:                    # a full disk
            os.remove(path)
            raise write_error(e, path) from None
        HELD_LOCKS.append(path)
        return path
    raise UserError(f"cannot lock {folder}: another run is taking it over at the same time")


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                     # alive, another user's
        return True
    return pid > 0


def release_locks():
    """Remove the locks this process holds (a run's end, error or stop; a kill leaves them)."""
    while HELD_LOCKS:
        path = HELD_LOCKS.pop()
        if os.path.exists(path):
            os.remove(path)


def at_exit():
    """Release the locks, then remove the folders this process made that are still empty."""
    release_locks()
    for folder in CREATED_DIRS:
        with contextlib.suppress(OSError):                 # not empty: the run wrote into it
            os.rmdir(folder)


atexit.register(at_exit)
