"""Errors that end one request while the others in the batch go on.

The engine steps many requests together. When something goes wrong that belongs to one of
them (its constraints leave no token to draw, its grammar cannot follow its tokens, its own
rows come out of the model non-finite, its drafter fails on it alone), that request alone is
finished with ``finish_reason="abort"``, its KV blocks are freed, and its `RequestOutput`
carries the error in ``error``; every other request's output is what it would have been
without it. Only a failure of the whole model step, which no row explains, fails the batch.
"""

from __future__ import annotations


class RequestError(RuntimeError):
    """The engine could not go on with one request (an internal failure on its rows).
    ``request_id``: the request; ``reason``: what happened, without the request's name."""

    def __init__(self, request_id: str, message: str) -> None:
        super().__init__(f"Request {request_id!r} was aborted: {message}")
        self.request_id = request_id
        self.reason = message


class UnsatisfiableRequestError(RequestError, ValueError):
    """The request's own settings leave no token to generate at some position: its grammar,
    allowed_token_ids, bad_words and the stop tokens min_tokens bans exclude every token.
    A client error (HTTP 400), found while generating rather than before."""
