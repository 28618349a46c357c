"""matplotlib for files only (the Agg backend: no display on servers and CI), imported in one
place so that a $MPLBACKEND matplotlib cannot read is one line, not a traceback at import."""

from __future__ import annotations

import os

from ninlab.errors import NinlabError

try:
    import matplotlib
except ValueError as error:  # matplotlib validates $MPLBACKEND as it is imported
    if "backend" not in str(error):
        raise
    raise NinlabError(
        f"MPLBACKEND={os.environ.get('MPLBACKEND')!r} is not a backend matplotlib knows; unset "
        "it (ninlab draws to files with Agg) or name one such as agg"
    ) from None

matplotlib.use("Agg")

__all__ = ["matplotlib"]
