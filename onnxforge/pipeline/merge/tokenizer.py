"""The tokenizer in the graph, for BERT-style models: a string in, ``input_ids`` / ``attention_mask`` /
``token_type_ids`` [1, tokens] out, fed to the network, through onnxruntime-extensions' ``BertTokenizer``
op (WordPiece over the model's ``vocab.txt``, the same splitting as Hugging Face's BertTokenizer).

The vocabulary is the model's: ``vocab.txt`` beside the model file (how Hugging Face and
sentence-transformers folders ship it) or a path given in the config. A model without one is a
MergeError, never a guess. The op tokenizes one text per run, so the merged graph takes ``text``
of shape [1] and gives batch-1 outputs. Running the merged graph needs the extensions library
registered in the session (``session_options.register_custom_ops_library(extensions_library())``);
the op's domain and version are written in the model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, compose, helper

from onnxforge._ort_logs import session_options
from onnxforge.errors import MergeError, UsageError
from onnxforge.model_io import TensorSpec, input_specs
from onnxforge.pipeline.merge._compose import block_model, value_info

__all__ = [
    "EXAMPLE_TEXTS",
    "EXTENSIONS_DOMAIN",
    "TokenizerConfig",
    "TokenizerPlan",
    "extensions_library",
    "plan_tokenizer",
]

EXTENSIONS_DOMAIN = "ai.onnx.contrib"
_PROTOBUF_ENV = "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"
VOCAB_NAME = "vocab.txt"
_FEEDS = ("input_ids", "attention_mask", "token_type_ids")
_OP_OUTPUTS = ("input_ids", "token_type_ids", "attention_mask")  # the op's output order
EXAMPLE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "ONNX Runtime runs the tokenizer inside the graph!",
    "Café naïve résumé, 12.5% faster — or not?",
    "a",
)


@dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    """``vocab``: the model's vocab.txt (default: beside the model file); ``lowercase``: an uncased
    model (also strips accents, as Hugging Face does for uncased BERTs); ``max_length``: tokens kept,
    [CLS] and [SEP] included; ``text_input``: the merged graph's string input."""

    vocab: Path | None = None
    lowercase: bool = True
    max_length: int = 512
    text_input: str = "text"

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise MergeError(f"tokenizer max_length {self.max_length}: needs room for [CLS] and [SEP] (>= 2)")
        if not self.text_input:
            raise MergeError("tokenizer text_input must be a name")


def extensions_library() -> str:
    """The onnxruntime-extensions custom-op library; UsageError (one line, with the install hint) without it."""
    # Importing onnxruntime_extensions sets PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python for the whole
    # process (0.15.2, its cvt module): every subprocess started later would parse models with the pure
    # Python protobuf. The variable is put back as it was.
    saved = os.environ.get(_PROTOBUF_ENV)
    try:
        import onnxruntime_extensions
    except ImportError as e:
        raise UsageError("the tokenizer in the graph needs onnxruntime-extensions, which is not installed",
                         hint="pip install 'onnxforge[tokenizer]'") from e
    finally:
        if saved is None:
            os.environ.pop(_PROTOBUF_ENV, None)
        else:
            os.environ[_PROTOBUF_ENV] = saved
    return onnxruntime_extensions.get_library_path()


