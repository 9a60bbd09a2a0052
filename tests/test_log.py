"""ringlwm.log: status lines on the standard output of the moment, information from rank 0 only, warnings
from every rank (named beyond rank 0)."""

import ringlwm.log
from ringlwm.log import logger


def test_information_from_rank_0_warnings_from_every_rank(capsys, monkeypatch):
    logger.info("stage 's0': seq_len 128")
    logger.warning("warning: skipping checkpoint c1: damaged")
    assert capsys.readouterr().out.splitlines() == ["stage 's0': seq_len 128",
                                                    "warning: skipping checkpoint c1: damaged"]
    monkeypatch.setattr(ringlwm.log, "_rank", lambda: 1)
    logger.info("stage 's0': seq_len 128")
    logger.warning("warning: skipping checkpoint c2: damaged")
    assert capsys.readouterr().out.splitlines() == ["[rank 1] warning: skipping checkpoint c2: damaged"]
