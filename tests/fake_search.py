"""Loopback fakes of the search APIs Relay runs `web_search` tools with: a SearXNG instance's
JSON API (`FakeSearxng`), the Brave Search API (`FakeBrave`) and Tavily's (`FakeTavily`). Each
answers in its API's JSON shape from a small canned corpus (`CORPUS`: pages by a word of the
query), records every request, and fails on demand:

    with FakeSearxng() as searxng:      # or the fake_searxng fixture
        searxng.base_url                # what a config's `url` is
        searxng.pages = [Page(...)]     # this test's results, whatever the query
        searxng.fail(500)               # the API's own error answer; fail(429, body, headers)
        searxng.answer_raw(b"<html>")   # a 200 that is not JSON
        searxng.delay_s = 1.0           # answer (or fail) after a second
        searxng.requests[-1]            # the last request's query parameters (GET) or JSON
        searxng.headers[-1]             # body (POST), and its headers, lower-cased

The fixtures `fake_searxng`, `fake_brave` and `fake_tavily` share one server each per session
and reset it (pages, failures, delay, records) around every test. Brave's and Tavily's fakes
require their keys (`BRAVE_KEY`, `TAVILY_KEY`) as the real APIs do. As an engine that ignores
`site:` would, no fake filters by domain: results outside a caller's allowed domains reach it.
"""

from __future__ import annotations

import asyncio
import html
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from loopback_server import LoopbackServer, serve_forever
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

__all__ = [
    "BRAVE_KEY",
    "CORPUS",
    "TAVILY_KEY",
    "FakeBrave",
    "FakeSearxng",
    "FakeTavily",
    "Page",
    "brave_server",
    "fake_brave",
    "fake_searxng",
    "fake_tavily",
    "searxng_server",
    "tavily_server",
]

# Random, as real keys are: the scrubber redacts any 8 characters of a key, so a key spelling
# words would redact them from the messages under test too.
BRAVE_KEY = "BSAq7Vd2mXk9R4tY8wZ1nJ6cH3fG5sLp0e"
TAVILY_KEY = "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"


@dataclass(frozen=True, slots=True)
class Page:
    title: str
    url: str
    content: str


# What a query finds: the pages of every word of it that is a key here, in this order, once.
CORPUS: dict[str, list[Page]] = {
    "python": [
        Page(
            "Welcome to Python.org",
            "https://www.python.org/",
            "The official home of the Python Programming Language.",
        ),
        Page(
            "The Python Tutorial",
            "https://docs.python.org/3/tutorial/index.html",
            "Python is an easy to learn, powerful programming language.",
        ),
        Page(
            "Python (programming language) - Wikipedia",
            "https://en.wikipedia.org/wiki/Python_(programming_language)",
            "Python is a high-level, general-purpose programming language.",
        ),
        Page(
            "Python's asyncio: A Hands-On Walkthrough",
            "https://realpython.com/async-io-python/",
            "A walkthrough of async IO in Python & the asyncio package.",
        ),
    ],
    "paris": [
        Page("Paris - Wikipedia", "https://en.wikipedia.org/wiki/Paris", "Paris is the capital."),
        Page(
            "Paris je t'aime",
            "https://parisjetaime.com/eng/",
            "The official website of the Paris tourist office.",
        ),
    ],
    "weather": [
        Page(
            "National Weather Service",
            "https://www.weather.gov/",
            "Forecasts, warnings and weather data.",
        ),
        Page("Met Office", "https://www.metoffice.gov.uk/", "Weather and climate change."),
    ],
}
_WORD = re.compile(r"[a-z0-9]+")


def lookup(query: str) -> list[Page]:
    """The corpus's pages for `query`."""
    found: list[Page] = []
    for word in _WORD.findall(query.lower()):
        found += [page for page in CORPUS.get(word, []) if page not in found]
    return found


