"""Web search for the hosted `web_search` tools, through the search API the operator configured
(`relay.models.web_search`): a SearXNG instance's JSON API, the Brave Search API or Tavily,
behind one small interface (`SearchBackend`, made by `build`).

Every backend gives the same thing back: at most `max_results` results, in the API's order,
one per URL, only from the allowed domains when the tool lists some, with plain-text titles
and snippets cut to length. Every failure (unreachable, slow, a refusal, an answer that is not
the API's JSON) is a `SearchFailed` that names the backend and what went wrong; its text
quotes the API only after the key has been scrubbed from it, so it is safe to show a client.

HTTP goes through Relay's own upstream client (`relay.providers.http_client`: pooled keep-alive
connections, verified HTTPS, the environment's proxy), whose `send` takes any method (a GET, as
`relay check` reads a models list).
"""

from __future__ import annotations

import asyncio
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlencode, urlsplit

import orjson

from relay.models.web_search import BraveConfig, SearxngConfig, TavilyConfig, WebSearchConfig
from relay.providers.credentials import Scrubber, basic_token
from relay.providers.http_client import ConnectFailed, HTTPClient, HTTPClientError, Response
from relay.providers.proxy import proxy_for

MAX_RESULTS = 20  # what Brave and Tavily give at most; SearXNG's first page is about as long
MAX_TITLE = 300
MAX_SNIPPET = 1000  # a snippet is a hint of the page, not the page: the model reads many
MAX_BODY = 8 << 20  # bytes; a larger answer is no page of search results
MAX_DETAIL = 300  # characters of an API's own error message quoted in a failure
MAX_CONNECTIONS = 64  # per backend and process; more searches at once wait for one
# Brave refuses longer queries (400 characters, 50 words); Tavily asks for 400 characters too.
MAX_QUERY = 400
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")

# Brave's `country` takes these codes only (another is refused with a 422, which would fail a
# search that the location only meant to steer).
_BRAVE_CODES = "AR AU AT BE BR CA CL DK FI FR DE HK IN ID IT JP KR MY MX NL NZ NO CN PL PT PH RU"
BRAVE_COUNTRIES = frozenset(f"{_BRAVE_CODES} SA ZA ES SE CH TW TR GB US".split())
# Tavily's `country` takes a lower-case English name from its own list, not a code: that list,
# by ISO 3166-1 code. A country missing here is not sent (an unknown name fails the search).
_TAVILY_NAMES = """
AF afghanistan, AL albania, DZ algeria, AD andorra, AO angola, AR argentina, AM armenia,
AU australia, AT austria, AZ azerbaijan, BS bahamas, BH bahrain, BD bangladesh, BB barbados,
BY belarus, BE belgium, BZ belize, BJ benin, BT bhutan, BO bolivia, BA bosnia and herzegovina,
BW botswana, BR brazil, BN brunei, BG bulgaria, BF burkina faso, BI burundi, KH cambodia,
CM cameroon, CA canada, CV cape verde, CF central african republic, TD chad, CL chile,
CN china, CO colombia, KM comoros, CG congo, CR costa rica, HR croatia, CU cuba, CY cyprus,
CZ czech republic, DK denmark, DJ djibouti, DO dominican republic, EC ecuador, EG egypt,
SV el salvador, GQ equatorial guinea, ER eritrea, EE estonia, ET ethiopia, FJ fiji,
FI finland, FR france, GA gabon, GM gambia, GE georgia, DE germany, GH ghana, GR greece,
GT guatemala, GN guinea, HT haiti, HN honduras, HU hungary, IS iceland, IN india,
ID indonesia, IR iran, IQ iraq, IE ireland, IL israel, IT italy, JM jamaica, JP japan,
JO jordan, KZ kazakhstan, KE kenya, KW kuwait, KG kyrgyzstan, LV latvia, LB lebanon,
LS lesotho, LR liberia, LY libya, LI liechtenstein, LT lithuania, LU luxembourg,
MG madagascar, MW malawi, MY malaysia, MV maldives, ML mali, MT malta, MR mauritania,
MU mauritius, MX mexico, MD moldova, MC monaco, MN mongolia, ME montenegro, MA morocco,
MZ mozambique, MM myanmar, NA namibia, NP nepal, NL netherlands, NZ new zealand,
NI nicaragua, NE niger, NG nigeria, KP north korea, MK north macedonia, NO norway, OM oman,
PK pakistan, PA panama, PG papua new guinea, PY paraguay, PE peru, PH philippines,
PL poland, PT portugal, QA qatar, RO romania, RU russia, RW rwanda, SA saudi arabia,
SN senegal, RS serbia, SG singapore, SK slovakia, SI slovenia, SO somalia, ZA south africa,
KR south korea, SS south sudan, ES spain, LK sri lanka, SD sudan, SE sweden,
CH switzerland, SY syria, TW taiwan, TJ tajikistan, TZ tanzania, TH thailand, TG togo,
TT trinidad and tobago, TN tunisia, TR turkey, TM turkmenistan, UG uganda, UA ukraine,
AE united arab emirates, GB united kingdom, US united states, UY uruguay, UZ uzbekistan,
VE venezuela, VN vietnam, YE yemen, ZM zambia, ZW zimbabwe
"""
TAVILY_COUNTRIES = {
    code: name
    for code, _, name in (entry.strip().partition(" ") for entry in _TAVILY_NAMES.split(","))
}


