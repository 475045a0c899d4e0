"""The web console (/console), over HTTP: sign-in with an admin key and with a project's key,
the session (its cookie, expiry, sign-out, a key revoked meanwhile), CSRF, the throttle on
failed sign-ins, the headers every answer carries, each page, and the admin API operations
the console reads. Then a real browser (Playwright driving Debian's chromium, headless) goes
through it as a person would, and nothing it loads leaves 127.0.0.1."""

from __future__ import annotations

import hashlib
import html
import logging
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import pytest
from console_client import ConsoleClient, csrf_of, signed_in
from team import (
    ADMIN_KEY,
    CONFIG_KEY,
    CONFIG_TENANT,
    AdminClient,
    clear_of_a_minute_end,
    client,
    team_relay,
)

from relay.access import listing
from relay.api.admin import RESPONSE_FILTERS
from relay.ui import pages
from relay.ui.routes import CSP

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
}


@dataclass
class Relay:
    url: str
    database: Path


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    database = tmp_path_factory.mktemp("console") / "relay.db"
    with team_relay(f"sqlite:///{database}") as url:
        yield Relay(url, database)


@pytest.fixture
def admin(relay: Relay) -> Iterator[AdminClient]:
    with AdminClient(relay.url) as admin_client:
        yield admin_client


def _ask(base_url: str, key: str, **body: Any) -> dict[str, Any]:
    with client(base_url, key) as http:
        answer = http.post("/v1/responses", json={"model": "fake-text", "input": "hi", **body})
    assert answer.status_code == 200, answer.text
    created: dict[str, Any] = answer.json()
    return created


