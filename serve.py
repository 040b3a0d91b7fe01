"""serve.py: the model behind an OpenAI-compatible HTTP API and a chat page for the browser.
in:  a checkpoint (like chat.py: default the newest SFT one; else dolly, mid)      out: http://127.0.0.1:8000
Serve:        python serve.py --checkpoint=sft              (then open http://127.0.0.1:8000 for the chat page)
From Python:  OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").chat.completions.create(model="t4chat",
                  messages=[{"role": "user", "content": "Hi"}], stream=True)
Other hosts:  python serve.py --host=0.0.0.0 --api_key=...  (or T4CHAT_API_KEY=...; /health stays open)
Endpoints: POST /v1/chat/completions (OpenAI's, streamed as server-sent events or not), GET /v1/models, GET / (the
page), GET /health. Requests that arrive together are decoded together: each model copy (one per GPU with
--num_gpus) runs engine.BatchedGenerator in its own thread, one forward per step for all its running answers.
Extensions to OpenAI's fields: top_k, repetition_penalty, truncate (drop the oldest turns of a prompt that is too
long instead of refusing it; the response's dropped_messages says how many) and ignore_eos (answers run to
max_tokens: benchmarks).
"""
import asyncio
import collections
import hashlib
import hmac
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

import common
from checkpoint import load_model
from common import UserError
from configurator import apply_overrides
from engine import BatchedGenerator, StopStrings, StreamDecoder, build_prompt, generate, pack_linears

# ---- config (module globals; override with --key=value; -h lists them) ---------------------------------------
checkpoint = ""               # a ckpt_*.pt, a run folder, a stage name (sft|dolly|mid|base) or hf:<dir>; "" = newest sft
host = "127.0.0.1"            # the interface to listen on; 0.0.0.0 = every one (anyone who reaches it can use the model)
port = 8000                   # 0 = any free port (the address is printed)
api_key = ""                  # "" = $T4CHAT_API_KEY, else none; a key: every endpoint but /health wants "Bearer <key>"
num_gpus = 1                  # model copies, one per GPU (cuda:0 .. cuda:N-1); a request goes to whichever has room
max_batch = 8                 # answers one model copy decodes together
max_queue = 64                # requests that may wait for a free slot; one more is answered 503 with Retry-After
request_timeout = 300.0       # seconds from arrival to the end of the answer; past it the request fails and frees its slot
max_messages = 64             # messages per request
max_message_chars = 32000     # characters per message
max_prompt_tokens = -1        # prompt tokens per request; -1 = the model's max_seq_len
max_tokens = 256              # answer tokens for a request that names no max_tokens
max_tokens_cap = -1           # the most answer tokens a request may ask for; -1 = the model's max_seq_len
device = "auto"               # auto | cpu | cuda | cuda:N | mps (--num_gpus > 1 takes cuda:0 .. cuda:N-1)
dtype = "auto"                # auto (bf16 on sm>=8.0, fp16 on older GPUs, fp32 on CPU) | float32 | float16 | bfloat16
model_name = ""               # the model id the API reports; "" = t4chat-<stage>
access_log = True             # one line per request on stderr (uvicorn's)
# ----------------------------------------------------------------------------------------------------------------

# `checkpoint = ""` tries these in order; a base model knows no chat format, so it is only served when named
SERVE_STAGES = ("sft", "dolly", "mid")
PAGE = Path(__file__).resolve().parent / "serve.html"
OPEN_PATHS = {"/health", "/"}  # the page holds no data; it asks for the key when the API answers 401
FINISH = {"stop": "stop", "length": "length", "context": "length"}  # OpenAI names the context limit 'length' too


# -----------------------------------------------------------------------------
# the request body: OpenAI's fields, strictly typed (a string where a number belongs is a 400, not coerced)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[TextPart]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool | None = None


class ChatRequest(BaseModel):
    # extra="ignore": clients send fields we have no use for (user, metadata, ...); the ones that would change the
    # answer's meaning (n, logprobs, tools) are checked in check_request
    model_config = ConfigDict(strict=True, extra="ignore")
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2 ** 63, lt=2 ** 64)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    logprobs: bool | None = None
    tools: list | None = None
    truncate: bool | None = None
    ignore_eos: bool | None = None


