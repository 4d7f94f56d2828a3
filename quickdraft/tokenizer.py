"""Tokenizer: a `tokenizers` backend plus special tokens, the chat template and incremental
detokenization. Built from an HF folder or from GGUF metadata."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


_GIL_FREE_CHARS = 4096  # above this, encode without holding the GIL


class Tokenizer:
    """Text <-> token ids for one model, with vLLM/transformers-like method names."""

    def __init__(self, backend: BackendTokenizer, *, bos_token: str | None, eos_token: str | None,
                 chat_template: str | None, add_bos_token: bool | None = None) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token else None
        self.chat_template = chat_template
        # When None, the backend's post-processor decides whether BOS is added.
        self.add_bos_token = add_bos_token
        added = backend.get_added_tokens_decoder()
        self.all_special_ids: set[int] = {i for i, t in added.items() if t.special}
        self.all_special_tokens: list[str] = [added[i].content for i in sorted(self.all_special_ids)]
        self._template_cache: dict[str, jinja2.Template] = {}
        self._token_text: dict[int, str] = {}

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Long texts go through ``encode_batch``, which releases the GIL,
        so a server thread tokenizing a huge prompt does not stall the event loop."""
        if len(text) > _GIL_FREE_CHARS:
            ids = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        else:
            ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True,
               spaces_between_special_tokens: bool = False) -> str:
        """Text of ``token_ids``. With ``spaces_between_special_tokens`` (and special tokens kept),
        special tokens are separated from their neighbours by a space, as transformers' slow
        tokenizers do."""
        if skip_special_tokens or not spaces_between_special_tokens or not self.all_special_ids:
            return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)
        parts: list[str] = []
        run: list[int] = []
        for t in token_ids:
            if t in self.all_special_ids:
                if run:
                    parts.append(self.backend.decode(run, skip_special_tokens=False))
                    run = []
                parts.append(self.backend.id_to_token(t))
            else:
                run.append(t)
        if run:
            parts.append(self.backend.decode(run, skip_special_tokens=False))
        return " ".join(parts)

    def token_text(self, token_id: int) -> str:
        """One token decoded on its own, special tokens kept (cached): logprob entries' text."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.backend.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text

    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str | None]:
        return [self.backend.id_to_token(t) for t in token_ids]

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                            chat_template: str | None = None, tokenize: bool = False,
                            **kwargs: Any) -> str | list[int]:
        """Render a conversation with the model's (or the given) jinja2 chat template."""
        source = chat_template or self.chat_template
        if source is None:
            raise ValueError(
                "This model has no chat template; pass chat_template=... to LLM.chat or use LLM.generate.")
        template = self._template_cache.get(source)
        if template is None:
            template = _jinja_env().from_string(source)
            self._template_cache[source] = template
        text = template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _jinja_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def load_hf_tokenizer(folder: str | Path) -> Tokenizer:
    """Tokenizer of an HF model folder: tokenizer.json, tokenizer_config.json, chat_template.jinja."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"No tokenizer.json in {folder}; quickdraft needs a fast tokenizer file.")
    backend = BackendTokenizer.from_file(str(path))
    cfg: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").is_file():
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
    template = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    elif (folder / "chat_template.json").is_file():
        template = json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    else:
        template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    add_bos = cfg.get("add_bos_token")
    return Tokenizer(backend, bos_token=_token_str(cfg.get("bos_token")), eos_token=_token_str(cfg.get("eos_token")),
                     chat_template=template, add_bos_token=add_bos if isinstance(add_bos, bool) and add_bos else None)


def detokenize_incrementally(tokenizer: Tokenizer, token_ids: list[int], prefix_offset: int, read_offset: int,
                             skip_special_tokens: bool, spaces_between_special_tokens: bool,
                             final: bool = False) -> tuple[str, int, int]:
    """New text produced by the tokens after ``read_offset``.

    Decodes ``token_ids[prefix_offset:]`` and ``token_ids[prefix_offset:read_offset]`` and
    returns the difference, so that merges across token boundaries (leading spaces, multi-byte
    characters split over tokens) come out right. While the text ends in an incomplete UTF-8
    character (U+FFFD), nothing is emitted and the offsets stay, unless ``final`` (the sequence
    ended: emit what there is). Returns (delta, prefix, read).
    """
    prefix = tokenizer.decode(token_ids[prefix_offset:read_offset], skip_special_tokens, spaces_between_special_tokens)
    full = tokenizer.decode(token_ids[prefix_offset:], skip_special_tokens, spaces_between_special_tokens)
    if final:
        return full[len(prefix):], read_offset, len(token_ids)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        return full[len(prefix):], read_offset, len(token_ids)
    return "", prefix_offset, read_offset


def encode_bad_words(tokenizer: Tokenizer, words: list[str]) -> list[list[int]]:
    """Token sequences that SamplingParams.bad_words forbids (vLLM's meaning): each word as it
    reads at the start of a text, and also with a leading space (a word inside the text) when
    that gives a different first token and the same number of tokens. Words must not be blank
    (SamplingParams checks)."""
    out: list[list[int]] = []
    for word in words:
        bare = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        out.append(bare)
        if spaced[0] != bare[0] and len(spaced) == len(bare):
            out.append(spaced)
    return out