def _tool_chain(base_url: str, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A tool call, then the turn that gives its output back."""
    call = _ask(base_url, key, model="fake-tool_call", input="Weather in Paris?", tools=[WEATHER])
    output = {"type": "function_call_output", "call_id": call["output"][0]["call_id"]}
    answer = _ask(
        base_url,
        key,
        previous_response_id=call["id"],
        input=[{**output, "output": '{"celsius": 21}'}],
    )
    return call, answer


def _newest_first(responses: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(responses, key=lambda response: (response["created_at"], response["id"]))[::-1]


def _cookie_header(answer: httpx.Response, name: str) -> str:
    [header] = [
        value for value in answer.headers.get_list("set-cookie") if value.startswith(name + "=")
    ]
    return header


def _error_code(page: httpx.Response) -> str:
    found = re.search(r'<span class="muted">([^<]+)</span></h1>', page.text)
    assert found is not None, page.text
    return found.group(1)


# --- signing in --------------------------------------------------------------------------------


def test_an_admin_key_signs_in_to_the_whole_console(relay: Relay) -> None:
    with ConsoleClient(relay.url) as console:
        answer = console.sign_in(ADMIN_KEY)
        assert answer.status_code == 303 and answer.headers["location"] == "/console"
        cookie = _cookie_header(answer, "relay_console").lower()
        assert {"httponly", "samesite=strict", "path=/console", "max-age=28800"} <= {
            part.strip() for part in cookie.split(";")
        }
        assert "secure" not in cookie  # plain HTTP on loopback; HTTPS adds it
        # The key is nowhere but in the form it was posted in.
        assert ADMIN_KEY not in str(answer.headers)
        assert ADMIN_KEY not in str(console.http.cookies.jar)
        home = console.get("/console")
        assert (home.status_code, home.headers["location"]) == (303, "/console/overview")
        for path in ("/console/overview", "/console/projects", "/console/audit"):
            page = console.get(path)
            assert page.status_code == 200, page.text
            assert "admin <b>ops</b>" in page.text


def test_a_project_key_sees_its_own_project_only(relay: Relay, admin: AdminClient) -> None:
    home, other = admin.project("home"), admin.project("other")
    _, key = admin.key(home)
    _, other_key = admin.key(other)
    mine, theirs = _ask(relay.url, key), _ask(relay.url, other_key)
    with signed_in(relay.url, key) as console:
        landing = console.get("/console")
        assert landing.headers["location"] == f"/console/projects/{home}/overview"
        assert console.get(landing.headers["location"]).status_code == 200
        listed = console.get(f"/console/projects/{home}/responses")
        assert listed.status_code == 200
        assert mine["id"] in listed.text and theirs["id"] not in listed.text
        assert console.get(f"/console/projects/{home}/responses/{mine['id']}").status_code == 200
        page = console.get(f"/console/projects/{home}")
        assert page.status_code == 200 and "Your key" in page.text
        # Another project's pages, and its response under this project's path: 404, as an
        # unknown project or response gets.
        for path in (
            f"/console/projects/{other}",
            f"/console/projects/{other}/overview",
            f"/console/projects/{other}/responses",
            f"/console/projects/{other}/responses/{theirs['id']}",
            f"/console/projects/{home}/responses/{theirs['id']}",
            "/console/projects/proj_unknown/responses",
        ):
            refused = console.get(path)
            assert refused.status_code == 404, path
        # An admin's pages and changes: 403 (another project's: 404).
        for path in ("/console/overview", "/console/projects", "/console/audit"):
            refused = console.get(path)
            assert (refused.status_code, _error_code(refused)) == (403, "admins_only")
        console.get(f"/console/projects/{home}")
        for path, form in (
            (f"/console/projects/{home}/policy", {"rpm": "1"}),
            (f"/console/projects/{home}/keys", {"name": "mine now"}),
            ("/console/projects", {"name": "new"}),
        ):
            assert console.post(path, form).status_code == 403, path
        assert console.post(f"/console/projects/{other}/policy", {"rpm": "1"}).status_code == 404
    assert admin.call("GET", f"/projects/{home}")["policy"] == {}
    assert admin.call("GET", "/keys", project_id=home)["data"][0]["id"].startswith("key_")


def test_a_config_file_key_signs_in_to_its_tenant(relay: Relay) -> None:
    _ask(relay.url, CONFIG_KEY)
    with signed_in(relay.url, CONFIG_KEY) as console:
        page = console.get(f"/console/projects/{CONFIG_TENANT}")
        assert page.status_code == 200 and "from the config file" in page.text
        assert console.get(f"/console/projects/{CONFIG_TENANT}/responses").status_code == 200


def test_a_key_allowed_several_projects_switches_between_exactly_those(
    relay: Relay, admin: AdminClient
) -> None:
    home, second, closed = (admin.project(name) for name in ("Home", "Second <b>", "Closed"))
    stranger = admin.project("Stranger")
    _, key = admin.key(home, projects=[second, closed])
    admin.call("DELETE", f"/projects/{closed}")  # archived: the gate refuses it now
    with client(relay.url, key, project=second) as http:
        theirs = http.post("/v1/responses", json={"model": "fake-text", "input": "x"}).json()
    with signed_in(relay.url, key) as console:
        landing = console.get(console.get("/console").headers["location"])
        assert landing.url.path == f"/console/projects/{home}/overview"
        # The picker offers the projects the gate lets the key act for, by name, no other.
        picker = re.search(
            r'<select id="project" name="project"[^>]*>(.*?)</select>', landing.text, re.S
        )
        assert picker is not None
        options = re.findall(r'<option value="([^"]+)"( selected)?>([^<]*)</option>', picker[1])
        assert sorted(options) == sorted(
            [(home, " selected", "Home"), (second, "", "Second &lt;b&gt;")]
        )
        switched = console.get("/console", project=second)
        assert switched.headers["location"] == f"/console/projects/{second}/overview"
        page = console.get(f"/console/projects/{second}/responses")
        assert page.status_code == 200 and theirs["id"] in page.text
        assert f'<option value="{second}" selected>' in page.text
        assert console.get(f"/console/projects/{second}").status_code == 200
        # An archived one, another project, or nonsense: what an unknown project gets.
        for project in (closed, stranger, "proj_unknown", "../x"):
            assert console.get("/console", project=project).status_code == 404, project
            assert console.get(f"/console/projects/{project}/overview").status_code == 404
        # The session still works for its own project afterwards.
        assert console.get(f"/console/projects/{home}/overview").status_code == 200
        # Its own project archived, the session goes on with the other it may act for.
        admin.call("DELETE", f"/projects/{home}")
        landing = console.get("/console")
        assert landing.headers["location"] == f"/console/projects/{second}/overview"
        assert console.get(f"/console/projects/{second}/responses").status_code == 200
        assert console.get(f"/console/projects/{home}/overview").status_code == 404
    # A key of one project has no picker.
    _, single = admin.key(stranger)
    with signed_in(relay.url, single) as console:
        own = console.get(f"/console/projects/{stranger}/overview").text
        assert 'id="project-picker"' not in own
        assert console.get("/console", project=home).status_code == 404


def test_wrong_keys_are_refused_logged_and_then_throttled(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    # From an address of its own (127.0.0.2), so that the other tests' address is untouched.
    clear_of_a_minute_end()
    with (
        caplog.at_level(logging.INFO, logger="relay.console"),
        ConsoleClient(relay.url, local_address="127.0.0.2") as console,
    ):
        for wrong in ("sk-relay-" + "x" * 44, ADMIN_KEY + "x", "", CONFIG_KEY[:-1]):
            answer = console.sign_in(wrong)
            assert answer.status_code == 401, answer.text
            assert "Incorrect API key provided." in answer.text
        assert console.sign_in("x").status_code == 401  # the fifth in the minute
        throttled = console.sign_in(ADMIN_KEY)  # even the right key, until the minute passes
        assert throttled.status_code == 429
        assert 1 <= int(throttled.headers["retry-after"]) <= 60
        assert "relay_console" not in console.http.cookies
    lines = [record.getMessage() for record in caplog.records if record.name == "relay.console"]
    refused = [line for line in lines if "127.0.0.2 refused: invalid_api_key" in line]
    assert len(refused) == 5, lines
    assert any("127.0.0.2 refused: too many failures" in line for line in lines), lines
    assert not any(ADMIN_KEY in line or CONFIG_KEY[:-1] in line for line in lines)
    # Another address is not held back.
    signed_in(relay.url, ADMIN_KEY, local_address="127.0.0.3").close()


def test_posts_without_the_csrf_token_are_refused(relay: Relay, admin: AdminClient) -> None:
    project = admin.project("csrf")
    key_id, _ = admin.key(project)
    with signed_in(relay.url, ADMIN_KEY) as console, signed_in(relay.url, ADMIN_KEY) as other:
        token = csrf_of(console.get("/console/projects"))
        stranger = csrf_of(other.get("/console/projects"))
        assert token != stranger
        forms = [
            ("/console/projects", {"name": "forged"}),
            (f"/console/projects/{project}/policy", {"rpm": "5"}),
            (f"/console/projects/{project}/keys", {"name": "forged"}),
            (f"/console/projects/{project}/keys/{key_id}/revoke", {}),
            ("/console/sign-out", {}),
        ]
        for path, form in forms:
            for sent, headers in (
                ({}, {}),
                ({"csrf": ""}, {}),
                ({"csrf": "x" * 64}, {}),
                ({"csrf": stranger}, {}),  # another session's token
                ({"csrf": token}, {"origin": "http://evil.example"}),  # another site's page
            ):
                answer = console.http.post(path, data={**form, **sent}, headers=headers)
                assert answer.status_code == 403, (path, sent, headers)
                assert _error_code(answer) == "csrf_failed"
        # Nothing happened: no project, the same policy, the key active, still signed in.
        names = [item["name"] for item in admin.call("GET", "/projects", limit=100)["data"]]
        assert "forged" not in names
        assert admin.call("GET", f"/projects/{project}")["policy"] == {}
        assert admin.call("GET", f"/keys/{key_id}")["status"] == "active"
        assert console.get("/console/projects").status_code == 200
        # With its token (and this site's Origin), the same form goes through.
        origin = {"origin": relay.url}
        data = {"name": "real", "csrf": token}
        answer = console.http.post("/console/projects", data=data, headers=origin)
        assert answer.status_code == 303
    # The sign-in form has a token of its own, doubled in a cookie.
    with ConsoleClient(relay.url) as fresh:
        form_token = csrf_of(fresh.http.get("/console/sign-in"))
        fresh.http.cookies.clear()
        data = {"csrf": form_token, "key": ADMIN_KEY}
        assert fresh.http.post("/console/sign-in", data=data).status_code == 403
        fresh.http.get("/console/sign-in")
        assert fresh.http.post("/console/sign-in", data={"key": ADMIN_KEY}).status_code == 403


def test_sign_out_ends_the_session(relay: Relay) -> None:
    console = signed_in(relay.url, ADMIN_KEY)
    replaced = console.http.cookies["relay_console"]
    assert console.sign_in(ADMIN_KEY).status_code == 303  # a new session ends the old one
    token = console.http.cookies["relay_console"]
    assert token != replaced
    with httpx.Client(base_url=relay.url, cookies={"relay_console": replaced}) as old:
        assert old.get("/console/projects").status_code == 303
    console.get("/console/projects")
    answer = console.post("/console/sign-out")
    assert answer.status_code == 200 and "Signed out." in answer.text
    assert 'relay_console=""' in _cookie_header(answer, "relay_console")
    # The old cookie, replayed, opens nothing.
    with httpx.Client(base_url=relay.url, cookies={"relay_console": token}) as replay:
        page = replay.get("/console/projects")
        assert (page.status_code, page.headers["location"]) == (303, "/console/sign-in")
        forged = replay.post("/console/projects", data={"csrf": console.csrf, "name": "x"})
        assert (forged.status_code, _error_code(forged)) == (403, "not_signed_in")
    console.close()


def test_an_expired_session_signs_out(relay: Relay) -> None:
    console = signed_in(relay.url, ADMIN_KEY)
    token = console.http.cookies["relay_console"]
    digest = hashlib.sha256(token.encode()).hexdigest()
    with sqlite3.connect(relay.database) as db:
        # Only the token's digest is stored, never the token.
        [(stored_kind, expires_at)] = db.execute(
            "SELECT kind, expires_at FROM console_sessions WHERE id = ?", (digest,)
        ).fetchall()
        assert stored_kind == "admin" and expires_at > time.time() + 28700
        assert not db.execute(
            "SELECT 1 FROM console_sessions WHERE id = ? OR subject = ?", (token, ADMIN_KEY)
        ).fetchall()
        db.execute("UPDATE console_sessions SET expires_at = ? WHERE id = ?", (1, digest))
    page = console.get("/console/projects")
    assert (page.status_code, page.headers["location"]) == (303, "/console/sign-in")
    # The next sign-in sweeps expired sessions.
    signed_in(relay.url, ADMIN_KEY).close()
    with sqlite3.connect(relay.database) as db:
        assert not db.execute("SELECT 1 FROM console_sessions WHERE id = ?", (digest,)).fetchall()
    console.close()


def test_a_revoked_key_or_archived_project_ends_its_sessions(
    relay: Relay, admin: AdminClient
) -> None:
    project = admin.project("revoked")
    key_id, key = admin.key(project)
    page = f"/console/projects/{project}/responses"
    with signed_in(relay.url, key) as console:
        assert console.get(page).status_code == 200
        admin.revoke(key_id)  # this instance forgets its cache at once (others: key_cache_s)
        ended = console.get(page)
        assert ended.status_code == 401 and "This API key has been revoked." in ended.text
        assert 'relay_console=""' in _cookie_header(ended, "relay_console")
    _, key = admin.key(project)
    with signed_in(relay.url, key) as console:
        admin.call("DELETE", f"/projects/{project}")
        ended = console.get(page)
        assert ended.status_code == 403 and "is archived" in ended.text
        assert console.sign_in(key).status_code == 403


def test_every_answer_carries_the_console_headers(relay: Relay) -> None:
    with signed_in(relay.url, ADMIN_KEY) as console, ConsoleClient(relay.url) as anonymous:
        answers = {
            "sign-in": anonymous.get("/console/sign-in"),
            "redirect": anonymous.get("/console/projects"),
            "page": console.get("/console/projects"),
            "error": console.get("/console/projects/nope"),
            "style": console.get("/console/static/console.css"),
            "script": console.get("/console/static/console.js"),
            "missing static": console.get("/console/static/nothing.js"),
        }
    for name, answer in answers.items():
        headers = answer.headers
        assert headers["content-security-policy"] == CSP, name
        assert headers["x-frame-options"] == "DENY", name
        assert headers["x-content-type-options"] == "nosniff", name
        assert headers["referrer-policy"] == "same-origin", name
        static = name in ("style", "script", "missing static")
        assert (headers.get("cache-control") == "no-store") != static, name
    assert "'unsafe-inline'" not in CSP and "'unsafe-eval'" not in CSP
    assert "default-src 'self'" in CSP and "frame-ancestors 'none'" in CSP
    for name in ("sign-in", "page", "error"):
        html = answers[name].text
        # No inline script, no inline style, nothing from another origin.
        assert not re.search(r"<script(?![^>]*\ssrc=)", html), name
        assert " style=" not in html and "<style" not in html, name
        assert not re.search(r"""(src|href|action)=["'](?!/|\?|#)""", html), name


def test_the_console_off_removes_its_routes(tmp_path: Path) -> None:
    with team_relay(f"sqlite:///{tmp_path / 'off.db'}", console=False) as url:
        for path in ("/console", "/console/sign-in", "/console/static/console.css"):
            assert httpx.get(url + path).status_code == 404, path
        assert httpx.post(url + "/console/sign-in", data={"key": ADMIN_KEY}).status_code == 404
        with client(url, CONFIG_KEY) as http:
            assert http.get("/v1/models").status_code == 200


def test_a_relay_without_keys_opens_no_console(tmp_path: Path) -> None:
    """Without keys Relay serves loopback clients unauthenticated; the console needs a key
    to know who signs in, so it says so and lets nobody in."""
    database = f"sqlite:///{tmp_path / 'open.db'}"
    with team_relay(database, admin_keys=[], api_keys=[]) as url, ConsoleClient(url) as console:
        assert "no keys configured" in console.get("/console/sign-in").text
        refused = console.sign_in("anything")
        assert refused.status_code == 403 and "no keys configured" in refused.text
        assert console.get("/console/projects").status_code == 303


# --- pages -------------------------------------------------------------------------------------


def test_projects_keys_and_policies(relay: Relay, admin: AdminClient) -> None:
    with signed_in(relay.url, ADMIN_KEY) as console:
        console.get("/console/projects")
        created = console.post("/console/projects", {"name": "Docs <team>"})
        assert created.status_code == 303
        path = created.headers["location"]
        project = path.rsplit("/", 1)[1]
        page = console.get(path)
        assert "Docs &lt;team&gt;" in page.text and "Docs <team>" not in page.text
        assert "Docs &lt;team&gt;" in console.get("/console/projects").text

        policy = {"rpm": "600", "tpm": "", "max_concurrent": "4"}
        policy |= {"daily_budget_usd": "", "monthly_budget_usd": "500", "credit_usd": "12.5"}
        saved = console.post(f"{path}/policy", policy)
        assert (saved.status_code, saved.headers["location"]) == (303, f"{path}?saved=policy")
        assert "Policy saved." in console.get(saved.headers["location"]).text
        expected = {"rpm": 600, "max_concurrent": 4, "monthly_budget_usd": 500.0}
        assert admin.call("GET", f"/projects/{project}")["policy"] == {
            **expected,
            "credit_usd": 12.5,
        }
        console.post(f"{path}/policy", {**policy, "credit_usd": ""})  # empty lifts a limit
        assert admin.call("GET", f"/projects/{project}")["policy"] == expected
        for wrong, says in (("many", "expected a whole number"), ("0", "policy.rpm")):
            refused = console.post(f"{path}/policy", {**policy, "rpm": wrong})
            assert refused.status_code == 400 and says in refused.text, refused.text
        assert admin.call("GET", f"/projects/{project}")["policy"] == expected

        made = console.post(
            f"{path}/keys",
            {"name": "<b>alice</b>", "models": "fake-text, fake-json", "expires": "2999-01-01"},
        )
        assert made.status_code == 201
        found = re.search(r'<code id="new-key">(sk-relay-[A-Za-z0-9]+)</code>', made.text)
        assert found is not None and "&lt;b&gt;alice&lt;/b&gt;" in made.text
        key = found.group(1)
        [listed] = admin.call("GET", "/keys", project_id=project)["data"]
        assert listed["models"] == ["fake-text", "fake-json"]
        assert listed["expires_at"] == 32472230400  # the end of 2999-01-01, UTC
        _ask(relay.url, key)
        with client(relay.url, key) as http:
            other_model = http.post("/v1/responses", json={"model": "fake-slow", "input": "x"})
        assert other_model.json()["error"]["code"] == "model_not_allowed"
        shown = console.get(path).text
        assert key not in shown and listed["redacted_value"] in shown  # shown once only

        elsewhere = admin.project("elsewhere")
        wrong_path = f"/console/projects/{elsewhere}/keys/{listed['id']}/revoke"
        assert console.post(wrong_path).status_code == 404
        revoked = console.post(f"{path}/keys/{listed['id']}/revoke")
        assert revoked.headers["location"] == f"{path}?saved=revoked"
        with client(relay.url, key) as http:
            answer = http.post("/v1/responses", json={"model": "fake-text", "input": "x"})
        assert answer.json()["error"]["code"] == "api_key_revoked"

        audit = console.get("/console/audit", target=project).text
        for action in ("project.created", "project.updated"):
            assert action in audit
        assert "console:ops" in audit
        # Each change says what the form changed, nothing else.
        updates = admin.call("GET", "/audit_log", action="project.updated", target=project)
        assert [entry["detail"] for entry in updates["data"]] == [
            {"policy": {"credit_usd": None}},
            {"policy": {**expected, "credit_usd": 12.5}},
        ]
        keys_only = console.get("/console/audit", action="key.revoked").text
        assert listed["id"] in keys_only and "project.created" not in keys_only


def test_spend_key_settings_and_archiving(relay: Relay, admin: AdminClient) -> None:
    project = admin.project("spenders", {"daily_budget_usd": 5, "credit_usd": 100})
    key_id, key = admin.key(project, name="bot", policy={"monthly_budget_usd": 2})
    _ask(relay.url, key, model="priced")  # a few cents (tests/team.py's PRICE)
    spent = admin.call("GET", f"/projects/{project}/spend")
    assert spent["object"] == "spend" and spent["scope"] == "project"
    day, month, total = spent["periods"]
    assert (day["period"], month["period"], total["period"]) == ("day", "month", "total")
    assert day["budget_usd"] == 5 and month["budget_usd"] is None and total["budget_usd"] == 100
    assert 0 < day["spent_usd"] == month["spent_usd"] == total["spent_usd"] < 1
    own = admin.call("GET", f"/keys/{key_id}/spend")
    assert own["periods"][1] == {**month, "budget_usd": 2}
    assert admin.http.get("/admin/v1/projects/proj_nope/spend").status_code == 404

    path = f"/console/projects/{project}"
    with signed_in(relay.url, ADMIN_KEY) as console:
        page = console.get(path).text
        assert f"${day['spent_usd']:.4f}" in page and "<meter" in page and "$100.00" in page
        key_page = console.get(f"{path}/keys/{key_id}")
        assert key_page.status_code == 200 and "$2.00" in key_page.text
        settings = {"name": "bot", "models": "", "expires": "", "monthly_budget_usd": "2"}
        settings |= dict.fromkeys(("rpm", "tpm", "max_concurrent"), "")
        settings |= {"daily_budget_usd": "", "credit_usd": ""}
        assert console.post(f"{path}/keys/{key_id}", settings).status_code == 303  # no change
        changed = {**settings, "models": "fake-text priced", "rpm": "50", "expires": "2999-12-31"}
        saved = console.post(f"{path}/keys/{key_id}", changed)
        assert saved.headers["location"] == f"{path}/keys/{key_id}?saved=key"
        assert 'value="2999-12-31"' in console.get(saved.headers["location"]).text
        assert console.post(f"{path}/keys/{key_id}", changed).status_code == 303  # the same
        updated = admin.call("GET", f"/keys/{key_id}")
        assert updated["models"] == ["fake-text", "priced"]
        assert updated["policy"] == {"rpm": 50, "monthly_budget_usd": 2.0}
        assert updated["expires_at"] == 32503680000  # the end of 2999-12-31, UTC
        entries = admin.call("GET", "/audit_log", action="key.updated", target=key_id)["data"]
        assert [entry["detail"] for entry in entries] == [
            {
                "models": ["fake-text", "priced"],
                "expires_at": 32503680000,
                "policy": {"rpm": 50},
            }
        ]
        bad = console.post(f"{path}/keys/{key_id}", {**changed, "expires": "tomorrow"})
        assert bad.status_code == 400 and "expected a date" in bad.text
        elsewhere = admin.project("not the key's")
        assert console.get(f"/console/projects/{elsewhere}/keys/{key_id}").status_code == 404

        archived = console.post(f"{path}/archive")
        assert archived.headers["location"] == f"{path}?saved=archived"
        assert admin.call("GET", f"/projects/{project}")["status"] == "archived"
        with client(relay.url, key) as http:
            refused = http.post("/v1/responses", json={"model": "fake-text", "input": "x"})
        assert refused.json()["error"]["code"] == "project_archived"
        assert 'id="archive"' not in console.get(path).text
    # A project key's session sees its project's spend and its own key's, and changes nothing.
    other = admin.project("viewer", {"daily_budget_usd": 1})
    other_key_id, other_key = admin.key(other, policy={"credit_usd": 3})
    with signed_in(relay.url, other_key) as console:
        page = console.get(f"/console/projects/{other}").text
        assert 'id="spend-project"' in page and 'id="spend-key"' in page
        assert console.get(f"/console/projects/{other}/keys/{other_key_id}").status_code == 403
        assert console.post(f"/console/projects/{other}/archive").status_code == 403


def test_the_overview_charts_usage_and_shows_deployments(relay: Relay, admin: AdminClient) -> None:
    project, other = admin.project("charted"), admin.project("elsewhere")
    _, key = admin.key(project)
    for model in ("priced", "priced", "fake-error_after", "fake-flaky"):
        _ask(relay.url, key, model=model)
    _ask(relay.url, admin.key(other)[1], model="fake-json")
    today = time.strftime("%Y-%m-%d", time.gmtime())
    # The documented operations the page reads.
    hours = admin.call("GET", "/usage", group_by="hour,status", project_id=project)["data"]
    assert {entry["status"] for entry in hours} == {"completed", "failed"}
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:00Z", entry["hour"]) for entry in hours)
    assert sum(entry["requests"] for entry in hours) == 4
    flaky = [
        deployment
        for deployment in admin.call("GET", "/deployments")["data"]
        if deployment["route"] == "fake-flaky"
    ]
    assert [(entry["state"], entry["provider"]) for entry in flaky] == [("healthy", "fake")]
    assert flaky[0]["failures"] >= 1 and flaky[0]["latency_ms"] is None
    with signed_in(relay.url, ADMIN_KEY) as console:
        for by in ("day", "hour"):
            page = console.get(f"/console/projects/{project}/overview", by=by).text
            bars = re.findall(r'class="bar (\w+)"><title>([^<]+)</title>', page)
            assert {series for series, _ in bars} == {
                "completed",
                "failed",
                "input",
                "output",
                "cost",
            }
            assert all(title.startswith(today) for _, title in bars)
            models = page[page.index('id="by-model"') :].split("</table>")[0]
            assert "priced" in models and "fake-json" not in models  # this project's only
        everything = console.get("/console/overview").text
        assert "fake-json" in everything[everything.index('id="by-model"') :].split("</table>")[0]
        assert project in everything[everything.index('id="by-project"') :]
        assert 'id="deployments"' in everything and "fake-flaky" in everything
    with signed_in(relay.url, key) as console:
        own = console.get(f"/console/projects/{project}/overview").text
        assert 'class="bar completed"' in own and 'id="by-project"' not in own


def test_the_overview_shows_the_window_asked_for_with_project_names(
    relay: Relay, admin: AdminClient
) -> None:
    project = admin.project("Windowed <i>")
    _, key = admin.key(project)
    _ask(relay.url, key, model="priced")
    now = time.time()
    today = time.strftime("%Y-%m-%d", time.gmtime(now))
    this_hour = time.strftime("%Y-%m-%dT%H:00Z", time.gmtime(now))
    with signed_in(relay.url, ADMIN_KEY) as console:
        for window, by, bars, first in (
            ("24h", None, 24, "hour"),
            ("7d", "hour", 7 * 24, "hour"),
            ("7d", None, 7, "day"),
            ("30d", "day", 30, "day"),
            (None, None, 14, "day"),  # the default: two weeks by day
        ):
            params = {name: value for name, value in (("window", window), ("by", by)) if value}
            page = console.get(f"/console/projects/{project}/overview", **params)
            assert page.status_code == 200, (params, page.text)
            # One tick every few bars; the table under the chart names every bucket it has.
            numbers = page.text[page.text.index('id="chart-requests"') :].split("</figure>")[0]
            [(bucket, requests)] = re.findall(
                r"<tr><td>([^<]+)</td><td class=\"num\">([^<]+)</td></tr>", numbers
            )
            assert (bucket, requests) == (this_hour if first == "hour" else today, "1")
            ticks = re.findall(r'class="tick">([^<]+)<', numbers)
            assert len(ticks) == len(range(0, bars, max(1, bars // 6))), params
            assert "1 in all" in numbers and 'role="img"' in numbers
            assert f'<option value="{window or "14d"}" selected>' in page.text
            # The project by its name (escaped), not its id.
            assert "Windowed &lt;i&gt;" in page.text
        for params in ({"window": "1y"}, {"by": "week"}, {"window": "30d", "by": "hour"}):
            refused = console.get(f"/console/projects/{project}/overview", **params)
            assert refused.status_code == 400, params
        everything = console.get("/console/overview", window="24h").text
        by_project = everything[everything.index('id="by-project"') :].split("</table>")[0]
        assert "Windowed &lt;i&gt;" in by_project and f'<code class="muted">{project}' in by_project


def test_config_file_tenants_are_listed_read_only(relay: Relay) -> None:
    _ask(relay.url, CONFIG_KEY, model="priced")
    with signed_in(relay.url, ADMIN_KEY) as console:
        listed = console.get("/console/projects").text
        configured = listed[listed.index('id="configured"') :].split("</table>")[0]
        row = re.search(rf'<tr id="configured-{CONFIG_TENANT}">(.*?)</tr>', configured, re.S)
        assert row is not None and "configuration" in row[1]
        cells = re.findall(r'<td class="num">([^<]+)</td>', row[1])
        requests, tokens, cost, today, month, total = cells
        assert int(requests.replace(",", "")) >= 1 and int(tokens.replace(",", "")) > 0
        assert cost.startswith("$") and float(cost[1:]) > 0
        assert float(today[1:]) == float(month[1:]) == float(total[1:]) > 0
        # Its page: its spend, marked as from the configuration, and nothing to change.
        page = console.get(f"/console/projects/{CONFIG_TENANT}")
        assert page.status_code == 200
        assert "from the configuration" in page.text and 'id="spend-project"' in page.text
        assert 'id="policy"' not in page.text and 'id="new-key-form"' not in page.text
        assert (
            console.post(f"/console/projects/{CONFIG_TENANT}/policy", {"rpm": "1"}).status_code
            == 404
        )
        assert console.get("/console/projects/not-configured").status_code == 404


def test_conversations_are_edited_and_deleted(relay: Relay, admin: AdminClient) -> None:
    project, other = admin.project("editors"), admin.project("bystanders")
    _, key = admin.key(project)
    with client(relay.url, key) as http:
        made = [
            http.post("/v1/conversations", json={"metadata": {"n": str(n)}}).json()
            for n in range(3)
        ]
    first, second, third = (conversation["id"] for conversation in made)
    base = f"/projects/{project}/conversations"
    # The admin API: update and delete, in the audit log, with the API's checks.
    updated = admin.call("POST", f"{base}/{first}", {"metadata": {"topic": "admin"}})
    assert updated["metadata"] == {"topic": "admin"} and updated["object"] == "conversation"
    for body in ({}, {"metadata": {"x": 1}}, {"metadata": {}, "extra": 1}):
        refused = admin.http.post(f"/admin/v1{base}/{first}", json=body)
        assert (
            refused.status_code == 400
            and refused.json()["error"]["type"] == "invalid_request_error"
        )
    gone = admin.call("DELETE", f"{base}/{second}")
    assert gone == {"id": second, "object": "conversation.deleted", "deleted": True}
    assert admin.http.get(f"/admin/v1{base}/{second}").status_code == 404
    elsewhere = admin.http.delete(f"/admin/v1/projects/{other}/conversations/{third}")
    assert elsewhere.json()["error"]["code"] == "conversation_not_found"
    actions = admin.call("GET", "/audit_log", actor="ops", target=first)["data"]
    assert [entry["action"] for entry in actions] == ["conversation.updated"]
    # The console: the same, as forms with the session's CSRF token (an admin's and a
    # project key's sessions).
    with signed_in(relay.url, ADMIN_KEY) as console:
        page = console.get(f"/console{base}/{first}")
        assert "topic: admin" in page.text
        saved = console.post(
            f"/console{base}/{first}", {"metadata": "topic: <edited>\n\nowner:  ada "}
        )
        assert saved.headers["location"] == f"/console{base}/{first}?saved=metadata"
        assert "Metadata saved." in console.get(saved.headers["location"]).text
        assert admin.call("GET", f"{base}/{first}")["metadata"] == {
            "topic": "<edited>",
            "owner": "ada",
        }
        # Metadata the form's lines could not keep is shown, and left to the API.
        kept = {"a:b": "c", "note": "two\nlines"}
        admin.call("POST", f"{base}/{first}", {"metadata": kept})
        page = console.get(f"/console{base}/{first}").text
        assert 'id="metadata-form"' not in page and 'id="metadata-api-only"' in page
        admin.call("POST", f"{base}/{first}", {"metadata": {"topic": "<edited>"}})
        assert 'id="metadata-form"' in console.get(f"/console{base}/{first}").text
        for wrong in ("no colon here", ": no name", "\n".join(f"k{n}: v" for n in range(17))):
            refused = console.post(f"/console{base}/{first}", {"metadata": wrong})
            assert refused.status_code == 400 and "metadata" in refused.text, wrong
        forged = console.http.post(f"/console{base}/{third}/delete", data={"csrf": "x" * 64})
        assert forged.status_code == 403
        deleted = console.post(f"/console{base}/{third}/delete")
        assert deleted.headers["location"] == f"/console{base}?saved=deleted"
        listed = console.get(deleted.headers["location"]).text
        assert "Conversation deleted." in listed and third not in listed and first in listed
        assert console.post(f"/console{base}/{third}/delete").status_code == 404
        assert console.post(f"/console{base}/nonsense/delete").status_code == 400
    audit = admin.call("GET", "/audit_log", actor="console:ops", target=third)["data"]
    assert [entry["action"] for entry in audit] == ["conversation.deleted"]
    with signed_in(relay.url, key) as console:
        console.get(f"/console{base}/{first}")
        assert console.post(f"/console{base}/{first}", {"metadata": ""}).status_code == 303
        assert admin.call("GET", f"{base}/{first}")["metadata"] == {}
        theirs = f"/console/projects/{other}/conversations/{first}/delete"
        assert console.post(theirs).status_code == 404
        assert console.post(f"/console{base}/{first}/delete").status_code == 303
    assert admin.call("GET", base)["data"] == []


def test_responses_and_their_transcripts(relay: Relay, admin: AdminClient) -> None:
    project = admin.project("agents")
    _, key = admin.key(project)
    call, answer = _tool_chain(relay.url, key)
    thought = _ask(relay.url, key, model="fake-reasoning", reasoning={"summary": "auto"})
    failed = _ask(relay.url, key, model="fake-error_after", metadata={"run": "nightly"})
    assert failed["status"] == "failed"
    base = f"/console/projects/{project}/responses"
    with signed_in(relay.url, ADMIN_KEY) as console:
        listed = console.get(base).text
        shown = re.findall(rf'class="rid" href="{base}/(resp_\w+)"', listed)
        # Newest first (the second each began, then the id), as the admin API lists them.
        newest = _newest_first([call, answer, thought, failed])
        assert shown == [response["id"] for response in newest]
        only_failed = console.get(base, status="failed").text
        assert failed["id"] in only_failed and call["id"] not in only_failed
        by_model = console.get(base, model="fake-tool_call").text
        assert call["id"] in by_model and answer["id"] not in by_model
        assert "No stored responses match." in console.get(base, start="2999-01-01").text
        assert console.get(base, status="bogus").status_code == 400

        first = console.get(f"{base}/{call['id']}").text
        assert "Tool call: get_weather" in first
        assert call["output"][0]["call_id"] in first
        assert "&#34;location&#34;: &#34;Paris&#34;" in first  # the arguments, as JSON
        assert "Weather in Paris?" in first
        second = console.get(f"{base}/{answer['id']}").text
        assert f'href="{base}/{call["id"]}"' in second  # its previous_response_id
        assert "Tool output" in second and "celsius" in second
        reasoning = console.get(f"{base}/{thought['id']}").text
        assert "Reasoning summary" in reasoning and "Let me think." in reasoning
        broken = console.get(f"{base}/{failed['id']}").text
        assert 'id="error"' in broken and "nightly" in broken
        for unknown in ("resp_" + "0" * 48, "nonsense"):
            assert console.get(f"{base}/{unknown}").status_code == 404


def test_conversations_and_their_items(relay: Relay, admin: AdminClient) -> None:
    project, other = admin.project("chatty"), admin.project("quiet")
    _, key = admin.key(project)
    with client(relay.url, key) as http:
        said = [{"type": "message", "role": "user", "content": "Remember: blue."}]
        body = {"items": said, "metadata": {"topic": "colours"}}
        first = http.post("/v1/conversations", json=body).json()
        second = http.post("/v1/conversations", json={}).json()
        turn = http.post(
            "/v1/responses",
            json={"model": "fake-text", "input": "Which colour?", "conversation": first["id"]},
        ).json()
        items = http.get(f"/v1/conversations/{first['id']}/items", params={"order": "asc"}).json()
    with client(relay.url, admin.key(other)[1]) as http:
        theirs = http.post("/v1/conversations", json={}).json()
    # The admin API, as the console reads it.
    base = f"/projects/{project}/conversations"
    listed = admin.call("GET", base)["data"]
    newer, older = _newest_first([first, second])
    assert [entry["id"] for entry in listed] == [newer["id"], older["id"]]
    assert admin.call("GET", f"{base}/{first['id']}") == {**first, "object": "conversation"}
    assert admin.call("GET", f"{base}/{first['id']}/items", order="asc") == items
    missing = admin.http.get(f"/admin/v1{base}/{theirs['id']}")
    assert missing.json()["error"]["code"] == "conversation_not_found"
    with signed_in(relay.url, key) as console:
        page = console.get(f"/console{base}").text
        assert first["id"] in page and second["id"] in page and theirs["id"] not in page
        assert "topic: colours" in page
        shown = console.get(f"/console{base}/{first['id']}").text
        for text in ("Remember: blue.", "Which colour?", "You said: Which colour?"):
            assert text in shown
        assert shown.index("Remember: blue.") < shown.index("Which colour?")
        answer_page = console.get(f"/console/projects/{project}/responses/{turn['id']}").text
        assert f'href="/console{base}/{first["id"]}"' in answer_page
        assert console.get(f"/console/projects/{other}/conversations").status_code == 404
        assert console.get(f"/console{base}/{theirs['id']}").status_code == 404


def test_a_running_background_response_is_followed_live(relay: Relay, admin: AdminClient) -> None:
    project = admin.project("background")
    _, key = admin.key(project)
    started = _ask(relay.url, key, model="fake-slow", background=True)
    path = f"/console/projects/{project}/responses/{started['id']}"
    with signed_in(relay.url, ADMIN_KEY) as console:
        running = console.get(path).text
        assert 'id="live"' in running and f'data-events="{path}/events"' in running
        with console.http.stream("GET", f"{path}/events") as events:
            assert events.headers["content-type"].startswith("text/event-stream")
            assert events.headers["content-security-policy"] == CSP
            kinds = [
                line.removeprefix("event: ")
                for line in events.iter_lines()
                if line.startswith("event: ")
            ]
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        assert kinds.count("response.output_text.delta") == 10
        assert 'id="live"' not in console.get(path).text  # ended: shown as stored
        done = console.get(f"{path}/events")  # an ended response's events: all, replayed
        assert done.text.count("event: response.output_text.delta") == 10
    streamed = admin.http.get(
        f"/admin/v1/projects/{project}/responses/{started['id']}", params={"stream": "true"}
    )
    assert streamed.text.count("event: response.output_text.delta") == 10
    plain = _ask(relay.url, key)
    with signed_in(relay.url, ADMIN_KEY) as console:
        refused = console.get(f"/console/projects/{project}/responses/{plain['id']}/events")
        assert refused.status_code == 400  # only background responses keep their events
        # An admin cancels one (the console's form, then the admin API's), in the audit log.
        running = _ask(relay.url, key, model="fake-slow", background=True)
        at = f"/console/projects/{project}/responses/{running['id']}"
        console.get(at)
        assert console.post(f"{at}/cancel").headers["location"] == at
        assert 'class="status cancelled"' in console.get(at).text
        again = _ask(relay.url, key, model="fake-slow", background=True)
        cancel = f"/projects/{project}/responses/{again['id']}/cancel"
        assert admin.call("POST", cancel)["status"] == "cancelled"
        assert console.post(f"{path}/cancel").status_code == 303  # ended: answered as it is
    entries = admin.call("GET", "/audit_log", action="response.cancel")["data"]
    assert [(entry["actor"], entry["target"]) for entry in entries[:3]] == [
        ("console:ops", started["id"]),
        ("ops", again["id"]),
        ("console:ops", running["id"]),
    ]


def test_the_admin_api_lists_a_projects_responses(relay: Relay, admin: AdminClient) -> None:
    project, other = admin.project("listed"), admin.project("unlisted")
    _, key = admin.key(project)
    call, answer = _tool_chain(relay.url, key)
    _ask(relay.url, admin.key(other)[1])
    base = f"/projects/{project}/responses"
    newer, older = _newest_first([call, answer])
    page = admin.call("GET", base, limit=1)
    assert [item["id"] for item in page["data"]] == [newer["id"]] and page["has_more"]
    rest = admin.call("GET", base, after=page["last_id"])
    assert [item["id"] for item in rest["data"]] == [older["id"]] and not rest["has_more"]
    [summary] = [item for item in page["data"] + rest["data"] if item["id"] == answer["id"]]
    assert summary["object"] == "response.summary"
    assert summary["previous_response_id"] == call["id"] and summary["status"] == "completed"
    assert summary["usage"] == answer["usage"]
    assert admin.call("GET", base, model="fake-tool_call")["data"][0]["id"] == call["id"]
    assert admin.call("GET", base, status="failed")["data"] == []
    today = time.strftime("%Y-%m-%d", time.gmtime(call["created_at"]))
    assert len(admin.call("GET", base, start=today, end=today)["data"]) == 2
    assert admin.call("GET", base, start="2999-01-01")["data"] == []
    assert admin.call("GET", base, end="2000-01-01")["data"] == []
    for params in (
        {"status": "done"},
        {"after": "resp_unknown"},
        {"limit": "0"},
        {"start": "2026-13-01"},
        {"end": "today"},
    ):
        refused = admin.http.get(f"/admin/v1{base}", params=params)
        assert refused.status_code == 400, params
    # One response, and its input items, as the project's own keys read them.
    with client(relay.url, key) as http:
        own = http.get(f"/v1/responses/{call['id']}").json()
        items = http.get(f"/v1/responses/{call['id']}/input_items").json()
    assert admin.call("GET", f"{base}/{call['id']}") == own
    assert admin.call("GET", f"{base}/{call['id']}/input_items") == items
    for path in (f"/projects/{other}/responses/{call['id']}", f"{base}/resp_{'0' * 48}"):
        missing = admin.http.get(f"/admin/v1{path}")
        assert missing.json()["error"]["code"] == "response_not_found"
    assert admin.http.get(f"/admin/v1{base}/nonsense").status_code == 400
    # The audit log's filters.
    entries = admin.call("GET", "/audit_log", action="project.created", target=project)["data"]
    assert [(entry["action"], entry["target"]) for entry in entries] == [
        ("project.created", project)
    ]


# --- searching responses, their cost, chains and pages -----------------------------------------


@pytest.fixture(scope="module")
def searchable(database_url: str) -> Iterator[str]:
    """A Relay on SQLite and on PostgreSQL: metadata and text are searched in each
    database's own SQL."""
    with team_relay(database_url) as url:
        yield url


def _ids(listed: dict[str, Any]) -> list[str]:
    return [item["id"] for item in listed["data"]]


def test_the_admin_api_searches_responses(searchable: str) -> None:
    with AdminClient(searchable) as admin:
        project, other = admin.project("searched"), admin.project("not searched")
        _, key = admin.key(project)
        _, other_key = admin.key(other)
        base = f"/projects/{project}/responses"
        fox = _ask(
            searchable,
            key,
            model="priced",
            input="The quick brown fox",
            metadata={"run": "nightly", "team": "a=b"},
            session_id="sess-a",
        )
        with client(searchable, key) as http:
            quoted = http.post(
                "/v1/responses",
                json={"model": "fake-text", "input": 'He said "hi"\nand left, 100%'},
                headers={"x-session-id": "sess-b"},
            ).json()
        follow = _ask(
            searchable,
            key,
            input="next step",
            previous_response_id=fox["id"],
            metadata={"run": "nightly"},
        )
        # Another project's response matches every filter: it is never listed here.
        theirs = _ask(
            searchable,
            other_key,
            input="The quick brown fox",
            metadata={"run": "nightly"},
            session_id="sess-a",
        )
        for params, expected in (
            ({"metadata": "run=nightly"}, [follow, fox]),
            ({"metadata": ["run=nightly", "team=a=b"]}, [fox]),  # split at the first '='
            ({"metadata": "run=daily"}, []),
            ({"metadata": "team=a"}, []),
            ({"session_id": "sess-a"}, [fox]),
            ({"session_id": "sess-b"}, [quoted]),  # from the x-session-id header
            ({"text": "QUICK brown"}, [fox]),  # case aside
            ({"text": 'said "hi"\nand'}, [quoted]),  # quotes and line breaks as typed
            ({"text": "100%"}, [quoted]),  # '%' is no wildcard
            ({"text": "0%"}, [quoted]),
            ({"text": "_"}, []),  # nor is '_'
            ({"text": "message"}, []),  # the text, not the items' ids, types or roles
            ({"text": "user"}, []),
            ({"text": "You said: next step"}, [follow]),  # an output's text
            ({"previous_response_id": fox["id"]}, [follow]),
            ({"text": "brown", "metadata": "run=nightly", "session_id": "sess-a"}, [fox]),
            ({"text": "brown", "session_id": "sess-b"}, []),
        ):
            listed = admin.call("GET", base, **params)
            assert _ids(listed) == [response["id"] for response in _newest_first(expected)], params
            assert theirs["id"] not in _ids(listed)
        assert (
            admin.call("GET", f"/projects/{other}/responses", text="quick")["data"][0]["id"]
            == theirs["id"]
        )

        # Each summary's session and cost: the sum of its usage rows, in dollars.
        summaries = {item["id"]: item for item in admin.call("GET", base)["data"]}
        assert summaries[fox["id"]]["session_id"] == "sess-a"
        assert summaries[follow["id"]]["session_id"] is None
        report = admin.call("GET", "/usage", group_by="project", project_id=project)["data"]
        assert 0 < summaries[fox["id"]]["cost_usd"] == pytest.approx(report[0]["cost_usd"])
        assert summaries[quoted["id"]]["cost_usd"] == 0  # an unpriced route: charged nothing

        # Paging both ways: `before` an id of the list gives the newer ones.
        newest = _newest_first([fox, quoted, follow])
        first = admin.call("GET", base, limit=2)
        assert _ids(first) == [response["id"] for response in newest[:2]] and first["has_more"]
        rest = admin.call("GET", base, limit=2, after=first["last_id"])
        assert _ids(rest) == [newest[2]["id"]] and not rest["has_more"]
        back = admin.call("GET", base, limit=2, before=rest["first_id"])
        assert _ids(back) == _ids(first) and not back["has_more"]
        nearer = admin.call("GET", base, limit=1, before=rest["first_id"])
        assert _ids(nearer) == [newest[1]["id"]] and nearer["has_more"]

        for params, param in (
            ({"metadata": "nightly"}, "metadata"),
            ({"metadata": "=nightly"}, "metadata"),
            ({"metadata": "k" * 65 + "=v"}, "metadata"),
            ({"metadata": [f"k{n}=v" for n in range(17)]}, "metadata"),
            ({"text": "x" * 201}, "text"),
            ({"session_id": "s" * 129}, "session_id"),
            ({"previous_response_id": "nonsense"}, "previous_response_id"),
            ({"after": fox["id"], "before": fox["id"]}, "before"),
            ({"before": "resp_unknown"}, "before"),
            ({"before": theirs["id"]}, "before"),  # another project's id is not of this list
        ):
            refused = admin.http.get(f"/admin/v1{base}", params=params)
            assert refused.status_code == 400, params
            assert refused.json()["error"]["param"] == param, refused.text
            assert refused.json()["error"]["type"] == "invalid_request_error"
        refused = admin.http.get(
            f"/admin/v1/projects/{project}/conversations", params={"before": "x"}
        )
        assert refused.status_code == 400


def test_a_search_reads_a_bounded_window_a_page(
    searchable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A text or metadata search tests SEARCH_WINDOW responses a page at most (3 here): a page
    whose window ends first says where it stopped, and the next goes on from there."""
    monkeypatch.setattr(listing, "SEARCH_WINDOW", 3)
    with AdminClient(searchable) as admin:
        project = admin.project("haystack")
        _, key = admin.key(project)
        made = [_ask(searchable, key, input="needle" if n in (0, 5) else "hay") for n in range(7)]
        base = f"/projects/{project}/responses"
        order = [response["id"] for response in _newest_first(made)]
        needles = {made[0]["id"], made[5]["id"]}
        windows = [order[:3], order[3:6], order[6:]]
        pages, after = [], None
        while True:
            listed = admin.call("GET", base, text="needle", **({"after": after} if after else {}))
            pages.append(listed)
            if not listed["has_more"]:
                break
            after = listed["last_id"]
        assert [_ids(page) for page in pages] == [
            [rid for rid in window if rid in needles] for window in windows
        ]
        # A page that read its whole window names the last response it read.
        assert [page["last_id"] for page in pages[:2]] == [order[2], order[5]]
        # Unfiltered, or filtered on columns only, a page is not bounded.
        assert len(admin.call("GET", base)["data"]) == 7
        # Backwards from the oldest: the window is the three just newer.
        back = admin.call("GET", base, text="needle", before=order[6])
        assert _ids(back) == [rid for rid in order[3:6] if rid in needles]
        assert back["has_more"] and back["first_id"] == order[3]


def test_the_console_searches_pages_and_follows_chains(
    relay: Relay, admin: AdminClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = admin.project("console search")
    _, key = admin.key(project)
    first = _ask(relay.url, key, model="priced", metadata={"ticket": "T-1"}, session_id="s1")
    second = _ask(relay.url, key, previous_response_id=first["id"], metadata={"ticket": "T-1"})
    third = _ask(relay.url, key, previous_response_id=first["id"], input="a branch")
    _ask(relay.url, key, metadata={"ticket": "T-2"})
    base = f"/console/projects/{project}/responses"
    shown = re.compile(rf'class="rid" href="{base}/(resp_\w+)"')
    summaries = {
        item["id"]: item for item in admin.call("GET", base.removeprefix("/console"))["data"]
    }
    cost = summaries[first["id"]]["cost_usd"]
    with signed_in(relay.url, ADMIN_KEY) as console:
        found = console.get(base, metadata="ticket=T-1")
        assert shown.findall(found.text) == [r["id"] for r in _newest_first([first, second])]
        assert 'value="ticket=T-1"' in found.text and 'id="clear"' in found.text
        assert f'<td class="num cost">${cost:,.4f}</td>' in found.text
        assert shown.findall(console.get(base, session_id="s1").text) == [first["id"]]
        assert shown.findall(console.get(base, text="a branch").text) == [third["id"]]
        assert "No stored responses match." in console.get(base, text="nowhere").text
        empty = console.get(base, **dict.fromkeys(RESPONSE_FILTERS, ""))  # the form, unfilled
        assert len(shown.findall(empty.text)) == 4
        refused = console.get(base, metadata="no pair")
        assert refused.status_code == 400 and "expected key=value" in refused.text

        # The transcript: its cost, and the responses that continue it (the chain forward).
        page = console.get(f"{base}/{first['id']}").text
        assert f'<dd id="cost">${cost:,.4f}</dd>' in page
        continued = re.findall(rf'class="continuation" href="{base}/(resp_\w+)"', page)
        assert continued == [r["id"] for r in _newest_first([second, third])]
        assert 'id="continued-by"' not in console.get(f"{base}/{second['id']}").text

        # One response a page: the older and newer links page through, keeping the filters.
        monkeypatch.setattr(pages, "PAGE", 1)
        expected = [r["id"] for r in _newest_first([first, second])]
        top = console.get(base, metadata="ticket=T-1").text
        assert shown.findall(top) == expected[:1] and 'id="newer"' not in top
        older = re.search(r'href="([^"]+)" id="older"', top)
        assert older is not None and "metadata=ticket%3DT-1" in older.group(1)
        bottom = console.get(base + html.unescape(older.group(1))).text
        assert shown.findall(bottom) == expected[1:] and 'id="older"' not in bottom
        newer = re.search(r'href="([^"]+)" id="newer"', bottom)
        assert newer is not None and "metadata=ticket%3DT-1" in newer.group(1)
        again = console.get(base + html.unescape(newer.group(1))).text
        assert shown.findall(again) == expected[:1]
        assert 'id="newer"' not in again and 'id="older"' in again


def test_the_conversations_list_pages_both_ways(
    relay: Relay, admin: AdminClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = admin.project("paged chats")
    _, key = admin.key(project)
    with client(relay.url, key) as http:
        made = [http.post("/v1/conversations", json={}).json() for _ in range(3)]
    expected = [conversation["id"] for conversation in _newest_first(made)]
    base = f"/console/projects/{project}/conversations"
    listed = re.compile(rf'class="cid" href="{base}/(conv_\w+)"')
    monkeypatch.setattr(pages, "PAGE", 2)
    with signed_in(relay.url, key) as console:
        top = console.get(base).text
        assert listed.findall(top) == expected[:2] and 'id="newer"' not in top
        older = re.search(r'href="\?([^"]+)" id="older"', top)
        assert older is not None
        bottom = console.get(f"{base}?{html.unescape(older.group(1))}").text
        assert listed.findall(bottom) == expected[2:]
        newer = re.search(r'href="\?([^"]+)" id="newer"', bottom)
        assert newer is not None and 'id="older"' not in bottom
        assert (
            listed.findall(console.get(f"{base}?{html.unescape(newer.group(1))}").text)
            == (expected[:2])
        )


# --- in a real browser -------------------------------------------------------------------------
# Playwright drives Debian's chromium (Playwright cannot download its own browsers here):
# `apt-get install -y chromium`, as .ci/run does. Screenshots go to a temporary folder, or to
# the folder RELAY_CONSOLE_SCREENSHOTS names (`make console-screenshots`: docs/console).

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page


def _chromium() -> str | None:
    return os.environ.get("RELAY_CHROMIUM") or shutil.which("chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(
            "CONSOLE BROWSER TESTS SKIPPED: playwright is not installed "
            "(pip install -e '.[dev]' installs it)"
        )
    executable = _chromium()
    if executable is None:
        pytest.skip(
            "CONSOLE BROWSER TESTS SKIPPED: no chromium on PATH "
            "(apt-get install -y chromium, as .ci/run does where apt is available)"
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("RELAY_CONSOLE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Tab:
    """A browser context and its page, watched: every request it makes (only 127.0.0.1 is
    let through; anything else is aborted and fails the test), and every error the page
    reports (a Content-Security-Policy violation is one)."""

    def __init__(
        self, browser: Browser, base_url: str, width: int = 1280, height: int = 800
    ) -> None:
        self.base_url = base_url
        self.context: BrowserContext = browser.new_context(
            viewport={"width": width, "height": height}
        )
        self.context.set_default_timeout(10_000)
        self.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base_url)
        self.requested: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page: Page = self.context.new_page()
        self.page.on(
            "console", lambda message: message.type == "error" and self.errors.append(message.text)
        )
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))

    def _route(self, route: Any) -> None:
        url = route.request.url
        self.requested.append(url)
        if urlsplit(url).hostname == "127.0.0.1":
            route.continue_()
        else:
            route.abort()

    def open(self, path: str) -> Page:
        self.page.goto(self.base_url + path)
        return self.page

    def go(self, selector: str) -> None:
        """Click what submits a form or follows a link, and wait for the page it leads to."""
        with self.page.expect_navigation():
            self.page.click(selector)

    def shot(self, folder: Path, name: str, **options: Any) -> None:
        self.page.screenshot(path=str(folder / f"{name}.png"), full_page=True, **options)

    def check_and_close(self, secrets: list[str]) -> None:
        """Nothing left 127.0.0.1, no page reported an error, and no key is in a URL, a
        cookie or the browser's storage."""
        assert self.requested, "the browser made no request"
        outside = [url for url in self.requested if urlsplit(url).hostname != "127.0.0.1"]
        assert outside == []
        assert self.errors == []
        stored = self.page.evaluate("[localStorage.length, sessionStorage.length]")
        assert stored == [0, 0]
        for secret in secrets:
            assert not any(secret in url for url in self.requested)
            assert not any(secret in cookie["value"] for cookie in self.context.cookies())
        self.context.close()


def test_a_person_runs_the_console_in_a_browser(
    relay: Relay, browser: Browser, shots: Path
) -> None:
    tab = Tab(browser, relay.url)
    page = tab.open("/console")
    assert page.url.endswith("/console/sign-in")  # no session: to the sign-in form
    tab.shot(shots, "sign-in")
    page.fill("#key", ADMIN_KEY)
    tab.go("button[type=submit]")
    assert page.url.endswith("/console/overview")
    [session] = tab.context.cookies()
    assert session["name"] == "relay_console" and session["httpOnly"]
    assert session["sameSite"] == "Strict" and session["path"] == "/console"

    # A project, its policy, a key (shown once, copied with the button).
    tab.go("nav >> text=Projects")
    page.fill("input[name=name]", "Search team")
    tab.go("text=Create project")
    assert page.locator("h1").inner_text().startswith("Search team")
    project = page.url.rsplit("/", 1)[1]
    page.fill("#policy input[name=rpm]", "600")
    page.fill("#policy input[name=max_concurrent]", "20")
    page.fill("#policy input[name=monthly_budget_usd]", "500")
    tab.go("text=Save policy")
    assert page.locator("text=Policy saved.").is_visible()
    page.fill("#new-key-form input[name=name]", "alice")
    tab.go("text=Create key")
    key = page.locator("#new-key").inner_text()
    assert key.startswith("sk-relay-")
    page.click("button[data-copy]")
    page.locator("button[data-copy]", has_text="Copied").wait_for()  # once the copy is done
    assert page.evaluate("navigator.clipboard.readText()") == key
    # The screenshot masks the key (a real one, of a server that is gone once the test ends).
    tab.shot(shots, "key-created", mask=[page.locator("#new-key")])

    # The key at work: a tool call, and the turn that gives its output back.
    call, answer = _tool_chain(relay.url, key)
    tab.go("text=Done")
    tab.shot(shots, "project")
    tab.go("text=Responses →")
    rows = page.locator("#responses tbody tr")
    assert rows.count() == 2
    assert page.locator(f"#responses a.rid >> text={answer['id']}").is_visible()
    tab.shot(shots, "responses")
    tab.go(f"a.rid >> text={answer['id']}")
    assert page.locator("#transcript").inner_text().count("Tool output") == 1
    page.click("#previous")  # its previous_response_id: the tool call
    assert page.url.endswith(f"/responses/{call['id']}")
    transcript = page.locator("#transcript").inner_text()
    assert "Tool call: get_weather" in transcript and '"location": "Paris"' in transcript
    assert call["output"][0]["call_id"] in transcript
    tab.shot(shots, "response")

    # Its usage on the charts (today's bar: two requests, their tokens and cost).
    page.goto(f"{relay.url}/console/projects/{project}")
    tab.go("text=Overview →")
    requests = page.locator("#chart-requests rect.bar.completed")
    assert requests.count() == 1
    title = requests.locator("title").text_content() or ""
    assert title == f"{time.strftime('%Y-%m-%d', time.gmtime())}: 2 completed"
    assert page.locator("#chart-tokens rect.bar.output").count() == 1
    assert "fake-tool_call" in page.locator("#by-model").inner_text()
    assert page.locator("#deployments").count() == 0  # every project's page has them
    tab.shot(shots, "overview")
    tab.go("nav >> text=Overview")
    assert project in page.locator("#by-project").inner_text()
    assert "get_weather" not in page.content()  # usage, not content
    assert page.locator("#deployments .status.healthy").count() > 0
    tab.shot(shots, "overview-all")

    # Revoke the key (after a confirmation), and the API refuses it.
    page.goto(f"{relay.url}/console/projects/{project}")
    page.once("dialog", lambda dialog: dialog.accept())
    tab.go("button.danger")
    assert page.locator("text=Key revoked.").is_visible()
    assert page.locator("#keys .status").inner_text() == "revoked"
    with client(relay.url, key) as http:
        refused = http.post("/v1/responses", json={"model": "fake-text", "input": "x"})
    assert refused.json()["error"]["code"] == "api_key_revoked"
    tab.go("text=Audit log")
    audit = page.locator("#audit").inner_text()
    for action in ("project.created", "project.updated", "key.created", "key.revoked"):
        assert action in audit
    tab.shot(shots, "audit")

    tab.go("#sign-out")
    assert page.locator("text=Signed out.").is_visible()
    assert [cookie["name"] for cookie in tab.context.cookies()] == ["relay_console_sign_in"]
    page.goto(f"{relay.url}/console/projects")
    assert page.url.endswith("/console/sign-in")
    tab.check_and_close([ADMIN_KEY, key])


def test_searching_responses_in_the_browser(
    relay: Relay, admin: AdminClient, browser: Browser
) -> None:
    """A person finds a ticket's responses by their metadata, sees what each cost, and walks
    the chain forward ("continued by") and back."""
    project = admin.project("support desk")
    _, key = admin.key(project)
    asked = _ask(relay.url, key, model="priced", input="Refund?", metadata={"ticket": "T-9"})
    followed = _ask(relay.url, key, input="And then?", previous_response_id=asked["id"])
    _ask(relay.url, key, model="priced", metadata={"ticket": "T-10"})
    [summary] = admin.call("GET", f"/projects/{project}/responses", metadata="ticket=T-9")["data"]
    cost = f"${summary['cost_usd']:,.4f}"
    tab = Tab(browser, relay.url)
    page = tab.open("/console/sign-in")
    page.fill("#key", ADMIN_KEY)
    tab.go("button[type=submit]")
    page.goto(f"{relay.url}/console/projects/{project}/responses")
    assert page.locator("#responses tbody tr").count() == 3
    page.fill("#filters input[name=metadata]", "ticket=T-9")
    tab.go("#filters button[type=submit]")
    assert "metadata=ticket%3DT-9" in page.url
    rows = page.locator("#responses tbody tr")
    assert rows.count() == 1 and asked["id"] in rows.inner_text()
    assert rows.locator("td.cost").inner_text() == cost
    tab.go(f"a.rid >> text={asked['id']}")
    assert page.locator("#cost").inner_text() == cost
    tab.go(f"#continued-by a >> text={followed['id']}")
    assert page.url.endswith(f"/responses/{followed['id']}")
    assert "And then?" in page.locator("#transcript").inner_text()
    tab.go("#previous")
    assert page.url.endswith(f"/responses/{asked['id']}")
    tab.check_and_close([ADMIN_KEY, key])


def test_a_project_key_in_the_browser_sees_its_project_only(
    relay: Relay, admin: AdminClient, browser: Browser, shots: Path
) -> None:
    project, other = admin.project("mobile app"), admin.project("billing")
    _, key = admin.key(project, name="ci bot")
    _tool_chain(relay.url, key)
    with client(relay.url, key) as http:
        said = [{"type": "message", "role": "user", "content": "My order number is 4411."}]
        chat = http.post("/v1/conversations", json={"items": said, "metadata": {"app": "ios"}})
        conversation = chat.json()["id"]
    _ask(relay.url, key, input="Where is my order?", conversation=conversation)
    theirs = _ask(relay.url, admin.key(other)[1])
    tab = Tab(browser, relay.url)
    page = tab.open("/console/sign-in")
    page.fill("#key", key)
    tab.go("button[type=submit]")
    assert page.url.endswith(f"/console/projects/{project}/overview")
    assert page.locator("nav").inner_text().split() == [
        "Overview",
        "Responses",
        "Conversations",
        "Project",
    ]
    tab.go("nav >> text=Responses")
    assert page.locator("#responses tbody tr").count() == 3
    tab.shot(shots, "project-key")
    tab.go("nav >> text=Conversations")
    tab.go(f"a.cid >> text={conversation}")
    items = page.locator("#transcript").inner_text()
    assert items.index("My order number is 4411.") < items.index("Where is my order?")
    tab.shot(shots, "conversation")
    for path, status in (
        (f"/console/projects/{other}/responses", 404),
        (f"/console/projects/{other}/responses/{theirs['id']}", 404),
        ("/console/projects", 403),
        ("/console/audit", 403),
    ):
        answer = page.goto(relay.url + path)
        assert answer is not None and answer.status == status, path
    # Each refusal is the one error those pages report (their status, as the console logs it).
    assert len(tab.errors) == 4 and all("status of 40" in error for error in tab.errors)
    tab.errors.clear()
    page.goto(f"{relay.url}/console/projects/{project}")
    assert "ci bot" in page.locator("#keys").inner_text()
    assert page.locator("button.danger").count() == 0  # nothing to change here
    tab.check_and_close([key])


def test_a_running_background_response_in_the_browser(
    relay: Relay, admin: AdminClient, browser: Browser, shots: Path
) -> None:
    project = admin.project("nightly jobs")
    _, key = admin.key(project)
    tab = Tab(browser, relay.url)
    page = tab.open("/console/sign-in")
    page.fill("#key", ADMIN_KEY)
    tab.go("button[type=submit]")
    # Ten words, one every 0.2 s: the page opens while it runs.
    started = _ask(relay.url, key, model="fake-slow", background=True)
    page.goto(f"{relay.url}/console/projects/{project}/responses/{started['id']}")
    page.locator("#live-text", has_text="one two").wait_for()
    tab.shot(shots, "live")
    page.locator("h1 .status.completed").wait_for()  # reloaded once it ended
    assert page.locator("#live").count() == 0
    opened = [url for url in tab.requested if url.endswith(started["id"])]
    assert len(opened) == 2  # the page, then its one reload
    words = "one two three four five six seven eight nine ten"
    assert words in page.locator("#transcript").inner_text()
    tab.check_and_close([ADMIN_KEY, key])


def test_cancelling_a_running_response_in_the_browser(
    relay: Relay, admin: AdminClient, browser: Browser
) -> None:
    project = admin.project("cancelled jobs")
    _, key = admin.key(project)
    tab = Tab(browser, relay.url)
    page = tab.open("/console/sign-in")
    page.fill("#key", key)  # a project key may cancel its project's responses, as the API lets it
    tab.go("button[type=submit]")
    started = _ask(relay.url, key, model="fake-slow", background=True)
    page.goto(f"{relay.url}/console/projects/{project}/responses/{started['id']}")
    page.locator("#live-text", has_text="one").wait_for()
    page.once("dialog", lambda dialog: dialog.accept())
    tab.go("#cancel")
    page.locator("h1 .status.cancelled").wait_for()
    assert page.locator("#live").count() == 0
    with client(relay.url, key) as http:
        stored = http.get(f"/v1/responses/{started['id']}").json()
    assert stored["status"] == "cancelled"
    tab.check_and_close([key])


# What every page must pass on a phone: nothing wider than the screen (a wide table scrolls
# within itself), every form control named for a screen reader, headings that skip no level.
_SMALL_SCREEN_CHECKS = """() => {
  const named = (element) => Boolean(
    (element.labels && [...element.labels].some((label) => label.textContent.trim()))
    || (element.getAttribute("aria-label") || "").trim()
    || element.getAttribute("aria-labelledby"));
  const unnamed = [...document.querySelectorAll("input:not([type=hidden]), select, textarea")]
    .filter((element) => !named(element)).map((element) => element.outerHTML);
  const buttons = [...document.querySelectorAll("button")]
    .filter((button) => !button.textContent.trim()).map((button) => button.outerHTML);
  const levels = [...document.querySelectorAll("h1, h2, h3, h4, h5, h6")]
    .map((heading) => Number(heading.tagName[1]));
  const skipped = levels.filter((level, index) => level > (index ? levels[index - 1] : 0) + 1);
  const wide = [...document.querySelectorAll("body *")]
    .filter((element) => element.getBoundingClientRect().right > innerWidth + 1
      && !element.closest("table.list"))
    .map((element) => element.tagName + "." + element.className);
  return {
    overflow: document.documentElement.scrollWidth - innerWidth,
    unnamed, buttons, levels, skipped, wide: wide.slice(0, 5),
    skip: document.querySelector("a.skip")?.getAttribute("href"),
    svgs: [...document.querySelectorAll("svg:not([aria-label])")].length,
  };
}"""


def test_a_phone_browser_fits_every_page_and_names_its_controls(
    relay: Relay, admin: AdminClient, browser: Browser, shots: Path
) -> None:
    home, second = admin.project("Phone app"), admin.project("Phone backend")
    key_id, key = admin.key(home, name="phone", projects=[second])
    call, _ = _tool_chain(relay.url, key)
    with client(relay.url, key) as http:
        conversation = http.post("/v1/conversations", json={"metadata": {"device": "x" * 60}})
    with client(relay.url, key, project=second) as http:
        assert http.post("/v1/responses", json={"model": "priced", "input": "hi"}).is_success
    tab = Tab(browser, relay.url, width=390, height=844)
    page = tab.open("/console/sign-in")

    def check(path: str) -> None:
        page.goto(relay.url + path)
        found = page.evaluate(_SMALL_SCREEN_CHECKS)
        assert found["overflow"] <= 0 and found["wide"] == [], (path, found["wide"])
        assert found["unnamed"] == [] and found["buttons"] == [], (path, found)
        assert found["levels"][:1] == [1], (path, found)
        assert found["skipped"] == [], (path, found)
        assert found["skip"] == "#main" and found["svgs"] == 0, (path, found)

    check("/console/sign-in")
    page.fill("#key", ADMIN_KEY)
    tab.go("button[type=submit]")
    # The skip link is the keyboard's first stop, shown once focused, and leads to the page's
    # content.
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
    box = page.locator("a.skip").bounding_box()
    assert box is not None and box["y"] >= 0
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    project = f"/console/projects/{home}"
    for path in (
        "/console/overview",
        "/console/overview?window=7d&by=hour",
        "/console/projects",
        project,
        f"{project}/keys/{key_id}",
        f"{project}/overview",
        f"{project}/conversations",
        f"{project}/conversations/{conversation.json()['id']}",
        "/console/audit",
        f"{project}/responses",
        f"{project}/responses/{call['id']}",
    ):
        check(path)
    # A focused control shows it: the focus ring is drawn.
    page.goto(relay.url + "/console/projects")
    page.focus("input[name=name]")
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"
    tab.go("#sign-out")

    # A key allowed two projects switches between them with the picker.
    page.fill("#key", key)
    tab.go("button[type=submit]")
    check(f"{project}/overview")
    with page.expect_navigation(url=f"**/console/projects/{second}/overview"):
        page.select_option("#project", second)  # its script submits the picker on choosing
    assert page.locator("h1").inner_text() == "Overview Phone backend"
    assert sorted(page.locator("#project option").all_inner_texts()) == [
        "Phone app",
        "Phone backend",
    ]
    check(f"/console/projects/{second}/overview")
    tab.shot(shots, "phone")
    tab.check_and_close([ADMIN_KEY, key])