class APIError(Exception):
    """An answer in OpenAI's error format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, *, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self):
        kind = {401: "authentication_error", 404: "not_found_error", 503: "overloaded_error",
                504: "timeout_error"}.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def validation_message(errors) -> tuple:
    """(message, param) for pydantic's first error, e.g. "messages.1.role: Input should be 'system', ... (got
    'robot')". A union (content: a string or parts) fails once per member; their messages are joined."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None

    def path(e):  # union members appear in the location as type names (str, list[TextPart]): not fields
        return [str(x) for x in e["loc"] if not (isinstance(x, str) and (x in ("str", "int", "float", "bool")
                                                                           or "[" in x or x[:1].isupper()))]
    where = path(first)
    if not where:
        return "the request body must be a JSON object with a 'messages' list", None
    msgs = [e["msg"] for e in errors if path(e) == where]
    msg = msgs[0] + "".join(" or " + m.removeprefix("Input should be ") for m in msgs[1:])
    got = "" if first["type"] == "missing" else f" (got {json.dumps(first.get('input'), default=str)[:60]})"
    return f"{'.'.join(where)}: {msg}{got}", ".".join(where)


# -----------------------------------------------------------------------------
# jobs, the queue and the decoding threads


class Job:
    """One request between the HTTP side and a decoding thread. The thread puts ('text', str), then ('end', finish
    reason) or ('error', status, message) into `out`, an asyncio queue of the server's event loop."""

    def __init__(self, ids, settings, stops, loop, timeout):
        self.ids, self.settings = ids, settings
        self.timeout, self.deadline = timeout, time.monotonic() + timeout
        self.stop = StopStrings(stops)
        self.loop, self.out = loop, asyncio.Queue()
        self.n_tokens = 0
        self.cancelled = None  # why the HTTP side gave up on it ('disconnected', 'timed out'); read by the thread
        self.finished = False
        self.seq = self.decoder = None

    def put(self, *item):
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)

    def cancel(self, why):
        if not self.finished and self.cancelled is None:
            self.cancelled = why


class Scheduler:
    """The jobs waiting for a slot, shared by every model copy's thread, and the counts /health reports. A job is
    refused when the running and waiting jobs fill every slot and the queue."""

    def __init__(self, slots, queue):
        self.slots, self.queue = slots, queue
        self.cond = threading.Condition()
        self.waiting = collections.deque()
        self.running = 0
        self.counts = collections.Counter()

    def submit(self, job) -> bool:
        with self.cond:
            if self.running + len(self.waiting) >= self.slots + self.queue:
                self.counts["refused"] += 1
                return False
            self.waiting.append(job)
            self.cond.notify()
            return True

    def take(self, n, wait) -> list:
        """Up to n waiting jobs; with wait, block (a while) until there is one."""
        with self.cond:
            if wait and not self.waiting:
                self.cond.wait(timeout=0.5)
            out = []
            while self.waiting and len(out) < n:
                job = self.waiting.popleft()
                if job.cancelled:
                    self.counts[job.cancelled] += 1
                else:
                    out.append(job)
            self.running += len(out)
            return out

    def done(self, how):
        with self.cond:
            self.running -= 1
            self.counts[how] += 1

    def started(self, n):
        with self.cond:
            self.counts["peak_running"] = max(self.counts["peak_running"], n)


async def read_body(request, lim) -> bytes:
    """The request body, refused (413) once it is larger than any request within the limits can be: nothing
    bounds a body before it is parsed, and a few GB of JSON would take the model's memory with it."""
    cap = lim["max_messages"] * (lim["max_message_chars"] * 6 + 256) + 65536  # 6: JSON's longest escape per char
    too_large = APIError(413, f"the request body is over {cap:,} bytes, more than --max_messages x "
                              f"--max_message_chars allow", code="request_too_large")
    if int(request.headers.get("content-length") or 0) > cap:  # said up front: refused before a byte is read
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise too_large
    return bytes(body)


