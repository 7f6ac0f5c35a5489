"""The OpenAI-compatible HTTP API over an AsyncEngine.

Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: bad input gets a 4xx
naming the field (the body's parse errors, unknown routes and methods included), and the server never
answers 500 to a request it could not use. Streams are server-sent events ending in `data: [DONE]`; a
client that leaves, streaming or not, aborts its request, and one that fails once begun (the engine
failing) ends with an error event in that shape, then `data: [DONE]`, as vLLM's do. Logprobs are finite
JSON numbers (a token the sampler ruled out has -9999.0, as vLLM reports it).
"""

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from itertools import accumulate

from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.base import BaseHTTPMiddleware

from moeserve.engine.async_engine import AsyncEngine, RequestStream
from moeserve.engine.engine import check_unicode
from moeserve.engine.outputs import CompletionOutput, RequestOutput
from moeserve.sampling_params import Logprob, RequestError, SamplingParams
from moeserve.server.metrics import Metrics, RequestTimer
from moeserve.server.protocol import (MAX_N_MARK, MAX_TOKENS, MODEL_NAME, TOKEN_ID, ChatCompletionRequest,
                                      CompletionRequest, DetokenizeRequest, TokenizeRequest, constrain_schema)
from moeserve.version import __version__

logger = logging.getLogger(__name__)

MIN_LOGPROB = -9999.0
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")  # the rest (health, metrics, version) stays open
DONE = "data: [DONE]\n\n"


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    chat_template: str | None = None
    max_n: int = 16
    max_concurrent_requests: int = 256  # more get 429
    max_request_bytes: int = 8 * 2**20  # larger bodies get 413
    model_root: str | None = None  # what the model was loaded from (the model card's `root`)
    allowed_origins: list[str] = field(default_factory=list)  # CORS; empty: no cross-origin access


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                   headers: dict | None = None) -> Response:
    """As ASCII JSON: a message that quotes the request, lone surrogates and all, always encodes (Starlette's
    JSONResponse writes UTF-8, which cannot hold them)."""
    body = json.dumps(error_body(status, message, param, kind), ensure_ascii=True)
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def internal_error_body(error: Exception) -> dict:
    return error_body(500, f"internal server error ({type(error).__name__}); the server log has the details",
                      kind="internal_server_error")


def validation_message(error: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})", None
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    field_name = ".".join(location) or None
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, RequestError):  # its message names the field
        return str(cause), field_name
    if field_name is None:  # the body itself
        if first.get("type") == "missing":
            return "the request body is empty: send a JSON object", None
        return "the request body must be a JSON object", None
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return f"{field_name}: {message}", field_name


class ApiKeyMiddleware(BaseHTTPMiddleware):
    """`Authorization: Bearer KEY` on /v1/*, /tokenize and /detokenize, before any handler runs."""

    def __init__(self, app, api_key: str):
        super().__init__(app)
        self.expected = f"Bearer {api_key}".encode()

    async def dispatch(self, request: Request, call_next):
        given = request.headers.get("authorization", "")
        if request.url.path.startswith(PROTECTED_PREFIXES) and not hmac.compare_digest(given.encode(), self.expected):
            return error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                  kind="authentication_error")
        return await call_next(request)


class BodyLimitMiddleware:
    """Reads the request body up to `max_bytes` (declared or chunked: 413 beyond), then hands it on."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await error_response(413, f"request body over {self.max_bytes} bytes")(scope, receive, send)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # then: the disconnect, which the handlers listen for
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class InternalErrorMiddleware:
    """An unexpected error, before the response began, becomes a 500 in OpenAI's shape here: inside the
    CORS middleware, so that it carries the CORS headers (Starlette's own 500 handler sits outside every
    middleware)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        started = False

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception as error:
            if started or scope["type"] != "http":
                raise
            logger.exception("unexpected error while serving a request")
            body = json.dumps(internal_error_body(error))
            await Response(body, status_code=500, media_type="application/json")(scope, receive, send)


