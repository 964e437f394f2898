"""``onnxforge cache``: where the stage cache is, what it holds; ``--clear`` empties it."""

from __future__ import annotations


import click

from onnxforge.cli.app import cli
from onnxforge.cli.console import human_bytes, out
from onnxforge.cli.door import stage_cache
from onnxforge.cli.options import cache_options


@cli.command(name="cache")
@click.option("--clear", is_flag=True, help="remove every cached stage output")
@cache_options
def cache_cmd(clear, cache_dir, no_cache):
    """Show where the stage cache is and how much it holds; --clear empties it."""
    cache = stage_cache(cache_dir, no_cache)
    if not cache.enabled:
        out.print("the stage cache is off (--no-cache)")
        return
    entries, size = cache.usage()
    if clear:
        removed = cache.clear()
        out.print(f"removed {removed} cached stage outputs ({human_bytes(size)}) from {cache.root}")
        return
    out.print(f"stage cache {cache.root}: {entries} stage outputs, {human_bytes(size)}")
