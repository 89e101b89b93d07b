"""Tabular models (an ONNX file, e.g. from skl2onnx): Arrow columns in, one Arrow array out.

The common shape is one float tensor input [N, F]; the columns of a record batch are
stacked into it. Arrow stores columns separately, so stacking costs one copy per column,
except for a single FixedSizeList column (a feature vector), which is reshaped in place.
Rows with a null in any feature give a null prediction rather than a guess from a filled-in
value. Models whose inputs are one [N, 1] tensor per feature (skl2onnx with one input per
column) are fed by name (record batch) or position (list of arrays).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import ModelError
from .ort_session import make_session, numpy_type

Columns = pa.RecordBatch | pa.Table | Sequence[pa.Array | pa.ChunkedArray]


class TabularModel:
    """A local ONNX model with `predict`; safe to share between threads."""

    def __init__(self, path: str | Path, *, threads: int | None = None,
                 inter_op_threads: int | None = None, name: str | None = None):
        self.path = Path(path)
        self.name = name or self.path.stem
        self._session = make_session(self.path, threads, inter_op_threads)
        self._inputs = self._session.get_inputs()
        for inp in self._inputs:
            numpy_type(inp.type, f"{self.path} input {inp.name}")  # fail early on odd types
        outputs = self._session.get_outputs()
        names = [o.name for o in outputs]
        # skl2onnx names classifier outputs output_label / output_probability (or label /
        # probabilities); a regressor has a single "variable" output.
        self.label_output = next((n for n in names if "label" in n.lower()), names[0])
        self.probability_output = next((o.name for o in outputs if o.name != self.label_output and (
            "prob" in o.name.lower() or o.type.startswith("seq(map"))), None)
        self.classes = _class_labels(self.path)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self._inputs]

    @property
    def n_features(self) -> int | None:
        """Features per row of a single [N, F] input, when the model fixes F."""
        if len(self._inputs) == 1 and len(self._inputs[0].shape) == 2 and isinstance(self._inputs[0].shape[1], int):
            return self._inputs[0].shape[1]
        return None

    def predict(self, batch: Columns) -> pa.Array:
        """The label (classifiers) or value (regressors) for each row."""
        out, valid = self._run(batch, self.label_output)
        return _to_arrow(out, valid)

    def predict_proba(self, batch: Columns) -> pa.FixedSizeListArray:
        """Class probabilities per row, in the order of `classes`."""
        if self.probability_output is None:
            raise ModelError(f"model {self.name!r} has no probability output "
                             f"(outputs: {', '.join(o.name for o in self._session.get_outputs())})")
        out, valid = self._run(batch, self.probability_output)
        if isinstance(out, list):  # ZipMap: one {class: p} dict per row (export with zipmap=False to avoid)
            keys = list(self.classes) if self.classes is not None else sorted(out[0]) if out else []
            out = np.array([[row[k] for k in keys] for row in out], np.float32).reshape(len(out), len(keys))
        out = np.asarray(out, np.float32)
        if len(out) == 0 and self.classes is not None:
            out = out.reshape(0, len(self.classes))
        return _to_arrow(out, valid)

    # ------------------------------------------------------------------ internals

    def _run(self, batch: Columns, output: str):
        columns, names = _columns(batch)
        n = len(columns[0]) if columns else 0
        valid = _all_valid(columns, n)
        if len(self._inputs) == 1:
            inp = self._inputs[0]
            matrix = _stack(columns, numpy_type(inp.type, inp.name), valid)
            if self.n_features is not None and matrix.shape[1] != self.n_features:
                raise ModelError(f"model {self.name!r} expects {self.n_features} features per row, "
                                 f"got {matrix.shape[1]}")
            feed = {inp.name: matrix}
        else:
            feed = self._feed_per_input(columns, names, valid)
        if n == 0 or (valid is not None and not valid.any()):
            return _empty_like(self, output), valid
        try:
            result = self._session.run([output], feed)[0]
        except Exception as e:  # onnxruntime's own exception types
            raise ModelError(f"model {self.name!r} failed: {e}") from None
        return result, valid

    def _feed_per_input(self, columns, names, valid) -> dict[str, np.ndarray]:
        if names is not None and all(i.name in names for i in self._inputs):
            by_input = [columns[names.index(i.name)] for i in self._inputs]
        elif len(columns) == len(self._inputs):
            by_input = columns
        else:
            raise ModelError(f"model {self.name!r} takes inputs {', '.join(self.input_names)}; "
                             f"got {len(columns)} columns")
        feed = {}
        for inp, col in zip(self._inputs, by_input):
            values = _stack([col], numpy_type(inp.type, inp.name), valid)
            feed[inp.name] = values if len(inp.shape) == 2 else values.reshape(-1)
        return feed


def _columns(batch: Columns) -> tuple[list[pa.Array], list[str] | None]:
    if isinstance(batch, (pa.RecordBatch, pa.Table)):
        return [_single_chunk(c) for c in batch.columns], list(batch.schema.names)
    return [_single_chunk(c) for c in batch], None


def _single_chunk(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    if not isinstance(col, pa.Array):
        raise ModelError(f"expected Arrow arrays, got {type(col).__name__}")
    return col


def _all_valid(columns: list[pa.Array], n: int) -> np.ndarray | None:
    """Row mask of rows without nulls, or None when there are no nulls at all (common case)."""
    if any(len(c) != n for c in columns):
        raise ModelError("feature columns have different lengths")
    if not any(c.null_count for c in columns):
        return None
    valid = np.ones(n, np.bool_)
    for c in columns:
        if c.null_count:
            valid &= c.is_valid().to_numpy(zero_copy_only=False)
    return valid


def _stack(columns: list[pa.Array], dtype, valid: np.ndarray | None) -> np.ndarray:
    """[rows, features] C-contiguous matrix of `dtype`, only the valid rows."""
    if len(columns) == 1 and pa.types.is_fixed_size_list(columns[0].type):
        col = columns[0]
        width = col.type.list_size
        # .values ignores the array's slice offset; slice it ourselves to stay zero-copy.
        values = col.values.slice(col.offset * width, len(col) * width)
        flat = _numeric(values, dtype)
        matrix = flat.reshape(len(col), width)
    else:
        for c in columns:
            if pa.types.is_nested(c.type):
                raise ModelError(f"a feature column of type {c.type} must be the only input column")
        n = len(columns[0]) if columns else 0
        matrix = np.empty((n, len(columns)), dtype)
        for j, c in enumerate(columns):
            matrix[:, j] = _numeric(c, dtype)
    return matrix if valid is None else matrix[valid]


def _numeric(values: pa.Array, dtype) -> np.ndarray:
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type) or pa.types.is_binary(values.type):
        raise ModelError(f"feature columns must be numeric, got {values.type}")
    if values.null_count:
        values = pc.fill_null(values, 0)  # those rows are dropped by the validity mask
    if pa.types.is_boolean(values.type) or pa.types.is_decimal(values.type):
        values = values.cast(pa.float64())
    # Zero-copy for primitive arrays without nulls; astype is a no-op when types match.
    return values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def _to_arrow(out: np.ndarray, valid: np.ndarray | None) -> pa.Array:
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if valid is not None:
        shape = (len(valid), *out.shape[1:])
        full = np.full(shape, None, object) if out.dtype == object else np.zeros(shape, out.dtype)
        full[valid] = out
        out, mask = full, ~valid
    else:
        mask = None
    if out.ndim == 1:
        # onnxruntime hands string tensors back as numpy object arrays.
        return pa.array(out, type=pa.string() if out.dtype == object else None, mask=mask)
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(out).reshape(-1)), out.shape[1],
                                             mask=None if mask is None else pa.array(mask))


def _empty_like(model: TabularModel, output: str) -> np.ndarray:
    """What the model would return for zero rows (onnxruntime rejects empty inputs for
    some ops, so it is not asked)."""
    out = next(o for o in model._session.get_outputs() if o.name == output)
    if out.type == "tensor(string)":
        return np.zeros(0, object)
    try:
        dtype = numpy_type(out.type, output)
    except ModelError:  # a ZipMap sequence; predict_proba reshapes it
        dtype = np.float32
    width = out.shape[1] if len(out.shape) == 2 and isinstance(out.shape[1], int) else 1
    return np.zeros((0, width), dtype)


def _class_labels(path: Path) -> np.ndarray | None:
    """Class labels from the ai.onnx.ml classifier node skl2onnx writes, if any."""
    try:
        import onnx
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # the session already loaded it; labels are optional metadata
        return None
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.name in ("classlabels_ints", "classlabels_int64s") and attr.ints:
                return np.array(attr.ints, np.int64)
            if attr.name == "classlabels_strings" and attr.strings:
                return np.array([s.decode() for s in attr.strings])
    return None
