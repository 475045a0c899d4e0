"""relay.tools.web_search against loopback fakes of SearXNG, Brave Search and Tavily
(tests/fake_search.py): what each backend sends, what it makes of the answers, its failures,
and the configuration it is built from."""

from __future__ import annotations

import base64
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from fake_search import BRAVE_KEY, CORPUS, TAVILY_KEY, FakeBrave, FakeSearxng, FakeTavily, Page
from pydantic import TypeAdapter, ValidationError

from relay.models.web_search import WebSearchConfig
from relay.providers.credentials import FRAGMENT, REDACTED
from relay.tools.web_search import (
    MAX_SNIPPET,
    TAVILY_COUNTRIES,
    SearchBackend,
    SearchFailed,
    SearchResult,
    build,
)

CONFIG: TypeAdapter[Any] = TypeAdapter(WebSearchConfig)
BRAVE_ENV = "RELAY_TEST_BRAVE_KEY"
TAVILY_ENV = "RELAY_TEST_TAVILY_KEY"
PYTHON = CORPUS["python"]


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BRAVE_ENV, BRAVE_KEY)
    monkeypatch.setenv(TAVILY_ENV, TAVILY_KEY)


def config_of(kind: str, url: str, **more: Any) -> dict[str, Any]:
    keys = {"brave": {"api_key_env": BRAVE_ENV}, "tavily": {"api_key_env": TAVILY_ENV}}
    return {"backend": kind, "url": url, **keys.get(kind, {}), **more}


@asynccontextmanager
async def backend(kind: str, url: str, **more: Any) -> AsyncIterator[SearchBackend]:
    search = build(CONFIG.validate_python(config_of(kind, url, **more)))
    try:
        yield search
    finally:
        await search.aclose()


def results_of(pages: list[Page]) -> list[SearchResult]:
    return [SearchResult(page.title, page.url, page.content) for page in pages]


# What every backend does alike, each against its fake -------------------------------------------

KINDS = ["searxng", "brave", "tavily"]
NAMES = {"searxng": "SearXNG", "brave": "Brave Search", "tavily": "Tavily"}
KEYS = {"searxng": None, "brave": BRAVE_KEY, "tavily": TAVILY_KEY}
Fake = FakeSearxng | FakeBrave | FakeTavily


@pytest.fixture(params=KINDS)
def api(request: pytest.FixtureRequest) -> tuple[str, Fake]:
    """Each backend's kind and its fake, reset."""
    return request.param, request.getfixturevalue(f"fake_{request.param}")


def sent_query(kind: str, fake: Fake) -> str:
    return str(fake.requests[-1]["q" if kind != "tavily" else "query"])


async def test_results_are_read_in_order(api: tuple[str, Fake]) -> None:
    kind, fake = api
    async with backend(kind, fake.base_url) as search:
        found = await search.search("python", max_results=4)
    assert found == results_of(PYTHON)  # Brave's markup is gone
    assert sent_query(kind, fake) == "python"


async def test_max_results_is_honoured(api: tuple[str, Fake]) -> None:
    kind, fake = api
    async with backend(kind, fake.base_url) as search:
        assert await search.search("python", max_results=2) == results_of(PYTHON[:2])
        assert await search.search("python", max_results=50) == results_of(PYTHON)
    if kind == "brave":
        assert fake.requests[0]["count"] == "2"
        assert fake.requests[1]["count"] == "20"
    if kind == "tavily":
        assert [body["max_results"] for body in fake.requests] == [2, 20]


async def test_a_url_is_given_once(api: tuple[str, Fake]) -> None:
    kind, fake = api
    fake.pages = [
        Page("One", "https://example.com/a", "first"),
        Page("One again", "https://example.com/a/", "a trailing slash"),
        Page("One's section", "https://example.com/a#part", "a fragment"),
        Page("One, plain", "http://EXAMPLE.com/a", "another scheme, another case"),
        Page("Two", "https://example.com/a?page=2", "another query"),
        Page("Not the web", "ftp://example.com/file", "not http"),
        Page("", "https://example.org/untitled", "no title"),
        Page("Broken", "https://[::1/", "an address that does not parse"),
    ]
    async with backend(kind, fake.base_url) as search:
        found = await search.search("anything", max_results=10)
    assert found == [
        SearchResult("One", "https://example.com/a", "first"),
        SearchResult("Two", "https://example.com/a?page=2", "another query"),
        SearchResult("https://example.org/untitled", "https://example.org/untitled", "no title"),
    ]


