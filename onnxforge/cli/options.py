"""Option groups, as Polygraphy's argument groups: each adds its options to a command and turns what the
user gave into the recipe spelling the one door (``cli.door``) runs.

A stage's own options are generated from its config dataclass (``config_options``): every field gets a
flag (``--field-name``, or the spelling a ``Flag`` gives it), its type and choices come from the field's
type, its default and help from the field and the ``Flag``. Only options the user actually gave go into
the stage's options, so ``--save-recipe`` writes what was asked and the config's defaults do the rest.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from onnxforge.errors import UsageError

__all__ = [
    "Flag",
    "MetricType",
    "cache_options",
    "check_json_path",
    "config_options",
    "data_spec",
    "eval_spec",
    "flag_spelling",
    "gate_options",
    "given",
    "given_options",
    "image_options",
    "input_shape_option",
    "json_option",
    "memory_limit",
    "model_argument",
    "output_option",
    "quality_options",
    "save_recipe_option",
    "stage_cache_options",
    "target_option",
    "timeout_option",
    "tune_session_option",
]

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


@dataclass(frozen=True)
class Flag:
    """How one config field is spelled on the command line when ``--field-name`` is not the right word."""

    field: str
    flag: str | None = None  # default: --field-name
    negate: bool = False  # a flag that sets a True-by-default field to False (--float-embeddings)
    help: str | None = None
    convert: Callable[[Any], Any] | None = None  # the click value -> the recipe spelling
    click_type: Any = None
    metavar: str | None = None
    dest: str | None = None  # the click parameter name (default: the field name)

    @property
    def param(self) -> str:
        return self.dest or self.field


def flag_spelling(field_name: str, flags: Sequence[Flag] = ()) -> str:
    """The CLI spelling of a config field."""
    for f in flags:
        if f.field == field_name:
            return f.flag or "--" + field_name.replace("_", "-")
    return "--" + field_name.replace("_", "-")


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _click_type(tp: Any) -> tuple[Any, bool] | None:
    """(click type, multiple) for a field type, or None when a field of this type needs its own Flag."""
    from onnxforge.pipeline.data_spec import DataSpec

    tp = _unwrap_optional(tp)
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            inner = _click_type(args[0])
            return None if inner is None or inner[1] else (inner[0], True)
        return None
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return click.Choice([str(m.value) for m in tp]), False
    if tp in (int, float, str):
        return tp, False
    if tp is bool:
        return bool, False
    if tp in (Path, DataSpec):
        return click.Path(path_type=Path), False
    from onnxforge.pipeline.quantize.config import QuantScheme

    if tp is QuantScheme:  # the codec reads its spelling (qdq-u8s8-per-channel)
        return str, False
    return None


def _default_text(value: Any) -> str | None:
    if value is None or value == () or value is dataclasses.MISSING:
        return None
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


def config_options(*config_classes: type, flags: Sequence[Flag] = (), skip: Sequence[str] = (),
                   labels: Mapping[type, str] | None = None) -> Decorator:
    """Add an option for every field of ``config_classes`` (a field shared by several is added once).

    Help comes from the field's metadata (``codec.option(..., help=...)``); a ``Flag`` only respells a
    field (its flag, a negation, a unit the command line takes). With ``labels`` (one command, several
    configs: prune's methods) each help says which config reads it (``channels: ...; low-rank: ...``).
    ``skip`` names fields spelled by a shared option group (data, target, quality gate). A field whose
    type has no generic spelling must have a ``Flag`` with a ``click_type``, or be skipped: never silently
    left without a CLI spelling (tests/test_one_door.py checks every registered pass).
    """
    by_field = {f.field: f for f in flags}

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        seen: set[str] = set()
        params = []
        for cls in config_classes:
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                if f.name in skip or f.name in seen:
                    continue
                seen.add(f.name)
                text = _labelled_help(f.name, config_classes, labels) if labels else None
                params.append(_option_for(cls, f, hints[f.name], by_field.get(f.name), text))
        for param in reversed(params):
            command = param(command)
        return command

    return decorate


def _labelled_help(name: str, config_classes: Sequence[type], labels: Mapping[type, str]) -> str:
    """One help for a field several configs share, each part labelled by the config that reads it."""
    by_help: dict[str, list[str]] = {}
    for cls in config_classes:
        found = next((f for f in dataclasses.fields(cls) if f.name == name), None)
        if found is not None:
            text = found.metadata.get("help") or name.replace("_", " ")
            default = _default_text(found.default) if found.default is not dataclasses.MISSING else None
            by_help.setdefault(text + (f" [{default}]" if default else ""), []).append(labels[cls])
    return "; ".join(f"{', '.join(names)}: {text}" for text, names in by_help.items())


def _option_for(cls: type, f: dataclasses.Field, tp: Any, spec: Flag | None, labelled: str | None = None
                ) -> Decorator:
    spec = spec or Flag(f.name)
    flag = flag_spelling(f.name, [spec])
    default = f.default if f.default is not dataclasses.MISSING else None
    help_text = spec.help or labelled or f.metadata.get("help") or f"{cls.__name__}.{f.name}"
    found = (spec.click_type, False) if spec.click_type is not None else _click_type(tp)
    if found is None:
        raise TypeError(f"{cls.__name__}.{f.name}: no CLI spelling for {tp!r}; give it a Flag or skip it")
    click_type, multiple = found
    if multiple:
        help_text += " (repeatable)"
    if click_type is bool and spec.click_type is None:
        if spec.negate:
            return click.option(flag, spec.param, is_flag=True, default=False, help=help_text)
        on = flag.removeprefix("--")
        return click.option(f"--{on}/--no-{on}", spec.param, default=bool(default), show_default=not labelled,
                            help=help_text)
    shown = None if labelled else _default_text(default)
    return click.option(
        flag,
        spec.param,
        type=click_type,
        multiple=multiple,
        default=() if multiple else None,
        metavar=spec.metavar,
        help=help_text + (f"  [default: {shown}]" if shown and not multiple else ""),
    )


def given(ctx: click.Context, param: str) -> bool:
    """Whether the user gave ``param`` (on the command line or through the environment)."""
    source = ctx.get_parameter_source(param)
    return source in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)


def given_options(ctx: click.Context, config_cls: type, flags: Sequence[Flag] = (), skip: Sequence[str] = ()
                  ) -> dict[str, Any]:
    """The options the user gave for ``config_cls``'s fields, in the recipe's spelling."""
    by_field = {f.field: f for f in flags}
    options: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        spec = by_field.get(f.name) or Flag(f.name)
        if f.name in skip or spec.param not in ctx.params or not given(ctx, spec.param):
            continue
        value = ctx.params[spec.param]
        if spec.negate:
            value = not value
        if spec.convert is not None:
            value = spec.convert(value)
        elif isinstance(value, tuple):
            value = [str(v) if isinstance(v, Path) else v for v in value]
        elif isinstance(value, Path):
            value = str(value)
        options[f.name] = value
    return options


def options_for_other_methods(ctx: click.Context, used: Sequence[type], every: Sequence[type], method: str,
                              flags: Sequence[Flag] = (), skip: Sequence[str] = ()) -> None:
    """Refuse a stage option given for a config the chosen method does not use (``--sparsity`` with channels)."""
    fields_used = {f.name for cls in used for f in dataclasses.fields(cls)}
    for cls in every:
        for f in dataclasses.fields(cls):
            spec = next((x for x in flags if x.field == f.name), Flag(f.name))
            if f.name in fields_used or f.name in skip or spec.param not in ctx.params:
                continue
            if given(ctx, spec.param):
                raise UsageError(f"{flag_spelling(f.name, flags)} does not apply to {method}",
                                 hint="see 'onnxforge COMMAND --help' for which method each option belongs to")


# ----------------------------------------------------------------------------------------------
# Shared groups


def model_argument(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.argument("model", type=click.Path(dir_okay=False, path_type=Path))(f)


def output_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="output .onnx path"
    )(f)


def input_shape_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--input-shape", "input_shapes", multiple=True, metavar="NAME=DIMS[:DTYPE]",
        help="an input's shape, e.g. image=1x3x224x224 or input_ids=1x128:int64 (repeatable)",
    )(f)


def target_option(f: Callable[..., Any]) -> Callable[..., Any]:
    from onnxforge.targets import TARGETS

    return click.option(
        "--target", default="cpu", show_default=True, type=click.Choice(list(TARGETS)), help="execution target"
    )(f)


def tune_session_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """The recipe's ``tune_session``: the output's session options measured, written beside it."""
    return click.option(
        "--tune-session", is_flag=True, default=False,
        help="also measure onnxruntime session options (graph level, threads, NCHWc, memory) for the output and "
        "write those faster twice by >3% beside the final model as OUTPUT.session.json (optimize: best.session.json); "
        "profile and the API apply it")(f)


def timeout_option(help_text: str) -> Decorator:
    """``--timeout``: how long the user's code (file.py:callable) may run in its child process."""
    from onnxforge.converters._isolation import SOURCE_TIMEOUT_S

    return click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=int(SOURCE_TIMEOUT_S),
                        show_default=True, metavar="SECONDS", help=help_text)


