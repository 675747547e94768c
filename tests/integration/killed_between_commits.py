"""``python -m tests.integration.killed_between_commits SCORE_ARGS...``: ``jobs.score``, whose process is killed
with SIGKILL the moment its first unit's data commit has landed, before that unit's unit-table commit.

The unit-table commit is the committer's first call of ``units.append`` in a fresh output (nothing is rolled
forward before it), so replacing that function places the kill exactly between the two commits."""

import os
import signal
import sys

from pipeline.cli import main
from pipeline.io import units


def _killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    units.append = _killed
    sys.exit(main(["score", *sys.argv[1:]]))
