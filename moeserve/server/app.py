"""The OpenAI-compatible HTTP API over an AsyncEngine.

Bad input always gets OpenAI's error shape with a 4xx status and a message naming the field; the
server never answers 500 to a request it could not use. Streams are server-sent events ending in
`data: [DONE]`; a client that leaves a stream aborts its request.
"""

import hmac
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.middleware.base import BaseHTTPMiddleware

from moeserve.engine.async_engine import AsyncEngine, RequestStream
from moeserve.engine.outputs import RequestOutput
from moeserve.sampling_params import SamplingParams
from moeserve.server.metrics import Metrics, RequestTimer
from moeserve.server.protocol import ChatCompletionRequest, CompletionRequest


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    chat_template: str | None = None
    max_n: int = 16
    max_concurrent_requests: int = 256  # more get 429
    max_request_bytes: int = 8 * 2**20  # larger bodies get 413


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status)


def validation_message(error: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})", None
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(location) or None
    return (f"{field}: {first.get('msg')}" if field else first.get("msg", "invalid request")), field


class ApiKeyMiddleware(BaseHTTPMiddleware):
    """`Authorization: Bearer KEY` on /v1/*, before any handler runs."""

    def __init__(self, app, api_key: str):
        super().__init__(app)
        self.expected = f"Bearer {api_key}".encode()

    async def dispatch(self, request: Request, call_next):
        given = request.headers.get("authorization", "")
        if request.url.path.startswith("/v1/") and not hmac.compare_digest(given.encode(), self.expected):
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
                return await receive()  # then: the disconnect, which streaming responses listen for
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def build_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="moeserve", version="0.1.0")
    metrics = Metrics(engine.engine, config.model_name)
    tokenizer = engine.engine.tokenizer
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_bytes)
    if config.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)

    @app.exception_handler(ApiError)
    async def api_error(_, error: ApiError):
        return error_response(error.status, error.message, error.param, error.kind)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_, error: RequestValidationError):
        message, field = validation_message(error)
        return error_response(400, message, field)

    @app.get("/health")
    async def health():
        return Response(status_code=200 if not engine.stopping else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        card = {"id": config.model_name, "object": "model", "created": 0, "owned_by": "moeserve",
                "max_model_len": engine.engine.max_model_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_common(body, config)
        if body.echo or (body.best_of is not None and body.best_of != body.n):
            raise ApiError(400, "echo and best_of are not supported", "echo" if body.echo else "best_of")
        prompts = prompt_list(body.prompt)
        check_capacity(engine, config, len(prompts))
        params = sampling(body, body.max_tokens, body.logprobs)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = start(engine, prompts, params, request_id)
        shape = CompletionShape(config.model_name, request_id, tokenizer, body.logprobs)
        if body.stream:
            return sse(shape, streams, params.n, metrics, include_usage=bool(body.stream_options and body.stream_options.include_usage))
        return await collect(shape, streams, params.n, metrics)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        check_common(body, config)
        if body.tools:
            raise ApiError(400, "tools are not supported", "tools")
        if body.response_format and body.response_format.get("type") not in (None, "text"):
            raise ApiError(400, "only response_format {'type': 'text'} is supported", "response_format")
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = sampling(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
        prompt = render_chat(tokenizer, body, config.chat_template)
        check_capacity(engine, config, 1)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = start(engine, [prompt], params, request_id)
        shape = ChatShape(config.model_name, request_id, tokenizer, body.top_logprobs if body.logprobs else None)
        if body.stream:
            return sse(shape, streams, params.n, metrics, include_usage=bool(body.stream_options and body.stream_options.include_usage))
        return await collect(shape, streams, params.n, metrics)

    return app


def check_common(body, config: ServerConfig) -> None:
    if body.model != config.model_name:
        raise ApiError(400, f"the model `{body.model}` does not exist; this server serves `{config.model_name}`", "model")
    if not 1 <= body.n <= config.max_n:
        raise ApiError(400, f"n must be between 1 and {config.max_n}, got {body.n}", "n")


def check_capacity(engine: AsyncEngine, config: ServerConfig, new_requests: int) -> None:
    """Requests in the engine (streaming or not) count until they finish; over the limit: 429."""
    if engine.num_streams + new_requests > config.max_concurrent_requests:
        raise ApiError(429, f"too many concurrent requests (limit {config.max_concurrent_requests}); retry later",
                       kind="rate_limit_error")


def bad_request(error: ValueError) -> ApiError:
    """A 400 naming the field (RequestError knows it); messages speak of request fields, not our classes."""
    return ApiError(400, str(error).replace("SamplingParams.", ""), getattr(error, "field", None))


def sampling(body, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    try:
        return body.sampling_params(max_tokens, logprobs)
    except ValueError as error:
        raise bad_request(error) from None


def prompt_list(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [{"prompt_token_ids": prompt}]
    if not prompt:
        raise ApiError(400, "prompt: must not be empty", "prompt")
    return [p if isinstance(p, str) else {"prompt_token_ids": p} for p in prompt]


def render_chat(tokenizer, body: ChatCompletionRequest, template: str | None) -> str:
    if tokenizer is None:
        raise ApiError(400, "this model has no tokenizer, so it has no chat template; use /v1/completions with token ids")
    try:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    except ValueError as error:
        raise ApiError(400, str(error), "messages") from None
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # jinja errors, a missing template
        raise ApiError(400, f"messages: the chat template could not render them ({error})", "messages") from None


def start(engine: AsyncEngine, prompts: list, params: SamplingParams, request_id: str) -> list[RequestStream]:
    """Queue every prompt of a request together (so they are batched); input errors (prompt too long,
    ...) become 400 before any byte is sent, and the prompts already queued are withdrawn."""
    streams: list[RequestStream] = []
    try:
        for p, prompt in enumerate(prompts):
            streams.append(engine.add_request(prompt, params, request_id if len(prompts) == 1 else f"{request_id}-{p}"))
    except ValueError as error:
        close_all(streams)
        raise bad_request(error) from None
    return streams


def close_all(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream.close()


class CompletionShape:
    object_name, chunk_name = "text_completion", "text_completion"

    def __init__(self, model_name, request_id, tokenizer, logprobs):
        self.model_name, self.request_id, self.tokenizer, self.logprobs = model_name, request_id, tokenizer, logprobs
        self.created = int(time.time())

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""

    def logprobs_of(self, completion, start: int):
        if self.logprobs is None or completion.logprobs is None:
            return None
        tokens = completion.token_ids[start:]
        entries = completion.logprobs[start:]
        return {
            "tokens": [self.token_text(t) for t in tokens],
            "token_logprobs": [e[t].logprob for t, e in zip(tokens, entries)],
            "top_logprobs": [{self.token_text(t): lp.logprob for t, lp in e.items()} for e in entries],
            "text_offset": [],
        }

    def choice(self, index, completion, text, start, final, first=False):
        return {"index": index, "text": text, "logprobs": self.logprobs_of(completion, start),
                "finish_reason": completion.finish_reason if final else None}

    def full_choice(self, index, completion):
        return self.choice(index, completion, completion.text, 0, True)

    def envelope(self, choices, usage=None, chunk=False):
        body = {"id": self.request_id, "object": self.chunk_name if chunk else self.object_name, "created": self.created,
                "model": self.model_name, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body


class ChatShape(CompletionShape):
    object_name, chunk_name = "chat.completion", "chat.completion.chunk"

    def logprobs_of(self, completion, start: int):
        if self.logprobs is None or completion.logprobs is None:
            return None
        content = []
        for token, entry in zip(completion.token_ids[start:], completion.logprobs[start:]):
            top = sorted(entry.items(), key=lambda item: item[1].rank)[: self.logprobs]
            content.append({"token": self.token_text(token), "logprob": entry[token].logprob,
                            "bytes": list(self.token_text(token).encode()),
                            "top_logprobs": [{"token": self.token_text(t), "logprob": lp.logprob,
                                              "bytes": list(self.token_text(t).encode())} for t, lp in top]})
        return {"content": content}

    def choice(self, index, completion, text, start, final, first=False):
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": index, "delta": delta, "logprobs": self.logprobs_of(completion, start),
                "finish_reason": completion.finish_reason if final else None}

    def full_choice(self, index, completion):
        return {"index": index, "message": {"role": "assistant", "content": completion.text},
                "logprobs": self.logprobs_of(completion, 0), "finish_reason": completion.finish_reason}


def usage_of(outputs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def collect(shape, streams: list[RequestStream], n: int, metrics: Metrics):
    finals = []
    try:
        for stream in streams:
            timer = RequestTimer(metrics, stream.arrival)
            async for output in stream:
                timer.on_output(output)
            finals.append(output)
    finally:  # a client that leaves aborts what is still running
        close_all(streams)
    choices = []
    for p, output in enumerate(finals):
        for completion in output.outputs:
            choices.append(shape.full_choice(p * n + completion.index, completion))
    return shape.envelope(choices, usage_of(finals))


def sse(shape, streams: list[RequestStream], n: int, metrics: Metrics, include_usage: bool) -> StreamingResponse:
    async def events():
        finals = []
        try:
            for p, stream in enumerate(streams):
                timer = RequestTimer(metrics, stream.arrival)
                sent_text = [0] * n
                sent_tokens = [0] * n
                opened = [False] * n
                async for output in stream:
                    timer.on_output(output)
                    chunks = []
                    for completion in output.outputs:
                        i = completion.index
                        new_text = completion.text[sent_text[i]:]
                        final = completion.finish_reason is not None
                        if len(completion.token_ids) == sent_tokens[i] and not final and opened[i]:
                            continue  # a chunk per step with new tokens, even while their text is held back
                        chunks.append(shape.choice(p * n + i, completion, new_text, sent_tokens[i], final,
                                                   first=not opened[i]))
                        opened[i] = True
                        sent_text[i], sent_tokens[i] = len(completion.text), len(completion.token_ids)
                    if chunks:
                        yield f"data: {json.dumps(shape.envelope(chunks, chunk=True))}\n\n"
                finals.append(output)
        finally:  # a client that leaves aborts what is still running
            close_all(streams)
        if include_usage:
            yield f"data: {json.dumps(shape.envelope([], usage_of(finals), chunk=True))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
