"""AsyncLLM: an asyncio front for one LLMEngine, for servers with many concurrent requests.

One engine thread owns the engine (it is not thread-safe): it applies queued commands (add,
abort) between steps, calls ``step(stream=True)`` while there is work, and hands every
request's cumulative output to the event loop of whoever added it. Requests from any number
of connections therefore share the engine's continuous batch. The thread sleeps while idle.

Memory per request is bounded: outputs are cumulative, so a `RequestGroup` keeps only the
latest one per request; a client that stops reading costs one snapshot, not one per step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from quickdraft.llm import LLM
from quickdraft.metrics import Metric, engine_metrics
from quickdraft.outputs import RequestOutput
from quickdraft.sampling_params import SamplingParams

logger = logging.getLogger("quickdraft")


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served. ``shutting_down``: it was
    stopped on purpose (the server is shutting down), not by a failure."""

    def __init__(self, message: str, *, shutting_down: bool = False) -> None:
        super().__init__(message)
        self.shutting_down = shutting_down


class RequestTimeoutError(Exception):
    """A request ran past its timeout; it has been aborted."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"The request did not finish within the server's request timeout of {timeout:g} s "
                         "and was aborted.")
        self.timeout = timeout


CRASHED = ("The engine stopped after an internal error (see the server log); no request can be served until "
           "the server is restarted.")
SHUTTING_DOWN = "The server is shutting down."


@dataclasses.dataclass
class _Failure:
    """Put on a request's queue when the engine failed it."""

    request_id: str
    error: BaseException


@dataclasses.dataclass
class _Add:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float | None
    sink: Callable[[Any], None]
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future
    stream: bool = True


@dataclasses.dataclass
class _Abort:
    request_id: str


class _Stop:
    pass


def _resolve(fut: asyncio.Future, error: BaseException | None) -> None:
    if fut.done():  # the caller was cancelled meanwhile
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


def _snapshot(out: RequestOutput) -> RequestOutput:
    """A copy the engine thread will not mutate any more (logprob lists and metrics grow in place)."""
    outputs = [dataclasses.replace(o, logprobs=None if o.logprobs is None else list(o.logprobs))
               for o in out.outputs]
    prompt_lp = None if out.prompt_logprobs is None else list(out.prompt_logprobs)
    metrics = None if out.metrics is None else dataclasses.replace(out.metrics)
    return dataclasses.replace(out, outputs=outputs, prompt_logprobs=prompt_lp, metrics=metrics)