async def test_long_snippets_are_cut(api: tuple[str, Fake]) -> None:
    kind, fake = api
    fake.pages = [Page("Long\n  title", "https://example.com/", "word " * 1000)]
    async with backend(kind, fake.base_url) as search:
        [result] = await search.search("anything", max_results=1)
    assert result.title == "Long title"
    assert len(result.snippet) == MAX_SNIPPET
    assert result.snippet.endswith("word…")


async def test_one_allowed_domain_narrows_the_query_and_filters(api: tuple[str, Fake]) -> None:
    kind, fake = api
    async with backend(kind, fake.base_url) as search:
        found = await search.search("python", max_results=5, domains=["https://Python.org/x"])
    # www.python.org and docs.python.org are within python.org; the fake ignores the filter,
    # so the others reached the backend and were dropped there.
    assert found == results_of(PYTHON[:2])
    if kind == "tavily":
        assert fake.requests[-1]["include_domains"] == ["python.org"]
        assert fake.requests[-1]["query"] == "python"
    else:
        assert sent_query(kind, fake) == "python site:python.org"


async def test_several_allowed_domains_filter_only(api: tuple[str, Fake]) -> None:
    kind, fake = api
    fake.pages = [*PYTHON, Page("Lookalike", "https://notwikipedia.org/python", "not it")]
    domains = ["docs.python.org", "wikipedia.org", "realpython.com"]
    async with backend(kind, fake.base_url) as search:
        found = await search.search("python", max_results=5, domains=domains)
    assert found == results_of(PYTHON[1:])
    if kind == "tavily":
        assert fake.requests[-1]["include_domains"] == domains
    else:
        assert sent_query(kind, fake) == "python"
    if kind == "brave":
        assert fake.requests[-1]["count"] == "20"  # a whole page, for the filter to keep enough


async def test_long_queries_are_cut(api: tuple[str, Fake]) -> None:
    kind, fake = api
    async with backend(kind, fake.base_url) as search:
        await search.search("python  " + "x" * 1000, max_results=5, domains=["python.org"])
    # What Brave and Tavily take at most; no room was left for a site: term.
    assert sent_query(kind, fake) == "python " + "x" * 393


async def test_empty_query_fails_before_any_request(api: tuple[str, Fake]) -> None:
    kind, fake = api
    async with backend(kind, fake.base_url) as search:
        with pytest.raises(SearchFailed, match="empty"):
            await search.search(" \n ", max_results=5)
    assert fake.requests == []


# Failures -----------------------------------------------------------------------------------------


def assert_keyless(kind: str, text: str) -> None:
    """No part of the backend's key (FRAGMENT characters or more) is in `text`."""
    key = KEYS[kind]
    if key is None:
        return
    fragments = {key[start : start + FRAGMENT] for start in range(len(key) - FRAGMENT + 1)}
    assert not any(fragment in text for fragment in fragments), text


async def failure(kind: str, url: str, **more: Any) -> SearchFailed:
    async with backend(kind, url, **more) as search:
        with pytest.raises(SearchFailed) as caught:
            await search.search("python", max_results=5)
    assert_keyless(kind, str(caught.value))
    return caught.value


@pytest.mark.parametrize("status", [500, 502, 503, 400, 404])
async def test_http_errors_name_the_backend_and_status(api: tuple[str, Fake], status: int) -> None:
    kind, fake = api
    fake.fail(status)
    error = await failure(kind, fake.base_url)
    assert str(error).startswith(f"{NAMES[kind]} answered HTTP {status}")
    assert error.status == status


async def test_rate_limits(api: tuple[str, Fake]) -> None:
    kind, fake = api
    fake.fail(429, headers={"Retry-After": "3"})
    error = await failure(kind, fake.base_url)
    assert error.status == 429
    assert str(error).startswith(f"{NAMES[kind]} answered HTTP 429")
    assert "rate limit" in str(error) or "limiter" in str(error)


