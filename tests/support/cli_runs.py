"""The CLI run in-process, and what its plots must look like: shared by the CLI tests and the end-to-end runs."""

from __future__ import annotations

import contextlib
import io
import subprocess
from pathlib import Path


def dg2pf(*args: str) -> subprocess.CompletedProcess:
    """Runs the CLI in-process (importing torch per call would dominate the test time)."""
    from dg2pf_cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's refusals (exit 2 with one line), as the console script ends
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def assert_drawn_png(path: Path) -> None:
    """A real PNG with something drawn in it (not an empty canvas)."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 16, f"{path} is blank"
