"""File-system helpers: staged (all-or-nothing) outputs that replace only what privaudit wrote, a lock per
output, atomic writes through unpredictable temporary names, owner-only folders, and strict JSON.

The rules they enforce, whoever calls them:

* **Only privaudit's folders are replaced.** Every folder privaudit creates as an output holds a marker,
  :data:`MARKER` (``.privaudit``: JSON ``{"kind": ..., "version": ...}``). :func:`is_privaudit_dir` recognises
  it, and the files older versions wrote (a run's ``train.json`` + ``predictions.csv``, a study's
  ``audit.json``, a sweep's ``sweep.json``, an image cache's ``cache.json``, a synthetic cohort's
  ``cohort.json``). A ``manifest.csv`` is *not* such a file: every data folder has one.
* **Never a dangerous target.** :func:`staged_dir` refuses an output that is, or contains, the input data, the
  working directory, the home folder or ``/``, whatever ``force`` says.
* **One writer per output.** :func:`staged_dir` holds an exclusive ``flock`` on ``.<name>.lock`` beside the
  output for the whole staging, so a second process on the same output fails at once with one line.
* **Replace by renaming.** The finished folder is moved in by renaming the old one aside, renaming the new
  one in (never onto an output that appeared meanwhile, unless ``force``), and only then deleting the old one.
* **No fixed temporary names.** :func:`atomic_write_bytes` writes through ``mkstemp`` in the target folder and
  ``os.replace``, so a symbolic link planted at a temporary name cannot redirect a write.
* **Restrict only what privaudit creates.** :func:`private_mkdir` makes a new folder owner-only and leaves the
  mode of an existing one alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import io
import json
import math
import os
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path

import numpy as np

from privaudit.errors import ConfigError, OutputExistsError

MARKER = ".privaudit"
MARKER_VERSION = 1
KINDS = ("run", "study", "sweep", "cache", "cohort")

# Files whose presence (with the content checks in is_privaudit_dir) means "an older privaudit wrote this".
# manifest.csv is not one of them: every data folder has one.
RUN_MARKERS = ("train.json", "predictions.csv", "audit.json", "sweep.json", "cache.json", "cohort.json")
PARTIAL = ".partial-"   # staging folders: .<name>.partial-XXXXXXXX beside the output
ASIDE = ".old-"         # the replaced output while the new one moves in: .<name>.old-XXXXXXXX


# ---- markers -------------------------------------------------------------------------------------------------
def write_marker(folder: Path, kind: str) -> None:
    """Mark ``folder`` as an output privaudit wrote (``kind``: run, study, sweep, cache or cohort)."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; use one of {', '.join(KINDS)}")
    atomic_write_text(Path(folder) / MARKER, json.dumps({"kind": kind, "version": MARKER_VERSION}) + "\n")


def _read_small_json(path: Path):
    """The JSON in a regular file (not a link) of at most 64 MiB, or None."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 64 << 20:
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def read_marker(folder: Path) -> dict | None:
    """The marker of a folder privaudit wrote (``{"kind", "version"}``), or None."""
    doc = _read_small_json(Path(folder) / MARKER)
    if isinstance(doc, dict) and doc.get("kind") in KINDS and isinstance(doc.get("version"), int):
        return doc
    return None


def is_privaudit_dir(path: Path) -> str | None:
    """The kind of output privaudit wrote at ``path`` (run, study, sweep, cache, cohort), or None.

    A folder counts when it holds the :data:`MARKER`, or the files an older privaudit wrote: a run
    (``train.json`` with a ``dp`` entry, beside ``predictions.csv``), a study (``audit.json`` with an integer
    ``schema_version`` and ``models``), a sweep (``sweep.json`` of kind "privaudit epsilon sweep"), an image
    cache (``cache.json`` of kind "privaudit image cache") or a synthetic cohort (``cohort.json`` whose
    ``generator`` is privaudit's). A symbolic link is never one."""
    path = Path(path)
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return None
    except OSError:
        return None
    marker = read_marker(path)
    if marker is not None:
        return marker["kind"]
    audit = _read_small_json(path / "audit.json")
    if isinstance(audit, dict) and isinstance(audit.get("schema_version"), int) and isinstance(audit.get("models"), dict):
        return "study"
    train = _read_small_json(path / "train.json")
    if isinstance(train, dict) and "dp" in train and (path / "predictions.csv").is_file():
        return "run"
    sweep = _read_small_json(path / "sweep.json")
    if isinstance(sweep, dict) and sweep.get("kind") == "privaudit epsilon sweep":
        return "sweep"
    cache = _read_small_json(path / "cache.json")
    if isinstance(cache, dict) and cache.get("kind") == "privaudit image cache":
        return "cache"
    cohort = _read_small_json(path / "cohort.json")
    if isinstance(cohort, dict) and str(cohort.get("generator", "")).startswith("privaudit."):
        return "cohort"
    return None


def holds_run(path: Path) -> bool:
    """True when ``path`` is a folder privaudit wrote (see :func:`is_privaudit_dir`)."""
    return is_privaudit_dir(path) is not None


# ---- targets that must never be an output --------------------------------------------------------------------
def _real(p) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(p))))


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_target(out: Path, *, inputs=(), what: str = "--out") -> None:
    """Refuse an output folder that is, or contains, ``/``, the home folder, the working directory or one of
    ``inputs`` (the data it reads). Symbolic links are resolved first, so an alias is refused too."""
    real = _real(out)
    if real == Path(real.anchor):
        raise ConfigError(f"{what} {out} is the file-system root; choose a new folder for privaudit's output")
    home = os.path.expanduser("~")
    if home and home != "~" and _within(_real(home), real):
        raise ConfigError(f"{what} {out} is or contains the home folder {home}; choose a new folder for "
                          "privaudit's output")
    with contextlib.suppress(OSError):
        cwd = os.getcwd()
        if _within(_real(cwd), real):
            raise ConfigError(f"{what} {out} is or contains the working directory {cwd}; choose a new folder for "
                              "privaudit's output")
    for inp in inputs:
        if inp is None:
            continue
        if _within(_real(inp), real):
            raise ConfigError(f"{what} {out} is or contains the input {inp}; choose an output folder outside the data")


