"""Projects and keys through the admin API and the CLI: what a platform team does by hand."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from team import ADMIN_KEY, CONFIG_KEY, CONFIG_TENANT, AdminClient, ask, client

from relay.access.keys import KEY_PREFIX


def test_a_key_is_shown_once_and_stored_as_a_digest(team_url: str, admin: AdminClient) -> None:
    project = admin.project("shown-once")
    key_id, value = admin.key(project, name="ci")
    assert value.startswith(KEY_PREFIX) and len(value) == len(KEY_PREFIX) + 44
    shown = admin.call("GET", f"/keys/{key_id}")
    assert "value" not in shown and value not in json.dumps(shown)
    assert shown["redacted_value"] == value[: len(KEY_PREFIX) + 12] + "..."
    assert shown["last_used_at"] is None
    listed = admin.call("GET", "/keys", project_id=project)["data"]
    assert [key["id"] for key in listed] == [key_id] and value not in json.dumps(listed)
    audit = json.dumps(admin.call("GET", "/audit_log", limit=100))
    assert key_id in audit and value not in audit
    with client(team_url, value) as http:
        assert ask(http).status_code == 200
    assert admin.call("GET", f"/keys/{key_id}")["last_used_at"] is not None


def test_revocation_and_expiry_take_effect(team_url: str, admin: AdminClient) -> None:
    project = admin.project()
    key_id, value = admin.key(project)
    with client(team_url, value) as http:
        assert ask(http).status_code == 200
        admin.revoke(key_id)
        # This instance forgets at once; others within key_cache_s (0.2 s here).
        answer = ask(http)
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "api_key_revoked"
    soon = int(time.time()) + 2
    _, expiring = admin.key(project, expires_at=soon)
    with client(team_url, expiring) as http:
        assert ask(http).status_code == 200
        time.sleep(max(0.0, soon - time.time()) + 0.3)
        assert ask(http).json()["error"]["code"] == "api_key_expired"


def test_a_key_uses_only_its_models(team_url: str, admin: AdminClient) -> None:
    _, value = admin.key(admin.project(), models=["fake-text"])
    with client(team_url, value) as http:
        assert ask(http).status_code == 200
        refused = ask(http, model="fake-json")
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "model_not_allowed"
        # A fallback list may not smuggle another model in.
        refused = ask(http, models=["fake-json"])
        assert refused.json()["error"]["code"] == "model_not_allowed"
        names = [model["id"] for model in http.get("/v1/models").json()["data"]]
        assert names == ["fake-text"]


def test_projects_are_tenants_picked_with_x_project_id(team_url: str, admin: AdminClient) -> None:
    first, second = admin.project("first"), admin.project("second")
    _, value = admin.key(first, projects=[second])
    with client(team_url, value) as http:
        mine = ask(http).json()["id"]
    with client(team_url, value, project=second) as http:
        theirs = ask(http).json()["id"]
        assert http.get(f"/v1/responses/{mine}").status_code == 404
        assert http.get(f"/v1/responses/{theirs}").status_code == 200
    admin.call("DELETE", f"/projects/{second}")
    with client(team_url, value, project=second) as http:
        archived = ask(http)
    assert archived.status_code == 403
    assert archived.json()["error"]["code"] == "project_archived"
    refused = admin.http.post("/admin/v1/keys", json={"project_id": second})
    assert refused.status_code == 400


def test_config_keys_keep_working_and_can_get_limits(team_url: str, admin: AdminClient) -> None:
    with client(team_url, CONFIG_KEY) as http:
        assert ask(http).status_code == 200
        # The config tenant becomes a project by id, to carry limits.
        admin.call("POST", "/projects", {"id": CONFIG_TENANT, "name": "from the config"})
        admin.call("POST", f"/projects/{CONFIG_TENANT}", {"policy": {"rpm": 1}})
        time.sleep(0.3)
        # Three: should a minute end between the first two, the second is admitted (the
        # sliding window weighs the previous minute's one request below a whole one).
        answers = [ask(http).status_code for _ in range(3)]
        assert 429 in answers
        admin.call("POST", f"/projects/{CONFIG_TENANT}", {"policy": {"rpm": None}})
        assert ask(http).status_code == 200


def test_admin_errors_are_envelopes(team_url: str, admin: AdminClient) -> None:
    cases = [
        ("POST", "/projects", {"name": ""}, 400),
        ("POST", "/projects", {"name": "x", "policy": {"rpm": 0}}, 400),
        ("POST", "/projects", {"name": "x", "colour": "red"}, 400),
        ("POST", "/keys", {"project_id": "proj_missing"}, 404),
        ("GET", "/projects/proj_missing", None, 404),
        ("DELETE", "/keys/key_missing", None, 404),
        ("GET", "/usage?group_by=colour", None, 400),
        ("GET", "/projects?limit=0", None, 400),
    ]
    for method, path, body, status in cases:
        answer = admin.http.request(method, f"/admin/v1{path}", json=body)
        assert answer.status_code == status, (path, answer.text)
        assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
    broken = admin.http.post(
        "/admin/v1/projects", content=b"{", headers={"content-type": "application/json"}
    )
    assert broken.status_code == 400


def test_listing_pages_through_projects(team_url: str, admin: AdminClient) -> None:
    for index in range(5):
        admin.project(f"page-{index}")
    seen: list[str] = []
    after = None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = admin.call("GET", "/projects", **params)
        seen += [project["id"] for project in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert len(seen) == len(set(seen)) >= 5 and seen == sorted(seen)


def test_the_cli_runs_a_team_end_to_end(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'database_url = "sqlite:///{tmp_path}/relay.db"\n'
        f'[[admin_keys]]\nkey = "{ADMIN_KEY}"\n'
        '[[routes]]\nmodel = "fake-text"\nprovider = "fake"\nupstream_model = "text"\n'
        "price = { input = 1000.0, output = 2000.0 }\n"
    )
    relay = [str(Path(sys.executable).with_name("relay")), "admin", "--config", str(config)]

    def run(*args: str) -> dict[str, object]:
        done = subprocess.run([*relay, *args], capture_output=True, text=True, check=True)
        result: dict[str, object] = json.loads(done.stdout)
        return result

    project = run("project", "create", "cli-team", "--rpm", "100", "--daily-budget", "5")
    assert project["policy"] == {"rpm": 100, "daily_budget_usd": 5.0}
    key = run("key", "create", "--project", str(project["id"]), "--name", "dev")
    value = str(key["value"])
    shown = run("key", "show", str(key["id"]))
    assert "value" not in shown
    run("project", "update", str(project["id"]), "--unset", "rpm", "--tpm", "1000")
    assert run("project", "show", str(project["id"]))["policy"] == {
        "tpm": 1000,
        "daily_budget_usd": 5.0,
    }
    from live_server import relay_serve

    with relay_serve({"RELAY_KEY_CACHE_S": "0.5"}, "--config", str(config)) as served:
        with client(served.url, value) as http:
            assert ask(http).status_code == 200
        run("key", "revoke", str(key["id"]))
        time.sleep(0.7)  # key_cache_s: the server learns of it within that time
        with client(served.url, value) as http:
            assert ask(http).status_code == 401
    usage = run("usage", "--group-by", "day,key")
    assert usage == [  # type: ignore[comparison-overlap]
        {
            "day": time.strftime("%Y-%m-%d", time.gmtime()),
            "key": key["id"],
            "requests": 1,
            "input_tokens": 1,
            "cached_tokens": 0,
            "output_tokens": 3,
            "cost_usd": 0.007,
            "estimated_requests": 0,
        }
    ]
    actions = [entry["action"] for entry in run("audit")["data"]]  # type: ignore[index]
    assert actions == ["key.revoked", "project.updated", "key.created", "project.created"]
    assert value not in json.dumps(run("audit"))


def test_admin_inputs_out_of_range_are_400(team_url: str, admin: AdminClient) -> None:
    project = admin.project("bounds")
    for path, params in (
        ("/projects", {"limit": "00050000"}),
        ("/projects", {"limit": "1" + "0" * 5000}),
        ("/audit_log", {"after": "9" * 40}),
    ):
        answer = admin.http.get(f"/admin/v1{path}", params=params)
        assert answer.status_code == 400, answer.text
    for body in (
        {"policy": {"credit_usd": 1e300}},
        {"policy": {"rpm": 10**30}},
    ):
        answer = admin.http.post(f"/admin/v1/projects/{project}", json=body)
        assert answer.status_code == 400, answer.text
    answer = admin.http.post("/admin/v1/keys", json={"project_id": project, "expires_at": 2**63})
    assert answer.status_code == 400
    answer = admin.http.post("/admin/v1/projects", json={"name": "x", "id": "a b/c?"})
    assert answer.status_code == 400
    with client(team_url, admin.key(project)[1]) as http:
        assert ask(http).status_code == 200  # the project still serves
