"""Request ids, logging and Prometheus metrics of the service.

Every request gets an id (the client's `X-Request-ID` when it is sane, else a new one), returned
in `X-Request-ID` and put on every log record made while the request is handled (and on the log
records of the slide job it starts). Unhandled exceptions become a generic 500 naming the id;
the traceback goes to the log, never to the client.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-ID"
request_id_var: ContextVar[str] = ContextVar("wsi_mil_request_id", default="-")
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
LOG_FORMAT = "%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"
access_log = logging.getLogger("wsi_mil.service.access")
error_log = logging.getLogger("wsi_mil.service.errors")
_factory_installed = False


def install_log_record_factory() -> None:
    """Give every log record a `request_id` attribute (the current request's, or `-`); idempotent."""
    global _factory_installed
    if _factory_installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.request_id = request_id_var.get()
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True


def uvicorn_log_config(level: str = "info") -> dict[str, Any]:
    """A `logging.dictConfig` for uvicorn and wsi_mil with the request id in every line."""
    formatter = {"format": LOG_FORMAT}
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "default",
        "stream": "ext://sys.stderr",
    }
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": handler},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            "wsi_mil": {"handlers": ["default"], "level": level, "propagate": False},
        },
    }


def new_request_id() -> str:
    """A fresh request id (32 hex digits)."""
    return uuid.uuid4().hex


class _JobStateCollector(Collector):
    """Reports the number of jobs per state at scrape time."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[GaugeMetricFamily]:
        """One gauge sample per job state."""
        family = GaugeMetricFamily(
            "wsi_mil_jobs", "Slide jobs in the job store, by state", labels=["state"]
        )
        for state, count in sorted(self._counts().items()):
            family.add_metric([state], count)
        yield family


class ServiceMetrics:
    """The Prometheus metrics of one app instance, in their own registry (several apps per process are fine)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "wsi_mil_http_requests",
            "HTTP requests handled, by method, route template and status code",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "wsi_mil_http_request_seconds",
            "HTTP request duration, by route template",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.predictions = Counter(
            "wsi_mil_predictions",
            "Feature-file predictions served, by model",
            ["model"],
            registry=self.registry,
        )

    def watch_jobs(self, counts: Callable[[], dict[str, int]]) -> None:
        """Report job counts per state from `counts()` at every scrape."""
        self.registry.register(_JobStateCollector(counts))


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class RequestContextMiddleware:
    """Pure ASGI middleware: request id, access log line, metrics and the last-resort 500 handler."""

    def __init__(self, app: ASGIApp, *, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _VALID_REQUEST_ID.fullmatch(incoming) else new_request_id()
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status_code = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status_code, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status_code = message["status"]
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"
                ]
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            status_code = 499  # nginx's "client closed request"; nothing can be sent any more
        except Exception:
            error_log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if response_started:
                raise
            status_code = 500
            body = json.dumps(
                {
                    "detail": "internal server error; quote the request id when reporting it",
                    "request_id": request_id,
                }
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"x-request-id", request_id.encode("latin-1")),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
        finally:
            elapsed = time.perf_counter() - started
            route = _route_template(scope)
            self.metrics.requests.labels(scope.get("method", ""), route, str(status_code)).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            access_log.info(
                "%s %s %d %.1f ms",
                scope.get("method"),
                scope.get("path"),
                status_code,
                elapsed * 1000,
            )
            request_id_var.reset(token)