class Admission:
    """Holds requests to --max-concurrent-requests, counting the engine's open streams and the prompts
    admitted but not open yet (being tokenized). A request reserves its slots before its first await, so
    a burst cannot pass the check all at once while none of it is in the engine yet."""

    def __init__(self, engine: AsyncEngine, limit: int):
        self.engine, self.limit = engine, limit
        self.pending = 0  # prompts admitted whose streams are not open yet

    def reserve(self, prompts: int) -> None:
        """Over the limit: 429; more prompts than the limit, which could never run: 400."""
        if prompts > self.limit:
            raise ApiError(400, f"prompt: {prompts} prompts in one request, but this server runs at most "
                                f"{self.limit} requests at once; send fewer per request", "prompt")
        if self.engine.num_streams + self.pending + prompts > self.limit:
            raise ApiError(429, f"too many concurrent requests (limit {self.limit}); retry later",
                           kind="rate_limit_error")
        self.pending += prompts

    def release(self, prompts: int) -> None:
        """Prompts no longer pending: their streams are open (the engine counts them now) or they failed."""
        self.pending -= prompts


@dataclass
class Serving:
    """What the routes share."""

    engine: AsyncEngine
    config: ServerConfig
    metrics: Metrics
    admission: Admission
    created: int = field(default_factory=lambda: int(time.time()))


def build_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="moeserve", version=__version__)
    serving = Serving(engine, config, Metrics(engine, config.model_name),
                      Admission(engine, config.max_concurrent_requests))
    add_middleware(app, config)
    add_error_handlers(app)
    add_info_routes(app, serving)
    add_generation_routes(app, serving)
    add_tokenizer_routes(app, serving)
    app.openapi = constrained_openapi(app, serving)
    return app


def add_middleware(app: FastAPI, config: ServerConfig) -> None:
    """The last added is the outermost: CORS, then internal errors (so 500s carry CORS headers too), the
    API key, the body limit."""
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_bytes)
    if config.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    app.add_middleware(InternalErrorMiddleware)
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in config.allowed_origins)


def add_info_routes(app: FastAPI, serving: Serving) -> None:
    @app.get("/health")
    async def health():
        return Response(status_code=200 if not serving.engine.stopping else 503)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus():
        return Response(serving.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(serving)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str = Path(json_schema_extra={MODEL_NAME: True})):
        if model_id != serving.config.model_name:
            raise ApiError(404, unknown_model(model_id, serving.config), "model", kind="not_found_error")
        return model_card(serving)


def model_card(serving: Serving) -> dict:
    name = serving.config.model_name
    return {"id": name, "object": "model", "created": serving.created, "owned_by": "moeserve",
            "root": serving.config.model_root or name, "parent": None, "max_model_len": serving.engine.max_model_len,
            "permission": []}


def add_generation_routes(app: FastAPI, serving: Serving) -> None:
    config = serving.config

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_common(body, config)
        if body.best_of is not None and body.best_of != body.n:
            raise ApiError(400, "best_of other than n is not supported", "best_of")
        prompt_logprobs = max_or_none(body.prompt_logprobs, body.logprobs if body.echo else None)
        params = sampling(body, body.max_tokens, body.logprobs, prompt_logprobs)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = await start(serving, prompt_list(body.prompt), params, request_id)
        shape = CompletionShape(config.model_name, request_id, serving.engine, body.logprobs, body.echo,
                                body.prompt_logprobs)
        return await respond(request, shape, streams, params.n, serving.metrics, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_chat(body, config)
        # logprobs alone: the sampled tokens' logprobs, with empty top_logprobs (as OpenAI answers)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = sampling(body, max_tokens, logprobs, body.prompt_logprobs)
        prompt = await serving.engine.off_loop(chat_prompt, serving.engine, body.messages, config.chat_template)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await start(serving, [prompt], params, request_id)
        shape = ChatShape(config.model_name, request_id, serving.engine, logprobs, False, body.prompt_logprobs)
        return await respond(request, shape, streams, params.n, serving.metrics, body)


def add_tokenizer_routes(app: FastAPI, serving: Serving) -> None:
    engine = serving.engine

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        check_model(body.model, serving.config)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "send exactly one of prompt and messages", "prompt")
        return await engine.off_loop(tokenized, engine, body, serving.config.chat_template)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model, serving.config)
        require_tokenizer(engine)
        if any(t >= engine.vocab_size for t in body.tokens):
            raise ApiError(400, f"tokens must be in [0, {engine.vocab_size})", "tokens")
        return {"prompt": await engine.off_loop(engine.detokenize, body.tokens)}


