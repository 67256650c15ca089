"""The one way to write a file (atomic_write, claim_outputs, lock) and to read one (load_torch)."""
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

CREATED_DIRS = []    # folders check_writable_dir made: removed at exit if the run left them empty
HELD_LOCKS = []      # released at the run's end, error or exit


def clean_stale_temps(folder, names):
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
    if isinstance(obj, (dict, list, tuple)):
        return sum(nbytes(v) for v in (obj.values() if isinstance(obj, dict) else obj))
    return 0


def write_error(e, path, size_hint=None):
    """An OSError (or torch's writer's RuntimeError) writing `path` -> a UserError to act on."""
    folder = os.path.dirname(os.path.abspath(path))
    kept = (f"the previous {os.path.basename(path)} is intact" if os.path.exists(path)
            else "nothing was written")
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
    """write(tmp) fills a temporary file; fsync, rename over `path`, fsync the folder: `path` holds
    the old or the whole new file, even after a kill or a power loss; an OSError is a UserError."""
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"    # own name: writers never share one
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
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), nbytes(obj))


def write_lines(path, lines):
    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(lines)
    return atomic_write(path, write)


def load_torch(path, what, fix, mmap=False):
    """torch.load(weights_only=True) of a user's file; missing, unreadable or pickled objects (which
    would run code) -> one UserError naming `what` and ending with `fix`. mmap: map the tensors."""
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
    """The fault of a loaded file's top level (not a dict, a key missing or mistyped), or None."""
    if not isinstance(obj, dict):
        return f"it holds a {type(obj).__name__}, not a dict"
    for key, kind in {**(optional or {}), **required}.items():
        if key not in obj and key in required:
            return f"no {key!r}"
        if key in obj and not isinstance(obj[key], kind):
            return f"its {key!r} is a {type(obj[key]).__name__}"
    return None


def nonfinite(tensors):
    return [name for name, value in tensors.items() if isinstance(value, torch.Tensor)
            and value.is_floating_point() and not bool(torch.isfinite(value).all())]


def check_writable_dir(folder, flag):
    """Create `folder`, prove it takes a file; one made here and still empty at exit is removed."""
    probe = os.path.join(folder, f".write_test_{os.getpid()}")
    missing, parent = [], os.path.abspath(folder)
    while not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(folder, exist_ok=True)
        CREATED_DIRS.extend(missing)                        # deepest first
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag} {folder} is not writable ({e.strerror}); "
                        f"pass another {flag}") from None


def claim_outputs(paths, overwrite, inputs=(), flag="--overwrite"):
    """Refuse an existing output unless `flag` is given, and one that is the run's input always."""
    for path in paths:
        for source in inputs:
            if source and os.path.exists(source) and os.path.exists(path) and \
                    os.path.samefile(source, path):
                raise UserError(f"{path} is this run's own input; write the output elsewhere")
        if os.path.lexists(path) and not overwrite:
            raise UserError(f"{path} exists and this run did not write it; pass {flag} to "
                            f"replace it, or write elsewhere")


def lock(folder):
    """Own `folder`: FOLDER/.lock holds the owner's pid and host. A dead owner's lock (same host,
    pid gone) is taken over and said; a live one, or another host's, is refused naming its owner."""
    path = os.path.join(folder, ".lock")
    me = f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = open(path).read().split()
            if len(owner) < 2 and time.time() - os.path.getmtime(path) < 5:
                break                           # its owner is writing it now
            # no pid and host, older than 5 s: its owner was killed writing it
            pid, host = (int(owner[0]), owner[1]) if len(owner) > 1 else (0, socket.gethostname())
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


@atexit.register
def at_exit():
    release_locks()
    for folder in CREATED_DIRS:
        with contextlib.suppress(OSError):                 # not empty: the run wrote into it
            os.rmdir(folder)