async def test_an_answer_that_is_not_json(api: tuple[str, Fake]) -> None:
    kind, fake = api
    fake.answer_raw(b"<html><body>Welcome!</body></html>")
    error = await failure(kind, fake.base_url)
    assert str(error) == f"{NAMES[kind]} answered with something other than JSON"


async def test_json_of_another_shape(api: tuple[str, Fake]) -> None:
    kind, fake = api
    fake.answer_raw(b'{"results": "none", "web": 3}')
    error = await failure(kind, fake.base_url)
    assert str(error) == f"{NAMES[kind]} answered JSON without a list of results"


async def test_a_slow_api_times_out(api: tuple[str, Fake]) -> None:
    kind, fake = api
    fake.delay_s = 1.0
    error = await failure(kind, fake.base_url, timeout_s=0.2)
    assert str(error) == f"{NAMES[kind]} did not answer within 0.2 s"
    assert error.status is None


@pytest.mark.parametrize("kind", KINDS)
async def test_connection_refused(kind: str) -> None:
    with socket.socket() as probe:  # a port nothing listens on once it is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = await failure(kind, f"http://127.0.0.1:{port}")
    assert str(error).startswith(f"{NAMES[kind]} could not be reached: 127.0.0.1:{port}")


@pytest.mark.parametrize(("kind", "status"), [("brave", 401), ("brave", 422), ("tavily", 401)])
async def test_the_api_s_message_is_quoted(
    request: pytest.FixtureRequest, kind: str, status: int
) -> None:
    fake = request.getfixturevalue(f"fake_{kind}")
    fake.fail(status)
    error = await failure(kind, fake.base_url)
    detail = fake.error_body(status)
    message = detail["error"]["detail"] if kind == "brave" else detail["detail"]["error"]
    assert str(error).startswith(f"{NAMES[kind]} answered HTTP {status}: {message}")
    if status == 401:
        env = BRAVE_ENV if kind == "brave" else TAVILY_ENV
        assert str(error).endswith(f"(check the key in {env})")


