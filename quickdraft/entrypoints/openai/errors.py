"""OpenAI's error JSON ``{"error": {"message", "type", "param", "code"}}`` and the exceptions
that become it. Messages name the bad value; a 500 never carries an exception's repr (the
details go to the server log)."""

from __future__ import annotations

import logging

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from quickdraft.engine.errors import UnsatisfiableRequestError
from quickdraft.entrypoints.async_engine import EngineDeadError, RequestTimeoutError

logger = logging.getLogger("quickdraft.server")

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               405: "MethodNotAllowedError", 408: "TimeoutError", 413: "RequestTooLargeError",
               500: "InternalServerError", 503: "ServiceUnavailableError", 504: "TimeoutError"}
# SamplingParams' messages start with the field they are about.
SAMPLING_FIELDS = {"n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p",
                   "top_k", "min_p", "seed", "stop", "stop_token_ids", "max_tokens", "min_tokens", "logprobs",
                   "prompt_logprobs", "logit_bias", "allowed_token_ids", "bad_words", "truncate_prompt_tokens"}


class APIError(Exception):
    """An error for the client: its HTTP status, a message naming the problem, and the field."""

    def __init__(self, status: int, message: str, *, param: str | None = None, err_type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.err_type = err_type or ERROR_TYPES.get(status, "APIError")
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, err_type: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type or ERROR_TYPES.get(status, "APIError"),
                      "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None, err_type: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, err_type), status_code=status, headers=headers)


def api_error_response(e: APIError) -> JSONResponse:
    return error_response(e.status, e.message, e.param, e.err_type, e.headers)


def bad_request(e: Exception, default_param: str | None = None) -> APIError:
    """A 400 from a SamplingParams / engine ValueError; ``param`` is the field it names, if any."""
    message = str(e)
    first = message.split(" ", 1)[0]
    return APIError(400, message, param=first if first in SAMPLING_FIELDS else default_param)


ENGINE_FAILED = "The engine failed while running this request; see the server log for details."


def engine_failure(e: BaseException) -> APIError:
    """The client's view of an engine error: what happened, never the exception's text (which may
    hold another request's content or internals; it is logged instead)."""
    if isinstance(e, RequestTimeoutError):
        return APIError(504, str(e))
    if isinstance(e, EngineDeadError):
        return APIError(503 if e.shutting_down else 500, str(e))
    if isinstance(e, UnsatisfiableRequestError):  # the request's own settings: its message is about them only
        return APIError(400, str(e))
    return APIError(500, ENGINE_FAILED)


def log_failure(err: APIError, cause: BaseException) -> None:
    """Log what the client was not told: the traceback of an engine failure."""
    if err.status == 500 and not isinstance(cause, EngineDeadError):
        logger.error("A request failed in the engine", exc_info=cause)
    elif err.status == 504:
        logger.warning("%s", err.message)


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line from pydantic's errors, and the first field they name."""
    parts: list[str] = []
    param = None
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return f"Invalid JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        # Union members add their type names to the location; keep the field path only.
        loc = [x for x in loc if x.lower() not in _UNION_TAGS and not any(c in x for c in "[]-")]
        where = ".".join(loc) or "request body"
        if param is None and loc:
            param = loc[0]
        part = f"{where}: {err.get('msg', 'invalid value')}"
        if part not in parts:
            parts.append(part)
    return "Invalid request: " + "; ".join(parts[:5]), param