def constrained_openapi(app: FastAPI, serving: Serving):
    """The app's OpenAPI schema with this server's limits (see constrain_schema), made once."""
    engine = serving.engine
    limits = {MODEL_NAME: {"enum": [serving.config.model_name]}, MAX_N_MARK: {"maximum": serving.config.max_n},
              TOKEN_ID: {"maximum": engine.vocab_size - 1}, MAX_TOKENS: {"maximum": engine.max_model_len - 1}}

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = constrain_schema(schema, limits)
        return app.openapi_schema

    return openapi


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_, error: ApiError):
        return error_response(error.status, error.message, error.param, error.kind)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_, error: RequestValidationError):
        message, field_name = validation_message(error)
        return error_response(400, message, field_name)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        if error.status_code == 404:
            return error_response(404, f"no route {request.url.path}", kind="not_found_error")
        if error.status_code == 405:
            return error_response(405, f"{request.method} is not allowed on {request.url.path}",
                                  headers=error.headers)
        if error.status_code == 400:  # fastapi could not decode the body (not UTF-8, nested too deeply, ...)
            return error_response(400, "the request body could not be parsed: send UTF-8 JSON, nested at most a "
                                       "few hundred levels deep")
        return error_response(error.status_code, str(error.detail), headers=error.headers)


def unknown_model(model: str, config: ServerConfig) -> str:
    return f"the model {model!r} does not exist; this server serves {config.model_name!r}"  # !r: escapes surrogates


def check_model(model: str | None, config: ServerConfig) -> None:
    if model is not None and model != config.model_name:
        raise ApiError(400, unknown_model(model, config), "model")


def check_common(body, config: ServerConfig) -> None:
    check_model(body.model, config)
    if not 1 <= body.n <= config.max_n:
        raise ApiError(400, f"n must be between 1 and {config.max_n}, got {body.n}", "n")


def check_chat(body: ChatCompletionRequest, config: ServerConfig) -> None:
    check_common(body, config)
    if body.tools:
        raise ApiError(400, "tools are not supported", "tools")
    if body.response_format and body.response_format.get("type") not in (None, "text"):
        raise ApiError(400, "only response_format {'type': 'text'} is supported", "response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")


def max_or_none(*values: int | None) -> int | None:
    given = [v for v in values if v is not None]
    return max(given) if given else None


def bad_request(error: ValueError) -> ApiError:
    """A 400 naming the field (RequestError knows it); messages speak of request fields, not our classes."""
    return ApiError(400, str(error).replace("SamplingParams.", ""), getattr(error, "field", None))


def sampling(body, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
    try:
        return body.sampling_params(max_tokens, logprobs, prompt_logprobs)
    except ValueError as error:
        raise bad_request(error) from None


def prompt_list(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, int) for p in prompt):
        return [{"prompt_token_ids": prompt}]
    return [p if isinstance(p, str) else {"prompt_token_ids": p} for p in prompt]


def require_tokenizer(engine: AsyncEngine) -> None:
    if not engine.has_tokenizer:
        raise ApiError(400, "this model has no tokenizer: send token ids, and expect no text back")


