"""The web console (/console) as a browser without scripts drives it, over HTTP: it signs
in with a key through the form, keeps the session cookie, and sends each form with the CSRF
token of the page it was on."""

from __future__ import annotations

import re

import httpx

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(page: httpx.Response) -> str:
    found = _CSRF.search(page.text)
    assert found is not None, page.text
    return found.group(1)


class ConsoleClient:
    def __init__(self, base_url: str, local_address: str | None = None) -> None:
        transport = httpx.HTTPTransport(local_address=local_address) if local_address else None
        self.http = httpx.Client(base_url=base_url, transport=transport, timeout=30)
        self.csrf: str | None = None  # the token of the last page that had a form

    def sign_in(self, key: str) -> httpx.Response:
        """The sign-in form, then its POST (the answer: 303 to /console, or the form again
        with the refusal's status)."""
        form = self.http.get("/console/sign-in")
        assert form.status_code == 200, form.text
        return self.http.post("/console/sign-in", data={"csrf": csrf_of(form), "key": key})

    def get(self, path: str, **params: str) -> httpx.Response:
        page = self.http.get(path, params=params or None)
        found = _CSRF.search(page.text)
        if found is not None:
            self.csrf = found.group(1)
        return page

    def post(self, path: str, data: dict[str, str] | None = None) -> httpx.Response:
        """A form, with the CSRF token of the last page (a page is read first when none was)."""
        if self.csrf is None:
            self.csrf = csrf_of(self.http.get("/console", follow_redirects=True))
        return self.http.post(path, data={"csrf": self.csrf or "", **(data or {})})

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ConsoleClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def signed_in(base_url: str, key: str, local_address: str | None = None) -> ConsoleClient:
    console = ConsoleClient(base_url, local_address)
    answer = console.sign_in(key)
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/console"
    return console