_WRITTEN_PARAMS = ("output", "html_path", "save_recipe")  # a command's other output files
_OUTPUT_FOLDERS = ("run_dir", "mobile_dir")
_SOURCE_PARAMS = ("source", "distill_source")


def check_json_path(json_path: str | None, params: Mapping[str, Any], *reads: Any, written: Sequence[Any] = ()) -> None:
    """Refuse ``--json PATH`` when PATH is a file the command reads (its Path options, the export or
    distillation source) or writes (``-o``, ``--html``, ``--save-recipe``); a pipe or /dev/stdout is fine."""
    if not json_path or json_path == "-":
        return
    from onnxforge._atomic import check_output_path

    files = [v for k, v in params.items() if isinstance(v, Path) and k not in _WRITTEN_PARAMS + _OUTPUT_FOLDERS]
    for key in _SOURCE_PARAMS:  # export's SOURCE, prune --distill SOURCE: file.py:callable or a model file
        if isinstance(params.get(key), str):
            from onnxforge.converters.source import source_files

            files += source_files(params[key])
    others = [*written, *(params.get(k) for k in _WRITTEN_PARAMS)]
    check_output_path(json_path, *reads, *files, written=others, stream_ok=True)


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(f)
    def checked(*args: Any, **kwargs: Any) -> Any:
        check_json_path(kwargs.get("json_path"), kwargs)  # before any work, not after the model is written
        return f(*args, **kwargs)

    return click.option(
        "--json", "json_path", metavar="PATH", default=None,
        help="also write the result and its stage record as JSON to PATH ('-' = stdout)",
    )(checked)


