"""Errors caused by what the user gave us (config, dataset, checkpoint, input files), and how the
command-line tools report them: one line, last, naming the file/record/key, the value and the fix.

``train_net.py``, ``demo/demo.py`` and ``tools/*.py`` run their work inside
:func:`report_user_errors`: a :class:`UserError` prints ``error: <message>`` as the last line on
stderr and exits with status 2; its traceback goes to the log (``OUTPUT_DIR/log.txt`` once the
logger is set up) or, with ``--debug``, to the terminal. Anything else is a bug of ours and keeps its
full traceback.
"""
import contextlib
import logging
import os
import sys
import traceback

USER_ERROR_EXIT_CODE = 2
# Set by a launcher of worker processes: a worker stopping on a UserError writes its message there, so
# the launcher can repeat it as the very last line (after torch's own messages about the workers).
ERROR_FILE_ENV = "KS_DETR_ERROR_FILE"


class UserError(Exception):
    """Bad user input; the message says what is wrong, where, and how to fix it."""


class ConfigError(UserError, ValueError):
    """Invalid config key or value."""


class DatasetError(UserError, ValueError):
    """Invalid dataset file or record."""


class CheckpointError(UserError, ValueError):
    """Unreadable or mismatching checkpoint file."""


class InputError(UserError, ValueError):
    """Unusable input file of a tool (e.g. an image given to the demo)."""


@contextlib.contextmanager
def report_user_errors(debug=False):
    """Turn a :class:`UserError` raised inside the block into ``error: <message>`` + exit 2."""
    try:
        yield
    except UserError as e:
        _log_to_files_only("user error (the traceback of the message below)")
        if debug:
            traceback.print_exc()
        sys.stderr.flush()
        print(f"error: {e}", file=sys.stderr, flush=True)
        if os.environ.get(ERROR_FILE_ENV):
            with open(os.environ[ERROR_FILE_ENV], "w") as f:
                f.write(str(e))
        sys.exit(USER_ERROR_EXIT_CODE)


def _log_to_files_only(message):
    """Log ``message`` with the exception being handled to the log files of the ``ks_detr`` logger
    (``OUTPUT_DIR/log.txt``), not to the terminal."""
    log = logging.getLogger("ks_detr")
    record = log.makeRecord(log.name, logging.DEBUG, __file__, 0, message, (), sys.exc_info())
    for h in log.handlers:
        stream = getattr(h, "stream", None)
        if stream not in (sys.stdout, sys.stderr) and (isinstance(h, logging.FileHandler) or stream is not None):
            h.handle(record)


def log_file(logger=None):
    """The file that ``logger`` (default the ``ks_detr`` logger) writes to, through it or its parents,
    or None (no file handler set up yet)."""
    log = logger or logging.getLogger("ks_detr")
    while log is not None:
        for h in log.handlers:
            if isinstance(h, logging.FileHandler):
                return h.baseFilename
            stream = getattr(h, "stream", None)
            name = getattr(stream, "name", None)
            if isinstance(name, str) and stream not in (sys.stdout, sys.stderr) and os.path.isfile(name):
                return name
        log = log.parent if log.propagate else None
    return None


def repeat_worker_error():
    """In a launcher whose worker stopped with :data:`USER_ERROR_EXIT_CODE`: print its message again."""
    path = os.environ.get(ERROR_FILE_ENV)
    if path and os.path.isfile(path) and os.path.getsize(path):
        with open(path) as f:
            print(f"error: {f.read()}", file=sys.stderr, flush=True)
