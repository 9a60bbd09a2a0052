"""The library's status lines, rank-0 aware: ``from ringlwm.log import logger``.

    logger.info("stage 'ctx1k': seq_len 1024, ...")      # rank 0 only
    logger.warning("warning: skipping checkpoint ...")    # every rank that has it ("[rank r] " in front beyond rank 0)

Messages go to the standard output of the moment (so that redirection and test capture follow), as written,
one flushed line each. Entry points (``python -m ...``) print their own results; library code logs. The level
is the logger's: ``logging.getLogger("ringlwm").setLevel(logging.WARNING)`` keeps only warnings.
"""

from __future__ import annotations

import logging
import sys

import torch.distributed as dist


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _RankFilter(logging.Filter):
    """Information from rank 0 only; warnings and errors from every rank, named beyond rank 0."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = _rank()
        if record.levelno < logging.WARNING:
            return rank == 0
        if rank:
            record.msg = f"[rank {rank}] {record.msg}"
        return True


class _CurrentStdout(logging.StreamHandler):
    """A StreamHandler on whatever ``sys.stdout`` is when a line is written."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


logger = logging.getLogger("ringlwm")
if not logger.handlers:
    _handler = _CurrentStdout()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    _handler.addFilter(_RankFilter())
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
