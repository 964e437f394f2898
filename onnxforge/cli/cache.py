"""``onnxforge cache``: where the stage cache is, what it holds and its cap; ``--clear`` empties it (of cache
entries only), ``--max-size`` caps it."""

from __future__ import annotations

from pathlib import Path

import click

from onnxforge.cli.app import cli
from onnxforge.cli.console import human_bytes, out
from onnxforge.cli.door import stage_cache
from onnxforge.cli.options import cache_options


@cli.command(name="cache")
@click.option("--clear", is_flag=True, help="remove every cached stage output (and nothing that is not one)")
@click.option("--max-size", metavar="SIZE", default=None,
              help="keep the cache under SIZE (e.g. 2G; kept in the cache); least recently used outputs go first")
@cache_options
def cache_cmd(clear: bool, max_size: str | None, cache_dir: Path | None, no_cache: bool) -> None:
    """Show where the stage cache is, what it holds and its cap; --clear empties it, --max-size caps it."""
    cache = stage_cache(cache_dir, no_cache)
    if not cache.enabled:
        out.print("the stage cache is off (--no-cache)")
        return
    if max_size is not None:
        from onnxforge.pipeline.quantize.calibration_memory import parse_memory_size

        cache.set_max_size(parse_memory_size(max_size, "--max-size"))
    entries, size = cache.usage()
    if clear:
        removed, left = cache.clear()
        out.print(f"removed {removed} cached stage outputs ({human_bytes(size)}) from {cache.root}"
                  + (f"; left {left} items that are not cache entries" if left else ""))
        return
    out.print(f"stage cache {cache.root}: {entries} stage outputs, {human_bytes(size)}, "
              f"cap {human_bytes(cache.max_size())}")
