"""part_fast.logs: the console handler the command line prints through, and the demo's watch on the trainer."""
import logging

from part_fast import logs


class _Writes:
    """A stream that records each write() call, to prove a line goes out in one."""

    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        pass


def test_console_prints_info_on_stdout_and_warnings_on_stderr_each_in_one_write(monkeypatch):
    out, err = _Writes(), _Writes()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stderr", err)
    logger = logging.getLogger("part_fast.train.loop")
    with logs.console():
        logger.debug("not shown")
        logger.info("epoch 1/2 [part] | loss %.2f", 1.5)
        logger.warning("part-fast: warning: something")
    logger.info("after: not shown")
    assert out.writes == ["epoch 1/2 [part] | loss 1.50\n"]
    assert err.writes == ["part-fast: warning: something\n"]


def test_console_restores_the_logger_and_follows_a_replaced_stdout(monkeypatch, capsys):
    root = logging.getLogger("part_fast")
    before = (root.level, list(root.handlers))
    with logs.console():
        logging.getLogger("part_fast.demo").info("one")
        monkeypatch.setattr("sys.stdout", replaced := _Writes())  # e.g. a test's capture, set after the start
        logging.getLogger("part_fast.demo").info("two")
    assert (root.level, list(root.handlers)) == before
    assert capsys.readouterr().out == "one\n" and replaced.writes == ["two\n"]


def test_watching_sees_info_lines_even_unconfigured_and_indents_what_is_printed(monkeypatch):
    out = _Writes()
    monkeypatch.setattr("sys.stdout", out)
    logger = logging.getLogger("part_fast.train.loop")
    seen = []
    assert not logger.isEnabledFor(logging.INFO)  # nobody configured logging: INFO records are not even made
    with logs.watching(logger.name, seen.append, prefix="  "):
        logger.info("epoch %d/2", 1)
    assert seen == ["epoch 1/2"] and out.writes == []  # observed, printed by no one
    with logs.console(), logs.watching(logger.name, seen.append, prefix="  "):
        logger.info("epoch %d/2", 2)
        logger.warning("part-fast: warning: kept as it is")
    assert seen == ["epoch 1/2", "epoch 2/2"] and out.writes == ["  epoch 2/2\n"]
    assert not logger.filters and logger.level == logging.NOTSET
