"""The ``onnxforge`` command line: one module per command, each a thin layer over the library.

Stage commands (export, simplify, quantize, prune, fp16, merge) build a one-stage recipe from their options
(``cli.options``: flags generated from the pass's config) and run it through the one door (``cli.door``):
the runner's ``run_stage``, its cache and its record. What they print is keyed by pass name (``cli.render``).
"""

from onnxforge.cli import (  # noqa: F401  (each module adds its command to the group)
    cache,
    compare,
    export,
    fp16,
    merge,
    optimize,
    profile,
    prune,
    quantize,
    run,
    simplify,
)
from onnxforge.cli.app import cli, entry, main

__all__ = ["cli", "entry", "main"]
