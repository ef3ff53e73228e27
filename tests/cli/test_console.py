"""The CLI's stderr filter: native noise goes to the log, everything else reaches stderr unchanged."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from cli.console import filtered_stderr


def test_tracker_lines_go_to_the_log_and_the_rest_passes(capfd, caplog):
    caplog.set_level(logging.INFO, logger="xgboost")
    with filtered_stderr():
        os.write(2, b"[20:10:45] Task [xgboost.dask-0]:tcp://127.0.0.1:37033 got rank 0\n")
        os.write(2, b"error: a line people must see\npartial ")
        os.write(2, b"line joined\n")
        # A child process inherits the descriptor: its lines are filtered too.
        subprocess.run([sys.executable, "-c", "import os; os.write(2, b'[20:10:46] Task [xgboost.dask-1]:"
                        "tcp://127.0.0.1:42301 got rank 1\\nfrom the child\\n')"], check=True)
        print("through sys.stderr", file=sys.stderr, flush=True)
    _, err = capfd.readouterr()
    assert "got rank" not in err
    assert err.splitlines() == ["error: a line people must see", "partial line joined", "from the child",
                                "through sys.stderr"]
    assert [r.getMessage().split("] ", 1)[1] for r in caplog.records if r.name == "xgboost"] == [
        "Task [xgboost.dask-0]:tcp://127.0.0.1:37033 got rank 0",
        "Task [xgboost.dask-1]:tcp://127.0.0.1:42301 got rank 1"]


def test_stderr_is_restored_after_the_block(capfd):
    with filtered_stderr():
        pass
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"
