"""OpenAI request bodies (with vLLM's extra sampling fields), vLLM's tokenize / detokenize bodies, and
their translation to SamplingParams.

The fields carry the ranges SamplingParams enforces, so the published OpenAPI schema says what a valid
request is (a fuzzer generating from it mostly sends requests the server runs), and a bad value is a
400 naming its field before any work starts. Non-finite numbers (JSON's NaN / Infinity extensions) are
refused everywhere.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WrapValidator

from moeserve.engine.engine import check_unicode
from moeserve.sampling_params import (LOGIT_BIAS_LIMIT, MAX_LOGPROBS, MAX_N, MAX_STOP_STRINGS, MAX_TEMPERATURE,
                                      REPETITION_PENALTY_RANGE, SEED_RANGE, SamplingParams)

# Marks on the schema that the app fills in with its own limits (constrain_schema)
MODEL_NAME, MAX_N_MARK, TOKEN_ID, MAX_TOKENS = "x-model-name", "x-max-n", "x-token-id", "x-max-tokens"

TokenId = Annotated[int, Field(ge=0, json_schema_extra={TOKEN_ID: True})]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


def described_as(description: str) -> WrapValidator:
    """For a union type: one clear message instead of an error per alternative."""
    def validate(value, handler):
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(f"must be {description}") from None

    return WrapValidator(validate)


def unicode_checked(field: str) -> BeforeValidator:
    """A field holding text or a list of texts: a lone surrogate in any is refused by check_unicode
    (before the type's own checks, which would only say that it is no string)."""
    def validate(value):
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                check_unicode(text, field)
        return value

    return BeforeValidator(validate)


Text = Annotated[str, Field(min_length=1)]
Logprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]


class RequestBody(BaseModel):
    """Unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(RequestBody):
    include_usage: bool = False


class SamplingFields(RequestBody):
    """Fields both endpoints share."""

    model: str = Field(json_schema_extra={MODEL_NAME: True})
    n: int = Field(1, ge=1, le=MAX_N, json_schema_extra={MAX_N_MARK: True})
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Annotated[Text | Annotated[list[Text], Field(max_length=MAX_STOP_STRINGS)] | None,
                    described_as(f"a non-empty string or a list of at most {MAX_STOP_STRINGS} of them"),
                    unicode_checked("stop")] = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # JSON keys are strings: pydantic reads them as token ids; OpenAI clamps biases to [-100, 100]
    logit_bias: dict[TokenId, Annotated[float, Field(ge=-LOGIT_BIAS_LIMIT, le=LOGIT_BIAS_LIMIT)]] | None = Field(
        None, json_schema_extra={"propertyNames": {"pattern": "^[0-9]{1,9}$"}})
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extras (extra_body in the openai client)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1])
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, json_schema_extra={MAX_TOKENS: True})
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: Logprobs | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, seed=self.seed, max_tokens=max_tokens,
            min_tokens=self.min_tokens, stop=self.stop or [], stop_token_ids=self.stop_token_ids or [],
            include_stop_str_in_output=self.include_stop_str_in_output, ignore_eos=self.ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, logit_bias=self.logit_bias or {},
            skip_special_tokens=self.skip_special_tokens,
        )


class CompletionRequest(SamplingFields):
    prompt: Annotated[Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)],
                      described_as("a non-empty string, a non-empty list of them, a non-empty list of token ids "
                                   "(integers >= 0), or a non-empty list of such lists"), unicode_checked("prompt")]
    max_tokens: int | None = Field(16, ge=1, json_schema_extra={MAX_TOKENS: True})
    logprobs: Logprobs | None = None
    echo: bool = False  # the prompt before the completion (with its logprobs when logprobs is set)
    best_of: int | None = Field(None, ge=1, le=MAX_N)


def text_part_schema(schema: dict) -> None:
    """What the app serves, {"type": "text", "text": string}; other parts get a 400 that says why."""
    schema["required"] = ["type", "text"]
    schema["properties"]["type"]["enum"] = ["text"]
    schema["properties"]["text"] = {"type": "string", "title": "Text"}


class ContentPart(RequestBody):
    model_config = ConfigDict(json_schema_extra=text_part_schema)

    type: str
    text: str | None = None


class ChatMessage(RequestBody):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Annotated[str | list[ContentPart] | None,
                       described_as("a string or a list of content parts {'type': 'text', 'text': string}")] = None

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI content parts: only text parts are supported
            for part in self.content:
                if part.type != "text":
                    raise ValueError(f"content part type {part.type!r} is not supported (text only)")
                if part.text is None:
                    raise ValueError("a text content part needs its 'text' string")
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    # top_logprobs needs logprobs: true (said in the schema for generators of requests; checked by the app)
    model_config = ConfigDict(json_schema_extra={"dependentSchemas": {"top_logprobs": {
        "properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}}})

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, json_schema_extra={MAX_TOKENS: True})
    max_completion_tokens: int | None = Field(None, ge=1, json_schema_extra={MAX_TOKENS: True})
    logprobs: bool = False
    top_logprobs: Logprobs | None = None
    tools: list | None = Field(None, json_schema_extra={"maxItems": 0})  # not supported: refused with a 400
    response_format: dict | None = None


class TokenizeRequest(RequestBody):
    """vLLM's /tokenize: a prompt, or chat messages rendered through the chat template (one of them:
    said in the schema, checked by the app)."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}}]})

    model: str | None = Field(None, json_schema_extra={MODEL_NAME: True})
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # vLLM's defaults: true for a prompt, false for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @property
    def adds_special_tokens(self) -> bool:
        """A chat template writes its own special tokens (vLLM's TokenizeChatRequest adds none)."""
        return self.add_special_tokens if self.add_special_tokens is not None else self.messages is None


class DetokenizeRequest(RequestBody):
    model: str | None = Field(None, json_schema_extra={MODEL_NAME: True})
    tokens: list[TokenId]


def constrain_schema(node, limits: dict[str, dict]):
    """The OpenAPI schema with each marked field given this server's limits (limits: mark -> keywords),
    e.g. the served model's name as the only `model`, the vocabulary's size as the largest token id."""
    if isinstance(node, list):
        return [constrain_schema(item, limits) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: constrain_schema(value, limits) for key, value in node.items()}
    for mark, keywords in limits.items():
        if node.pop(mark, False):
            numeric = [b for b in node.get("anyOf", []) if b.get("type") in ("integer", "number")]
            for target in numeric or [node]:  # int | None: the bound goes on the integer alternative
                target.update(keywords)
            if "enum" in keywords:
                node.pop("type", None)
    return node
