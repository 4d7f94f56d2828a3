"""Chat messages as the chat template sees them, shared by `LLM.chat` and the server.

OpenAI's messages may carry ``content`` as a string, as a list of content parts
(``[{"type": "text", "text": "..."}]``), or not at all (an assistant turn with tool calls);
chat templates expect a string. Text parts are joined with newlines (vLLM's rule); other part
types are refused by name, since the models we serve read text only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jinja2

from quickdraft.tokenizer import Tokenizer


def conversation_for_template(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each message as a dict with a string ``content`` (and its other keys as given);
    ValueError naming the first message or part that cannot be one."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ValueError(f"Each chat message must be a dict with a string 'role', got {m!r} (message {i}).")
        msg = dict(m)
        msg["content"] = _content_text(m.get("content"), i)
        out.append(msg)
    return out


def _content_text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            text = part.get("text") if isinstance(part, Mapping) else None
            if kind != "text" or not isinstance(text, str):
                raise ValueError(f"Unsupported content part {_describe(part)} in message {index}: only 'text' "
                                 "parts are supported.")
            texts.append(text)
        return "\n".join(texts)
    raise ValueError(f"The content of message {index} must be a string or a list of content parts, got {content!r}.")


def _describe(part: Any) -> str:
    if isinstance(part, Mapping) and isinstance(part.get("type"), str):
        return f"of type {part['type']!r}"
    return repr(part)[:200]


def render_conversation(tokenizer: Tokenizer, conversation: list[dict[str, Any]], **kwargs: Any) -> str:
    """The chat template applied (``kwargs``: add_generation_prompt, chat_template and the
    template's own variables); ValueError when the template cannot render these messages."""
    try:
        return tokenizer.apply_chat_template(conversation, **kwargs)
    except (jinja2.TemplateError, TypeError, KeyError, AttributeError, IndexError) as e:
        raise ValueError(f"The chat template could not render these messages: {e}") from None