class AsyncLLM:
    """Serve an `LLM`'s engine to asyncio code. Call `start()` once, then `add_request` from any
    event loop; `shutdown()` stops the engine thread."""

    def __init__(self, llm: LLM, on_finished: Callable[[RequestOutput], None] | None = None) -> None:
        self.llm = llm
        self.engine = llm.engine
        self.tokenizer = llm.get_tokenizer()
        self.max_model_len = llm.config.max_model_len
        self.on_finished = on_finished  # called by the engine thread with each finished output
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # request id -> (sink, loop); touched by the engine thread only.
        self._sinks: dict[str, tuple[Callable[[Any], None], asyncio.AbstractEventLoop]] = {}
        # Requests that want every step's output; the others get only their final one, and while
        # none streams the engine builds no per-step outputs at all.
        self._streaming: set[str] = set()
        self._thread: threading.Thread | None = None
        self._go: threading.Event | None = None  # set by start() when load() built the engine
        self.dead_error: BaseException | None = None
        self._metrics: list[Metric] = engine_metrics(self.engine)

    @classmethod
    def load(cls, factory: Callable[[], LLM], on_finished: Callable[[RequestOutput], None] | None = None, *,
             num_threads: int | None = None) -> AsyncLLM:
        """Build the `LLM` (``factory()``) on the thread that will run its engine, and return the
        engine, not yet started; load errors are raised here. ``num_threads`` sets that thread's
        torch (and native kernel) threads first: the setting is per thread.

        Why: OpenMP keeps a pool of worker threads for every thread that starts parallel work.
        An `LLM` built on one thread (which runs its warm-up on that thread's pool) and stepped
        on another leaves two pools, more threads than cores on a small machine, and libgomp
        then nearly stops its workers' spin-waiting: measured here, decoding on the engine
        thread was 15% slower (23.0 s against 19.8 s for 256 prompts x 64 tokens) unless the
        model was also loaded there."""
        box: dict[str, Any] = {}
        loaded, go = threading.Event(), threading.Event()

        def main() -> None:
            try:
                if num_threads is not None:
                    import torch

                    torch.set_num_threads(max(1, num_threads))
                box["llm"] = factory()
            except BaseException as e:  # noqa: BLE001 - re-raised by load()
                box["error"] = e
                return
            finally:
                loaded.set()
            go.wait()
            box["engine"]._run()

        thread = threading.Thread(target=main, name="quickdraft-engine", daemon=True)
        thread.start()
        loaded.wait()
        if "error" in box:
            raise box["error"]
        engine = cls(box["llm"], on_finished)
        box["engine"] = engine
        engine._thread, engine._go = thread, go
        return engine

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self._go is not None:  # built by load(): its thread waits to run the engine
            self._go.set()
            self._go = None
            return
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="quickdraft-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        if self._thread is None:
            return
        self._commands.put(_Stop())
        if self._go is not None:  # never started: let the thread see the stop and end
            self._go.set()
            self._go = None
        self._thread.join(timeout)
        self._thread = None

    @property
    def is_running(self) -> bool:
        return (self._thread is not None and self._go is None and self._thread.is_alive()
                and self.dead_error is None)

    def get_metrics(self) -> list[Metric]:
        """The engine's metrics as of its last step (a snapshot, safe from any thread)."""
        return self._metrics

    def get_default_sampling_params(self) -> SamplingParams:
        return self.llm.get_default_sampling_params()

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> list[int]:
        """Raise ValueError for an empty, out-of-vocabulary or too long prompt, or token ids in
        the params outside the vocabulary; returns the prompt as it will run (reads only
        immutable engine settings, so it is safe outside the engine thread)."""
        return self.engine.validate_request(prompt_token_ids, params)

    # ---- requests -------------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                          params: SamplingParams, sink: Callable[[Any], None],
                          arrival_time: float | None = None, stream: bool = True) -> None:
        """Queue a request; ``sink`` is called on this event loop with each of its outputs
        (cumulative `RequestOutput`s, the last with ``finished``; only the last one unless
        ``stream``) or with a `_Failure`.
        Returns once the engine accepted it, raising its error (ValueError for invalid input)
        otherwise."""
        if not self.is_running:
            raise EngineDeadError(CRASHED) if self.dead_error is not None else EngineDeadError(
                SHUTTING_DOWN, shutting_down=True)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._commands.put(_Add(request_id, prompt, list(prompt_token_ids), params, arrival_time, sink, loop, done,
                                stream))
        try:
            await done
        except asyncio.CancelledError:
            self.abort(request_id)
            raise

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op once it finished); its KV blocks are freed before the next step."""
        self._commands.put(_Abort(request_id))

    # ---- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                if not self.engine.has_unfinished_requests():
                    if not self._apply(self._commands.get()):  # sleep until there is work
                        return
                while True:
                    try:
                        cmd = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    if not self._apply(cmd):
                        return
                if self.engine.has_unfinished_requests():
                    self._step()
                self._metrics = engine_metrics(self.engine)
        except BaseException as e:  # a bug in the loop itself: fail everything, refuse new work
            logger.exception("The engine thread stopped")
            self.dead_error = e
            self._fail_all(EngineDeadError(CRASHED))
        finally:
            self._fail_all(EngineDeadError(SHUTTING_DOWN, shutting_down=True))
            self._drain_commands()
            bm = self.engine.block_manager
            logger.info("Engine thread stopped; KV blocks in use: %d of %d.", bm.num_blocks - bm.num_free_blocks,
                        bm.num_blocks)

    def _apply(self, cmd: Any) -> bool:
        if isinstance(cmd, _Stop):
            return False
        if isinstance(cmd, _Abort):
            out = self.engine.abort_request(cmd.request_id)
            self._forget(cmd.request_id)
            if out is not None:
                self._finished(out)
        elif isinstance(cmd, _Add):
            if cmd.done.cancelled():
                return True
            try:
                self.engine.add_request(cmd.request_id, cmd.prompt, cmd.prompt_token_ids, cmd.params,
                                        arrival_time=cmd.arrival_time)
            except Exception as e:  # noqa: BLE001 - reported to the caller
                error: BaseException | None = e
            else:
                error = None
                self._sinks[cmd.request_id] = (cmd.sink, cmd.loop)
                if cmd.stream:
                    self._streaming.add(cmd.request_id)
            try:
                cmd.loop.call_soon_threadsafe(_resolve, cmd.done, error)
            except RuntimeError:  # the caller's event loop is closed
                self.engine.abort_request(cmd.request_id)
                self._forget(cmd.request_id)
        return True

    def _forget(self, request_id: str) -> None:
        self._sinks.pop(request_id, None)
        self._streaming.discard(request_id)

    def _step(self) -> None:
        try:
            outputs = self.engine.step(stream=bool(self._streaming))
        except Exception as e:  # noqa: BLE001 - keep serving: fail the batch, free its blocks
            logger.exception("Engine step failed; aborting the requests in flight")
            self._fail_all(e)
            return
        for out in outputs:
            target = self._sinks.get(out.request_id)
            if out.finished:
                self._forget(out.request_id)
                self._finished(out)
            elif out.request_id not in self._streaming:
                continue
            if target is not None:
                sink, loop = target
                try:
                    loop.call_soon_threadsafe(sink, _snapshot(out))
                except RuntimeError:  # the caller's event loop is closed: nobody is listening
                    self.engine.abort_request(out.request_id)
                    self._forget(out.request_id)

    def _finished(self, out: RequestOutput) -> None:
        if self.on_finished is not None:
            try:
                self.on_finished(out)
            except Exception:  # noqa: BLE001 - metrics must never break serving
                logger.exception("on_finished callback failed")

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self.engine.requests):
            try:
                self.engine.abort_request(request_id)
            except Exception:  # noqa: BLE001 - still tell every caller
                logger.exception("Could not abort request %s", request_id)
        sinks, self._sinks = self._sinks, {}
        self._streaming.clear()
        for request_id, (sink, loop) in sinks.items():
            try:
                loop.call_soon_threadsafe(sink, _Failure(request_id, error))
            except RuntimeError:  # that event loop is closed
                pass

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                try:
                    error = EngineDeadError(CRASHED) if self.dead_error is not None else EngineDeadError(
                        SHUTTING_DOWN, shutting_down=True)
                    cmd.loop.call_soon_threadsafe(_resolve, cmd.done, error)
                except RuntimeError:
                    pass


class RequestGroup:
    """The engine requests behind one API call (several prompts, or one), read together.

    ``async for updates in group`` yields dicts request id -> latest cumulative output; outputs
    that arrive while the reader is busy replace each other (they are cumulative), so a slow
    reader holds one output per request. `abort()` aborts whatever is unfinished, e.g. when the
    client disconnected. ``timeout`` (seconds from creation) aborts the group and raises
    `RequestTimeoutError` from the reader. ``reserved`` admission slots (see the server's
    limits) are given back through ``on_release`` as requests finish, abort or fail to add.
    With ``stream=False`` only final outputs are delivered (a reader of `results()` needs no
    more), which spares the engine thread a snapshot per request per step.
    A request the engine aborted alone (engine/errors.py) ends the group's reading with its
    error, raised, the others aborted (one API call, one answer), unless ``raise_errors=False``:
    its output, with ``error`` set, is then delivered like any other."""

    def __init__(self, engine: AsyncLLM, *, timeout: float | None = None, reserved: int = 0,
                 on_release: Callable[[int], None] | None = None, stream: bool = True,
                 raise_errors: bool = True) -> None:
        self.engine = engine
        self.stream = stream
        self.raise_errors = raise_errors
        self.request_ids: list[str] = []
        self.unfinished: set[str] = set()
        self.final: dict[str, RequestOutput] = {}
        self.timeout = timeout
        self._deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        self._latest: dict[str, RequestOutput] = {}
        self._failure: BaseException | None = None
        self._ready = asyncio.Event()
        self._reserved = reserved
        self._on_release = on_release

    def _deliver(self, item: Any) -> None:
        """Called on the event loop by the engine thread (via call_soon_threadsafe)."""
        if isinstance(item, _Failure):
            if self._failure is None:
                self._failure = item.error
        elif item.request_id in self.unfinished:
            self._latest[item.request_id] = item
        else:
            return
        self._ready.set()

    def _release(self, count: int) -> None:
        if count and self._on_release is not None:
            self._on_release(count)

    async def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                  arrival_time: float | None = None) -> None:
        # Listen before the engine has it: its first outputs (a short request's last one too) can be
        # delivered on this loop before this coroutine resumes from the add.
        self.unfinished.add(request_id)
        try:
            await self.engine.add_request(request_id, prompt, prompt_token_ids, params, self._deliver, arrival_time,
                                          stream=self.stream)
        except BaseException:
            self.unfinished.discard(request_id)
            self._latest.pop(request_id, None)
            raise
        self.request_ids.append(request_id)
        if self._reserved:
            self._reserved -= 1  # the slot now belongs to the running request

    async def add_many(self, requests: Sequence[tuple[str, str | None, list[int], SamplingParams]],
                       arrival_time: float | None = None) -> list[BaseException | None]:
        """Add (request_id, prompt, prompt_token_ids, params) tuples together: they reach the
        engine between the same two steps and start in one batch (added one after the other,
        each would wait for a step, and the batch would fill one request per step). Returns each
        one's error (e.g. ValueError for invalid input) or None; ``request_ids`` keeps their order."""
        before = len(self.request_ids)
        errors = await asyncio.gather(*(self.add(rid, prompt, ids, params, arrival_time)
                                        for rid, prompt, ids, params in requests), return_exceptions=True)
        added = set(self.request_ids[before:])
        self.request_ids[before:] = [r[0] for r in requests if r[0] in added]
        for e in errors:
            if isinstance(e, asyncio.CancelledError):
                raise e
        return [e if isinstance(e, BaseException) else None for e in errors]

    def abort(self) -> None:
        for request_id in self.unfinished:
            self.engine.abort(request_id)
        self._release(len(self.unfinished) + self._reserved)
        self.unfinished.clear()
        self._reserved = 0

    async def _wait(self) -> None:
        while not self._latest and self._failure is None:
            self._ready.clear()
            if self._deadline is None:
                await self._ready.wait()
                continue
            remaining = self._deadline - asyncio.get_running_loop().time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                await asyncio.wait_for(self._ready.wait(), remaining)
            except TimeoutError:
                self.abort()
                raise RequestTimeoutError(self.timeout) from None

    async def __aiter__(self) -> AsyncIterator[dict[str, RequestOutput]]:
        while self.unfinished:
            await self._wait()
            if self._failure is not None:
                self.abort()
                raise self._failure
            latest, self._latest = self._latest, {}
            for request_id, out in latest.items():
                if out.error is not None and self.raise_errors:
                    self.unfinished.discard(request_id)
                    self._release(1)
                    self.abort()
                    raise out.error
                if out.finished:
                    self.final[request_id] = out
                    self.unfinished.discard(request_id)
                    self._release(1)
            if latest:
                yield latest

    async def results(self) -> list[RequestOutput]:
        """Wait for every request to finish; outputs in the order they were added."""
        async for _ in self:
            pass
        return [self.final[r] for r in self.request_ids]
