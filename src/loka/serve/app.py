"""``create_app``: the HTTP API of ``loka serve`` (FastAPI).

OpenAI-compatible completions and chat completions (``"artifacts": [ids]`` stacks artifacts for one
request), the artifacts API (make, list, apply and revert globally, delete, download, upload), probes,
the model catalogue and export, and the workbench page (``GET /``). Every error is one JSON object
``{"error": {"message", "type", "param"}}`` with one line of message; a traceback stays in the server's
log. Endpoints that change something (POST and DELETE, except completions, chat completions and
probes, which only read) need ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.util
import logging
import re
import secrets
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import env
from ..errors import LokaError
from ..version import __version__
from .engine import PROBE_TOKENS, Engine, Generation, GenParams, chat_prompt, check_model_name
from .store import MAX_UPLOAD_BYTES, ArtifactStore, ConflictError, Entry, NotFoundError

if TYPE_CHECKING:
    from ..models.loader import ModelHandle

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
#: prompts one completion or probe request may hold
MAX_PROMPTS = 32
#: records one artifact request may hold
MAX_RECORDS = 1024


class AuthError(LokaError):
    """A missing or wrong bearer token (HTTP 401)."""


ErrorType = Literal[
    "invalid_request_error", "authentication_error", "not_found_error", "conflict_error", "server_error"
]
_TYPE_OF_STATUS: dict[int, ErrorType] = {
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
}


def error_response(
    status: int, message: str, kind: ErrorType | None = None, param: str | None = None, headers=None
) -> JSONResponse:
    """The one error shape: ``{"error": {"message", "type", "param"}}``."""
    kind = kind or _TYPE_OF_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    message = " ".join(str(message).split())  # one line
    body = {"error": {"message": message, "type": kind, "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


_PARAM = re.compile(r"^(?:request )?([A-Za-z_]\w*(?:\[\d+\])?(?:\.\w+)?):")


def _param_of(message: str) -> str | None:
    """The field a loka message names first (``"max_tokens: ..."``, ``"request edit[0]: ..."``)."""
    m = _PARAM.match(message)
    return m.group(1) if m else None


# -- request bodies -----------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Sampling(_Body):
    """The fields completions and chat completions share (OpenAI's names and ranges)."""

    model: str | None = Field(None, description="the loaded model's name (GET /v1/models); optional")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0: greedy; above 0: sampling")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass (temperature > 0)")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the text (left out)")
    stream: bool = Field(False, description="send server-sent events as the text is made")
    stream_options: dict[str, bool] | None = Field(None, description='{"include_usage": true}')
    n: int = Field(1, description="choices per prompt: only 1")
    seed: int | None = Field(None, description="seed of the sampler (temperature > 0)")
    artifacts: list[str] = Field(
        default_factory=list, description="artifact ids applied on top of the global stack for this request"
    )
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None


class CompletionBody(_Sampling):
    prompt: str | list[str]
    max_tokens: int = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart]
    name: str | None = None


class ChatBody(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None


class ProbeBody(_Body):
    prompts: list[str] = Field(min_length=1, max_length=MAX_PROMPTS)
    targets: list[str | None] | None = None
    max_tokens: int = PROBE_TOKENS
    artifacts: list[str] = Field(default_factory=list)


class CreateBody(_Body):
    method: str | None = Field(None, description="default: rome for edits only, else npo")
    edit: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_RECORDS)
    forget: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_RECORDS)
    retain: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_RECORDS)
    hparams: dict[str, Any] = Field(default_factory=dict)
    forget_method: str = "npo"
    apply: bool = False


class LoadBody(_Body):
    model: str


