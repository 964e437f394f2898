"""The README's command reference, generated from the commands (whose stage options come from the configs).

``python -m onnxforge.cli.reference --write README.md`` rewrites the part of the README between the
``<!-- commands:start -->`` and ``<!-- commands:end -->`` markers; ``tests/test_one_door.py`` checks it is
current, so the reference cannot drift from the options.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

START, END = "<!-- commands:start -->", "<!-- commands:end -->"

__all__ = ["command_reference", "update_readme"]


def _recipe_spelling(command: str, param: click.Parameter) -> str:
    """Where a flag lands in a recipe: a stage option, a top-level key, or nowhere (output side)."""
    import importlib

    try:
        module = importlib.import_module(f"onnxforge.cli.{command}")
    except ImportError:
        return ""
    if not hasattr(module, "FLAGS"):  # not a stage command (profile, compare, run...), or merge's nested options
        return ""
    flags = {f.param: f.field for f in getattr(module, "FLAGS", ())}
    top = {"calibration": "`calibration`", "eval_data": "`eval`", "target": "`target`", "max_samples": "`max_samples`",
           "tune_session": "`tune_session`",
           "image_size": "`calibration.image_size`", "mean": "`calibration.mean`", "std": "`calibration.std`",
           "layout": "`calibration.layout`", "input_shapes": "`input_shapes`", "metric": "stage `metric`",
           "tolerance": "stage `tolerance`", "atol": "stage `tolerance.atol`", "rtol": "stage `tolerance.rtol`",
           "dynamic_dims": "stage `dynamic_axes`", "distill_source": "`model` (the teacher)",
           "prune_method": "the stage kind"}
    if param.name in flags:
        return f"stage `{flags[param.name]}`"
    if param.name in top:
        return top[param.name]
    stage_fields = getattr(module, "SKIP", ()) + getattr(module, "SHARED", ())
    if param.name not in stage_fields and param.name not in (
            "output", "json_path", "save_recipe", "cache_dir", "no_cache", "force", "model", "source"):
        return f"stage `{param.name}`"
    return ""


def command_reference() -> str:
    """Markdown: one collapsible table per command (flag, recipe spelling, help)."""
    from onnxforge.cli import cli

    lines = []
    for name, command in sorted(cli.commands.items()):
        lines.append(f"<details><summary><code>onnxforge {name}</code>: {command.get_short_help_str(100)}</summary>\n")
        lines.append("| option | recipe | what it does |")
        lines.append("| --- | --- | --- |")
        for param in command.params:
            if not isinstance(param, click.Option):
                continue
            flags = " ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
            help_text = (param.help or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {flags} | {_recipe_spelling(name, param)} | {help_text} |")
        lines.append("\n</details>\n")
    return "\n".join(lines)


def update_readme(path: Path) -> bool:
    """Rewrite the reference in ``path``; True when it changed."""
    text = path.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    new = f"{head}{START}\n{command_reference()}\n{END}{tail}"
    if new == text:
        return False
    path.write_text(new)
    return True


if __name__ == "__main__":
    target = Path(sys.argv[sys.argv.index("--write") + 1]) if "--write" in sys.argv else None
    if target is None:
        print(command_reference())
    else:
        print("updated" if update_readme(target) else "unchanged", target)