class Worker:
    """One model copy and the thread that decodes for it: between steps it drops the jobs whose client went away or
    whose time ran out, and takes new jobs into the batch while it has free slots."""

    def __init__(self, model, tok, dev, autocast, scheduler, max_batch):
        self.model, self.tok, self.dev, self.scheduler, self.max_batch = model, tok, dev, scheduler, max_batch
        self.batch = BatchedGenerator(model, tok, autocast=autocast)
        self.thread = threading.Thread(target=self.loop, name=f"decode {dev}", daemon=True)

    def loop(self):
        if self.dev.type == "cuda":  # library handles (cuBLAS) follow the thread's current device
            torch.cuda.set_device(self.dev)
        while True:
            now = time.monotonic()
            for seq in [s for s in self.batch.running if s.job.cancelled or now > s.job.deadline]:
                # past its deadline even when the HTTP side never said so (a client gone before its stream began)
                seq.job.cancel("timed out")
                self.batch.remove(seq)
                self.scheduler.done(seq.job.cancelled or "timed out")
            for job in self.scheduler.take(self.max_batch - len(self.batch.running), wait=not self.batch.running):
                self.admit(job)
            self.scheduler.started(len(self.batch.running))
            if not self.batch.running:
                continue
            try:
                events = self.batch.step()
            except Exception as e:  # out of memory or a bug: fail this batch's requests, never hang them
                for seq in list(self.batch.running):
                    self.batch.remove(seq)
                    seq.job.finished = True
                    seq.job.put("error", 500, f"generation failed: {type(e).__name__}: {str(e)[:200]}")
                    self.scheduler.done("failed")
                continue
            for seq, t in events:
                self.emit(seq, t)

    def admit(self, job):
        gen = torch.Generator(device=self.dev)
        seed = job.settings.pop("seed")
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed % 2 ** 64)  # OpenAI's seed may be negative; torch takes 0 .. 2^64-1
        try:
            job.seq = self.batch.add(job.ids, generator=gen, **job.settings)
        except ValueError as e:  # check_request caught these already; kept so a gap there cannot hang a request
            job.finished = True
            job.put("error", 400, str(e))
            self.scheduler.done("failed")
            return
        job.seq.job, job.decoder = job, StreamDecoder(self.tok)

    def emit(self, seq, t):
        """Pass the new token on as text (stop strings held back); end the job when it is over."""
        job = seq.job
        if t is not None:
            job.n_tokens += 1
            text = job.stop.feed(job.decoder.feed(t))
            if text:
                job.put("text", text)
            if job.stop.stopped:
                self.batch.remove(seq, "stop")
        if seq.finish_reason is None:
            return
        if not job.stop.stopped:  # an incomplete character, then what waited to see if it began a stop string
            text = job.stop.feed(job.decoder.flush()) + job.stop.flush()
            if text:
                job.put("text", text)
        job.finished = True
        job.put("end", "stop" if job.stop.stopped else FINISH[seq.finish_reason])
        self.scheduler.done("served")


# -----------------------------------------------------------------------------
# the HTTP side


