"""What one request may ask for, and how many requests may wait: the server's protection
against requests that would take it down or crowd everyone else out.

Every limit is checked before any work is done for the request (no tokenizing, no queueing),
and a request over a limit gets an OpenAI-style error naming the limit and the value:
413 for a body over ``max_request_body_bytes``, 400 for n / max_tokens / logprobs / prompts /
stop strings over their maximum, 503 with ``Retry-After`` when the waiting room is full.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

@dataclass(frozen=True)
class ServerLimits:
    """The limits of one server (``quickdraft serve`` flags of the same names).

    ``max_n`` None: the engine's ``max_num_seqs``. ``max_tokens`` None: only the context
    bounds max_tokens. ``max_waiting_requests``: requests admitted beyond the ``max_num_seqs``
    the engine runs at once (None: unbounded). ``request_timeout``: seconds from arrival after
    which a request is aborted (None: never)."""

    max_request_body_bytes: int = 4 * 2**20
    max_n: int | None = None
    max_tokens: int | None = None
    max_logprobs: int = 20
    max_prompts_per_request: int = 128
    max_stop_sequences: int = 32
    max_waiting_requests: int | None = 256
    request_timeout: float | None = 600.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in ("max_n", "max_tokens", "max_waiting_requests", "request_timeout"):
                continue
            low = 0 if f.name in ("max_logprobs", "max_waiting_requests") else 1
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
                raise ValueError(f"{f.name} must be a number >= {low}, got {value!r}.")
