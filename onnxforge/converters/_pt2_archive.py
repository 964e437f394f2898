"""What a ``torch.export`` archive (``.pt2``) may hold before torch is allowed to load it.

``torch.export.load`` unpickles with ``weights_only=False`` every weight or constant whose entry in
``data/weights/*_weights_config.json`` or ``data/constants/*_constants_config.json`` says
``"use_pickle": true``, and retries that way the sample inputs (``data/sample_inputs/*.pt``) when
the weights-only unpickler refuses them; it runs ``pickle.loads`` on opaque-object constants,
restores torchbind objects, and loads AOTInductor's compiled libraries. A pickle runs whatever its
``__reduce__`` names, so a .pt2 from elsewhere could run code the moment it is loaded.

So before torch sees the file, every member torch would unpickle must load with torch's
weights-only unpickler (tensors and plain containers of them), and members that only code can
restore (opaque and torchbind objects, AOTInductor libraries) are refused: ExportError, exit 2,
naming the member. torch then reads the same open file with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``,
which turns even its own ``weights_only=False`` calls into weights-only ones.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from onnxforge.errors import ExportError

__all__ = ["check_pt2_archive", "weights_only_loads"]

# Member names as torch 2.13 writes them (torch/export/pt2_archive/constants.py), below the
# archive's root folder.
_WEIGHTS_DIR, _CONSTANTS_DIR, _AOTI_DIR = "data/weights/", "data/constants/", "data/aotinductor/"
_TENSOR_CONSTANT_PREFIX = "tensor_"
_HINT = "save one with torch.export.save(torch.export.export(model, args), 'model.pt2')"
_REFUSED_HINT = ("onnxforge loads a .pt2 only when all it holds is tensors; a pickle can run code when loaded. "
                 "If you trust the file, export from file.py:callable that loads it")


def _refuse(path: Path, why: str) -> ExportError:
    return ExportError(f"{path}: refusing to load this .pt2: {why}", hint=_REFUSED_HINT)


def _relative(name: str) -> str:
    """The member's name below the archive's root folder (torch names that folder after the file)."""
    return name.split("/", 1)[1] if "/" in name else name


def _weights_only_failure(error: Exception) -> str:
    text = " ".join(str(error).split())
    called = re.search(r"GLOBAL ([\w.]+)", text)
    return f"it calls {called.group(1)}" if called else f"{type(error).__name__}: {text[:160]}"


def check_pt2_archive(file: BinaryIO, path: Path) -> None:
    """Raise ExportError unless every member of the archive ``file`` that torch.export.load would
    unpickle is plain tensor data (see the module docstring)."""
    import torch

    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise ExportError(f"{path}: not a torch.export program (not a zip archive)", hint=_HINT) from e
    with archive:
        members = {_relative(name): name for name in archive.namelist()}
        pickled = [rel for rel in members if rel.endswith(".pt")]  # torch.save payloads: sample inputs, legacy weights
        for rel, name in members.items():
            if rel.startswith(_AOTI_DIR):
                raise _refuse(path, f"{rel} is AOTInductor compiled code, which loading would run")
            if not (rel.startswith((_WEIGHTS_DIR, _CONSTANTS_DIR)) and rel.endswith("_config.json")):
                continue
            folder = rel.rsplit("/", 1)[0] + "/"
            try:
                config = json.loads(archive.read(name)).get("config", {})
            except (ValueError, AttributeError, zipfile.BadZipFile) as e:
                raise ExportError(f"{path}: not a torch.export program ({rel} is not readable)", hint=_HINT) from e
            for fqn, meta in config.items():
                path_name = str((meta or {}).get("path_name", ""))
                if folder == _CONSTANTS_DIR and not path_name.startswith(_TENSOR_CONSTANT_PREFIX):
                    raise _refuse(
                        path, f"constant {fqn!r} is a Python object ({path_name}), which only code can restore"
                    )
                if (meta or {}).get("use_pickle"):
                    pickled.append(folder + path_name)
        for rel in pickled:
            if rel not in members:
                continue  # torch reports the missing member itself
            try:
                torch.load(io.BytesIO(archive.read(members[rel])), weights_only=True, map_location="cpu")
            except Exception as e:
                raise _refuse(path, f"{rel} is a pickle that is not only tensors ({_weights_only_failure(e)})") from e


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within the block, every torch.load is weights-only, even one that asks for weights_only=False."""
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value
