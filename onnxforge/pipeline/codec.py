"""One config codec, driven by ``dataclasses.fields()``: every stage config is saved, loaded, hashed
and cached through it, so a field that exists is a field that is saved, hashed and cached.

``encode(config)`` gives plain JSON data (enums by value, paths as strings, tuples as lists,
nested dataclasses as mappings); ``decode(cls, data)`` builds the frozen config back, checking keys
and types with messages that name the key (``stages[2].quantize.ratio: expected a number``).
``fingerprint(config)`` is what a cache key hashes: the encoded config with every file path
replaced by the sha256 of what it names (a file's bytes, a folder's files), so an edited data file
changes the key and a moved one does not.

A field renamed since recipes were written says so in its metadata (``{"renamed_from": "old"}``):
the old key is refused with a message naming the new one, like any unknown key but more helpfully.

Types that need their own spelling (a quantization scheme is written ``qdq-u8s8-per-channel``)
register an encoder/decoder pair with ``register_type``.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from onnxforge.errors import OnnxForgeError, RecipeError

__all__ = ["ABSENT", "Absent", "JsonResult", "decode", "decode_dataclass", "encode", "encode_result", "fingerprint",
           "key_fields", "register_type", "rounded"]

_HOOKS: dict[type, tuple[Callable[[Any], Any] | None, Callable[[Any, str, Path | None], Any]]] = {}


def register_type(
    cls: type, encoder: Callable[[Any], Any] | None, decoder: Callable[[Any, str, Path | None], Any]
) -> None:
    """Give ``cls`` its own spelling: ``encoder(value) -> JSON data``, ``decoder(data, where, base) -> value``
    (the decoder raises RecipeError naming ``where`` on bad data; ``base`` as in ``decode``). An encoder
    of None keeps the generic encoding (a dataclass as a mapping) and changes only what decoding accepts."""
    _HOOKS[cls] = (encoder, decoder)


def key_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that change a stage's output: all but those marked ``metadata={"key": False}``
    (limits such as ``max_memory`` decide whether a stage runs, not what it writes)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("key", True)]


class Absent(enum.Enum):
    """The value of a result field the result does not have yet (a trial that failed before it was
    timed has no ``ratio``): ``encode_result`` leaves the key out, where None would write null."""

    ABSENT = "absent"


ABSENT = Absent.ABSENT


def option(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
           **metadata: Any) -> Any:
    """A config field with its description: what ``--help``, the README's command reference and recipe
    errors say about it (``ratio: float = option(0.5, help="share of channels removed")``). Other
    metadata (``key=False``, ``renamed_from=...``) is passed through."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help, **metadata})


class JsonResult:
    """A stage result (or trial record) saved through the codec: ``to_json()`` encodes every field, nested
    results included, except those marked ``metadata={"json": False}`` (an in-memory model), then adds what
    ``json_extra()`` derives (a ratio, a flag a reader wants without recomputing it). A field whose JSON is
    spelled otherwise than its value (seconds rounded to the millisecond) names the spelling in its
    metadata: ``metadata={"encode": rounded(3)}``. No hand-written ``to_json``: a field that exists is a
    field that is saved."""

    def json_extra(self) -> dict[str, Any]:
        return {}

    def to_json(self) -> dict[str, Any]:
        return encode_result(self)


def encode_result(value: Any) -> dict[str, Any]:
    """A result dataclass as JSON data: its JSON fields by ``encode`` (or the field's own ``encode``
    spelling), then its ``json_extra()``."""
    data = {}
    for f in dataclasses.fields(value):
        if not f.metadata.get("json", True):
            continue
        spell = f.metadata.get("encode")
        raw = getattr(value, f.name)
        if raw is ABSENT:
            continue
        data[f.name] = spell(raw) if spell is not None else _encode_in_result(raw)
    extra = getattr(value, "json_extra", None)
    if extra is not None:
        data.update({k: _encode_in_result(v) for k, v in extra().items()})
    return data


def rounded(digits: int) -> Callable[[float | None], float | None]:
    """A field spelling (``metadata={"encode": rounded(3)}``): the number rounded to ``digits`` places."""
    return lambda value: None if value is None else round(value, digits)


