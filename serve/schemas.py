"""The OpenAI request and response shapes the server speaks, as pydantic models.

Requests are parsed leniently about *which* fields arrive (``extra="allow"``) so that every field
this server does not implement is refused by name (``unsupported``) instead of being dropped:
a field OpenAI defines is accepted only at its neutral value (``n: 1``, ``logprobs: false``,
``presence_penalty: 0``, ``tools: []``, ...), any other field is a 400 naming it. Type and range
errors are pydantic's (422, the field's path in the message).

Extensions beside the standard fields, vLLM style:

* request ``top_k`` (0 = off) and ``return_token_ids`` (adds ``prompt_token_ids`` to the response
  and ``token_ids`` to each choice);
* response ``singlepass``: ``{"labels": {probe: {"label", "score"}}, "blocked_by": probe}`` (on a
  stream: on the first chunk), with ``"response_labels"`` (the response probes' label of the
  response so far) on the response and on every stream chunk of a decode pass (a token's, or the
  notice of a response stopped by a ``stop`` rule, with ``blocked_by``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def _omit_none(v) -> bool:
    return v is None


def Ext(**kw):  # noqa: N802 - an extension field: left out of the JSON when unset
    return Field(None, exclude_if=_omit_none, **kw)


# ----------------------------------------------------------------------------- requests


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = Field(False, description="send a last chunk with the token usage")


class _Sampled(_Request):
    model: str = Field(description="the served model id (GET /v1/models)")
    max_tokens: int | None = Field(
        None,
        ge=0,
        description="new tokens at most (default: completions 16, chat the artifact's limit); 0 = labels only",
    )
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy (default 1)")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus mass (default 1 = off)")
    top_k: int | None = Field(None, ge=0, description="extension: the K most likely tokens (0 = off)")
    seed: int | None = Field(None, ge=0, description="sampling seed: the same request gives the same result")
    stop: str | list[str] | None = Field(None, description="up to 4 strings; the text ends before the first one")
    stream: bool | None = Field(False, description="server-sent events, ending with data: [DONE]")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="an end-user id (logged with the request, nothing else)")
    return_token_ids: bool | None = Field(False, description="extension: prompt and completion token ids")


class ChatMessage(_Request):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampled):
    messages: list[ChatMessage] = Field(min_length=1, description="one user message (see the server docs)")
    max_completion_tokens: int | None = Field(None, ge=0, description="the newer name of max_tokens")


class CompletionRequest(_Sampled):
    prompt: str | list[str] = Field(description="one prompt (a string or a list of one string)")


class ModerationRequest(_Request):
    input: str | list[str] = Field(description="a string or a list of strings")
    model: str | None = None


# OpenAI fields this server does not implement, each with the values that mean "not used"
NEUTRAL: dict[str, tuple] = {
    "n": (1,),
    "best_of": (1,),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "echo": (False,),
    "suffix": ("",),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "repetition_penalty": (1,),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "parallel_tool_calls": (True, False),
    "response_format": ({"type": "text"},),
    "store": (False,),
    "metadata": ({},),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "reasoning_effort": (),
    "service_tier": ("auto", "default"),
    "web_search_options": (),
    "safety_identifier": None,
    "verbosity": (),
    "prompt_cache_key": (),
    "min_p": (0,),
    "min_tokens": (0,),
    "ignore_eos": (False,),
}
WHY = {
    "n": "one choice per request (n=1)",
    "best_of": "one choice per request (best_of=1)",
    "logprobs": "log probabilities are not returned",
    "top_logprobs": "log probabilities are not returned",
    "echo": "the prompt is not echoed",
    "suffix": "insertion (suffix) is not supported",
    "presence_penalty": "penalties are not applied",
    "frequency_penalty": "penalties are not applied",
    "repetition_penalty": "penalties are not applied",
    "logit_bias": "logit bias is not applied",
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "response_format": "only plain text responses are supported",
    "store": "completions are not stored",
    "metadata": "completions are not stored",
    "modalities": "only text is generated",
}


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):  # False is not 0 here
        return type(a) is type(b) and a == b
    return a == b


def unsupported(req: BaseModel, prefix: str = "") -> tuple[str, str] | None:
    """-> (field, message) for the first field this server would have to ignore, else None."""
    for name, value in (req.model_extra or {}).items():
        field = f"{prefix}{name}"
        if name not in NEUTRAL:
            return field, f"unsupported field '{field}' (this server implements the fields listed in /docs)"
        neutral = NEUTRAL[name]
        if value is None or neutral is None or any(_same(value, v) for v in neutral):
            continue
        why = WHY.get(name, "it is not supported by this server")
        return field, f"'{field}' = {value!r} is not supported: {why}"
    return None


# ----------------------------------------------------------------------------- responses


class LabelOut(BaseModel):
    label: str
    score: float


class Singlepass(BaseModel):
    """The extension beside the standard fields: every prompt probe's label on the prompt, and the
    response probes' label of the response so far."""

    labels: dict[str, LabelOut] | None = Ext(description="the prompt probes' labels (prefill pass)")
    blocked_by: str | None = Ext(description="the probe whose policy blocked the prompt or stopped the response")
    response_labels: dict[str, LabelOut] | None = Ext(description="the response probes' labels of the response so far")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None
    token_ids: list[int] | None = Ext()


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_token_ids: list[int] | None = Ext()
    singlepass: Singlepass


class Delta(BaseModel):
    role: Literal["assistant"] | None = Ext()
    content: str | None = Ext()


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = Ext()


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = Ext()
    prompt_token_ids: list[int] | None = Ext()
    singlepass: Singlepass | None = Ext()


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = Ext()


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Ext()
    system_fingerprint: str | None = None
    prompt_token_ids: list[int] | None = Ext()
    singlepass: Singlepass | None = Ext()


class ModerationResult(BaseModel):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[str]]
    singlepass: Singlepass


class Moderation(BaseModel):
    id: str
    model: str
    results: list[ModerationResult]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "singlepass"
    singlepass: dict | None = Ext()


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