# -- the app ------------------------------------------------------------------------------------------
def create_app(
    model: ModelHandle | str,
    *,
    store: str | Path | None = None,
    token: str | None = None,
    max_tokens_limit: int = 512,
    device: str | None = None,
) -> FastAPI:
    """The server's app for ``model`` (a loaded handle, or a name to load), its artifacts kept in
    ``store`` (default ``$LOKA_HOME/serve/artifacts``). ``token`` guards the endpoints that change
    something (generated when ``None``; ``app.state.token``). ``app.state.engine`` holds the model."""
    from ..models import load_model

    handle = load_model(model, device=device) if isinstance(model, str) else model
    root = Path(store) if store is not None else env.loka_home() / "serve" / "artifacts"
    engine = Engine(handle, ArtifactStore(root), max_tokens_limit=max_tokens_limit, device=device)
    token = token or secrets.token_urlsafe(24)

    app = FastAPI(title="loka serve", version=__version__, docs_url="/docs", redoc_url=None)
    app.state.engine = engine
    app.state.token = token
    _install_errors(app)

    def authorized(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise AuthError(
                "this endpoint needs the server's token: send the header Authorization: Bearer <token> "
                "(loka serve prints it at start; --token or LOKA_SERVE_TOKEN sets it)"
            )

    auth = [Depends(authorized)]

    # -- the server and its model -------------------------------------------------------------------
    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": engine.handle.name, "version": __version__, "stack": engine.stack}

    @app.get("/v1/models")
    def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": engine.handle.name, "object": "model", "owned_by": "loka", "created": 0}],
        }

    @app.get("/v1/catalog")
    def catalog() -> dict:
        from ..models import list_models

        rows = list_models()
        return {
            "data": [
                {
                    "name": m["name"],
                    "installed": m["installed"],
                    "loaded": m["name"] == engine.handle.name,
                    "cached": m["cached"],
                    "description": m["description"],
                }
                for m in rows
            ]
        }

    @app.post("/v1/models/load", dependencies=auth)
    def load(body: LoadBody) -> dict:
        engine.load_model(check_model_name(body.model, engine.handle.name))
        return {"model": engine.handle.name, "stack": engine.stack}

    @app.get("/v1/stack")
    def stack() -> dict:
        return {"stack": engine.stack}

    # -- completions ---------------------------------------------------------------------------------
    def _check_model_field(name: str | None) -> None:
        if name is not None and name != engine.handle.name:
            raise NotFoundError(
                f"model: {name!r} is not loaded; this server has {engine.handle.name} (GET /v1/models)"
            )

    def _params(body: _Sampling, max_tokens: int) -> GenParams:
        _check_model_field(body.model)
        unsupported = [
            ("n", body.n != 1, "only n=1 is supported"),
            ("presence_penalty", body.presence_penalty != 0, "penalties are not supported; leave it 0"),
            ("frequency_penalty", body.frequency_penalty != 0, "penalties are not supported; leave it 0"),
        ]
        if isinstance(body, CompletionBody):
            unsupported += [
                (
                    "logprobs",
                    body.logprobs is not None,
                    "logprobs are not supported (POST /v1/probe gives top tokens)",
                ),
                ("echo", body.echo, "echo is not supported"),
                ("best_of", body.best_of not in (None, 1), "only best_of=1 is supported"),
            ]
        elif isinstance(body, ChatBody):
            unsupported.append(("logprobs", bool(body.logprobs), "logprobs are not supported"))
        for param, bad, why in unsupported:
            if bad:
                raise LokaError(f"{param}: {why}")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise LokaError("stop: give up to 4 non-empty strings")
        return GenParams(max_tokens, body.temperature, body.top_p, stop, body.seed)

    def _usage(gens: list[Generation]) -> dict:
        p = sum(g.prompt_tokens for g in gens)
        c = sum(g.completion_tokens for g in gens)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise LokaError(f"prompt: give 1 to {MAX_PROMPTS} prompts, got {len(prompts)}")
        params = _params(body, body.max_tokens)
        rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": engine.handle.name}
        if body.stream:

            def chunk(ev: dict, eff: list[str]) -> dict | None:
                if ev["type"] == "text":
                    choice = {
                        "text": ev["text"],
                        "index": ev["index"],
                        "logprobs": None,
                        "finish_reason": None,
                    }
                elif ev["type"] == "end":
                    g = ev["generation"]
                    choice = {
                        "text": "",
                        "index": ev["index"],
                        "logprobs": None,
                        "finish_reason": g.finish_reason,
                    }
                else:
                    return None
                return {**head, "choices": [choice], "loka": {"artifacts": eff}}

            return await _stream(engine, prompts, params, body, chunk, head, True)
        eff, gens = await run_in_threadpool(engine.complete, prompts, params, body.artifacts)
        choices = [
            {"text": g.text, "index": i, "logprobs": None, "finish_reason": g.finish_reason}
            for i, g in enumerate(gens)
        ]
        return {**head, "choices": choices, "usage": _usage(gens), "loka": {"artifacts": eff}}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        msgs = [
            {
                "role": m.role,
                "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content),
            }
            for m in body.messages
        ]
        text, special = chat_prompt(engine.handle, msgs)
        max_tokens = next((n for n in (body.max_completion_tokens, body.max_tokens) if n is not None), 16)
        params = _params(body, max_tokens)
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": engine.handle.name}
        if body.stream:
            head = {**head, "object": "chat.completion.chunk"}

            def chunk(ev: dict, eff: list[str]) -> dict | None:
                if ev["type"] == "start":
                    choice = {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                    }
                elif ev["type"] == "text":
                    choice = {"index": 0, "delta": {"content": ev["text"]}, "finish_reason": None}
                else:
                    choice = {"index": 0, "delta": {}, "finish_reason": ev["generation"].finish_reason}
                return {**head, "choices": [{**choice, "logprobs": None}], "loka": {"artifacts": eff}}

            return await _stream(engine, [text], params, body, chunk, head, special)
        eff, [g] = await run_in_threadpool(engine.complete, [text], params, body.artifacts, special)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": g.text},
            "finish_reason": g.finish_reason,
            "logprobs": None,
        }
        return {**head, "choices": [choice], "usage": _usage([g]), "loka": {"artifacts": eff}}

    @app.post("/v1/probe")
    def probe(body: ProbeBody) -> dict:
        eff, rows = engine.probe(body.prompts, body.targets, body.max_tokens, body.artifacts)
        return {"data": rows, "loka": {"artifacts": eff}}

    # -- artifacts -----------------------------------------------------------------------------------
    def summary(entry: Entry) -> dict:
        out = {**entry.summary(), "applied": entry.id in engine.stack}
        out["compatible"] = (entry.manifest.get("model") or {}).get("hash") == engine.handle.model_hash
        return out

    @app.get("/v1/artifacts")
    def list_artifacts() -> dict:
        return {"data": [summary(e) for e in engine.store.entries()]}

    @app.post("/v1/artifacts", dependencies=auth, status_code=201)
    def create(body: CreateBody) -> dict:
        art, report, seconds = engine.create(
            body.method,
            body.edit,
            body.forget,
            body.retain,
            body.hparams,
            forget_method=body.forget_method,
            apply=body.apply,
        )
        return {
            **summary(engine.store.entry(art.id)),
            "report": report,
            "seconds": seconds,
            "steps": art.steps,
        }

    @app.post("/v1/artifacts/upload", dependencies=auth, status_code=201)
    async def upload(request: Request) -> dict:
        scratch = engine.store.new_scratch()
        try:
            data = scratch / "upload"
            await _receive(request, data)
            art = await run_in_threadpool(
                _unpack, engine.store, data, request.headers.get("content-type", ""), scratch
            )
            if art.id in engine.store:
                raise ConflictError(f"artifact {art.id} is already in the store")
            entry = await run_in_threadpool(engine.store.add, art)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return summary(entry)

    @app.get("/v1/artifacts/{art_id}")
    def get_artifact(art_id: str) -> dict:
        entry = engine.store.entry(art_id)
        return {**summary(entry), "manifest": entry.manifest, "report": entry.meta.get("report")}

    @app.get("/v1/artifacts/{art_id}/download")
    def download(art_id: str):
        engine.store.entry(art_id)
        scratch = engine.store.new_scratch()
        try:
            out = engine.store.write_tar(art_id, scratch / f"{art_id}.loka.tar")
        except BaseException:
            engine.store.drop_scratch(scratch)
            raise
        return FileResponse(
            out,
            media_type="application/x-tar",
            filename=out.name,
            background=BackgroundTask(engine.store.drop_scratch, scratch),
        )

    @app.post("/v1/artifacts/{art_id}/apply", dependencies=auth)
    def apply(art_id: str) -> dict:
        return {"stack": engine.apply_global(art_id)}

    @app.post("/v1/artifacts/{art_id}/revert", dependencies=auth)
    def revert(art_id: str) -> dict:
        return {"stack": engine.revert_global(art_id)}

    @app.delete("/v1/artifacts/{art_id}", dependencies=auth)
    def delete(art_id: str) -> dict:
        engine.delete(art_id)
        return {"id": art_id, "deleted": True}

    # -- export --------------------------------------------------------------------------------------
    if importlib.util.find_spec("loka.export.gguf") is not None:
        _add_export(app, engine, auth)

    # -- the workbench -------------------------------------------------------------------------------
    try:
        from . import workbench
    except ImportError as e:  # only the module's absence; an error inside it is raised
        if e.name != f"{__package__}.workbench":
            raise
    else:
        app.include_router(workbench.router)

    if (STATIC / "index.html").is_file():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

        @app.get("/", include_in_schema=False)
        def index():
            return FileResponse(STATIC / "index.html", media_type="text/html")

    return app


