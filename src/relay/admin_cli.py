"""`relay admin ...`: the admin API's operations from a shell, on the configured database
(no server needed; changes reach running servers within `key_cache_s`). Prints JSON; says on
stderr which database it works on, and never makes the default one where none is."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from relay.access.admin import Admin
from relay.access.usage import GROUPS, Ledger
from relay.config import load_settings
from relay.console import report_config_error, without_password
from relay.errors import RelayError, StartupError
from relay.storage.database import Database, open_database, sqlite_file


def _listed(text: str) -> list[str]:
    return [entry.strip() for entry in text.split(",") if entry.strip()]


_POLICY_FLAGS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "rpm": ("--rpm", int, "requests per minute"),
    "tpm": ("--tpm", int, "tokens per minute"),
    "max_concurrent": ("--max-concurrent", int, "requests at once"),
    "daily_budget_usd": ("--daily-budget", float, "US dollars per UTC day"),
    "monthly_budget_usd": ("--monthly-budget", float, "US dollars per UTC month"),
    "credit_usd": ("--credit", float, "US dollars over all time (prepaid credit)"),
    "mcp_servers": (
        "--mcp-servers",
        _listed,
        "the MCP servers it may reach, comma-separated (URL prefixes or hosts; '' for none)",
    ),
}


def _policy_flags(parser: argparse.ArgumentParser, *, unset: bool) -> None:
    for field, (flag, kind, what) in _POLICY_FLAGS.items():
        parser.add_argument(flag, dest=field, type=kind, help=what)
    if unset:
        parser.add_argument(
            "--unset",
            action="append",
            default=[],
            choices=sorted(_POLICY_FLAGS),
            help="lift a limit (repeatable)",
        )


def _policy(args: argparse.Namespace) -> dict[str, Any]:
    policy = {field: getattr(args, field) for field in _POLICY_FLAGS}
    policy = {field: value for field, value in policy.items() if value is not None}
    for field in getattr(args, "unset", []):
        policy[field] = None
    return policy


def _text_file(path: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {error}") from None


def _messages_file(path: str) -> list[Any]:
    try:
        messages = orjson.loads(_text_file(path))
    except orjson.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"{path} does not hold JSON") from None
    if not isinstance(messages, list):
        raise argparse.ArgumentTypeError(f"{path} must hold a JSON list of messages")
    return messages


def _content_flags(parser: argparse.ArgumentParser) -> None:
    """A template version's content: its instructions, and its messages from a JSON file
    (`[{"role": "user", "content": "..."}]`); `{{name}}` placeholders in either."""
    instructions = parser.add_mutually_exclusive_group()
    instructions.add_argument("--instructions", help="the instructions")
    instructions.add_argument(
        "--instructions-file", dest="instructions", type=_text_file, help="... read from a file"
    )
    parser.add_argument(
        "--messages-file", dest="messages", type=_messages_file, help="a JSON list of messages"
    )


def _content(args: argparse.Namespace) -> dict[str, Any]:
    content = {"instructions": args.instructions, "messages": args.messages}
    return {field: value for field, value in content.items() if value is not None}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="relay admin", description="Administer Relay.")
    root.add_argument("--config", type=Path, help="TOML config file (env vars override it)")
    nouns = root.add_subparsers(dest="noun", required=True)

    project = nouns.add_parser("project", help="projects (tenants)").add_subparsers(
        dest="verb", required=True
    )
    create = project.add_parser("create", help="create a project")
    create.add_argument("name")
    create.add_argument("--id", help="a chosen id (e.g. a config file's tenant)")
    _policy_flags(create, unset=False)
    project.add_parser("list", help="list projects")
    project.add_parser("show", help="show a project").add_argument("id")
    update = project.add_parser("update", help="rename, or set limits and budgets")
    update.add_argument("id")
    update.add_argument("--name")
    _policy_flags(update, unset=True)
    project.add_parser("archive", help="archive a project (its keys stop working)").add_argument(
        "id"
    )

    key = nouns.add_parser("key", help="client API keys").add_subparsers(dest="verb", required=True)
    create = key.add_parser("create", help="create a key (its value is printed once)")
    create.add_argument("--project", required=True, help="its default project")
    create.add_argument("--name", default="")
    create.add_argument("--also-project", action="append", default=[], dest="projects")
    create.add_argument("--model", action="append", dest="models", help="allow only these")
    create.add_argument("--expires-in-days", type=float)
    _policy_flags(create, unset=False)
    listing = key.add_parser("list", help="list keys")
    listing.add_argument("--project")
    key.add_parser("show", help="show a key").add_argument("id")
    update = key.add_parser("update", help="rename, or set limits and budgets")
    update.add_argument("id")
    update.add_argument("--name")
    _policy_flags(update, unset=True)
    key.add_parser("revoke", help="revoke a key").add_argument("id")

    prompt = nouns.add_parser("prompt", help="a project's prompt templates").add_subparsers(
        dest="verb", required=True
    )
    create = prompt.add_parser("create", help="create a template (its version 1)")
    create.add_argument("name")
    create.add_argument("--project", required=True)
    _content_flags(create)
    prompt.add_parser("list", help="list a project's templates").add_argument(
        "--project", required=True
    )
    show = prompt.add_parser("show", help="show a template's latest version, or --version")
    show.add_argument("id")
    show.add_argument("--project", required=True)
    show.add_argument("--version")
    version = prompt.add_parser("version", help="add a version (earlier ones never change)")
    version.add_argument("id")
    version.add_argument("--project", required=True)
    _content_flags(version)
    archive = prompt.add_parser("archive", help="archive a template (requests naming it fail)")
    archive.add_argument("id")
    archive.add_argument("--project", required=True)

    usage = nouns.add_parser("usage", help="usage and cost, summed")
    usage.add_argument("--group-by", default="day", help=f"comma-separated: {', '.join(GROUPS)}")
    usage.add_argument("--project")
    usage.add_argument("--key")
    usage.add_argument("--start", help="first day, YYYY-MM-DD")
    usage.add_argument("--end", help="last day, YYYY-MM-DD")

    nouns.add_parser("audit", help="the latest admin actions")
    return root


async def _run(args: argparse.Namespace, db: Database) -> Any:
    admin = Admin(db)
    actor = f"cli:{getpass.getuser()}"
    commands: dict[tuple[str, str | None], Callable[[], Awaitable[Any]]] = {
        ("project", "create"): lambda: admin.create_project(
            actor, {"name": args.name, "id": args.id, "policy": _policy(args)}
        ),
        ("project", "list"): lambda: admin.list_projects(None, 100),
        ("project", "show"): lambda: admin.get_project(args.id),
        ("project", "update"): lambda: admin.update_project(
            actor,
            args.id,
            {"name": args.name, "policy": _policy(args)},
        ),
        ("project", "archive"): lambda: admin.archive_project(actor, args.id),
        ("key", "create"): lambda: admin.create_key(
            actor,
            {
                "project_id": args.project,
                "name": args.name,
                "projects": args.projects,
                "models": args.models,
                "policy": _policy(args),
                "expires_at": None
                if args.expires_in_days is None
                else int(time.time() + args.expires_in_days * 86400),
            },
        ),
        ("key", "list"): lambda: admin.list_keys(args.project, None, 100),
        ("key", "show"): lambda: admin.get_key(args.id),
        ("key", "update"): lambda: admin.update_key(
            actor,
            args.id,
            {
                field: value
                for field, value in (("name", args.name), ("policy", _policy(args)))
                if value is not None
            },
        ),
        ("key", "revoke"): lambda: admin.revoke_key(actor, args.id),
        ("prompt", "create"): lambda: admin.create_prompt(
            actor, args.project, {"name": args.name, **_content(args)}
        ),
        ("prompt", "list"): lambda: admin.list_prompts(args.project, None, 100),
        ("prompt", "show"): lambda: admin.get_prompt(args.project, args.id, args.version),
        ("prompt", "version"): lambda: admin.add_prompt_version(
            actor, args.project, args.id, _content(args)
        ),
        ("prompt", "archive"): lambda: admin.archive_prompt(actor, args.project, args.id),
        ("usage", None): lambda: Ledger(db).report(
            [name for name in args.group_by.split(",") if name],
            project=args.project,
            key=args.key,
            start=args.start,
            end=args.end,
        ),
        ("audit", None): lambda: admin.audit(None, 100),
    }
    return await commands[(args.noun, getattr(args, "verb", None))]()


async def _main(args: argparse.Namespace) -> Any:
    settings = load_settings(args.config)
    print(f"relay admin: database {without_password(settings.database_url)}", file=sys.stderr)
    # A forgotten --config must not make an empty database wherever this runs: the default
    # database is used only where it exists (a configured one is made, as relay serve would).
    path = sqlite_file(settings.database_url)
    if "database_url" not in settings.model_fields_set and path is not None and not path.exists():
        raise StartupError(
            f"no database at {path} (the default database_url, under this folder): pass the "
            "--config of the server to administer, or set RELAY_DATABASE_URL"
        )
    db = await open_database(settings.database_url)
    try:
        return await _run(args, db)
    finally:
        await db.close()


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.noun == "usage":
        unknown = [name for name in args.group_by.split(",") if name and name not in GROUPS]
        if unknown:
            print(f"relay admin: unknown --group-by {unknown}", file=sys.stderr)
            return 2
    try:
        result = asyncio.run(_main(args))
    except RelayError as error:
        print(f"relay admin: {error.message}", file=sys.stderr)
        return 1
    except StartupError as error:
        print(f"relay admin: {error}", file=sys.stderr)
        return 1
    except ValueError as error:  # pydantic's ValidationError included
        report_config_error("relay admin", error)
        return 2
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0
