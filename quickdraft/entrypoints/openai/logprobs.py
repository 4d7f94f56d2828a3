"""Per-token text and bytes, and OpenAI's two logprob shapes (completions and chat)."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import decoders

from quickdraft.outputs import Logprob
from quickdraft.tokenizer import Tokenizer

MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI and vLLM clamp to this


def clamp(lp: float) -> float:
    return lp if lp > MIN_LOGPROB else MIN_LOGPROB  # also maps -inf and NaN


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte alphabet (printable bytes stand for themselves, the rest at 256+)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table



class TokenTexts:
    """Per-token text (as in vLLM's logprobs: each token decoded on its own) and the token's
    UTF-8 bytes (exact for byte-level BPE, so split characters can be put back together)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        backend = tokenizer.backend
        self._byte_level = isinstance(backend.decoder, decoders.ByteLevel)
        self._byte_decoder = _byte_decoder() if self._byte_level else {}
        self._added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        self._bytes: dict[int, list[int]] = {}

    def text(self, token_id: int) -> str:
        return self.tokenizer.token_text(token_id)

    def bytes(self, token_id: int, text: str | None = None) -> list[int]:
        b = self._bytes.get(token_id)
        if b is None:
            b = None
            if self._byte_level and token_id not in self._added:
                piece = self.tokenizer.backend.id_to_token(token_id)
                if piece is not None and all(c in self._byte_decoder for c in piece):
                    b = [self._byte_decoder[c] for c in piece]
            if b is None:
                b = list((text if text is not None else self.text(token_id)).encode("utf-8", errors="replace"))
            self._bytes[token_id] = b
        return b


def completion_logprobs(token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob] | None],
                        texts: TokenTexts, text_offset: int) -> tuple[dict, int]:
    """OpenAI completions logprobs {tokens, token_logprobs, top_logprobs, text_offset} of some
    tokens (a None entry is a first prompt token, which has no logprob); returns it and the
    text offset after the last token. top_logprobs holds the top N plus the chosen token."""
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for tid, entry in zip(token_ids, logprobs):
        if entry is None:
            t = texts.text(tid)
            token_lps.append(None)
            tops.append(None)
        else:
            chosen = entry.get(tid)
            t = chosen.decoded_token if chosen is not None and chosen.decoded_token is not None else texts.text(tid)
            token_lps.append(clamp(chosen.logprob) if chosen is not None else None)
            tops.append({(lp.decoded_token if lp.decoded_token is not None else texts.text(i)): clamp(lp.logprob)
                         for i, lp in entry.items()})
        tokens.append(t)
        offsets.append(text_offset)
        text_offset += len(t)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}, text_offset


def chat_logprobs(token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob]], texts: TokenTexts,
                  top_n: int) -> list[dict]:
    """OpenAI chat logprobs content entries {token, logprob, bytes, top_logprobs[top_n]}."""
    content = []
    for tid, entry in zip(token_ids, logprobs):
        chosen = entry.get(tid)
        t = chosen.decoded_token if chosen is not None and chosen.decoded_token is not None else texts.text(tid)
        top = []
        for i, lp in list(entry.items())[:top_n]:
            tt = lp.decoded_token if lp.decoded_token is not None else texts.text(i)
            top.append({"token": tt, "logprob": clamp(lp.logprob), "bytes": texts.bytes(i, tt)})
        content.append({"token": t, "logprob": clamp(chosen.logprob) if chosen is not None else MIN_LOGPROB,
                        "bytes": texts.bytes(tid, t), "top_logprobs": top})
    return content


