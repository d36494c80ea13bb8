"""Quiet imports of third-party packages that announce themselves on stderr.

Importing TensorFlow (directly, or through aif360 or tf-keras) prints absl's start-up notices from C++
("All log messages before absl::InitializeLog() ...", "oneDNN custom operations are on ...", the
``cpu_feature_guard`` line), and aif360 logs a ``No module named 'inFairness'`` warning for each optional
extra that is not installed. None of it is the user's business, and it buries privaudit's own output.

:func:`quiet_imports` wraps an import and removes exactly that noise:

* ``TF_CPP_MIN_LOG_LEVEL=2`` is set with ``setdefault`` (a user's own setting wins), which silences
  TensorFlow's C++ info and warning lines that honour it;
* the C-level stderr (file descriptor 2) is captured while the import runs, and every captured line is
  written back afterwards except those matching :data:`NOISE` (absl's notices, which print before any
  setting can reach them);
* log records and Python warnings raised by third-party modules during the import are dropped when they are
  optional-dependency notices or deprecation chatter.

Nothing outside the ``with`` block is touched, so privaudit's own warnings and log lines are never hidden,
nor are a third-party package's warnings at run time. ``PRIVAUDIT_SHOW_IMPORT_NOISE=1`` turns the filtering
off, for debugging an import.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import sys
import tempfile
import warnings

SHOW_ENV = "PRIVAUDIT_SHOW_IMPORT_NOISE"

# stderr lines that third-party imports print and that are dropped (matched anywhere in the line)
NOISE = tuple(re.compile(p) for p in (
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"oneDNN custom operations are on",
    r"cpu_feature_guard",
    r"This TensorFlow binary is optimized to use available CPU instructions",
    r"^To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags",
    r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"computation placer already registered",
    r"Could not find cuda drivers on your machine",
    r"TF-TRT Warning: Could not find TensorRT",
    r"failed call to cuInit",
    r"^Skipping registering GPU devices",
))

# log records of optional-dependency notices (aif360: "No module named 'inFairness': SenSeI and SenSR will be
# unavailable. To install, run: ...")
_OPTIONAL_NOTICE = re.compile(r"^No module named '[\w.]+'")
_CHATTY = ("absl", "tensorflow", "tf_keras", "keras", "h5py")   # loggers whose import-time chatter is dropped


class _ImportNoiseFilter(logging.Filter):
    """Drops third-party optional-dependency notices and warnings logged while a quiet import runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        path = (record.pathname or "").replace("\\", "/")
        if "/privaudit/" in path or record.name.startswith("privaudit"):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: let logging itself report it
            return True
        if _OPTIONAL_NOTICE.match(message):
            return False
        # TensorFlow, absl and Keras log start-up chatter at WARNING and below while they import
        return not (record.levelno <= logging.WARNING and record.name.split(".")[0] in _CHATTY)


def _is_noise(line: str) -> bool:
    return any(p.search(line) for p in NOISE)


@contextlib.contextmanager
def _captured_stderr():
    """Capture file descriptor 2 while the block runs, then write back the lines that are not noise."""
    fd = 2
    try:
        saved = os.dup(fd)
    except OSError:   # no descriptor 2 at all: nothing to capture
        yield
        return
    sink = tempfile.TemporaryFile()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os.dup2(sink.fileno(), fd)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, fd)
        os.close(saved)
        sink.seek(0)
        text = sink.read().decode("utf-8", errors="replace")
        sink.close()
        kept = [line for line in text.splitlines(keepends=True) if not _is_noise(line)]
        if kept:
            os.write(fd, "".join(kept).encode("utf-8", errors="replace"))


@contextlib.contextmanager
def quiet_imports():
    """Run the block (an import of a noisy third-party package) without its start-up noise on stderr."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if os.environ.get(SHOW_ENV, "").strip() not in ("", "0"):
        yield
        return
    noise_filter = _ImportNoiseFilter()
    loggers = [logging.getLogger(name) for name in ("", *_CHATTY)]
    for logger in loggers:
        logger.addFilter(noise_filter)
    try:
        with warnings.catch_warnings():
            for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning, ImportWarning):
                # only warnings whose origin is not privaudit
                warnings.filterwarnings("ignore", category=category, module=r"^(?!privaudit(\.|$))")
            with _captured_stderr():
                yield
    finally:
        for logger in loggers:
            logger.removeFilter(noise_filter)


class _OptionalNoticeFilter(logging.Filter):
    """Drops third-party optional-dependency notices (aif360's ``No module named 'inFairness'``) whenever they
    are logged, so a lazy import of such a package at run time is quiet too; nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        path = (record.pathname or "").replace("\\", "/")
        if "/privaudit/" in path or record.name.startswith("privaudit"):
            return True
        try:
            return not _OPTIONAL_NOTICE.match(record.getMessage())
        except Exception:  # a malformed record: let logging itself report it
            return True


def quiet_process() -> None:
    """For a command-line entry point: ``TF_CPP_MIN_LOG_LEVEL=2`` (with ``setdefault``, inherited by worker
    processes) before anything can load TensorFlow, and optional-dependency notices of third-party packages
    dropped from the root logger for the whole process. privaudit's own warnings and logs, and any other
    third-party warning, are untouched; ``PRIVAUDIT_SHOW_IMPORT_NOISE=1`` turns it off."""
    if os.environ.get(SHOW_ENV, "").strip() not in ("", "0"):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    root = logging.getLogger()
    if not any(isinstance(f, _OptionalNoticeFilter) for f in root.filters):
        root.addFilter(_OptionalNoticeFilter())


def import_quietly(name: str):
    """``importlib.import_module(name)`` inside :func:`quiet_imports`."""
    with quiet_imports():
        return importlib.import_module(name)
