"""The temp directory a benchmark works in."""

import shutil


def leave(workdir, keep):
    """Remove ``workdir``, or say where it is kept (``--keep``)."""
    if keep:
        print(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