def save_recipe_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--save-recipe", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="PATH",
        help="also write the recipe that reruns this command (onnxforge run PATH)",
    )(f)


class MetricType(click.ParamType):
    """``--metric``: a built-in metric's name, or ``file.py:function`` (a user metric: the file must exist;
    it is given to the recipe by its absolute path)."""

    name = "metric"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        from onnxforge.pipeline.evaluate import Metric

        return "[" + "|".join(m.value for m in Metric if m is not Metric.USER) + "|FILE.py:FUNCTION]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from onnxforge.pipeline.evaluate import Metric
        from onnxforge.pipeline.user_metric import parse_user_metric

        text = str(value)
        names = [m.value for m in Metric if m is not Metric.USER]
        if text in names:
            return text
        try:
            user = parse_user_metric(text)
        except UsageError as e:
            self.fail(e.message, param, ctx)
        if user is None:
            self.fail(f"{text!r} is not one of {', '.join(names)}, or file.py:function (your own metric)", param, ctx)
        if not user.path.is_file():
            self.fail(f"{user.path}: no such file (the metric {text})", param, ctx)
        return f"{user.path.resolve()}:{user.function}"


def gate_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--metric`` and ``--tolerance``, the gate's rules every gated command shares (stage commands and
    optimize); the other rules, ``--max-churn`` and ``--worst-cosine``, are generated from the same
    declaration (gate_fields.GateRules) by ``config_options``."""
    from onnxforge.pipeline.evaluate import METRIC_HELP, tolerance_help

    f = click.option("--tolerance", type=float, default=None,
                     help=f"the quality gate, in the metric's unit ({tolerance_help()})")(f)
    return click.option("--metric", type=MetricType(), default="auto", show_default=True, help=METRIC_HELP)(f)


def quality_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--eval`` and the gate's ``--metric`` and ``--tolerance`` (gate_options)."""
    f = gate_options(f)
    return click.option(
        "--eval", "eval_data", type=click.Path(path_type=Path), default=None,
        help="held-out samples (.npz keyed by input name, optional 'label' array; a folder of .npz/.npy or images)",
    )(f)