def encode(engine: AsyncEngine, text: str, add_special_tokens: bool) -> list[int]:
    try:
        return engine.encode(text, "prompt", add_special_tokens)
    except RequestError as error:
        raise bad_request(error) from None


def tokenized(engine: AsyncEngine, body: TokenizeRequest, template: str | None) -> dict:
    """vLLM's /tokenize answer (run off the event loop)."""
    if body.messages is not None:
        text = render_chat(engine, body.messages, template, body.add_generation_prompt)
    else:
        require_tokenizer(engine)
        text = body.prompt
    tokens = encode(engine, text, body.adds_special_tokens)
    return {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens,
            "token_strs": engine.token_strings(tokens) if body.return_token_strs else None}


def chat_prompt(engine: AsyncEngine, messages, template: str | None) -> dict:
    """The messages through the chat template, tokenized as vLLM does: the template writes the special
    tokens it wants, so the tokenizer adds none (run off the event loop)."""
    text = render_chat(engine, messages, template, add_generation_prompt=True)
    return {"prompt": text, "prompt_token_ids": encode(engine, text, add_special_tokens=False)}


def render_chat(engine: AsyncEngine, messages, template: str | None, add_generation_prompt: bool) -> str:
    """The chat template applied to the messages (run off the event loop: templates can be slow)."""
    if not engine.has_tokenizer:
        raise ApiError(400, "this model has no tokenizer, so it has no chat template; use /v1/completions with token ids")
    rendered = []
    for i, message in enumerate(messages):
        field_name = f"messages.{i}.content"
        try:
            text = message.text()
        except ValueError as error:
            raise ApiError(400, f"{field_name}: {error}", field_name) from None
        try:
            check_unicode(text, field_name)
        except RequestError as error:
            raise bad_request(error) from None
        rendered.append({"role": message.role, "content": text})
    try:
        return engine.apply_chat_template(rendered, template, add_generation_prompt)
    except Exception as error:  # jinja errors, a missing template
        raise ApiError(400, f"messages: the chat template could not render them ({error})", "messages") from None


async def start(serving: Serving, prompts: list, params: SamplingParams, request_id: str) -> list[RequestStream]:
    """Admit a request (its slots reserved before the first await) and queue every prompt of it together
    (so they are batched); input errors (prompt too long, ...) become 400 before any byte is sent, and
    the prompts already queued are withdrawn, not counted as aborted."""
    serving.admission.reserve(len(prompts))
    streams: list[RequestStream] = []
    try:
        for p, prompt in enumerate(prompts):
            stream_id = request_id if len(prompts) == 1 else f"{request_id}-{p}"
            streams.append(await serving.engine.add_request(prompt, params, stream_id))
            serving.admission.release(1)
    except ValueError as error:
        withdraw(serving, streams, len(prompts), count_abort=False)
        raise bad_request(error) from None
    except BaseException:
        withdraw(serving, streams, len(prompts), count_abort=True)
        raise
    return streams


def withdraw(serving: Serving, streams: list[RequestStream], num_prompts: int, count_abort: bool) -> None:
    serving.admission.release(num_prompts - len(streams))
    for stream in streams:
        stream.close(count_abort)