@dataclass(frozen=True, slots=True)
class SearchResult:
    title: str
    url: str
    snippet: str


class SearchFailed(Exception):
    """A search that has no results to give: its text says which backend and why, and is safe
    to show a client (never the key). `status`: the API's HTTP status, None when none came."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class SearchBackend(Protocol):
    async def search(
        self,
        query: str,
        *,
        max_results: int,
        domains: Sequence[str] = (),
        country: str | None = None,
    ) -> list[SearchResult]:
        """At most `max_results` results for `query`; with `domains`, only from those domains
        (and their subdomains); `country` (ISO 3166-1 alpha-2) steers the search where the API
        can be told. Raises SearchFailed."""
        ...

    async def aclose(self) -> None: ...


def build(config: WebSearchConfig) -> SearchBackend:
    """The backend `config` names. Raises ValueError when the variable its key is read from is
    not set."""
    if isinstance(config, SearxngConfig):
        return SearxngSearch(config)
    try:
        key = config.api_key()
    except ValueError as error:
        raise ValueError(f"web search backend {config.backend}: {error}") from None
    if isinstance(config, BraveConfig):
        return BraveSearch(config, key)
    return TavilySearch(config, key)


Found = list[tuple[Any, Any, Any]]  # (title, url, snippet) as an API wrote them


class _Backend:
    """What the backends share: the query and the allowed domains made ready before the API
    is asked (`_found`), and the results kept from its answer after."""

    _api: _Api
    markup = False  # the API writes titles and snippets as HTML

    async def search(
        self,
        query: str,
        *,
        max_results: int,
        domains: Sequence[str] = (),
        country: str | None = None,
    ) -> list[SearchResult]:
        allowed = _allowed(domains)
        wanted = _bounded(max_results)
        found = await self._found(_query(query), wanted, allowed, _country_code(country))
        return _kept(found, wanted, allowed, markup=self.markup)

    async def _found(
        self, query: str, max_results: int, allowed: list[str], country: str | None
    ) -> Found:
        raise NotImplementedError

    async def aclose(self) -> None:
        await self._api.aclose()


class SearxngSearch(_Backend):
    """GET `/search?format=json` on a SearXNG instance. `country` is not sent: SearXNG has no
    parameter for it (a configured `language` such as en-GB is the nearest, and the
    operator's choice)."""

    def __init__(self, config: SearxngConfig) -> None:
        hints = {
            403: "is json listed in search.formats of its settings.yml?",
            429: "its bot limiter refused Relay: turn it off, or pass-list Relay's address",
        }
        self._api = _Api("SearXNG", config.url, timeout_s=config.timeout_s, hints=hints)
        self._params = {"format": "json"}
        if config.categories:
            self._params["categories"] = ",".join(config.categories)
        if config.engines:
            self._params["engines"] = ",".join(config.engines)
        if config.language:
            self._params["language"] = config.language
        if config.safesearch is not None:
            self._params["safesearch"] = str(config.safesearch)

    async def _found(
        self, query: str, max_results: int, allowed: list[str], country: str | None
    ) -> Found:
        params = {"q": _narrowed(query, allowed), **self._params}
        answer = await self._api.ask("GET", "/search", params=params)
        found = _entries(self._api.name, answer, "results")
        if not found and (unresponsive := _get(answer, "unresponsive_engines")):
            # Nothing found and engines that failed: their failure, not an empty web.
            failed = ", ".join(_engine_failure(entry) for entry in unresponsive)
            raise SearchFailed(f"no engine of SearXNG answered ({failed[:MAX_DETAIL]})")
        return [(entry.get("title"), entry.get("url"), entry.get("content")) for entry in found]


class BraveSearch(_Backend):
    """GET `/res/v1/web/search` of the Brave Search API, the key in `X-Subscription-Token`."""

    markup = True  # <strong> around the query's words, HTML entities

    def __init__(self, config: BraveConfig, key: str) -> None:
        hints = {
            401: f"check the key in {config.api_key_env}",
            403: f"check the key in {config.api_key_env} and its plan",
            429: "rate limited, or the plan's quota is spent",
        }
        headers = {"X-Subscription-Token": key}
        self._api = _Api(
            "Brave Search", config.url, timeout_s=config.timeout_s, hints=hints, headers=headers
        )

    async def _found(
        self, query: str, max_results: int, allowed: list[str], country: str | None
    ) -> Found:
        params = {
            "q": _narrowed(query, allowed),
            # The domain filter drops results here: a whole page keeps enough of them.
            "count": str(MAX_RESULTS if allowed else max_results),
            "result_filter": "web",  # not news, videos, discussions...
        }
        if country in BRAVE_COUNTRIES:
            params["country"] = country
        answer = await self._api.ask("GET", "/res/v1/web/search", params=params)
        if isinstance(answer, dict) and "web" not in answer:
            return []  # Brave leaves `web` out when it found nothing
        found = _entries(self._api.name, _get(answer, "web"), "results")
        return [(entry.get("title"), entry.get("url"), entry.get("description")) for entry in found]


class TavilySearch(_Backend):
    """POST `/search` of Tavily's API, the key as `Authorization: Bearer`."""

    def __init__(self, config: TavilyConfig, key: str) -> None:
        hints = {
            401: f"check the key in {config.api_key_env}",
            429: "rate limited",
            432: "the plan's credits are spent",
            433: "the pay-as-you-go limit is reached",
        }
        headers = {"Authorization": f"Bearer {key}"}
        self._api = _Api(
            "Tavily", config.url, timeout_s=config.timeout_s, hints=hints, headers=headers
        )
        self._depth = config.search_depth

    async def _found(
        self, query: str, max_results: int, allowed: list[str], country: str | None
    ) -> Found:
        body: dict[str, Any] = {
            "query": query,
            "max_results": max_results,
            "search_depth": self._depth,
        }
        if allowed:
            body["include_domains"] = allowed  # searched within by Tavily itself
        if name := TAVILY_COUNTRIES.get(country or ""):
            body["country"] = name
        answer = await self._api.ask("POST", "/search", body=body)
        found = _entries(self._api.name, answer, "results")
        return [(entry.get("title"), entry.get("url"), entry.get("content")) for entry in found]


class _Api:
    """One search API's origin: a pooled client carrying its credentials, its failures as
    SearchFailed, with every credential sent scrubbed from the API's text they quote."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        timeout_s: float,
        hints: Mapping[int, str],
        headers: Mapping[str, str] | None = None,
    ) -> None:
        parts = urlsplit(url.rstrip("/"))
        self.name = name
        self._base_path = parts.path
        self._timeout_s = timeout_s
        self._hints = hints
        sent = {"Accept": "application/json", **(headers or {})}
        if parts.username is not None:
            # A user and password in the URL (an instance behind a reverse proxy): Basic auth.
            sent["Authorization"] = "Basic " + basic_token(parts.username, parts.password or "")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        proxy = proxy_for(parts.scheme, parts.hostname or "", port)
        # The key is one of `headers`: every value of them is scrubbed.
        self._scrub = Scrubber.for_upstream(
            headers=headers,
            username=parts.username,
            password=parts.password,
            proxy_username=proxy.username if proxy else None,
            proxy_password=proxy.password if proxy else None,
        )
        self._http = HTTPClient(
            f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}",
            headers=sent,
            connect_timeout_s=min(timeout_s, 10.0),
            read_timeout_s=timeout_s,
            max_connections=MAX_CONNECTIONS,
            proxy=proxy,
        )

    async def ask(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> Any:
        """The API's JSON answer to one request; anything else raises SearchFailed."""
        target = self._base_path + path + (f"?{urlencode(params)}" if params else "")
        payload, headers = b"", None
        if body is not None:
            payload, headers = orjson.dumps(body), {"Content-Type": "application/json"}
        try:
            # The client's own timeouts bound each wait; this bounds the whole search.
            async with asyncio.timeout(self._timeout_s):
                response = await self._http.send(method, target, payload, headers)
                try:
                    raw = await self._read(response)
                finally:
                    response.release()
        except TimeoutError:
            raise SearchFailed(f"{self.name} did not answer within {self._timeout_s:g} s") from None
        except HTTPClientError as error:
            detail = self._quote(str(error)) or type(error).__name__
            if isinstance(error, ConnectFailed):
                raise SearchFailed(f"{self.name} could not be reached: {detail}") from None
            raise SearchFailed(f"the connection to {self.name} failed: {detail}") from None
        if response.status != 200:
            raise self._refused(response.status, response.headers, raw)
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise SearchFailed(f"{self.name} answered with something other than JSON") from None

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _read(self, response: Response) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.chunks():
            size += len(chunk)
            if size > MAX_BODY:
                raise SearchFailed(f"{self.name} answered with over {MAX_BODY >> 20} MiB")
            chunks.append(chunk)
        return b"".join(chunks)

    def _refused(self, status: int, headers: Mapping[str, str], raw: bytes) -> SearchFailed:
        message = f"{self.name} answered HTTP {status}"
        if detail := self._quote(_error_detail(raw)):
            message += f": {detail}"
        if 300 <= status < 400 and "location" in headers:
            hint: str | None = f"redirected to {self._quote(headers['location'])}: set url to it"
        else:
            hint = self._hints.get(status)
        return SearchFailed(f"{message} ({hint})" if hint else message, status=status)

    def _quote(self, text: str) -> str:
        """API text as a failure may repeat it: credentials scrubbed, then cut (in that order,
        so that a cut never leaves part of a key)."""
        return self._scrub(text[: 4 * MAX_DETAIL])[:MAX_DETAIL]


def _error_detail(raw: bytes) -> str:
    """The message of a JSON error answer, as Brave (`error.detail`), Tavily (`detail.error`)
    and most others (`detail`, `error`, `message`) put it; "" for anything else (an HTML
    error page says nothing worth quoting)."""
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ""
    paths = (("error", "detail"), ("detail", "error"), ("error", "message"))
    for path in (*paths, ("detail",), ("error",), ("message",)):
        value = answer
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def _get(answer: Any, key: str) -> Any:
    return answer.get(key) if isinstance(answer, dict) else None


def _entries(name: str, answer: Any, key: str) -> list[dict[str, Any]]:
    """`answer[key]`, a list of objects, or SearchFailed (JSON of another shape)."""
    found = _get(answer, key)
    if not isinstance(found, list):
        raise SearchFailed(f"{name} answered JSON without a list of {key}")
    return [entry for entry in found if isinstance(entry, dict)]


def _engine_failure(entry: Any) -> str:
    """An entry of SearXNG's `unresponsive_engines`: `[engine, reason]`."""
    if isinstance(entry, list) and len(entry) == 2:
        return f"{entry[0]}: {entry[1]}"
    return str(entry)


def _query(query: str) -> str:
    query = " ".join(query.split())
    if not query:
        raise SearchFailed("the search query is empty")
    return query[:MAX_QUERY]


def _bounded(max_results: int) -> int:
    return max(1, min(max_results, MAX_RESULTS))


def _country_code(country: str | None) -> str | None:
    code = (country or "").strip().upper()
    return code if len(code) == 2 and code.isascii() and code.isalpha() else None


def _allowed(domains: Sequence[str]) -> list[str]:
    """The allowed domains as host names: `https://www.Example.com/x` -> `www.example.com`."""
    hosts: list[str] = []
    for domain in domains:
        text = domain.strip().lower()
        try:
            host = urlsplit(text if "://" in text else f"//{text}").hostname or ""
        except ValueError:
            continue
        host = host.removeprefix("*.").rstrip(".")
        if host and host not in hosts:
            hosts.append(host)
    return hosts


def _narrowed(query: str, allowed: list[str]) -> str:
    """The query with a `site:` term when one domain is allowed: the search itself then looks
    there, instead of leaving a general page of results to the filter. Several domains get
    none: an OR of `site:` terms is read differently, or not at all, by Brave and by the
    engines behind SearXNG, so those searches rely on the filter alone."""
    if len(allowed) != 1:
        return query
    narrowed = f"{query} site:{allowed[0]}"
    return narrowed if len(narrowed) <= MAX_QUERY else query


def _within(host: str, allowed: list[str]) -> bool:
    host = host.rstrip(".")
    return any(host == domain or host.endswith(f".{domain}") for domain in allowed)


def _kept(
    found: Found, max_results: int, allowed: list[str], *, markup: bool
) -> list[SearchResult]:
    """The results to give: (title, url, snippet) as the API wrote them, in order, each URL
    once (scheme, fragment and a trailing slash aside), http(s) only, within `allowed` when it
    lists any, at most `max_results`."""
    kept: list[SearchResult] = []
    seen: set[str] = set()
    for title, url, snippet in found:
        if len(kept) == max_results:
            break
        if not isinstance(url, str):
            continue
        url = url.strip()
        try:
            parts = urlsplit(url)
            host = (parts.hostname or "").lower()
            key = f"{host}:{parts.port}{parts.path.rstrip('/')}?{parts.query}"
        except ValueError:  # a malformed address or port
            continue
        if parts.scheme.lower() not in ("http", "https") or not host:
            continue
        if allowed and not _within(host, allowed):
            continue
        if key in seen:
            continue
        seen.add(key)
        text = _text(title, MAX_TITLE, markup) or url
        kept.append(SearchResult(text, url, _text(snippet, MAX_SNIPPET, markup)))
    return kept


def _text(value: Any, limit: int, markup: bool) -> str:
    """An API's text as plain text on one line, cut to `limit` characters."""
    if not isinstance(value, str):
        return ""
    text = " ".join((html.unescape(_TAG.sub("", value)) if markup else value).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