def _encode_in_result(value: Any) -> Any:
    """``encode`` for the values inside a result, where a nested result from outside the codec (a
    ``ParityReport``, a ``TensorSpec``: results still spelled by their own ``to_json``) is encoded by it.
    Configs never reach here, so what they hash does not depend on such methods."""
    if isinstance(value, JsonResult) and dataclasses.is_dataclass(value):
        return encode_result(value)
    to_json = getattr(value, "to_json", None)
    if callable(to_json) and not isinstance(value, type):
        return to_json()
    if isinstance(value, Mapping):
        return {str(k): _encode_in_result(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode_in_result(v) for v in value]
    return encode(value)


def encode(value: Any) -> Any:
    """``value`` as JSON data (see the module docstring)."""
    for cls, (encoder, _) in _HOOKS.items():
        if encoder is not None and isinstance(value, cls):
            return encoder(value)
    if isinstance(value, JsonResult) and dataclasses.is_dataclass(value):
        return encode_result(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.dtype):
        return value.name
    if isinstance(value, type) and issubclass(value, np.generic):
        return np.dtype(value).name
    if isinstance(value, Mapping):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def fingerprint(value: Any) -> Any:
    """``encode(value)`` with paths replaced by the sha256 of their content and non-key fields left out."""
    from onnxforge.pipeline.evaluations import file_fingerprint  # hashed once per file per process

    # Dataclasses go field by field even when they have their own spelling, so paths inside them
    # are hashed by content.
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: fingerprint(getattr(value, f.name)) for f in key_fields(type(value))}
    if isinstance(value, os.PathLike):
        path = Path(value)
        return {"sha256": file_fingerprint(path)} if path.exists() else {"missing": os.fspath(path)}
    if isinstance(value, Mapping):
        return {str(k): fingerprint(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [fingerprint(v) for v in value]
    return encode(value)


# ----------------------------------------------------------------------------------------------
# Decoding


def _decode_path(value: Any, where: str, base: Path | None) -> Path:
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{where}: expected a file path, got {value!r}")
    path = Path(value)
    if base is not None:
        path = path if path.is_absolute() else base / path
        if not path.exists():
            raise RecipeError(f"{where}: file {path} does not exist")
    return path


def _decode_number(value: Any, annotation: type, where: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{where}: expected a number, got {value!r}")
    if annotation is int and not float(value).is_integer():
        raise RecipeError(f"{where}: expected an integer, got {value!r}")
    return annotation(value)


def _decode_union(value: Any, args: tuple, where: str, base: Path | None) -> Any:
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in (a for a in args if a is not type(None)):
        try:
            return decode(arg, value, where, base)
        except RecipeError as e:
            errors.append(e.message)
    raise RecipeError(errors[0] if errors else f"{where}: invalid value {value!r}")


def decode(annotation: Any, value: Any, where: str = "config", base: Path | None = None) -> Any:
    """Build a value of type ``annotation`` (a config dataclass, or any field annotation) from JSON data.

    ``base``: when given, relative paths are resolved against it and must exist (recipes); when None,
    paths are taken as written (manifests, caches, tests).
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return _decode_union(value, args, where, base)
    if annotation in _HOOKS:
        return _HOOKS[annotation][1](value, where, base)
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return decode_dataclass(annotation, value, where, base)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        choices = [m.value for m in annotation]
        if value not in choices:
            raise RecipeError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        return annotation(value)
    if annotation is Path:
        return _decode_path(value, where, base)
    if annotation is np.dtype:
        try:
            return np.dtype(value)
        except TypeError:
            raise RecipeError(f"{where}: unknown dtype {value!r}") from None
    if annotation is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation in (int, float):
        return _decode_number(value, annotation, where)
    if annotation is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        if (len(args) == 2 and args[1] is Ellipsis) or len(args) <= 1:
            item = args[0] if args else Any
            return tuple(decode(item, v, f"{where}[{i}]", base) for i, v in enumerate(value))
        if len(value) != len(args):
            raise RecipeError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(decode(a, v, f"{where}[{i}]", base) for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin in (Mapping, dict, typing.get_origin(Mapping[str, int])):
        if not isinstance(value, Mapping):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        key_t, val_t = args if args else (Any, Any)
        return {_decode_key(k, key_t, where): decode(val_t, v, f"{where}.{k}", base) for k, v in value.items()}
    if annotation is Any:
        return value
    raise RecipeError(f"{where}: this key cannot be set from a recipe")


def _decode_key(key: Any, annotation: Any, where: str) -> Any:
    # JSON object keys are strings: {"0": "batch"} decodes to {0: "batch"} for Mapping[int, str].
    if annotation is int and isinstance(key, str) and key.lstrip("-").isdigit():
        return int(key)
    return decode(annotation, key, f"{where} key", None)


def decode_dataclass(cls: type, values: Any, where: str, base: Path | None) -> Any:
    if not isinstance(values, Mapping):
        raise RecipeError(f"{where}: expected a mapping of options, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - fields)
    renamed = {f.metadata["renamed_from"]: f.name for f in dataclasses.fields(cls) if "renamed_from" in f.metadata}
    for key in unknown:
        if key in renamed:  # an old spelling: name the new key rather than list all of them
            raise RecipeError(f"{where}: {key!r} is now called {renamed[key]!r}",
                              hint=f"write {renamed[key]}: {values[key]!r}")
    if unknown:
        raise RecipeError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(fields))}")
    kwargs = {k: decode(hints[k], v, f"{where}.{k}", base) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except OnnxForgeError as e:
        raise RecipeError(f"{where}: {e.message}", hint=e.hint) from e
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{where}: {e}") from e
