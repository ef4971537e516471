"""`.ci/run`'s command line: a wrong word is one line and exit 2, before any install."""

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, ".ci", "run")

pytestmark = pytest.mark.skipif(not os.path.exists(RUN),
                                reason="not in a checkout (the package's build-time tests)")


@pytest.mark.parametrize("argv,message", [
    (["bogus"], "unknown mode 'bogus'"),
    (["setup", "--bogus"], "unknown option '--bogus'"),
    (["all", "--server-only"], "--server-only goes with setup"),
    (["setup", "--server-only", "extra"], "too many arguments"),
])
def test_bad_arguments_are_one_line_and_install_nothing(argv, message):
    done = subprocess.run(["bash", RUN, *argv], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == f".ci/run: {message} (use: .ci/run [setup [--server-only] | debian])\n"
