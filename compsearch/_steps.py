"""One-line notes on long one-time work ("training the mnist teacher, one time, about 4 min"), so a
user is never left watching a silent terminal. They go to the ``compsearch.steps`` logger, which the
command line shows on stderr without ``--verbose``; in Python they follow your logging set-up."""

from __future__ import annotations

import logging
import sys

STEPS = logging.getLogger("compsearch.steps")


def say(message: str) -> None:
    STEPS.info(message)


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a test's capture, a redirected stream)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def show_on_stderr() -> None:
    """What the command line does: steps on stderr, as plain lines, whatever the log level."""
    if not any(isinstance(h, _Stderr) for h in STEPS.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        STEPS.addHandler(handler)
    STEPS.setLevel(logging.INFO)
    STEPS.propagate = False