# -- pieces -------------------------------------------------------------------------------------------
def _install_errors(app: FastAPI) -> None:
    """Every failure as one JSON error with one line of message: loka's errors by kind (404, 409, 401,
    else 400), request validation 422 (400 for a body that is not JSON), anything else 500 (logged)."""

    @app.exception_handler(LokaError)
    async def loka_error(request: Request, e: LokaError):
        status = 404 if isinstance(e, NotFoundError) else 409 if isinstance(e, ConflictError) else 400
        headers = None
        if isinstance(e, AuthError):
            status, headers = 401, {"WWW-Authenticate": "Bearer"}
        return error_response(status, str(e), param=_param_of(str(e)), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            why = (first.get("ctx") or {}).get("error", "")
            return error_response(400, f"the request body is not valid JSON ({why}); send a JSON object")
        loc = [str(x) for x in first.get("loc", ())]
        loc = loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc
        param = ".".join(loc) or None
        if first.get("type") == "extra_forbidden":
            msg = f"{param}: unknown field; see the API reference in docs/serve.md"
        elif first.get("type") == "missing":
            msg = f"{param}: required"
        else:
            msg = f"{param or 'body'}: {first.get('msg', 'invalid')}"
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        return error_response(422, msg + more, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        msg = e.detail if isinstance(e.detail, str) else "request refused"
        if e.status_code == 404 and msg == "Not Found":
            msg = f"{request.url.path}: no such endpoint (GET /docs lists them)"
        elif e.status_code == 405:
            msg = f"{request.method} {request.url.path}: method not allowed"
        return error_response(e.status_code, msg, headers=getattr(e, "headers", None))

    @app.exception_handler(OSError)
    async def os_error(request: Request, e: OSError):
        log.error("%s %s: %s", request.method, request.url.path, e)
        where = " -> ".join(str(x) for x in (e.filename, e.filename2) if x)
        return error_response(
            500, f"the server could not read or write {where or 'a file'} ({e.strerror or e})"
        )

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error ({type(e).__name__}); the server's log has the details")


async def _receive(request: Request, dest: Path) -> None:
    """Write the request body to ``dest``, refusing more than :data:`MAX_UPLOAD_BYTES`."""
    n = 0
    with open(dest, "xb") as f:
        async for chunk in request.stream():
            n += len(chunk)
            if n > MAX_UPLOAD_BYTES:
                raise LokaError(f"the upload exceeds {MAX_UPLOAD_BYTES} bytes; an artifact tar is smaller")
            f.write(chunk)
    if n == 0:
        raise LokaError(
            "the upload is empty; send the artifact tar as the body (Content-Type: application/x-tar)"
        )


def _unpack(store: ArtifactStore, data: Path, content_type: str, scratch: Path):
    """The artifact of an upload: the body is the tar, or a multipart form whose (first) file part is."""
    if content_type.lower().startswith("multipart/form-data"):
        from email.parser import BytesParser
        from email.policy import HTTP

        msg = BytesParser(policy=HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + data.read_bytes()
        )
        part = next((p for p in msg.iter_parts() if p.get_filename()), None) if msg.is_multipart() else None
        if part is None:
            raise LokaError("the multipart upload holds no file; attach the artifact tar as a file field")
        data = scratch / "upload.tar"
        data.write_bytes(part.get_payload(decode=True) or b"")
    return store.read_tar(data, scratch)


async def _stream(
    engine: Engine,
    prompts: list[str],
    params: GenParams,
    body: _Sampling,
    chunk: Callable[[dict, list[str]], dict | None],
    head: dict,
    special: bool,
) -> StreamingResponse:
    """Generate in a worker thread (which holds the model's lock) and send each event as a server-sent
    event: ``data: {chunk}`` … ``data: [DONE]``. A failure before the first token is an ordinary error
    response; a client that goes away stops the generation."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def emit(ev: dict) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, ev)
        except RuntimeError:  # the event loop is gone: nobody is listening
            cancel.set()

    def work() -> None:
        try:
            engine.stream(prompts, params, body.artifacts, emit, cancel, special)
        except BaseException as e:  # handed to the response
            emit({"type": "error", "error": e})
        finally:
            emit({"type": "done"})

    threading.Thread(target=work, name="loka-serve-stream", daemon=True).start()
    first = await queue.get()
    if first["type"] == "error":
        cancel.set()
        raise first["error"]
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    async def events() -> AsyncIterator[str]:
        import json

        eff = first.get("artifacts", [])
        ev, gens = first, []
        try:
            while ev["type"] != "done":
                if ev["type"] == "error":
                    e = ev["error"]
                    msg = str(e) if isinstance(e, LokaError) else f"internal error ({type(e).__name__})"
                    if not isinstance(e, LokaError):
                        log.error("stream failed", exc_info=e)
                    yield f"data: {json.dumps({'error': {'message': msg, 'type': 'server_error', 'param': None}})}\n\n"
                    break
                if ev["type"] == "end":
                    gens.append(ev["generation"])
                out = chunk(ev, eff)
                if out is not None:
                    yield f"data: {json.dumps(jsonable_encoder(out))}\n\n"
                ev = await queue.get()
            if include_usage and gens:
                p = sum(g.prompt_tokens for g in gens)
                c = sum(g.completion_tokens for g in gens)
                usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _add_export(app: FastAPI, engine: Engine, auth: list) -> None:
    """``GET /v1/export?format=hf|gguf&quant=…``: the model with the global stack applied, written to a
    scratch folder of the store, sent, then removed."""
    from ..artifact import ArtifactError
    from ..export.gguf import export_gguf

    @app.get("/v1/export", dependencies=auth)
    def export(
        fmt: Literal["hf", "gguf"] = Query("hf", alias="format"),
        quant: Literal["f16", "q8_0", "q4_0", "q4_1"] = "q8_0",
    ):
        scratch = engine.store.new_scratch()
        try:
            with engine.using([]) as eff:
                h = engine.handle
                try:  # what a file cannot carry (hooks in a GGUF, a codebook anywhere) is refused: a 409
                    if fmt == "gguf":
                        out = scratch / f"{h.name}-{quant}.gguf"
                        export_gguf(h, out, quant=quant, verify=True)
                        media = "application/octet-stream"
                    else:
                        info = {"artifacts": eff, "served_by": "loka serve"}
                        folder = h.save_pretrained(scratch / h.name, info=info)
                        out = scratch / f"{h.name}-hf.tar"
                        _tar_folder(folder, out)
                        media = "application/x-tar"
                except ArtifactError as e:
                    raise ConflictError(str(e)) from None
        except BaseException:
            engine.store.drop_scratch(scratch)
            raise
        return FileResponse(
            out,
            media_type=media,
            filename=out.name,
            background=BackgroundTask(engine.store.drop_scratch, scratch),
        )


def _tar_folder(folder: Path, out: Path) -> None:
    """``out``: a tar of every regular file under ``folder`` (which this server just wrote), under its name."""
    import tarfile

    with tarfile.open(out, "w") as tar:
        for p in sorted(folder.rglob("*")):
            if p.is_file() and not p.is_symlink():
                tar.add(p, arcname=f"{folder.name}/{p.relative_to(folder).as_posix()}", recursive=False)


__all__ = ["AuthError", "create_app", "error_response"]
