"""The HTTP face of a model server (FastAPI): tasks, predictions, health and Prometheus metrics.

    GET  /v1/tasks                   every served task: kind, model id, accuracy, size, FLOPs, labels
    GET  /v1/tasks/{task}            one of them
    POST /v1/tasks/{task}/predict    images -> top-k labels with probabilities, and the model id
    POST /v1/predict                 images and tasks (default all) -> per-task predictions; each
                                     distinct frozen prefix runs once per batch
    GET  /healthz   /readyz   /metrics

Images come as multipart files (field ``image``, repeatable), JSON (``{"images": [base64, ...]}``),
an ``.npy`` body (``application/x-npy``) or one raw ``image/png`` / ``image/jpeg`` body; ``tasks``
(comma-separated) and ``top_k`` come as query parameters, form fields or JSON keys. Every error is a
JSON ``{"error": "..."}`` with a 4xx status (503 with ``Retry-After`` when the queue is full). With a
token, every endpoint but /healthz and /readyz needs ``Authorization: Bearer TOKEN``.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import os
import time
from collections.abc import Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from agents.serving.plan import Plan
from agents.serving.server import Answer, MicroBatcher, ModelServer, NotServed, QueueFull
from launch.serve_inputs import InputError, Limits, decode_images, decode_npy, from_base64

MAX_TOP_K = 1000
RETRY_AFTER_S = 1
IMAGE_FIELDS = ("image", "images", "file")
log = logging.getLogger("munet.serve")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Metrics:
    """The service's Prometheus metrics, in a registry of its own."""

    def __init__(self, server: ModelServer, batcher: MicroBatcher) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("munet_serve_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram("munet_serve_request_seconds", "request latency", ["endpoint"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch_images = Histogram("munet_serve_batch_images", "images per batch", registry=r,
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.batch_requests = Histogram("munet_serve_batch_requests", "requests per batch", registry=r,
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.batch_seconds = Histogram("munet_serve_batch_seconds", "compute time per batch", registry=r,
                                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 5))
        self.swaps = Counter("munet_serve_model_swaps", "served models replaced by newer ones", registry=r)
        self.model = Gauge("munet_serve_model_published_timestamp_seconds",
                           "when the served model of a task was published", ["task", "model_id", "kind"],
                           registry=r)
        Gauge("munet_serve_queue_requests", "requests waiting", registry=r).set_function(batcher.queue.qsize)
        Gauge("munet_serve_plan_version", "plans built so far", registry=r).set_function(
            lambda: server.plan.version)
        server.on_swap.append(self.on_swap)  # first, so no swap goes unseen; then the plan of now
        self.on_swap(Plan({}), server.plan)

    def on_swap(self, old: Plan, new: Plan) -> None:
        for task, m in old.models.items():
            if new.models.get(task) is not m:
                try:
                    self.model.remove(task, m.info.model_id, m.info.kind)
                except KeyError:  # never set (a swap raced the first call)
                    pass
                self.swaps.inc()
        for task, m in new.models.items():
            self.model.labels(task, m.info.model_id, m.info.kind).set(m.info.published_at)

    def observe_batch(self, images: int, requests: int, seconds: float) -> None:
        self.batch_images.observe(images)
        self.batch_requests.observe(requests)
        self.batch_seconds.observe(seconds)


def top_k(answer: Answer, k: int, labels: tuple[str, ...] | None) -> list[dict]:
    out = []
    order = np.argsort(-answer.probs, axis=1, kind="stable")[:, :k]
    for probs, idx in zip(answer.probs, order):
        top = [{"label": int(i), "name": labels[i] if labels else None, "prob": round(float(probs[i]), 6)}
               for i in idx]
        out.append({**top[0], "top": top})
    return out


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it passes ``limit`` bytes, declared or not."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"request body of {int(declared)} bytes; the limit is {limit}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"request body over the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # nobody is left to answer: no traceback, nothing to do
        raise HTTPError(400, "the client went away before its request body arrived") from None
    body = b"".join(chunks)
    request._body = body  # noqa: SLF001 (Starlette's own cache: request.form() reads it from here)
    return body


def _param(value: object, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise HTTPError(400, f"{what}: expected a string or a list of strings")


async def parse_request(request: Request, limits: Limits) -> tuple[list[np.ndarray], str | None, str | None]:
    """(images, tasks text, top_k text) from any accepted body."""
    body = await read_body(request, limits.max_body_bytes)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    tasks, k = request.query_params.get("tasks"), request.query_params.get("top_k")
    if ctype == "multipart/form-data":
        try:  # one file past the limit still parses, so the count check below answers 413
            form = await request.form(max_files=limits.max_images + 1, max_fields=16)
        except StarletteHTTPException as exc:
            raise HTTPError(400, f"multipart body: {exc.detail}") from None
        uploads = [f for name in IMAGE_FIELDS for f in form.getlist(name) if not isinstance(f, str)]
        limits.check_count(len(uploads))
        files = [(await f.read(), f"image {i} ({f.filename or 'unnamed'})") for i, f in enumerate(uploads)]
        images = await run_in_threadpool(decode_images, files, limits)  # off the event loop
        tasks = tasks or _param(form.get("tasks"), "tasks")
        k = k or _param(form.get("top_k"), "top_k")
    elif ctype == "application/json":
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise HTTPError(400, "body is not valid JSON") from None
        if not isinstance(doc, dict):
            raise HTTPError(400, 'JSON body must be an object like {"images": ["<base64>", ...]}')
        raw = doc.get("images", [doc["image"]] if "image" in doc else None)
        if not isinstance(raw, list):
            raise HTTPError(400, 'JSON body needs "images": a list of base64-encoded PNG or JPEG files')
        limits.check_count(len(raw))
        files = [(from_base64(text, f"image {i}"), f"image {i}") for i, text in enumerate(raw)]
        images = await run_in_threadpool(decode_images, files, limits)
        tasks = tasks or _param(doc.get("tasks"), "tasks")
        k = k or _param(doc.get("top_k"), "top_k")
    elif ctype in ("application/x-npy", "application/octet-stream"):
        images = decode_npy(body, limits)
    elif ctype in ("image/png", "image/jpeg"):
        images = await run_in_threadpool(decode_images, [(body, "image")], limits)
    else:
        raise HTTPError(415, f"content type {ctype or 'none'!r}: send multipart/form-data, "
                             "application/json, application/x-npy, image/png or image/jpeg")
    return images, tasks, k


def create_app(server: ModelServer, batcher: MicroBatcher, *, limits: Limits = Limits(),
               token: str | None = None, default_top_k: int = 5) -> FastAPI:
    app = FastAPI(title="munet-swarm models", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(server, batcher)
    batcher.observe = metrics.observe_batch
    app.state.metrics = metrics
    replica = str(os.getpid())

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
        return error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail).lower() if exc.status_code == 404 else str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("serve: %s %s failed", request.method, request.url.path)
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        return error(400, f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg', 'invalid')}")

    def authorize(request: Request) -> None:
        if token is None:
            return
        got = request.headers.get("authorization", "")
        if not (got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode(), token.encode())):
            raise HTTPError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    def timed(endpoint: str, handler: Callable):
        @functools.wraps(handler)  # FastAPI reads the handler's own parameters (path parameters)
        async def wrapped(request: Request, **kw):
            started, status = time.perf_counter(), 500
            try:
                authorize(request)
                response = await handler(request, **kw)
                status = response.status_code
                response.headers["X-Served-By"] = replica
                return response
            except HTTPError as exc:
                status = exc.status
                raise
            except InputError as exc:
                status = exc.status
                raise HTTPError(exc.status, str(exc)) from None
            finally:
                metrics.requests.labels(endpoint, str(status)).inc()
                metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return wrapped

    def parse_k(text: str | None) -> int:
        if text is None:
            return default_top_k
        if not str(text).isdigit() or not 1 <= int(text) <= MAX_TOP_K:
            raise HTTPError(400, f"top_k {text!r}: a whole number from 1 to {MAX_TOP_K}")
        return int(text)

    async def answer(images: list[np.ndarray], tasks: list[str]) -> dict[str, Answer]:
        try:
            future = batcher.submit(images, tasks)
        except NotServed as exc:
            raise HTTPError(404, f"task {exc.args[0]!r} is not served here "
                                 f"(served: {', '.join(sorted(server.plan.models)) or 'none yet'})") from None
        except QueueFull as exc:
            raise HTTPError(503, f"busy: {exc}; retry later", {"Retry-After": str(RETRY_AFTER_S)}) from None
        return await asyncio.wrap_future(future)

    def predictions(task: str, a: Answer, k: int) -> dict:
        if not np.isfinite(a.probs).all():  # JSON has no NaN: say what broke instead of a bare 500
            log.error("serve: model %s of %s gave non-finite outputs", a.model_id, task)
            raise HTTPError(500, f"the model {a.model_id} of {task} gave non-finite outputs")
        return {"task": task, "model_id": a.model_id, "predictions": top_k(a, k, a.labels)}

    async def list_tasks(request: Request) -> JSONResponse:
        return JSONResponse({"tasks": [m.info.to_dict() for _, m in sorted(server.plan.models.items())]})

    async def one_task(request: Request, task: str) -> JSONResponse:
        model = server.plan.models.get(task)
        if model is None:
            raise HTTPError(404, f"task {task!r} is not served here")
        return JSONResponse(model.info.to_dict())

    async def predict_task(request: Request, task: str) -> JSONResponse:
        if task not in server.plan.models:
            raise HTTPError(404, f"task {task!r} is not served here")
        images, _, k = await parse_request(request, limits)
        result = await answer(images, [task])
        return JSONResponse(predictions(task, result[task], parse_k(k)))

    async def predict_all(request: Request) -> JSONResponse:
        images, tasks_text, k = await parse_request(request, limits)
        tasks = [t for t in (tasks_text or "").split(",") if t.strip()]
        tasks = [t.strip() for t in tasks] or sorted(server.plan.models)
        if not tasks:
            raise HTTPError(404, "no task is served yet")
        top = parse_k(k)
        result = await answer(images, tasks)
        return JSONResponse({"images": len(images), "model_ids": {t: a.model_id for t, a in result.items()},
                             "tasks": {t: predictions(t, a, top) for t, a in result.items()}})

    async def metrics_text(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/v1/tasks", timed("tasks", list_tasks), methods=["GET"])
    app.add_api_route("/v1/tasks/{task}", timed("task", one_task), methods=["GET"])
    app.add_api_route("/v1/tasks/{task}/predict", timed("predict_task", predict_task), methods=["POST"])
    app.add_api_route("/v1/predict", timed("predict", predict_all), methods=["POST"])
    app.add_api_route("/metrics", timed("metrics", metrics_text), methods=["GET"])

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ok = server.ready
        return JSONResponse({"ready": ok, "tasks": len(server.plan.models), "plan": server.plan.version,
                             "swaps": server.swaps, "last_check": server.last_check},
                            status_code=200 if ok else 503)

    return app
