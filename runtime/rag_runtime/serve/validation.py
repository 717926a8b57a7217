"""Request parsing: every refusal is an ``ApiError`` that becomes a one-line JSON body."""

from __future__ import annotations

import json
import math

from starlette.requests import Request

from .limits import ServeLimits


class ApiError(Exception):
    """A refusal with its HTTP status, a machine-readable type and the field at fault.

    Args:
        status: HTTP status code.
        type: Short machine-readable kind (``unknown_field``, ``invalid_value``, ``queue_full``...).
        message: One line for the client.
        field: The request field at fault, when there is one.
        headers: Extra response headers (``Retry-After``).
    """

    def __init__(self, status: int, type: str, message: str, field: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.field = status, type, message, field
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON body of the response."""
        out = {"error": self.message, "type": self.type}
        if self.field:
            out["field"] = self.field
        return out


async def read_json(request: Request, limits: ServeLimits) -> dict:
    """The body as a JSON object, read up to ``max_body_bytes`` (413 above, 422 if not a JSON object)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise ApiError(413, "body_too_large", f"body of {declared} bytes exceeds max_body_bytes "
                       f"({limits.max_body_bytes})")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise ApiError(413, "body_too_large", f"body exceeds max_body_bytes ({limits.max_body_bytes})")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(422, "empty_body", "request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(422, "invalid_json", f"body is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_json", f"body must be a JSON object, got {type(body).__name__}")
    return body


def parse_questions(body: dict, limits: ServeLimits) -> list[str]:
    """``question`` (one string) or ``questions`` (a list of strings), within the server's caps."""
    if ("question" in body) == ("questions" in body):
        raise ApiError(422, "missing_field", "give exactly one of 'question' (a string) or 'questions' (a list)",
                       "questions")
    name = "question" if "question" in body else "questions"
    questions = [body.pop("question")] if name == "question" else body.pop("questions")
    if not isinstance(questions, list) or not questions:
        raise ApiError(422, "invalid_type", "'questions' must be a non-empty list of strings", name)
    if len(questions) > limits.max_questions:
        raise ApiError(413, "too_many_questions", f"{len(questions)} questions exceed max_questions "
                       f"({limits.max_questions})", name)
    for i, q in enumerate(questions):
        where = name if name == "question" else f"questions[{i}]"
        if not isinstance(q, str):
            raise ApiError(422, "invalid_type", f"'{where}' must be a string, got {_json_type(q)}", where)
        if len(q) > limits.max_question_chars:
            raise ApiError(422, "limit_exceeded", f"'{where}' has {len(q)} characters; max_question_chars is "
                           f"{limits.max_question_chars}", where)
    return questions


def parse_timeout(body: dict, limits: ServeLimits) -> float:
    """The request's own ``timeout_s`` (at most ``max_timeout_s``), else the server's ``timeout_s``."""
    value = body.pop("timeout_s", None)
    if value is None:
        return limits.timeout_s
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ApiError(422, "invalid_value", f"'timeout_s' must be a positive number, got {value!r}", "timeout_s")
    if value > limits.max_timeout_s:
        raise ApiError(422, "limit_exceeded", f"'timeout_s' ({value}) exceeds max_timeout_s "
                       f"({limits.max_timeout_s})", "timeout_s")
    return float(value)


def parse_generation(body: dict) -> dict:
    """The remaining fields, as ``generate`` keywords; the runtime's option schema validates them
    (``Service.validate_generation``), so names, types, bounds and caps are checked in one place."""
    return dict(body)


def _json_type(value) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