def check_out_dir(out: Path, *, force: bool, what: str = "--out") -> None:
    """Refuse an existing ``out`` that is not an empty folder, unless ``force`` is set and privaudit wrote it."""
    out = Path(out)
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise OutputExistsError(f"{what} {out} is a symbolic link; give the path of a real folder")
    if not stat.S_ISDIR(st.st_mode):
        raise OutputExistsError(f"{what} {out} is a file; give a directory path")
    if not any(out.iterdir()):
        return
    kind = is_privaudit_dir(out)
    if not force:
        if kind:
            raise OutputExistsError(f"{what} {out} already holds a run or other output privaudit wrote (a {kind}); "
                                    "choose a new directory or pass --force to replace it")
        raise OutputExistsError(f"{what} {out} already holds files; choose a new directory (--force replaces only "
                                "a folder privaudit wrote)")
    if kind is None:
        raise OutputExistsError(f"{what} {out} holds files privaudit did not write; --force replaces only a "
                                "run, study, sweep, cache or cohort folder privaudit wrote; choose a new directory")


# ---- locks ---------------------------------------------------------------------------------------------------
def lock_path(out: Path) -> Path:
    out = Path(out).absolute()
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out: Path, *, what: str = "--out"):
    """Hold an exclusive, non-blocking ``flock`` on ``.<name>.lock`` beside ``out``; a second holder fails at
    once with one line. The lock file is created without following links and removed on release."""
    path = lock_path(out)
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    while True:
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OutputExistsError(f"{what} {out}: its lock file {path} is a symbolic link; remove it") from None
            raise OutputExistsError(f"{what} {out}: cannot create the lock file {path} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputExistsError(f"{what} {out} is being written by another privaudit process (lock {path}); "
                                    "wait for it to finish or choose another folder") from None
        # the previous holder may have unlinked the file between our open and our lock: then lock afresh
        try:
            same = os.path.samestat(os.fstat(fd), os.lstat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def is_locked(out: Path) -> bool:
    """True while another process holds the lock of ``out`` (see :func:`output_lock`)."""
    try:
        fd = os.open(lock_path(out), os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _leftovers(out: Path) -> list[Path]:
    prefixes = (f".{out.name}{PARTIAL}", f".{out.name}{ASIDE}")
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(out.parent):
            if entry.name.startswith(prefixes) and entry.is_dir(follow_symlinks=False):
                found.append(Path(entry.path))
    return found


def clean_stale_partials(out: Path) -> int:
    """Remove the staging folders (``.<name>.partial-*``, ``.<name>.old-*``) that a killed process left beside
    ``out``; returns how many. Does nothing while another process holds the lock of ``out``: its staging
    folder is alive. (:func:`staged_dir` does this by itself under its lock.)"""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return 0
    try:
        with output_lock(out):
            return _remove_leftovers(out)
    except OutputExistsError:
        return 0


def _remove_leftovers(out: Path) -> int:
    found = _leftovers(out)
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    return len(found)


# ---- the final rename ----------------------------------------------------------------------------------------
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_renameat2 = None


def _libc_renameat2():
    global _renameat2
    if _renameat2 is None:
        fn = False
        with contextlib.suppress(OSError, AttributeError, TypeError):
            libc = ctypes.CDLL(None, use_errno=True)   # the process's own symbols: libc's among them
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
        _renameat2 = fn
    return _renameat2 or None


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with FileExistsError when ``dst`` exists (renameat2's
    RENAME_NOREPLACE where the system has it; otherwise a check just before the rename, which the caller makes
    safe against other privaudit processes by holding the output's lock)."""
    fn = _libc_renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT and SIGTERM back (main thread) while a few renames run, so they are not cut in half."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _swap_in(tmp: Path, out: Path, *, force: bool, what: str) -> None:
    """Move the finished ``tmp`` to ``out``: the old ``out`` (an empty folder, or with ``force`` a folder
    privaudit wrote) is renamed aside, ``tmp`` renamed in without replacing anything, then the old one deleted."""
    aside = None
    with _signals_held():
        if os.path.lexists(out):
            check_out_dir(out, force=force, what=what)   # again: something may have appeared meanwhile
            mode = stat.S_IMODE(os.lstat(out).st_mode)
            if not any(out.iterdir()):
                os.chmod(tmp, mode)  # the user's own empty folder: keep the mode they gave it
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}{ASIDE}", dir=out.parent))
            os.rename(out, aside / out.name)
        try:
            rename_noreplace(tmp, out)
        except BaseException as e:
            if aside is not None:  # put the old folder back where it was
                with contextlib.suppress(OSError):
                    rename_noreplace(aside / out.name, out)
                with contextlib.suppress(OSError):
                    os.rmdir(aside)
            if isinstance(e, FileExistsError):
                raise OutputExistsError(f"{what} {out} appeared while privaudit was writing it; the new result "
                                        "was discarded and what is there now was left alone") from None
            raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(out: Path, *, force: bool = False, kind: str = "run", inputs=(), what: str = "--out"):
    """Yield a private staging folder beside ``out``; move it to ``out`` only when the block succeeds.

    * ``out`` must not be, or contain, ``/``, the home folder, the working directory or any of ``inputs``
      (the data paths the command reads), nor lie below a regular file (:func:`privaudit.limits.check_out_parent`);
    * an existing non-empty ``out`` is refused, unless ``force`` is set and privaudit wrote it
      (:func:`is_privaudit_dir`); a symbolic link or a file at ``out`` is always refused;
    * the whole staging holds the lock of ``out`` (:func:`output_lock`): a second process on the same ``out``
      fails at once with one line, and the leftovers of a killed process are removed;
    * on success the folder gets privaudit's marker of ``kind``, the old ``out`` is renamed aside, the new one
      renamed in (failing if ``out`` appeared meanwhile and ``force`` is not set), and the old one deleted;
    * on any error, Ctrl-C, or SIGTERM (see :func:`install_signal_handlers`) the staging folder is removed and
      an existing ``out`` is untouched.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; use one of {', '.join(KINDS)}")
    from privaudit.limits import check_out_parent

    check_out_parent(Path(out), option=what)   # a file where a parent folder should be: one line, not ENOTDIR
    out = Path(out).absolute()
    check_target(out, inputs=inputs, what=what)
    check_out_dir(out, force=force, what=what)
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out, what=what):
        check_out_dir(out, force=force, what=what)
        _remove_leftovers(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL}", dir=out.parent))  # mode 0700
        try:
            yield tmp
            if read_marker(tmp) is None:
                write_marker(tmp, kind)
            _swap_in(tmp, out, force=force, what=what)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def install_signal_handlers() -> None:
    """Turn SIGTERM (what a scheduler sends to stop a job) into KeyboardInterrupt, so staged outputs are
    cleaned up as for Ctrl-C. Call it once from the main thread of the command-line entry point."""
    if threading.current_thread() is not threading.main_thread():
        return

    def _terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _terminate)


# ---- folders and files ---------------------------------------------------------------------------------------
def private_mkdir(path: Path) -> Path:
    """Create ``path`` (and missing parents) and make it owner-only (0700) when this call created it; a folder
    that already exists keeps its mode (a user's ``--out``, a shared cache folder, ``/tmp``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not path.is_dir():
            raise
        return path
    os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask; a new folder is owner-only whatever it is
    return path


def _default_mode() -> int:
    """0666 less the umask (read from /proc where possible: setting the umask to read it races other threads)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = 0o600) -> None:
    """Write ``data`` to ``path`` all at once: into a new ``mkstemp`` file in the same folder, then
    ``os.replace``. A link planted at ``path`` is replaced, never followed. ``mode``: the new file's mode;
    None keeps the mode of the file being replaced (else the umask's default)."""
    path = Path(path)
    if mode is None:
        try:
            st = os.lstat(path)
            mode = stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else _default_mode()
        except FileNotFoundError:
            mode = _default_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str, mode: int | None = 0o600, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding), mode)


def atomic_write_csv(path: Path, frame, mode: int | None = 0o600, **to_csv) -> None:
    """``frame.to_csv(path, **to_csv)`` through :func:`atomic_write_bytes`."""
    buf = io.StringIO()
    frame.to_csv(buf, **to_csv)
    atomic_write_text(path, buf.getvalue(), mode)


def to_jsonable(obj):
    """Convert numpy scalars/arrays and non-finite floats (to None) for strict JSON."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, obj, mode: int | None = None) -> None:
    """Strict JSON (no NaN), written atomically through a ``mkstemp`` name (see :func:`atomic_write_bytes`);
    ``mode`` None: the umask's default, or the mode of the file it replaces."""
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False, sort_keys=False) + "\n"
    atomic_write_text(Path(path), text, mode)


def read_json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)
