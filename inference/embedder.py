"""Text embeddings with onnxruntime + tokenizers: Arrow strings in, FixedSizeList<float32> out.

Reproduces `SentenceTransformer.encode` (tokenize with truncation, transformer, pooling,
optional L2 normalisation) without torch. The work per call is:

1. one `encode_batch_fast` call for all texts (Rust, parallel, no offsets computed);
2. texts sorted by token count and cut into sub-batches, so each sub-batch is padded only
   to its own longest text (short and long texts mixed in one batch would otherwise make
   every row pay for the longest one);
3. pooling and normalisation in numpy, written into one preallocated [n, dim] matrix in
   the original order, which becomes the Arrow child array without per-row objects.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from .errors import ModelError
from .ort_session import make_session, numpy_type
from .st_dir import POOLING_MODES, SentenceTransformerDir, load_st_dir, read_pooling

TextInput = pa.Array | pa.ChunkedArray | Sequence[str | None]


class TextEmbedder:
    """A sentence embedding model ready to run; safe to share between threads.

    Build one with `from_sentence_transformers` (a model folder, converted to ONNX and
    cached) or `from_onnx` (an existing ONNX file plus its tokenizer.json), or directly.
    """

    def __init__(self, onnx_path: str | Path, tokenizer_path: str | Path, *,
                 max_seq_length: int = 256, pooling: str = "mean", normalize: bool = True,
                 threads: int | None = None, inter_op_threads: int | None = None,
                 batch_size: int = 64, name: str | None = None):
        if pooling not in POOLING_MODES:
            raise ModelError(f"pooling must be one of {', '.join(POOLING_MODES)}, not {pooling!r}")
        if int(batch_size) < 1 or int(max_seq_length) < 2:
            raise ModelError("batch_size must be >= 1 and max_seq_length >= 2")
        self.name = name or Path(onnx_path).stem
        self.onnx_path = Path(onnx_path)
        self.pooling, self.normalize = pooling, bool(normalize)
        self.batch_size, self.max_seq_length = int(batch_size), int(max_seq_length)
        self._tokenizer = _load_tokenizer(Path(tokenizer_path), self.max_seq_length)
        self._counter = None  # the tokenizer without truncation, built on first count_tokens
        self._pad_id = _pad_id(self._tokenizer)
        self._session = make_session(onnx_path, threads, inter_op_threads)
        self._inputs = {i.name: numpy_type(i.type, f"{onnx_path} input {i.name}")
                        for i in self._session.get_inputs()}
        unknown = set(self._inputs) - {"input_ids", "attention_mask", "token_type_ids"}
        if "input_ids" not in self._inputs or unknown:
            raise ModelError(f"{onnx_path}: expected inputs input_ids[, attention_mask, token_type_ids], "
                             f"found {', '.join(self._inputs)}")
        self._output, rank, dim = _pick_output(self._session, onnx_path)
        # rank 3 = token embeddings, pooled here; rank 2 = already a sentence embedding.
        self._pool_here = rank == 3
        self.dim = dim if isinstance(dim, int) else self._embed_numpy([""]).shape[1]

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_sentence_transformers(cls, model_dir: str | Path | SentenceTransformerDir,
                                   cache_dir: str | Path, *, quantization: str = "none",
                                   **kwargs) -> "TextEmbedder":
        """Convert (once, cached) a sentence-transformers folder to ONNX and load it."""
        from .bert_onnx import export_onnx

        st = model_dir if isinstance(model_dir, SentenceTransformerDir) else load_st_dir(model_dir)
        limit = int(st.config.get("max_position_embeddings", 512))
        if int(kwargs.get("max_seq_length") or 0) > limit:
            raise ModelError(f"max_seq_length {kwargs['max_seq_length']} exceeds the model's {limit} positions")
        path = export_onnx(st, cache_dir, quantization)
        kwargs.setdefault("max_seq_length", st.max_seq_length)
        kwargs.setdefault("name", st.label)
        return cls(path, st.tokenizer, pooling=st.pooling, normalize=st.normalize, **kwargs)

    @classmethod
    def from_onnx(cls, onnx_path: str | Path, tokenizer_path: str | Path, **kwargs) -> "TextEmbedder":
        """An exported ONNX model; pooling, normalisation and length default to what a
        sentence-transformers folder around the tokenizer says, if there is one."""
        folder = Path(tokenizer_path).parent
        if "pooling" not in kwargs or "normalize" not in kwargs:
            pooling, normalize, _ = read_pooling(folder)
            if not (folder / "modules.json").is_file():
                normalize = True  # a bare ONNX file: cosine-ready vectors are the useful default
            kwargs.setdefault("pooling", pooling)
            kwargs.setdefault("normalize", normalize)
        if "max_seq_length" not in kwargs and (folder / "sentence_bert_config.json").is_file():
            cfg = json.loads((folder / "sentence_bert_config.json").read_text())
            if cfg.get("max_seq_length"):
                kwargs["max_seq_length"] = int(cfg["max_seq_length"])
        return cls(onnx_path, tokenizer_path, **kwargs)

    # ------------------------------------------------------------------ API

    @property
    def type(self) -> pa.DataType:
        return pa.list_(pa.float32(), self.dim)

    def embed(self, texts: TextInput) -> pa.FixedSizeListArray:
        """One embedding per input row; null rows give null embeddings."""
        arr = _as_string_array(texts)
        n = len(arr)
        if arr.null_count == 0:
            matrix = self._embed_numpy(arr.to_pylist()) if n else np.zeros((0, self.dim), np.float32)
            return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), self.dim)
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        matrix = np.zeros((n, self.dim), np.float32)
        if valid.any():
            matrix[valid] = self._embed_numpy(arr.drop_null().to_pylist())
        return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), self.dim,
                                                 mask=pa.array(~valid))

    def embed_numpy(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] float32; for queries and callers that stay in numpy."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        if any(t is None for t in texts):
            raise ModelError("embed_numpy does not accept None; use embed() for nullable input")
        return self._embed_numpy(texts)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Each text's token count before truncation to ``max_seq_length`` (special tokens
        not counted): what a request limit or a usage report is about."""
        if self._counter is None:
            from tokenizers import Tokenizer
            counter = Tokenizer.from_str(self._tokenizer.to_str())
            counter.no_truncation()
            counter.no_padding()
            self._counter = counter
        return [len(e.ids) for e in self._counter.encode_batch_fast(list(texts), add_special_tokens=False)]

    # ------------------------------------------------------------------ internals

    def _embed_numpy(self, texts: list[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch_fast(texts)
        id_lists = [e.ids for e in encodings]
        lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
        offsets = np.zeros(len(lengths), np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        flat = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64, count=int(lengths.sum()))
        order = np.argsort(lengths, kind="stable")
        dim = getattr(self, "dim", None)
        out: np.ndarray | None = np.empty((len(texts), dim), np.float32) if dim else None
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            width = int(lengths[rows].max())
            positions = np.arange(width)
            mask = positions[None, :] < lengths[rows, None]
            # Vectorised padding: gather each row's ids from the flat buffer, pad elsewhere.
            gather = np.minimum(offsets[rows, None] + positions[None, :], len(flat) - 1)
            ids = np.where(mask, flat[gather], self._pad_id)
            pooled = self._run(ids, mask)
            if out is None:  # first call, used to discover the dimension of a dynamic output
                out = np.empty((len(texts), pooled.shape[1]), np.float32)
            out[rows] = pooled
        return out

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feed = {"input_ids": ids.astype(self._inputs["input_ids"], copy=False)}
        if "attention_mask" in self._inputs:
            feed["attention_mask"] = mask.astype(self._inputs["attention_mask"])
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = np.zeros(ids.shape, self._inputs["token_type_ids"])
        hidden = self._session.run([self._output], feed)[0]
        if self._pool_here:
            vectors = _pool(hidden.astype(np.float32, copy=False), mask, self.pooling)
        else:
            vectors = hidden.astype(np.float32, copy=False)
        if self.normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            # Same floor as torch.nn.functional.normalize: a zero vector stays zero.
            vectors = vectors / np.maximum(norms, 1e-12)
        return vectors


def _pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    if mode == "cls":
        return hidden[:, 0, :]
    if mode == "max":
        return np.where(mask[:, :, None], hidden, -np.inf).max(axis=1).astype(np.float32)
    weights = mask.astype(np.float32)
    # [b, 1, s] @ [b, s, h]: one batched matmul instead of a masked multiply + sum.
    summed = (weights[:, None, :] @ hidden)[:, 0, :]
    return summed / np.maximum(weights.sum(axis=1, keepdims=True), 1e-9)


def _load_tokenizer(path: Path, max_seq_length: int):
    from tokenizers import Tokenizer

    if not path.is_file():
        raise ModelError(f"tokenizer file {path} does not exist")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a generic Exception on bad JSON
        raise ModelError(f"cannot load tokenizer {path}: {e}") from None
    # tokenizer.json files often carry their own truncation/padding (MiniLM's: fixed 128).
    # The model's max_seq_length is what sentence-transformers applies, and padding is done
    # per sub-batch here, so both are overridden.
    tokenizer.enable_truncation(max_length=max_seq_length)
    tokenizer.no_padding()
    return tokenizer


def _pad_id(tokenizer) -> int:
    padding = tokenizer.padding
    if padding:
        return int(padding["pad_id"])
    for token in ("[PAD]", "<pad>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id)
    return 0  # masked out anyway; any valid id will do


def _pick_output(session, path) -> tuple[str, int, int | str | None]:
    outputs = {o.name: o for o in session.get_outputs()}
    for preferred in ("sentence_embedding", "last_hidden_state", "token_embeddings"):
        if preferred in outputs:
            out = outputs[preferred]
            break
    else:
        out = session.get_outputs()[0]
    if len(out.shape) not in (2, 3):
        raise ModelError(f"{path}: output {out.name} has shape {out.shape}; expected "
                         "[batch, seq, dim] token embeddings or [batch, dim] sentence embeddings")
    return out.name, len(out.shape), out.shape[-1]


def _as_string_array(texts: TextInput) -> pa.Array:
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks() if texts.num_chunks != 1 else texts.chunk(0)
    if not isinstance(texts, pa.Array):
        texts = pa.array(list(texts), pa.string())
    if pa.types.is_dictionary(texts.type):
        texts = texts.dictionary_decode()
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)
            or pa.types.is_string_view(texts.type)):
        if pa.types.is_null(texts.type):
            return pa.nulls(len(texts), pa.string())
        raise ModelError(f"embed() needs text, got an Arrow array of type {texts.type}")
    return texts