@pytest.mark.parametrize("kind", ["brave", "tavily"])
async def test_a_wrong_key(
    kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = request.getfixturevalue(f"fake_{kind}")
    env = f"RELAY_TEST_WRONG_{kind.upper()}_KEY"
    monkeypatch.setenv(env, "wrong-key-Zp4Lq8Rt2Vx6")
    async with backend(kind, fake.base_url, api_key_env=env) as search:
        with pytest.raises(SearchFailed) as caught:
            await search.search("python", max_results=5)
    assert caught.value.status == 401
    assert "wrong-key" not in str(caught.value)


@pytest.mark.parametrize("kind", ["brave", "tavily"])
async def test_an_echoed_key_is_scrubbed(kind: str, request: pytest.FixtureRequest) -> None:
    fake = request.getfixturevalue(f"fake_{kind}")
    key = KEYS[kind]
    assert key is not None
    echo = f"token {key} refused; {key[:12]}... is not a key; header Bearer%20{key[3:20]}"
    body = {"error": {"detail": echo}} if kind == "brave" else {"detail": {"error": echo}}
    fake.fail(403, body)
    error = await failure(kind, fake.base_url)  # asserts that no fragment is left
    assert REDACTED in str(error)


async def test_searxng_without_the_json_format(fake_searxng: FakeSearxng) -> None:
    fake_searxng.fail(403, b"Forbidden")
    error = await failure("searxng", fake_searxng.base_url)
    assert str(error) == (
        "SearXNG answered HTTP 403 (is json listed in search.formats of its settings.yml?)"
    )


async def test_a_redirect_says_where_to(fake_searxng: FakeSearxng) -> None:
    fake_searxng.fail(301, b"", headers={"Location": "https://searx.example.com/search"})
    error = await failure("searxng", fake_searxng.base_url)
    assert str(error) == (
        "SearXNG answered HTTP 301 (redirected to https://searx.example.com/search: set url to it)"
    )


async def test_searxng_whose_engines_all_failed(fake_searxng: FakeSearxng) -> None:
    fake_searxng.pages = []
    fake_searxng.unresponsive = [["google", "timeout"], ["duckduckgo", "CAPTCHA"]]
    error = await failure("searxng", fake_searxng.base_url)
    assert str(error) == "no engine of SearXNG answered (google: timeout, duckduckgo: CAPTCHA)"
    # Some results, however many engines failed, are results.
    fake_searxng.pages = PYTHON[:1]
    async with backend("searxng", fake_searxng.base_url) as search:
        assert await search.search("python", max_results=5) == results_of(PYTHON[:1])


async def test_nothing_found_is_no_failure(api: tuple[str, Fake]) -> None:
    kind, fake = api
    async with backend(kind, fake.base_url) as search:
        assert await search.search("zzyzx", max_results=5) == []


# What each API is sent ----------------------------------------------------------------------------


async def test_searxng_request(fake_searxng: FakeSearxng) -> None:
    async with backend("searxng", fake_searxng.base_url) as search:
        await search.search("python", max_results=3, country="DE")
    # No country parameter exists; nothing else is sent by default.
    assert fake_searxng.requests[-1] == {"q": "python", "format": "json"}
    async with backend(
        "searxng",
        fake_searxng.base_url,
        categories=["general", "it"],
        engines=["duckduckgo", "brave"],
        language="en-GB",
        safesearch=2,
    ) as search:
        await search.search("python", max_results=3)
    assert fake_searxng.requests[-1] == {
        "q": "python",
        "format": "json",
        "categories": "general,it",
        "engines": "duckduckgo,brave",
        "language": "en-GB",
        "safesearch": "2",
    }
    assert fake_searxng.headers[-1]["accept"] == "application/json"
    assert "authorization" not in fake_searxng.headers[-1]


async def test_searxng_behind_basic_auth(fake_searxng: FakeSearxng) -> None:
    url = fake_searxng.base_url.replace("http://", "http://relay:s3cr%40t-Pw9x@")
    async with backend("searxng", url) as search:
        await search.search("python", max_results=1)
    token = base64.b64encode(b"relay:s3cr@t-Pw9x").decode()
    assert fake_searxng.headers[-1]["authorization"] == f"Basic {token}"


async def test_searxng_under_a_path(fake_searxng: FakeSearxng) -> None:
    # An instance served under a prefix: /search is added to it.
    async with backend("searxng", f"{fake_searxng.base_url}/searx/") as search:
        with pytest.raises(SearchFailed, match="HTTP 404"):
            await search.search("python", max_results=1)
    assert fake_searxng.requests == []  # the fake answers /search only: the prefix was kept


async def test_brave_request(fake_brave: FakeBrave) -> None:
    async with backend("brave", fake_brave.base_url) as search:
        await search.search("python", max_results=3, country="de")
    assert fake_brave.requests[-1] == {
        "q": "python",
        "count": "3",
        "result_filter": "web",
        "country": "DE",
    }
    headers = fake_brave.headers[-1]
    assert headers["x-subscription-token"] == BRAVE_KEY
    assert headers["accept"] == "application/json"
    assert "authorization" not in headers
    assert BRAVE_KEY not in str(fake_brave.requests[-1])


@pytest.mark.parametrize("country", ["IS", "Germany", "", None])
async def test_brave_is_sent_only_countries_it_knows(
    fake_brave: FakeBrave, country: str | None
) -> None:
    async with backend("brave", fake_brave.base_url) as search:
        await search.search("python", max_results=3, country=country)
    assert "country" not in fake_brave.requests[-1]


async def test_brave_markup_is_plain_text(fake_brave: FakeBrave) -> None:
    # The fake writes "<strong>Python</strong>&#x27;s <strong>asyncio</strong>: ...".
    async with backend("brave", fake_brave.base_url) as search:
        found = await search.search("python asyncio", max_results=5)
    assert found[3] == SearchResult(
        "Python's asyncio: A Hands-On Walkthrough",
        "https://realpython.com/async-io-python/",
        "A walkthrough of async IO in Python & the asyncio package.",
    )


async def test_tavily_request(fake_tavily: FakeTavily) -> None:
    async with backend("tavily", fake_tavily.base_url, search_depth="advanced") as search:
        await search.search("python", max_results=3, country="gb", domains=["python.org"])
    assert fake_tavily.requests[-1] == {
        "query": "python",
        "max_results": 3,
        "search_depth": "advanced",
        "include_domains": ["python.org"],
        "country": "united kingdom",
    }
    headers = fake_tavily.headers[-1]
    assert headers["authorization"] == f"Bearer {TAVILY_KEY}"
    assert headers["content-type"] == "application/json"
    async with backend("tavily", fake_tavily.base_url) as search:
        await search.search("python", max_results=3, country="XK")  # not in Tavily's list
    assert fake_tavily.requests[-1] == {
        "query": "python",
        "max_results": 3,
        "search_depth": "basic",
    }


def test_tavily_country_names() -> None:
    assert all(len(code) == 2 and code.isupper() for code in TAVILY_COUNTRIES)
    assert all(name == name.strip().lower() and name for name in TAVILY_COUNTRIES.values())
    assert TAVILY_COUNTRIES["US"] == "united states"
    assert TAVILY_COUNTRIES["KR"] == "south korea"


# Configuration ------------------------------------------------------------------------------------


def validation_error(data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        CONFIG.validate_python(data)
    return str(caught.value)


def test_defaults() -> None:
    searxng = CONFIG.validate_python({"backend": "searxng", "url": "http://searx:8080"})
    assert (searxng.max_results, searxng.timeout_s, searxng.price_per_search_usd) == (5, 10.0, 0)
    brave = CONFIG.validate_python({"backend": "brave", "api_key_env": "K"})
    assert brave.url == "https://api.search.brave.com"
    tavily = CONFIG.validate_python({"backend": "tavily", "api_key_env": "K"})
    assert (tavily.url, tavily.search_depth) == ("https://api.tavily.com", "basic")


@pytest.mark.parametrize("backend_value", ["google", None])
def test_an_unknown_backend(backend_value: str | None) -> None:
    data = {"url": "http://searx:8080"}
    if backend_value is not None:
        data["backend"] = backend_value
    assert "backend must be one of searxng, brave, tavily" in validation_error(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"backend": "searxng"}, "url\n  Field required"),
        ({"backend": "searxng", "url": "searx:8080"}, "must begin with http:// or https://"),
        ({"backend": "searxng", "url": "http://"}, "names no host"),
        ({"backend": "searxng", "url": "http://searx:80800"}, "Port out of range"),
        ({"backend": "searxng", "url": "http://s", "api_key_env": "K"}, "Extra inputs"),
        ({"backend": "searxng", "url": "http://s", "safesearch": 3}, "safesearch"),
        ({"backend": "brave"}, "api_key_env\n  Field required"),
        ({"backend": "brave", "api_key_env": "K", "search_depth": "basic"}, "Extra inputs"),
        ({"backend": "tavily", "api_key_env": "K", "search_depth": "deep"}, "search_depth"),
        ({"backend": "tavily", "api_key_env": "K", "max_results": 0}, "greater than or equal"),
        ({"backend": "tavily", "api_key_env": "K", "max_results": 21}, "less than or equal"),
        ({"backend": "brave", "api_key_env": "K", "price_per_search_usd": -1}, "greater than"),
        ({"backend": "brave", "api_key_env": "K", "timeout_s": 0}, "greater than"),
    ],
)
def test_invalid_configs(data: dict[str, Any], message: str) -> None:
    assert message in validation_error(data)


@pytest.mark.parametrize("kind", ["brave", "tavily"])
def test_a_key_variable_that_is_not_set(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAY_TEST_UNSET_KEY", raising=False)
    config = CONFIG.validate_python({"backend": kind, "api_key_env": "RELAY_TEST_UNSET_KEY"})
    with pytest.raises(ValueError) as caught:
        build(config)
    assert str(caught.value) == (
        f"web search backend {kind}: environment variable RELAY_TEST_UNSET_KEY is not set"
    )