class Server:
    """What the endpoints need: the tokenizer, the limits, the scheduler and what /health reports."""

    def __init__(self, *, tok, max_seq_len, name, info, scheduler, limits):
        self.tok, self.max_seq_len, self.name, self.info = tok, max_seq_len, name, info
        self.scheduler, self.limits = scheduler, limits
        self.created = int(time.time())

    def check_request(self, req: ChatRequest) -> tuple:
        """(prompt ids, messages dropped, engine settings, stop strings), or APIError(400) saying what is wrong."""
        lim = self.limits
        if req.n not in (None, 1):
            raise APIError(400, f"n={req.n}: this server returns one choice per request (n=1)", param="n")
        if req.logprobs or req.tools:
            what = "logprobs" if req.logprobs else "tools"
            raise APIError(400, f"{what} is not supported by this server", param=what)
        if len(req.messages) > lim["max_messages"]:
            raise APIError(400, f"{len(req.messages)} messages; this server takes at most {lim['max_messages']} per "
                                f"request (--max_messages)", param="messages")
        messages = []
        for i, m in enumerate(req.messages):
            text = m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content)
            if len(text) > lim["max_message_chars"]:
                raise APIError(400, f"messages.{i}.content has {len(text):,} characters; this server takes at most "
                                    f"{lim['max_message_chars']:,} per message (--max_message_chars)",
                               param=f"messages.{i}.content")
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        answer = req.max_completion_tokens or req.max_tokens or min(lim["max_tokens"], lim["max_tokens_cap"])
        if answer > lim["max_tokens_cap"]:
            key = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise APIError(400, f"{key}={answer} is more than this server allows per answer ({lim['max_tokens_cap']})",
                           param=key)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or any(not s or len(s) > 200 for s in stops):
            raise APIError(400, "stop: up to 4 strings of 1 to 200 characters", param="stop")
        ids, dropped = self.prompt_ids(messages, answer, bool(req.truncate))
        settings = dict(max_tokens=answer, temperature=1.0 if req.temperature is None else req.temperature,
                        top_k=req.top_k or 0, top_p=1.0 if req.top_p is None else req.top_p,
                        repetition_penalty=req.repetition_penalty or 1.0,
                        frequency_penalty=req.frequency_penalty or 0.0, presence_penalty=req.presence_penalty or 0.0,
                        stop_ids=() if req.ignore_eos else self.tok.chat_format.stop_ids(), seed=req.seed)
        return ids, dropped, settings, stops

    def prompt_ids(self, messages, answer, truncate) -> tuple:
        """The chat format's prompt, and how many messages had to go to fit it (with truncate: the oldest turns,
        keeping room for the answer as chat.py does; without, a prompt too long is refused)."""
        fmt, limit = self.tok.chat_format, self.limits["max_prompt_tokens"]
        try:
            if not truncate:
                ids = fmt.render_prompt(messages)
                if len(ids) > limit:
                    raise APIError(400, f"the prompt is {len(ids):,} tokens; this server takes at most {limit:,} "
                                        f"(the model's context is {self.max_seq_len:,}). Shorten the conversation, "
                                        f"or send \"truncate\": true to drop its oldest turns", param="messages")
                return ids, 0
            if messages[-1]["role"] != "user":
                raise ValueError("the last message must be the user's (the one to answer)")
            system = messages[0]["content"] if messages[0]["role"] == "system" else ""
            history = messages[1 if system else 0:-1]
            reserve = min(answer, self.max_seq_len // 2)  # room for the answer, but never half the context
            return build_prompt(self.tok, history, messages[-1]["content"], system_prompt=system, max_seq_len=limit,
                                reserve=reserve)
        except (ValueError, UserError) as e:  # the roles out of order, or even the last message does not fit
            raise APIError(400, str(e), param="messages") from None

    def health(self):
        s = self.scheduler
        with s.cond:
            return {"status": "ok", **self.info, "running": s.running, "queued": len(s.waiting),
                    "slots": s.slots, "max_queue": s.queue, "requests": dict(s.counts)}


async def job_items(job, request=None):
    """What the decoding thread sends for `job`, until it ends. Past its deadline the job is cancelled (its slot
    frees at the thread's next step) and APIError(504) raised; a client that disconnects cancels it too."""
    while True:
        left = job.deadline - time.monotonic()
        if left <= 0:
            job.cancel("timed out")
            raise APIError(504, f"the answer took longer than this server allows (--request_timeout={job.timeout:g} "
                                f"s); ask for fewer max_tokens, or try again when it is less busy")
        try:
            item = await asyncio.wait_for(job.out.get(), timeout=min(left, 0.5))
        except asyncio.TimeoutError:
            # a streamed response learns of a disconnect by being cancelled; a plain one has to ask
            if request is not None and await request.is_disconnected():
                job.cancel("disconnected")
                return
            continue
        yield item
        if item[0] != "text":
            return


def chunk(cid, created, name, delta, finish=None, **extra):
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def stream_answer(server, job, req, dropped):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. Cancelled by Starlette when the
    client disconnects; the finally then cancels the job."""
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    extra = {"dropped_messages": dropped} if req.truncate else {}
    try:
        yield sse(chunk(cid, created, server.name, {"role": "assistant", "content": ""}, **extra))
        try:
            async for item in job_items(job):
                if item[0] == "text":
                    yield sse(chunk(cid, created, server.name, {"content": item[1]}))
                elif item[0] == "end":
                    yield sse(chunk(cid, created, server.name, {}, item[1]))
                else:  # the status line went out with the first chunk: the error goes in the stream
                    yield sse({"error": {"message": item[2], "type": "server_error", "param": None, "code": None}})
                    return
        except APIError as e:  # the timeout, likewise
            yield sse({"error": {"message": e.message, "type": "timeout_error", "param": None, "code": None}})
            return
        if req.stream_options and req.stream_options.include_usage:
            yield sse({**chunk(cid, created, server.name, {}), "choices": [], "usage": usage(job)})
        yield "data: [DONE]\n\n"
    finally:
        job.cancel("disconnected")


def usage(job):
    n = len(job.ids)
    return {"prompt_tokens": n, "completion_tokens": job.n_tokens, "total_tokens": n + job.n_tokens}


class BearerAuth:
    """ASGI middleware: with a key, every path but OPEN_PATHS wants `Authorization: Bearer <key>`. It runs before
    routing and body parsing, so a request without the key learns nothing else (not even that its JSON is bad)."""

    def __init__(self, app, key):
        self.app = app
        self.digest = hashlib.sha256(key.encode()).digest()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            auth = Headers(scope=scope).get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            # hashes of equal length, compared in constant time: the time taken says nothing about the key
            if not hmac.compare_digest(hashlib.sha256(given.encode()).digest(), self.digest):
                msg = ("incorrect API key" if given else
                       "this server wants an API key: send the header 'Authorization: Bearer <key>'")
                err = APIError(401, msg, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="t4chat", docs_url=None, redoc_url=None, openapi_url=None)
    page = PAGE.read_text(encoding="utf-8")

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, exc):  # FastAPI's default is 422 with its own body; OpenAI's clients expect 400
        message, param = validation_message([{**e, "loc": e["loc"][1:]} for e in exc.errors()])  # drop 'body'
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # 404, 405: the same error format as everything else
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(APIError)
    async def api_error(request, exc):
        return exc.response()

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        return server.health()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": server.created,
                                            "owned_by": "t4chat"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        # the body is JSON whatever its Content-Type says (curl -d sends a form type); read by pydantic directly
        try:
            req = ChatRequest.model_validate_json(await read_body(request, server.limits))
        except ValidationError as e:
            message, param = validation_message(e.errors())
            raise APIError(400, message, param=param) from None
        # tokenizing a long conversation takes a while: off the event loop, which serves every other client
        ids, dropped, settings, stops = await asyncio.to_thread(server.check_request, req)
        job = Job(ids, settings, stops, asyncio.get_running_loop(), server.limits["request_timeout"])
        if not server.scheduler.submit(job):
            raise APIError(503, "the server is busy: every slot and the whole queue are taken; retry in a moment",
                           code="overloaded", headers={"Retry-After": "1"})
        if req.stream:
            return StreamingResponse(stream_answer(server, job, req, dropped), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces, finish = [], None
        try:
            async for item in job_items(job, request):
                if item[0] == "text":
                    pieces.append(item[1])
                elif item[0] == "end":
                    finish = item[1]
                else:
                    raise APIError(item[1], item[2])
        except asyncio.CancelledError:
            job.cancel("disconnected")
            raise
        if finish is None:  # the client went away; nobody reads this
            return JSONResponse({}, status_code=499)
        body = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": server.name, "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                                                   "logprobs": None, "finish_reason": finish}],
                "usage": usage(job)}
        if req.truncate:
            body["dropped_messages"] = dropped
        return body

    return app


# -----------------------------------------------------------------------------
# main


def check_config():
    for name, value, low in (("port", port, 0), ("num_gpus", num_gpus, 1), ("max_batch", max_batch, 1),
                             ("max_queue", max_queue, 0), ("max_messages", max_messages, 1),
                             ("max_message_chars", max_message_chars, 1), ("max_tokens", max_tokens, 1)):
        if value < low:
            raise UserError(f"--{name}={value} must be >= {low}")
    if port > 65535:
        raise UserError(f"--port={port} must be at most 65535")
    if request_timeout <= 0:
        raise UserError(f"--request_timeout={request_timeout} must be > 0 seconds")
    for name, value in (("max_prompt_tokens", max_prompt_tokens), ("max_tokens_cap", max_tokens_cap)):
        if value == 0 or value < -1:
            raise UserError(f"--{name}={value} must be >= 1, or -1 for the model's max_seq_len")


def devices() -> list:
    if num_gpus == 1:
        return [common.resolve_device(device)]
    if not torch.cuda.is_available() or torch.cuda.device_count() < num_gpus:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise UserError(f"--num_gpus={num_gpus} but torch sees {have} CUDA GPU(s); lower --num_gpus")
    return [torch.device("cuda", i) for i in range(num_gpus)]


def listen_socket():
    """Bound before the model loads, so a port in use fails at once; port 0 learns its number here."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port, or stop what uses it")
    sock.listen(2048)
    return sock


