"""OpenAI's embeddings contract: POST /v1/embeddings, GET /v1/models[/{id}].

The stock ``openai`` client works unmodified: it sends ``encoding_format: "base64"`` unless
told otherwise and decodes little-endian float32; it reads errors from
``{"error": {...}}`` and maps 401 and 404 to its own exception classes. OpenAI's request
limits hold: at most 2048 inputs, 8192 tokens per input and 300,000 tokens per request.
Token-id input is refused: ids of another tokenizer would mean other words to these models.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

from flight.http.bodies import field
from flight.http.errors import RequestError
from flightdeck.auth import Principal
from flightdeck.errors import INVALID, LIMIT_EXCEEDED, NOT_FOUND, ServiceError
from flightdeck.service import Service

MAX_INPUTS = 2048
MAX_TOKENS_PER_INPUT = 8192
MAX_TOKENS_PER_REQUEST = 300_000
ENCODINGS = ("float", "base64")
OWNER = "flightdeck"


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    texts: list[str]
    encoding_format: str
    dimensions: int | None


def parse_request(body: dict) -> EmbeddingRequest:
    model = field(body, "model", str, required=True)
    encoding_format = field(body, "encoding_format", str, default="float")
    if encoding_format not in ENCODINGS:
        raise RequestError(INVALID, f"encoding_format must be one of {', '.join(ENCODINGS)}",
                           param="encoding_format")
    dimensions = field(body, "dimensions", int)
    return EmbeddingRequest(model, _texts(body.get("input")), encoding_format, dimensions)


def _texts(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise RequestError(INVALID, "'input' must be a string or a non-empty list of strings", param="input")
    if all(isinstance(item, str) for item in value):
        return value
    if all(isinstance(item, int) or (isinstance(item, list) and all(isinstance(i, int) for i in item))
           for item in value):
        raise RequestError(INVALID, "token-id input is not supported: send the text itself "
                                    "(a string or a list of strings)", param="input")
    raise RequestError(INVALID, "'input' must be a string or a list of strings", param="input")


def _check_limits(texts: list[str], tokens: list[int]) -> None:
    if len(texts) > MAX_INPUTS:
        raise RequestError(LIMIT_EXCEEDED, f"too many inputs: {len(texts)} (at most {MAX_INPUTS} per request)",
                           param="input")
    for index, count in enumerate(tokens):
        if count > MAX_TOKENS_PER_INPUT:
            raise RequestError(LIMIT_EXCEEDED, f"input[{index}] has {count} tokens; at most "
                                               f"{MAX_TOKENS_PER_INPUT} per input", param="input")
    if sum(tokens) > MAX_TOKENS_PER_REQUEST:
        raise RequestError(LIMIT_EXCEEDED, f"the request has {sum(tokens)} tokens; at most "
                                           f"{MAX_TOKENS_PER_REQUEST} per request", param="input")


def _vector(values: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(values.astype("<f4").tobytes()).decode()
    return values.tolist()


def create_embeddings(service: Service, principal: Principal, request: EmbeddingRequest) -> dict:
    """The OpenAI ``create embeddings`` answer (blocking: call it in a worker thread)."""
    if len(request.texts) > MAX_INPUTS:
        _check_limits(request.texts, [])
    try:
        vectors, tokens = service.embed(principal, request.model, request.texts,
                                        lambda tokens: _check_limits(request.texts, tokens))
    except RequestError:
        raise
    except ServiceError as error:
        raise _model_error(error, request.model) from None
    dimension = vectors.type.list_size
    if request.dimensions is not None and request.dimensions != dimension:
        raise RequestError(INVALID, f"model {request.model} has {dimension} dimensions and cannot be "
                                    f"shortened to {request.dimensions}", param="dimensions")
    matrix = vectors.flatten().to_numpy(zero_copy_only=False).reshape(-1, dimension)
    total = sum(tokens)
    return {"object": "list", "model": request.model,
            "data": [{"object": "embedding", "index": i, "embedding": _vector(row, request.encoding_format)}
                     for i, row in enumerate(matrix)],
            "usage": {"prompt_tokens": total, "total_tokens": total}}


def _model_error(error: ServiceError, model: str) -> ServiceError:
    if error.kind == NOT_FOUND:
        return RequestError(NOT_FOUND, f"The model '{model}' does not exist", param="model", code="model_not_found")
    return error


def model_entry(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": OWNER}


def list_models(service: Service, principal: Principal) -> dict:
    return {"object": "list", "data": [model_entry(name) for name in service.embedding_models(principal)]}


def get_model(service: Service, principal: Principal, name: str) -> dict:
    if name not in service.embedding_models(principal):
        raise RequestError(NOT_FOUND, f"The model '{name}' does not exist", param="model", code="model_not_found")
    return model_entry(name)