def stage_cache_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """A stage command's cache options: where, off, or recompute (--force) while still recording."""
    f = click.option("--force", is_flag=True, help="recompute the stage even when the cache holds it")(f)
    return cache_options(f)


_SHARED_CACHE_HELP = ("the content-addressed stage cache, shared by runs and search trials "
                      "(default: $ONNXFORGE_CACHE_DIR or ~/.cache/onnxforge)")


def cache_options(f: Callable[..., Any] | None = None, *, cache_help: str = _SHARED_CACHE_HELP) -> Any:
    """``--cache-dir`` and ``--no-cache``; ``cache_help`` says what the default is where it is not the shared cache."""

    def add(f: Callable[..., Any]) -> Callable[..., Any]:
        f = click.option("--no-cache", is_flag=True, help="neither use nor fill the stage cache")(f)
        return click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                            help=cache_help)(f)

    return add(f) if f is not None else add


def image_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """How a folder of images given as data is read (--calibration and --eval alike)."""
    f = click.option("--layout", type=click.Choice(["auto", "nchw", "nhwc"]), default="auto", show_default=True,
                     help="images: input layout")(f)
    f = click.option("--std", metavar="S[,S,S]", default=None, help="images: per-channel std divided by")(f)
    f = click.option("--mean", metavar="M[,M,M]", default=None,
                     help="images: per-channel mean subtracted after scaling to [0,1]")(f)
    return click.option("--image-size", metavar="HxW", default=None,
                        help="images: resize to this size (default: the model input's)")(f)


def floats(text: str | None, name: str) -> tuple[float, ...] | None:
    try:
        return None if text is None else tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{name} {text!r}: expected comma-separated numbers") from None


def size_hw(text: str | None, name: str) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"{name} {text!r}: expected HxW, e.g. 224x224") from None
    return h, w


def data_spec(path: Path | None, image_size: str | None = None, mean: str | None = None, std: str | None = None,
              layout: str = "auto") -> Any:
    """A data option in the recipe's spelling: a plain path, or ``{path, image_size, mean, std, layout}``."""
    if path is None:
        return None
    options: dict[str, Any] = {"path": str(path)}
    hw = size_hw(image_size, "--image-size")
    if hw:
        options["image_size"] = list(hw)
    for key, text in (("mean", mean), ("std", std)):
        values = floats(text, f"--{key}")
        if values:
            options[key] = list(values)
    if layout != "auto":
        options["layout"] = layout
    return options if len(options) > 1 else str(path)


def data_options(ctx: click.Context) -> tuple[Any, Any]:
    """``--calibration`` and ``--eval`` with the image options (``image_options``), in the recipe's spelling."""
    params = ctx.params
    images = (params.get("image_size"), params.get("mean"), params.get("std"), params.get("layout") or "auto")
    return data_spec(params.get("calibration"), *images), eval_spec(params.get("eval_data"), *images)


def eval_spec(path: Path | None, image_size: str | None = None, mean: str | None = None, std: str | None = None,
              layout: str = "auto") -> Any:
    """``--eval`` in the recipe's spelling: the image options apply when it is a folder (of images)."""
    if path is None or not path.is_dir():
        return None if path is None else str(path)
    return data_spec(path, image_size, mean, std, layout)


def memory_limit(text: str | None) -> int | None:
    from onnxforge.pipeline.quantize.calibration_memory import parse_memory_size

    return None if text is None else parse_memory_size(text)
