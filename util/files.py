"""One way to write a file and one way to read a user's torch file. A write is atomic and durable
(its own temporary name, fsync, rename, a full disk said plainly); a read takes tensors only (a
file that would run code is refused by name)."""
import errno
import os
import shutil
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
    """An OSError while writing `path` -> the UserError a user can act on."""
    folder = os.path.dirname(os.path.abspath(path))
    kept = "nothing was written"
    if os.path.exists(path):
        kept = f"the previous {os.path.basename(path)} is intact"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
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