def say(msg):
    print(msg, file=sys.stderr, flush=True)


def main(argv=None):
    apply_overrides(globals(), sys.argv[1:] if argv is None else list(argv))
    check_config()
    key = api_key or os.environ.get("T4CHAT_API_KEY", "")
    if host not in ("127.0.0.1", "localhost", "::1"):
        say(f"warning: --host={host} listens beyond this machine: anyone who can reach port {port} can use the model"
            + ("" if key else " (no API key: set --api_key or T4CHAT_API_KEY)"))
    sock = listen_socket()
    devs = devices()
    ptdtype, dtype_reason = common.pick_dtype(devs[0], dtype)
    scheduler = Scheduler(len(devs) * max_batch, max_queue)
    workers, meta = [], None
    for dev in devs:
        model, tok, meta = load_model(checkpoint, dev, default_stage=SERVE_STAGES, key="checkpoint")
        pack_linears(model, ptdtype)
        autocast, _ = common.make_autocast_and_scaler(dev, ptdtype)
        # the first forwards build kernels for their shapes: done here, not in the first user's answer
        generate(model, tok, tok.chat_format.render_prompt([{"role": "user", "content": "Hi"}]), max_tokens=2,
                 autocast=autocast)
        workers.append(Worker(model, tok, dev, autocast, scheduler, max_batch))
    for note in meta["notes"]:
        say(note)
    if meta["stage"] == "base":
        say("note: a base model never saw the chat format; its answers through this API will be poor (chat.py "
            "--checkpoint=base completes plain text instead)")
    cfg = model.config
    limits = dict(max_messages=max_messages, max_message_chars=max_message_chars, max_tokens=max_tokens,
                  max_prompt_tokens=cfg.max_seq_len if max_prompt_tokens == -1 else min(max_prompt_tokens, cfg.max_seq_len),
                  max_tokens_cap=cfg.max_seq_len if max_tokens_cap == -1 else max_tokens_cap,
                  request_timeout=request_timeout)
    name = model_name or f"t4chat-{meta['stage'] or 'model'}"
    info = {"model": name, "checkpoint": str(meta["path"]), "stage": meta["stage"], "step": meta["step"],
            "device": [str(d) for d in devs], "dtype": str(ptdtype).replace("torch.", ""), "max_batch": max_batch,
            "max_seq_len": cfg.max_seq_len, "max_tokens_cap": limits["max_tokens_cap"]}  # the page sizes its control
    server = Server(tok=tok, max_seq_len=cfg.max_seq_len, name=name, info=info, scheduler=scheduler, limits=limits)
    for w in workers:
        w.thread.start()
    app = create_app(server)
    if key:
        app = BearerAuth(app, key)
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://{'[' + bound_host + ']' if ':' in bound_host else bound_host}:{bound_port}"
    say(f"serving {meta['path']} as {name} (stage {meta['stage'] or 'unknown'}, {model.num_params():,} parameters, "
        f"max_seq_len {cfg.max_seq_len}) on {', '.join(map(str, devs))}, {ptdtype} ({dtype_reason}); {max_batch} "
        f"answers at a time per copy, {max_queue} may wait")
    say(f"serving on {url}  (chat page: {url}/  OpenAI API: {url}/v1{'  API key required' if key else ''})")
    config = uvicorn.Config(app, log_level="info" if access_log else "warning", access_log=access_log,
                            timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    common.run(main)
