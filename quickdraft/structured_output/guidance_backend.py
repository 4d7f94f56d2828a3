"""The llguidance backend: an Earley parser over the model's tokenizer, masks computed per
token on demand (no compilation step to speak of)."""

from __future__ import annotations

from typing import Any

import torch

from quickdraft.sampling_params import StructuredOutputsParams
from quickdraft.structured_output.backend import choice_alternatives, schema_of
from quickdraft.tokenizer import Tokenizer


class GuidanceGrammar:
    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def accept_tokens(self, tokens: list[int]) -> bool:
        return self.matcher.consume_tokens(tokens) and not self.matcher.is_error()

    def validate_tokens(self, tokens: list[int]) -> int:
        return self.matcher.validate_tokens(tokens)

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self.matcher.rollback(num_tokens)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self.matcher, bitmask, row)

    def forced_tokens(self) -> list[int]:
        return list(self.matcher.compute_ff_tokens())

    def is_terminated(self) -> bool:
        return self.matcher.is_stopped()


def json_whitespace(params: StructuredOutputsParams) -> dict:
    """llguidance's JSON options for the request's whitespace between JSON tokens: none, one
    space or a newline and at most ``max_indent`` spaces or tabs, or any."""
    if params.disable_any_whitespace:
        return {"whitespace_flexible": False}
    if params.max_indent is None:
        return {"whitespace_flexible": True}
    return {"whitespace_flexible": True, "whitespace_pattern": f"(?: |\\n[ \\t]{{0,{params.max_indent}}})"}


class GuidanceBackend:
    name = "guidance"

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        import llguidance
        import llguidance.gbnf_to_lark  # noqa: F401 - a submodule: GBNF grammars are translated to Lark

        self.llg = llguidance
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                                eos_token=stop_token_ids[0] if len(stop_token_ids) == 1
                                                else stop_token_ids)

    def compile(self, params: StructuredOutputsParams) -> str:
        M, kind = self.llg.LLMatcher, params.kind
        options = json_whitespace(params)
        try:
            if kind == "json":
                grammar = M.grammar_from_json_schema(schema_of(params), overrides=options)
            elif kind == "json_object":
                grammar = M.grammar_from_json_schema({"type": "object"}, overrides=options)
            elif kind == "regex":
                grammar = M.grammar_from_regex(params.regex)
            elif kind == "choice":
                grammar = M.grammar_from_lark("start: " + choice_alternatives(params.choice))
            elif "::=" in params.grammar:
                grammar = M.grammar_from_lark(self.llg.gbnf_to_lark.gbnf_to_lark(params.grammar))
            else:
                grammar = M.grammar_from_lark(params.grammar)
        except Exception as e:
            raise ValueError(f"Invalid structured_outputs.{kind} for the guidance backend: {e}") from None
        error = M.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(f"Invalid structured_outputs.{kind} for the guidance backend: {error.splitlines()[0]}")
        return grammar

    def new_grammar(self, compiled: str) -> GuidanceGrammar:
        matcher = self.llg.LLMatcher(self.tokenizer, compiled, log_level=0)
        if matcher.is_error():
            raise ValueError(f"Invalid structured output grammar: {matcher.get_error()}")
        return GuidanceGrammar(matcher)
