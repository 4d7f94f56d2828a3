"""Replicated OpenAI-compatible serving on Ray Serve.

Each replica is the single-process server (`build_app`: same endpoints, errors, limits, and its
own ``/metrics``) around its own `LLM`; Serve's proxy spreads requests over the replicas and
streams their responses. Every response names the replica that served it in the
``x-quickdraft-replica`` header.

    app = build_serve_app({"model": "model.gguf"}, ["my-model"], num_replicas=2)
    serve.run(app, route_prefix="/")

or, from a shell: ``quickdraft serve model.gguf --ray --num-replicas 2``.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from typing import Any

from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from quickdraft.entrypoints.openai.limits import ServerLimits

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-quickdraft-replica"


class _ReplicaHeader:
    """ASGI middleware: add ``x-quickdraft-replica: <id>`` to every HTTP response."""

    def __init__(self, app: ASGIApp, replica_id: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica_id.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


@serve.ingress()
class QuickdraftServer:
    """One Serve replica: an `LLM`, its engine thread and the FastAPI app serving it (started
    and stopped by the app's lifespan, which Serve runs on the replica)."""

    def __init__(self, llm_kwargs: dict[str, Any], served_model_names: list[str], server_kwargs: dict[str, Any],
                 num_threads: int) -> None:
        from quickdraft.entrypoints.async_engine import AsyncLLM
        from quickdraft.entrypoints.openai.api_server import build_app
        from quickdraft.llm import LLM

        # built on the engine's own thread (see AsyncLLM.load)
        self.engine = AsyncLLM.load(lambda: LLM(**llm_kwargs), num_threads=num_threads)
        self.asgi_app = build_app(self.engine, served_model_names, **server_kwargs)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.asgi_app.add_middleware(_ReplicaHeader, replica_id=self.replica_id)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return self.asgi_app


def build_serve_app(llm_kwargs: dict[str, Any], served_model_names: Sequence[str], *, num_replicas: int | None = 1,
                    autoscaling_config: dict[str, Any] | None = None, num_cpus_per_replica: float = 1.0,
                    num_gpus_per_replica: float = 0.0,
                    api_key: str | None = None, limits: ServerLimits | None = None,
                    allowed_origins: Sequence[str] | None = None, enable_log_requests: bool = False,
                    max_ongoing_requests: int | None = None,
                    shutdown_timeout: float = 10.0) -> serve.Application:
    """A Serve application of ``num_replicas`` replicas (or ``autoscaling_config``, Serve's dict:
    ``min_replicas``, ``max_replicas``, ``target_ongoing_requests``...), each with
    ``num_cpus_per_replica`` CPUs and ``num_gpus_per_replica`` GPUs (with ``llm_kwargs`` device
    "cuda"). ``max_ongoing_requests`` per replica defaults to what one
    server admits (``max_num_seqs`` running + ``limits.max_waiting_requests``); Serve queues the
    rest in its proxy. On shutdown a replica's running requests get ``shutdown_timeout`` seconds
    to finish."""
    if not served_model_names:
        raise ValueError("served_model_names must name at least one model.")
    if autoscaling_config is None and (not isinstance(num_replicas, int) or num_replicas < 1):
        raise ValueError(f"num_replicas must be a positive integer, got {num_replicas!r}.")
    if not num_cpus_per_replica > 0:
        raise ValueError(f"num_cpus_per_replica must be positive, got {num_cpus_per_replica!r}.")
    limits = limits or ServerLimits()
    if max_ongoing_requests is None:
        waiting = limits.max_waiting_requests if limits.max_waiting_requests is not None else 4096
        max_ongoing_requests = int(llm_kwargs.get("max_num_seqs") or 256) + waiting
    actor_options: dict[str, Any] = {"num_cpus": num_cpus_per_replica}
    if num_gpus_per_replica:
        actor_options["num_gpus"] = num_gpus_per_replica
    options: dict[str, Any] = {"ray_actor_options": actor_options,
                               "max_ongoing_requests": max_ongoing_requests,
                               "graceful_shutdown_timeout_s": shutdown_timeout}
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = num_replicas
    deployment = serve.deployment(QuickdraftServer, name="quickdraft", **options)
    server_kwargs = {"api_key": api_key, "limits": limits, "allowed_origins": allowed_origins,
                     "enable_log_requests": enable_log_requests}
    return deployment.bind(dict(llm_kwargs), list(served_model_names), server_kwargs, int(num_cpus_per_replica))


class _StopDeploying(BaseException):
    """SIGTERM or SIGINT while Ray starts or the replicas deploy (a BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way swallows it)."""


def run_ray_server(llm_kwargs: dict[str, Any], *, served_model_names: Sequence[str], host: str = "127.0.0.1",
                   port: int = 8000, ray_address: str | None = None, **app_kwargs: Any) -> None:
    """Connect to Ray (``ray_address``, or a local instance), deploy the app on Serve's proxy at
    ``host:port`` and serve until SIGTERM or SIGINT; then delete the replicas and disconnect.

    The signals are handled from the start: one that comes while Ray starts or the replicas
    deploy (the proxy may already serve from the first replica that is up) interrupts the
    deployment, which is then deleted the same way, and the call returns normally."""
    import ray

    stop = threading.Event()
    deploying = [True]

    def on_signal(*_: Any) -> None:
        stop.set()
        if deploying[0]:
            deploying[0] = False  # raise once; the cleanup below runs undisturbed
            raise _StopDeploying

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            ray.init(address=ray_address, include_dashboard=False)
            serve.start(http_options={"host": host, "port": port})
            serve.run(build_serve_app(llm_kwargs, served_model_names, **app_kwargs), name="quickdraft",
                      route_prefix="/")
            deploying[0] = False
            logger.info("Serving %s on http://%s:%d with Ray Serve", served_model_names[0], host, port)
            while not stop.wait(1.0):
                pass
        except _StopDeploying:  # the handler has cleared `deploying`
            logger.info("Interrupted while deploying")
        logger.info("Shutting down: deleting the replicas")
    finally:
        deploying[0] = False
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