class _FakeSearchAPI(LoopbackServer):
    """What the three fakes share: canned pages, forced failures, a delay, the key check."""

    label = "search API"

    def __init__(
        self, routes: Sequence[BaseRoute], *, api_key: str | None = None, port: int = 0
    ) -> None:
        super().__init__(routes, api_key=api_key, port=port)
        self.pages: list[Page] | None = None
        self.delay_s = 0.0
        self._failure: tuple[int, bytes, str, dict[str, str]] | None = None

    def reset(self) -> None:
        super().reset()
        self.pages = None
        self.delay_s = 0.0
        self._failure = None

    def found(self, query: str) -> list[Page]:
        return list(self.pages) if self.pages is not None else lookup(query)

    def fail(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        """Answer every request with `status`: `body` as JSON (bytes as they are), by default
        the API's own error answer for that status."""
        if body is None:
            body = self.error_body(status)
        if isinstance(body, bytes):
            self._failure = (status, body, "text/html; charset=utf-8", headers or {})
        else:
            self._failure = (status, orjson.dumps(body), "application/json", headers or {})

    def answer_raw(self, body: bytes, status: int = 200) -> None:
        """Answer every request with `body`, labelled JSON whatever it is."""
        self._failure = (status, body, "application/json", {})

    def error_body(self, status: int) -> Any:
        raise NotImplementedError

    def key_given(self, request: Request) -> str | None:
        raise NotImplementedError

    async def gate(self, request: Request, payload: dict[str, Any]) -> Response | None:
        """Record the request; then the delay, a forced failure, or a refused key."""
        self.record(request, payload)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self._failure is not None:
            status, body, media_type, headers = self._failure
            return Response(body, status, headers, media_type)
        if self.api_key is not None and self.key_given(request) != self.api_key:
            return JSONResponse(self.error_body(401), 401)
        return None


class FakeSearxng(_FakeSearchAPI):
    """`GET /search` of a SearXNG instance with `json` in its formats (another format: 403, as
    an instance answers a format it does not serve). `unresponsive` lists the engines it says
    failed, as `[engine, reason]`."""

    label = "fake SearXNG"

    def __init__(self, port: int = 0) -> None:
        super().__init__([Route("/search", self._search, methods=["GET"])], port=port)
        self.unresponsive: list[list[str]] = []

    def reset(self) -> None:
        super().reset()
        self.unresponsive = []

    def error_body(self, status: int) -> Any:
        return f"<!DOCTYPE html><html><body><h1>Error {status}</h1></body></html>".encode()

    def key_given(self, request: Request) -> str | None:
        return None

    async def _search(self, request: Request) -> Response:
        params = dict(request.query_params)
        if (early := await self.gate(request, params)) is not None:
            return early
        if params.get("format") != "json":
            return Response(b"Forbidden", 403, media_type="text/plain")
        query = params.get("q", "")
        results = [
            {
                "url": page.url,
                "title": page.title,
                "content": page.content,
                "engine": "duckduckgo",
                "parsed_url": _split(page.url),
                "template": "default.html",
                "engines": ["duckduckgo", "brave"],
                "positions": [index + 1],
                "score": round(2.0 / (index + 1), 3),
                "category": "general",
            }
            for index, page in enumerate(self.found(query))
        ]
        return JSONResponse(
            {
                "query": query,
                "number_of_results": len(results),
                "results": results,
                "answers": [],
                "corrections": [],
                "infoboxes": [],
                "suggestions": [],
                "unresponsive_engines": self.unresponsive,
            }
        )


class FakeBrave(_FakeSearchAPI):
    """`GET /res/v1/web/search` of the Brave Search API, `X-Subscription-Token` required:
    `count` results at most (20 by default), titles and descriptions in Brave's markup (HTML
    entities, `<strong>` around the query's words), no `web` at all when nothing is found."""

    label = "fake Brave Search API"

    def __init__(self, api_key: str = BRAVE_KEY, port: int = 0) -> None:
        routes = [Route("/res/v1/web/search", self._search, methods=["GET"])]
        super().__init__(routes, api_key=api_key, port=port)

    def error_body(self, status: int) -> Any:
        code, detail = {
            401: ("SUBSCRIPTION_TOKEN_INVALID", "The provided subscription token is invalid."),
            422: ("VALIDATION", "Unable to validate request parameter(s)."),
            429: ("RATE_LIMITED", "Request rate limit exceeded for plan."),
        }.get(status, ("INTERNAL_ERROR", "An internal error occurred."))
        return {
            "type": "ErrorResponse",
            "error": {"id": str(uuid.uuid4()), "status": status, "code": code, "detail": detail},
            "time": 1_700_000_000,
        }

    def key_given(self, request: Request) -> str | None:
        return request.headers.get("x-subscription-token")

    async def _search(self, request: Request) -> Response:
        params = dict(request.query_params)
        if (early := await self.gate(request, params)) is not None:
            return early
        query = params.get("q", "")
        count = min(int(params.get("count", "20")), 20)
        words = set(_WORD.findall(query.lower()))
        answer: dict[str, Any] = {
            "type": "search",
            "query": {
                "original": query,
                "country": params.get("country", "us").lower(),
                "more_results_available": False,
            },
        }
        pages = self.found(query)[:count]
        if pages:
            answer["web"] = {
                "type": "search",
                "family_friendly": True,
                "results": [_brave_result(page, words) for page in pages],
            }
        return JSONResponse(answer)


def _split(url: str) -> list[str]:
    """A URL's parts as SearXNG's `parsed_url` lists them; none for one that does not parse
    (pages of a test may be broken on purpose)."""
    try:
        return list(urlsplit(url))
    except ValueError:
        return ["", "", "", "", ""]


def _brave_result(page: Page, words: set[str]) -> dict[str, Any]:
    scheme, netloc, path, _, _ = _split(page.url)
    return {
        "type": "search_result",
        "subtype": "generic",
        "title": _highlighted(page.title, words),
        "url": page.url,
        "description": _highlighted(page.content, words),
        "is_source_local": False,
        "is_source_both": False,
        "language": "en",
        "family_friendly": True,
        "meta_url": {"scheme": scheme, "netloc": netloc, "path": path},
    }


def _highlighted(text: str, words: set[str]) -> str:
    """Text as Brave writes it: HTML-escaped, the query's words in <strong>."""
    escaped = html.escape(text)
    for word in words:
        escaped = re.sub(rf"\b({re.escape(word)})\b", r"<strong>\1</strong>", escaped, flags=re.I)
    return escaped


class FakeTavily(_FakeSearchAPI):
    """`POST /search` of Tavily's API, `Authorization: Bearer` required: `max_results` results
    at most (5 by default), each with a score; a body without `query` is a 400."""

    label = "fake Tavily API"

    def __init__(self, api_key: str = TAVILY_KEY, port: int = 0) -> None:
        super().__init__(
            [Route("/search", self._search, methods=["POST"])], api_key=api_key, port=port
        )

    def error_body(self, status: int) -> Any:
        message = {
            400: "Invalid request: query is required.",
            401: "Unauthorized: missing or invalid API key.",
            429: "Your request has been blocked due to excessive requests.",
            432: "This request exceeds your plan's set usage limit.",
        }.get(status, "Internal server error.")
        return {"detail": {"error": message}}

    def key_given(self, request: Request) -> str | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return token if scheme == "Bearer" else None

    async def _search(self, request: Request) -> Response:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            body = None
        if (early := await self.gate(request, body if isinstance(body, dict) else {})) is not None:
            return early
        if not isinstance(body, dict) or not isinstance(body.get("query"), str):
            return JSONResponse(self.error_body(400), 400)
        pages = self.found(body["query"])[: min(int(body.get("max_results", 5)), 20)]
        return JSONResponse(
            {
                "query": body["query"],
                "follow_up_questions": None,
                "answer": None,
                "images": [],
                "results": [
                    {
                        "title": page.title,
                        "url": page.url,
                        "content": page.content,
                        "score": round(0.9 - 0.05 * index, 3),
                        "raw_content": None,
                    }
                    for index, page in enumerate(pages)
                ],
                "response_time": 0.42,
                "request_id": str(uuid.uuid4()),
            }
        )


def _fresh(server: _FakeSearchAPI) -> Iterator[Any]:
    server.reset()
    yield server
    server.reset()


@pytest.fixture(scope="session")
def searxng_server() -> Iterator[FakeSearxng]:
    with FakeSearxng() as server:
        yield server


@pytest.fixture
def fake_searxng(searxng_server: FakeSearxng) -> Iterator[FakeSearxng]:
    """The session's fake SearXNG, reset around the test."""
    yield from _fresh(searxng_server)


@pytest.fixture(scope="session")
def brave_server() -> Iterator[FakeBrave]:
    with FakeBrave() as server:
        yield server


@pytest.fixture
def fake_brave(brave_server: FakeBrave) -> Iterator[FakeBrave]:
    """The session's fake Brave Search API (key BRAVE_KEY), reset around the test."""
    yield from _fresh(brave_server)


@pytest.fixture(scope="session")
def tavily_server() -> Iterator[FakeTavily]:
    with FakeTavily() as server:
        yield server


@pytest.fixture
def fake_tavily(tavily_server: FakeTavily) -> Iterator[FakeTavily]:
    """The session's fake Tavily API (key TAVILY_KEY), reset around the test."""
    yield from _fresh(tavily_server)


if __name__ == "__main__":  # python tests/fake_search.py [PORT]: a fake SearXNG until interrupted
    serve_forever(FakeSearxng)
