"""The one door for stage commands: options -> a recipe -> the runner -> a record -> rendering.

A stage command (``export``, ``simplify``, ``quantize``, ``prune``, ``fp16``, ``merge``) collects what the
user gave into a ``CommandRecipe`` and calls ``run_command``; nothing here knows a stage kind. The
record's result is rendered by the pass's renderer (``cli.render``), ``--json`` writes the result with its
stage record, and ``--save-recipe`` writes the recipe that reruns the command with ``onnxforge run``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from onnxforge.cli.console import emit_json, err, out, quiet
from onnxforge.cli.options import check_json_path
from onnxforge.cli.progress_view import progress_display
from onnxforge.errors import QualityGateError
from onnxforge.pipeline.cache import StageCache
from onnxforge.pipeline.command_run import CommandRecipe, run_to_output, stage_json
from onnxforge.pipeline.manifest import StageRecord
from onnxforge.pipeline.run_guard import recipe_reads

__all__ = ["run_command", "stage_cache"]


def stage_cache(cache_dir: Path | None, no_cache: bool) -> StageCache:
    return StageCache(None) if no_cache else StageCache(cache_dir) if cache_dir else StageCache.default()


def run_command(
    command: CommandRecipe,
    output: Path,
    ctx: click.Context,
    *,
    message: str,
    extra_reads: Sequence[Any] = (),
    cached: bool = True,
) -> list[StageRecord]:
    """Run ``command`` into ``output`` through the runner; render, write ``--json`` and ``--save-recipe``.

    The output side (``--json``, ``--save-recipe``, ``--cache-dir``, ``--no-cache``, ``--force``) is read
    from the command's parameters; ``cached=False`` runs without the stage cache (export: its
    ``file.py:callable`` may import files the cache key cannot see)."""
    params = ctx.params
    json_path, save_recipe = params.get("json_path"), params.get("save_recipe")
    cache_dir, no_cache = params.get("cache_dir"), params.get("no_cache", False) or not cached
    force = params.get("force", False)
    from onnxforge.cli.render import render_stage

    recipe = command.recipe()
    reads = [*recipe_reads(recipe), *extra_reads]
    check_json_path(json_path, params, *reads, written=[output, save_recipe])
    if save_recipe is not None:
        command.save(save_recipe, *reads, output)
    kind = recipe.stages[-1].kind
    try:
        with progress_display(message) as update:
            records = run_to_output(recipe, output, cache=stage_cache(cache_dir, no_cache), progress=update,
                                    force=force)
    except QualityGateError as e:  # exit 4 still shows every try and writes --json
        if e.result is not None:
            payload = dict(e.result)
            record = getattr(e, "record", None)  # set by the runner on a stage's gate failure
            if record is not None:
                payload["stage"] = {k: v for k, v in record.to_json().items() if k != "result"}
            emit_json(json_path, payload)
            if not quiet(json_path):
                render_stage(kind, payload, output, failed=True)
        raise
    payload = stage_json(records)
    emit_json(json_path, payload)
    if not quiet(json_path):
        render_stage(kind, payload, output, failed=False)
        last = records[-1]
        session = (last.result or {}).get("session")
        if isinstance(session, dict):  # --tune-session: what was measured for the output's session
            written = f"; wrote {Path(session['written']).name}" if session.get("written") else ""
            out.print(f"session: {escape(str(session.get('summary', '')))}{escape(written)}", highlight=False)
        if last.status == "cached":
            err.print(f"[dim]cached:[/] {escape(last.cache)} (stage key {last.key[:12]}; --no-cache recomputes)",
                      highlight=False)
        if save_recipe is not None:
            err.print(
                f"[dim]recipe:[/] {escape(str(save_recipe))} (rerun with: onnxforge run {escape(str(save_recipe))})",
                highlight=False,
            )
    return records
