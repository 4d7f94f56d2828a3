"""The xgrammar backend (vLLM's default): grammars compiled against the model's vocabulary,
token bitmasks filled on the CPU."""

from __future__ import annotations

import re
from typing import Any

import torch

from quickdraft.sampling_params import StructuredOutputsParams
from quickdraft.structured_output.backend import choice_alternatives, schema_of
from quickdraft.tokenizer import Tokenizer


class XgrammarGrammar:
    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def accept_tokens(self, tokens: list[int]) -> bool:
        return all(self.matcher.accept_token(t) for t in tokens)

    def validate_tokens(self, tokens: list[int]) -> int:
        n = 0
        for t in tokens:
            if not self.matcher.accept_token(t):
                break
            n += 1
        if n:
            self.matcher.rollback(n)
        return n

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self.matcher.rollback(num_tokens)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def forced_tokens(self) -> list[int]:
        return list(self.matcher.find_jump_forward_tokens())

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


class XgrammarBackend:
    name = "xgrammar"

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        backend = tokenizer.backend
        n = backend.get_vocab_size(with_added_tokens=True)
        encoded = [backend.id_to_token(i) or "" for i in range(min(n, vocab_size))]
        encoded += [""] * (vocab_size - len(encoded))  # logits wider than the tokenizer: never allowed
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
        info = xgr.TokenizerInfo(encoded, vocab_type=meta["vocab_type"], vocab_size=vocab_size,
                                 stop_token_ids=stop_token_ids, add_prefix_space=meta["add_prefix_space"])
        self.compiler = xgr.GrammarCompiler(info, max_threads=2)

    def compile(self, params: StructuredOutputsParams) -> Any:
        kind, c = params.kind, self.compiler
        try:
            if kind in ("json", "json_object"):
                schema = schema_of(params) if kind == "json" else {"type": "object"}
                if params.disable_any_whitespace or params.max_indent is None:
                    return c.compile_json_schema(schema, any_whitespace=not params.disable_any_whitespace)
                return c.compile_grammar(self.json_with_indent(schema, params.max_indent))
            if kind == "regex":
                return c.compile_regex(params.regex)
            if kind == "choice":
                return c.compile_grammar("root ::= " + choice_alternatives(params.choice))
            grammar = params.grammar
            if _looks_like_lark(grammar):
                return c.compile_lark(grammar)
            return c.compile_grammar(grammar)
        except Exception as e:  # xgrammar raises RuntimeError/ValueError subclasses with the parser's message
            raise ValueError(f"Invalid structured_outputs.{kind} for the xgrammar backend: {_first_line(e)}") from None

    def json_with_indent(self, schema: dict | bool, max_indent: int) -> Any:
        """The schema's grammar with llama.cpp's whitespace between JSON tokens: nothing, one
        space, or a newline and at most ``max_indent`` spaces or tabs. xgrammar bounds only the
        number of whitespace characters (any mix, so twenty newlines in a row), so its EBNF is
        written with a count no schema produces (``_MARK``) and each such whitespace run is
        replaced by the rule ``json_ws``."""
        ebnf = str(self.xgr.Grammar.from_json_schema(schema, any_whitespace=True, max_whitespace_cnt=_MARK))
        runs = re.compile(r"\bwhitespace(?:_\d+)?\{0, %d\}" % _MARK)
        ebnf, count = runs.subn("json_ws", ebnf)
        if re.search(r"\{0, %d\}" % _MARK, ebnf):  # a whitespace run in a form this rewrite does not know
            raise RuntimeError("xgrammar wrote JSON whitespace in an unexpected form")
        if count:
            ebnf += '\njson_ws ::= "" | " " | "\\n" [ \\t]{0, %d}\n' % max_indent
        return self.xgr.Grammar.from_ebnf(ebnf)

    def new_grammar(self, compiled: Any) -> XgrammarGrammar:
        return XgrammarGrammar(self.xgr.GrammarMatcher(compiled, max_rollback_tokens=-1))


_MARK = 987654  # whitespace count marking xgrammar's whitespace runs in json_with_indent


def _looks_like_lark(grammar: str) -> bool:
    """EBNF (GBNF) rules read ``name ::= ...``; Lark's ``name: ...``."""
    return "::=" not in grammar


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0] if len(text) < 2000 else text[:2000]
