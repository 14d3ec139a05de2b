"""What the terminal shows of a ``train_net.py`` run, and what goes to ``OUTPUT_DIR/log.txt`` only.

The terminal gets progress, checkpoints, evaluations, warnings and errors. The environment table, the
command line, the config file, the full config and the model print go to the log file only (one line
on the terminal says where), as do detectron2's "Fast COCO eval is not built" notes and tracebacks of
user errors (``--debug`` shows them). Known harmless import-time warnings are silenced.
"""
import logging
import warnings

from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .errors import UserError

# Messages (their beginning) that go to the log file only.
FILE_ONLY = ("Rank of current process", "Environment info:", "Command line arguments:", "Contents of args.config_file",
             "Running with full config:", "Full config saved to", "Model:\n", "Fast COCO eval is not built")
LOGGERS = ("detectron2", "fvcore", "ks_detr")
D2_C_NOTE = ("detectron2._C is not built here, and ks-detr needs none of it: the environment table's 'detectron2._C "
             "not built correctly' and the evaluator's 'Fast COCO eval is not built. Falling back to official COCO "
             "eval.' are expected; COCO AP comes from pycocotools, with the same numbers")


class TerminalFilter(logging.Filter):
    """Drops from a terminal handler: records marked ``extra={"file_only": True}``, messages starting
    with one of :data:`FILE_ONLY`, and (unless ``debug``) records carrying a :class:`UserError`'s
    traceback (e.g. detectron2's "Exception during training:"; the error line follows)."""

    def __init__(self, debug=False):
        super().__init__()
        self.debug = debug

    def filter(self, record):
        if getattr(record, "file_only", False):
            return False
        if isinstance(record.msg, str) and record.getMessage().startswith(FILE_ONLY):
            return False
        if record.exc_info and isinstance(record.exc_info[1], UserError) and not self.debug:
            return False
        return True


def quiet_known_warnings():
    """Silence import-time messages that say nothing about the run: torch's deprecation of
    ``torch.jit.script`` (used inside detectron2/fvcore) and "No CUDA runtime is found" on CPU machines."""
    warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def _terminal_handlers(logger):
    import sys

    return [h for h in logger.handlers if getattr(h, "stream", None) in (sys.stdout, sys.stderr)]


def setup_run_logging(cfg, args):
    """detectron2's ``default_setup`` (loggers, seeds, config.yaml) plus the ``ks_detr`` logger, with
    :class:`TerminalFilter` on every terminal handler; returns the log file's path (None without OUTPUT_DIR)."""
    rank, output = comm.get_rank(), cfg.OUTPUT_DIR
    # the same calls as default_setup's (setup_logger is cached by its arguments), so the filters are
    # in place before it logs the environment and the config
    setup_logger(output, distributed_rank=rank, name="fvcore")
    setup_logger(output, distributed_rank=rank)
    setup_logger(output=output, distributed_rank=rank, name="ks_detr")
    debug = bool(getattr(args, "debug", False))
    for name in LOGGERS:
        for h in _terminal_handlers(logging.getLogger(name)):
            if not any(isinstance(f, TerminalFilter) for f in h.filters):
                h.addFilter(TerminalFilter(debug))
    default_setup(cfg, args)
    log = logging.getLogger("ks_detr")
    path = f"{output}/log.txt" if output else None
    try:
        import detectron2._C  # noqa: F401
    except ImportError:
        log.info(D2_C_NOTE, extra={"file_only": True})
    if path:
        log.info(f"environment, command line, config and model: {path}")
    return path