@dataclass(frozen=True)
class TokenizerPlan:
    config: TokenizerConfig
    vocab_path: Path
    vocab: str
    network_inputs: tuple[TensorSpec, ...]  # the network inputs the tokenizer feeds

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec(self.config.text_input, (1,), np.dtype(object))]

    @property
    def fed(self) -> list[str]:
        return [s.name for s in self.network_inputs]

    def block(self, like: onnx.ModelProto) -> tuple[onnx.ModelProto, list[tuple[str, str]]]:
        text = self.config.text_input
        # The op directly rather than pre_post_processing's BertTokenizer step (benchmarks/merge_library.py,
        # 2026-12-07): the step wraps the same op (equal ids, 1.02-1.05x: noise) and both need the
        # extensions library at runtime, but the step sets no max_length (a 42-token text stays 42 tokens
        # where the model takes 16) and its need_token_type_ids_output flag reads inverted.
        op_outputs = [f"raw_{name}" for name in _OP_OUTPUTS]
        nodes = [helper.make_node(
            "BertTokenizer", [text], op_outputs, domain=EXTENSIONS_DOMAIN, vocab_file=self.vocab,
            do_lower_case=int(self.config.lowercase), strip_accents=int(self.config.lowercase),
            max_length=self.config.max_length)]
        outputs = []
        for spec in self.network_inputs:
            nodes.append(helper.make_node("Cast", [f"raw_{spec.name}"], [spec.name],
                                          to=helper.np_dtype_to_tensor_dtype(spec.dtype)))
            outputs.append(value_info(spec.name, spec.dtype, ["tokens"]))
        block = block_model("bert_tokenizer", nodes, [value_info(text, TensorProto.STRING, [1])], outputs, like,
                            domains=[(EXTENSIONS_DOMAIN, 1)])
        # The op gives one text's tokens [tokens]; the network takes a batch [batch, tokens].
        block = compose.expand_out_dim(block, 0)
        # expand_out_dim writes a dynamic dim as 0 in the new output types: declare [1, tokens] instead.
        for out, spec in zip(block.graph.output, self.network_inputs, strict=False):
            out.CopyFrom(value_info(out.name, spec.dtype, [1, "tokens"]))
        onnx.checker.check_model(block)
        return block, [(s.name, s.name) for s in self.network_inputs]

    def reference(self, raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The tokenizer run on its own (onnxruntime with the extensions library): text -> the network's feeds."""
        import onnxruntime as ort

        options = session_options()
        options.register_custom_ops_library(extensions_library())
        like = helper.make_model(helper.make_graph([], "like", [], []), opset_imports=[helper.make_opsetid("", 17)])
        block, _ = self.block(like)
        session = ort.InferenceSession(block.SerializeToString(), options, providers=["CPUExecutionProvider"])
        outputs = session.run(None, {self.config.text_input: np.asarray(raw[self.config.text_input], dtype=object)})
        return dict(zip([s.name for s in self.network_inputs], outputs, strict=False))

    def raw_from(self, network_feeds: Mapping[str, np.ndarray]) -> None:
        return None  # token ids cannot be turned back into the text a deployed model receives

    def examples(self, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
        return [{self.config.text_input: np.array([t], dtype=object)} for t in EXAMPLE_TEXTS]


def find_vocab(config: TokenizerConfig, model_path: Path | None) -> Path:
    if config.vocab is not None:
        if not config.vocab.is_file():
            raise MergeError(f"tokenizer vocabulary {config.vocab} does not exist")
        return config.vocab
    beside = model_path.parent / VOCAB_NAME if model_path is not None else None
    if beside is None or not beside.is_file():
        where = f"no {VOCAB_NAME} beside {model_path}" if model_path else "no model file to look beside"
        raise MergeError(f"the model ships no vocabulary for a tokenizer ({where})",
                         hint=f"pass the model's {VOCAB_NAME} (--vocab PATH), or put it beside the model")
    return beside


def plan_tokenizer(config: TokenizerConfig, network: onnx.ModelProto, model_path: Path | None) -> TokenizerPlan:
    """Check that ``network`` is BERT-style and find its vocabulary; MergeError otherwise."""
    specs = {s.name: s for s in input_specs(network)}
    if "input_ids" not in specs:
        raise MergeError(f"the tokenizer feeds BERT-style inputs (input_ids, attention_mask, token_type_ids); "
                         f"the model takes {', '.join(specs)}")
    unknown = sorted(set(specs) - set(_FEEDS))
    if unknown:
        raise MergeError(f"the tokenizer cannot feed the model's input(s) {', '.join(unknown)}")
    for spec in specs.values():
        if spec.dtype.kind not in "iu" or len(spec.shape) != 2:
            raise MergeError(f"the tokenizer feeds [batch, tokens] integer ids; {spec.name!r} is "
                             f"{spec.dtype}[{spec.shape_text()}]")
        if isinstance(spec.shape[0], int) and spec.shape[0] != 1:
            raise MergeError(
                f"the tokenizer gives one text per run; {spec.name!r} has a fixed batch of {spec.shape[0]}")
    extensions_library()  # fail before any work when the package is missing
    path = find_vocab(config, model_path)
    try:
        vocab = "\n".join(path.read_text(encoding="utf-8").splitlines())  # one token a line, whatever the line ends
    except (OSError, UnicodeDecodeError) as e:
        raise MergeError(f"cannot read the vocabulary {path}: {e}") from e
    if not {"[CLS]", "[SEP]"} <= set(vocab.splitlines()):
        raise MergeError(f"{path} is not a BERT vocabulary (no [CLS]/[SEP] lines)")
    return TokenizerPlan(config, path, vocab, tuple(specs[n] for n in _FEEDS if n in specs))