def close_all(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream.close()


def finite(logprob: float) -> float:
    """Logprobs as JSON can carry them: -inf (a token ruled out by top-k, top-p, ...) and NaN become -9999."""
    return logprob if logprob >= MIN_LOGPROB else MIN_LOGPROB


@dataclass
class Sent:
    """How much of one completion a response has sent."""

    tokens: int = 0
    chars: int = 0  # of the completion's text
    offset: int = 0  # characters of the choice's text so far, an echoed prompt included: the next text_offset
    opened: bool = False
    closed: bool = False  # its finish_reason went out

    def has_news(self, completion: CompletionOutput) -> bool:
        """A chunk per step with new tokens (even while their text is held back), and the first and last."""
        if self.closed:
            return False
        return not self.opened or len(completion.token_ids) > self.tokens or completion.finish_reason is not None

    def advance(self, completion: CompletionOutput, text: str) -> None:
        """`text` of the choice went out, up to completion's current end."""
        self.tokens, self.chars = len(completion.token_ids), len(completion.text)
        self.offset += len(text)
        self.opened, self.closed = True, completion.finish_reason is not None


class CompletionShape:
    object_name, chunk_name = "text_completion", "text_completion"

    def __init__(self, model_name, request_id, engine, logprobs, echo, prompt_logprobs):
        self.model_name, self.request_id, self.engine = model_name, request_id, engine
        self.logprobs, self.echo, self.prompt_logprobs = logprobs, echo, prompt_logprobs
        self.created = int(time.time())

    def token_text(self, token_id: int) -> str:
        return self.engine.decode([token_id]) if self.engine.has_tokenizer else ""

    def prompt_text(self, output: RequestOutput) -> str:
        if output.prompt is not None:
            return output.prompt
        return self.engine.decode(output.prompt_token_ids) if self.engine.has_tokenizer else ""

    def logprobs_of(self, tokens: list[int], entries: list[dict[int, Logprob] | None], offset: int) -> dict:
        """OpenAI's completion logprobs, the first token at text_offset `offset`; a prompt's first token has
        none (null)."""
        texts = [self.token_text(t) for t in tokens]
        return {
            "tokens": texts,
            "token_logprobs": [None if e is None else finite(e[t].logprob) for t, e in zip(tokens, entries)],
            "top_logprobs": [None if e is None else {self.token_text(t): finite(lp.logprob) for t, lp in e.items()}
                             for e in entries],
            "text_offset": list(accumulate(map(len, texts), initial=offset))[:-1],
        }

    def choice(self, index: int, output: RequestOutput, completion: CompletionOutput, sent: Sent) -> dict:
        """The choice for what completion holds beyond what `sent` says went out (which it advances)."""
        first = not sent.opened
        text = completion.text[sent.chars:]
        tokens, entries = completion.token_ids[sent.tokens:], (completion.logprobs or [])[sent.tokens:]
        if first and self.echo:
            text = self.prompt_text(output) + text
            tokens = output.prompt_token_ids + tokens
            entries = (output.prompt_logprobs or [None] * len(output.prompt_token_ids)) + entries
        choice = {"index": index, "text": text, "finish_reason": completion.finish_reason,
                  "logprobs": self.logprobs_of(tokens, entries, sent.offset)
                  if self.logprobs is not None and completion.logprobs is not None else None}
        if first and self.prompt_logprobs is not None:
            choice["prompt_logprobs"] = self.vllm_prompt_logprobs(output)
        sent.advance(completion, text)
        return choice

    def vllm_prompt_logprobs(self, output: RequestOutput) -> list:
        """vLLM's prompt_logprobs: per prompt token null (the first) or {token id: {logprob, rank, decoded_token}}."""
        return [None if entry is None else
                {str(t): {"logprob": finite(lp.logprob), "rank": lp.rank, "decoded_token": self.token_text(t)}
                 for t, lp in entry.items()} for entry in output.prompt_logprobs or []]

    def full_choice(self, index, output, completion):
        return self.choice(index, output, completion, Sent())

    def envelope(self, choices, usage=None, chunk=False, output=None):
        body = {"id": self.request_id, "object": self.chunk_name if chunk else self.object_name, "created": self.created,
                "model": self.model_name, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body


class ChatShape(CompletionShape):
    object_name, chunk_name = "chat.completion", "chat.completion.chunk"

    def chat_logprobs(self, completion, start: int):
        if self.logprobs is None or completion.logprobs is None:
            return None
        content = []
        for token, entry in zip(completion.token_ids[start:], completion.logprobs[start:]):
            top = sorted(entry.items(), key=lambda item: item[1].rank)[: self.logprobs]
            content.append({"token": self.token_text(token), "logprob": finite(entry[token].logprob),
                            "bytes": list(self.token_text(token).encode()),
                            "top_logprobs": [{"token": self.token_text(t), "logprob": finite(lp.logprob),
                                              "bytes": list(self.token_text(t).encode())} for t, lp in top]})
        return {"content": content}

    def choice(self, index: int, output: RequestOutput, completion: CompletionOutput, sent: Sent) -> dict:
        text = completion.text[sent.chars:]
        delta = {"content": text} if sent.opened else {"role": "assistant", "content": text}
        choice = {"index": index, "delta": delta, "logprobs": self.chat_logprobs(completion, sent.tokens),
                  "finish_reason": completion.finish_reason}
        sent.advance(completion, text)
        return choice

    def full_choice(self, index, output, completion):
        return {"index": index, "message": {"role": "assistant", "content": completion.text},
                "logprobs": self.chat_logprobs(completion, 0), "finish_reason": completion.finish_reason}

    def envelope(self, choices, usage=None, chunk=False, output=None):
        body = super().envelope(choices, usage, chunk)
        if output is not None and self.prompt_logprobs is not None:  # vLLM: at the response level in chat
            body["prompt_logprobs"] = self.vllm_prompt_logprobs(output)
        return body


def usage_of(outputs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def respond(request: Request, shape, streams: list[RequestStream], n: int, metrics: Metrics, body):
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(events(shape, streams, n, metrics, include_usage), media_type="text/event-stream")
    return await collect(request, shape, streams, n, metrics)


async def collect(request: Request, shape, streams: list[RequestStream], n: int, metrics: Metrics):
    """The whole response at once; a client that hangs up first aborts the request (nobody reads it)."""
    gathering = asyncio.ensure_future(final_outputs(streams, metrics))
    leaving = asyncio.ensure_future(client_leaves(request))
    try:
        await asyncio.wait({gathering, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        leaving.cancel()
        gathering.cancel()
        close_all(streams)  # aborts what is still running
    if not gathering.done() or gathering.cancelled():
        return Response(status_code=499)
    finals = gathering.result()
    choices = [shape.full_choice(p * n + c.index, output, c) for p, output in enumerate(finals) for c in output.outputs]
    body = shape.envelope(choices, usage_of(finals), output=finals[0] if len(finals) == 1 else None)
    return Response(json.dumps(body, allow_nan=False), media_type="application/json")


async def final_outputs(streams: list[RequestStream], metrics: Metrics) -> list[RequestOutput]:
    finals = []
    for stream in streams:
        timer = RequestTimer(metrics, stream.arrival)
        async for output in stream:
            timer.on_output(output)
        finals.append(output)
    return finals


async def client_leaves(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, allow_nan=False)}\n\n"


async def events(shape, streams: list[RequestStream], n: int, metrics: Metrics, include_usage: bool):
    """Each prompt's chunks in turn. An error once the response has begun (the engine failing) ends it
    with an error event in OpenAI's shape, then [DONE], as vLLM's streams end."""
    finals = []
    try:
        for p, stream in enumerate(streams):
            timer = RequestTimer(metrics, stream.arrival)
            sent = [Sent() for _ in range(n)]
            async for output in stream:
                timer.on_output(output)
                first_chunk = not any(s.opened for s in sent)
                choices = [shape.choice(p * n + c.index, output, c, sent[c.index]) for c in output.outputs
                           if sent[c.index].has_news(c)]
                if choices:
                    yield sse(shape.envelope(choices, chunk=True, output=output if first_chunk else None))
            finals.append(output)
    except Exception as error:
        logger.exception("a streamed response failed")
        yield sse(internal_error_body(error))
        yield DONE
        return
    finally:  # a client that leaves aborts what is still running
        close_all(streams)
    if include_usage:
        yield sse(shape.envelope([], usage_of(finals), chunk=True))
    yield DONE
