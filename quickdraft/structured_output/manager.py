"""The engine's structured-output service: picks the backend, compiles each distinct constraint
once, gives every constrained sequence its grammar, and keeps verification exact.

Exactness under speculation. A sequence's draft x_1..x_k is first cut to its longest prefix the
grammar allows (``valid_prefix``). Verification row j (the law of the token after x_1..x_j) is
then masked with the grammar's state after x_1..x_j: the matcher is advanced through the draft
to fill the rows and rolled back (``mask_rows``), so every verified position sees exactly the
masked law plain constrained decoding would see there. Only emitted tokens advance the matcher
(``advance``). Tokens the grammar alone determines (``forced``) make drafts that need no model.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

import torch

from quickdraft.sampling_params import StructuredOutputsParams
from quickdraft.structured_output.backend import Grammar, StructuredOutputBackend
from quickdraft.structured_output.bitmask import allocate_bitmask, apply_bitmask
from quickdraft.tokenizer import Tokenizer

logger = logging.getLogger("quickdraft")

BACKENDS = ("auto", "xgrammar", "guidance")


def make_backend(name: str, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: list[int]
                 ) -> StructuredOutputBackend:
    if name not in BACKENDS:
        raise ValueError(f"structured_outputs_backend must be one of {', '.join(BACKENDS)}, got {name!r}.")
    if name in ("auto", "xgrammar"):
        try:
            from quickdraft.structured_output.xgrammar_backend import XgrammarBackend

            return XgrammarBackend(tokenizer, vocab_size, stop_token_ids)
        except ImportError:
            if name == "xgrammar":
                raise ImportError("structured_outputs_backend='xgrammar' needs the xgrammar package "
                                  "(pip install xgrammar).") from None
    try:
        from quickdraft.structured_output.guidance_backend import GuidanceBackend

        return GuidanceBackend(tokenizer, vocab_size, stop_token_ids)
    except ImportError:
        raise ImportError("Structured outputs need xgrammar or llguidance (pip install xgrammar llguidance).") from None


class StructuredOutputManager:
    def __init__(self, backend_name: str, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: list[int],
                 cache_size: int = 256) -> None:
        self.backend_name = backend_name
        self._init = (tokenizer, vocab_size, sorted(stop_token_ids))
        self._backend: StructuredOutputBackend | None = None
        self.vocab_size = vocab_size
        self._compiled: OrderedDict[tuple, Any] = OrderedDict()
        self.cache_size = cache_size
        self.num_compiled = 0  # compilations done (cache misses)
        self._lock = threading.Lock()

    @property
    def backend(self) -> StructuredOutputBackend:
        """Built on the first constrained request (tokenizer tables take a moment)."""
        with self._lock:
            if self._backend is None:
                self._backend = make_backend(self.backend_name, *self._init)
                logger.info("Structured outputs: %s backend", self._backend.name)
            return self._backend

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled constraint, once per distinct one (an LRU cache; safe from the server's
        threads); ValueError naming the problem when it does not compile."""
        key = params.key()
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
                return compiled
        compiled = self.backend.compile(params)
        with self._lock:
            self.num_compiled += 1
            self._compiled[key] = compiled
            if len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        return compiled

    def grammar_for(self, params: StructuredOutputsParams) -> Grammar:
        """A fresh grammar for one sequence."""
        return self.backend.new_grammar(self.compile(params))

    @staticmethod
    def valid_prefix(grammar: Grammar, draft: list[int]) -> int:
        """Length of the longest prefix of ``draft`` the grammar allows from its state."""
        return grammar.validate_tokens(draft) if draft else 0

    @staticmethod
    def forced(grammar: Grammar, k: int) -> list[int]:
        """Up to k tokens the grammar determines from its state."""
        if k <= 0 or grammar.is_terminated():
            return []
        return grammar.forced_tokens()[:k]

    def mask_rows(self, logits: torch.Tensor, items: list[tuple[Grammar, int, list[int]]]) -> dict[int, Exception]:
        """Mask, in place, the verification rows of constrained sequences: for (grammar, first
        row, draft), rows first..first+len(draft) get the grammar's mask after draft[:j]. The
        drafts must be valid (``valid_prefix``); each grammar ends where it started. Rows after
        the grammar terminated inside a draft stay unmasked (their tokens are never kept).
        Returns {item index: error} for items whose grammar failed (their rows are left as they
        were and must not be sampled); the other items are masked all the same."""
        bitmask = allocate_bitmask(sum(len(d) + 1 for _, _, d in items), self.vocab_size)
        rows: list[int] = []
        errors: dict[int, Exception] = {}
        for i, (grammar, first, draft) in enumerate(items):
            start, advanced = len(rows), 0
            try:
                for j in range(len(draft) + 1):
                    if grammar.is_terminated():
                        break
                    grammar.fill_bitmask(bitmask, len(rows))
                    rows.append(first + j)
                    if j < len(draft):
                        if not grammar.accept_tokens([draft[j]]):
                            raise RuntimeError(f"the grammar rejected draft token {draft[j]} after validating it")
                        advanced += 1
            except Exception as e:  # noqa: BLE001 - this sequence's grammar only
                errors[i] = e
                del rows[start:]  # the next item's rows are filled from here
            finally:
                if advanced:
                    grammar.rollback(advanced)
        bitmask = bitmask[:len(rows)]
        apply_bitmask(logits, bitmask, rows)
        return errors

    @staticmethod
    def advance(grammar: Grammar, tokens: list[int]) -> int:
        """The sequence emitted ``tokens``, each allowed by the mask it was drawn under: advance
        through them up to the grammar's end; returns how many belong to the output (those after
        the end, bonus tokens of a draft that ended the grammar, do not)."""
        for i, t in enumerate(tokens):
            if grammar.is_terminated():
                return i
            if not grammar.accept_tokens([t]):
                raise RuntimeError(f"the grammar rejected emitted token {t}: a mask was not applied")
        return len(tokens)
