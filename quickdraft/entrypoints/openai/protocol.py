"""Request bodies of the OpenAI-compatible server (pydantic), with vLLM's extra sampling fields.

The models check JSON types only; value checks (temperature >= 0, top_p in (0, 1], ...) are
SamplingParams' own, so the server answers with the same messages as the offline API.
Unknown fields are ignored, as OpenAI's API and vLLM do. Non-finite floats are rejected.
"""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


def _check_text(value: Any, where: str) -> None:
    """Raise ValueError for a string that is not valid Unicode text: JSON can carry a lone
    surrogate (``"\\ud800"``), which no tokenizer or UTF-8 encoder accepts."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where} holds a lone UTF-16 surrogate, which is not valid Unicode text") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, where)
            _check_text(v, where)
    elif isinstance(value, list):
        for v in value:
            _check_text(v, where)


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="after")
    def _valid_text(self) -> "OpenAIBaseModel":
        # Nested models check themselves; here the plain strings, lists and dicts.
        for name, value in {**self.__dict__, **(self.model_extra or {})}.items():
            if not isinstance(value, BaseModel):
                _check_text(value, name)
        return self


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False  # vLLM: usage in every chunk


class _SamplingFields(OpenAIBaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's and vLLM's extras).
    ``None`` means "the model's default" (its generation_config.json, else SamplingParams')."""

    model: str | None = None
    n: int = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    seed: int | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extra sampling parameters.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    response_format: ResponseFormat | None = None
    # vLLM: {"json" | "regex" | "choice" | "grammar" | "json_object": ..., "disable_any_whitespace": ...}
    structured_outputs: dict[str, Any] | None = None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = True  # vLLM: add BOS etc. when tokenizing a text prompt


class ContentPart(OpenAIBaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    type: str
    text: str | None = None


class ChatMessage(OpenAIBaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None


class JsonSchemaResponseFormat(OpenAIBaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, populate_by_name=True)
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIBaseModel):
    """OpenAI's response_format: {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}."""
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    type: str
    json_schema: JsonSchemaResponseFormat | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    # vLLM's extras.
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeCompletionRequest(OpenAIBaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(OpenAIBaseModel):
    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None


TokenizeRequest = Union[TokenizeCompletionRequest, TokenizeChatRequest]


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo



CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()
