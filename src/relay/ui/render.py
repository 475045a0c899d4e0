"""Pages from Jinja2 templates (`templates/`), autoescaped: whatever a response, a key's name
or an audit entry holds is shown as text, never as markup. Jinja2 is imported for the first
page a process renders: a process whose console nobody opens does without it."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from relay.errors import RelayError

if TYPE_CHECKING:
    import jinja2

    from relay.ui.guard import Viewer


def _when(seconds: int | float | None) -> str:
    if seconds is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def expiry_day(seconds: int | None) -> str:
    """The day a key's expiry ends (as a date field shows it, and pages.update_key reads it
    back): an expiry at midnight UTC ends the day before."""
    return "" if seconds is None else time.strftime("%Y-%m-%d", time.gmtime(seconds - 1))


def dollars(value: float | None) -> str:
    """US dollars as the console shows them: cents, or four decimals under a dollar."""
    if value is None:
        return ""
    return f"${value:,.4f}" if value < 1 else f"${value:,.2f}"


def _pretty(value: Any) -> str:
    """JSON indented for reading; a string that holds JSON (tool arguments) is read first."""
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return str(value)
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


@functools.cache
def _templates() -> jinja2.Environment:
    import jinja2

    templates = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    templates.filters["when"] = _when
    templates.filters["pretty"] = _pretty
    templates.filters["expiry_day"] = expiry_day
    templates.filters["dollars"] = dollars
    return templates


def page(
    request: Request, viewer: Viewer | None, template: str, status: int = 200, **context: Any
) -> Response:
    html = (
        _templates().get_template(template).render(viewer=viewer, path=request.url.path, **context)
    )
    return HTMLResponse(html, status_code=status)


def error(request: Request, viewer: Viewer | None, failure: RelayError) -> Response:
    """A refusal or failure as a page, with the status the API would give it."""
    answer = page(request, viewer, "error.html", failure.status, error=failure)
    answer.headers.update(failure.headers)
    return answer


def see_other(path: str) -> Response:
    """The answer to a change: the page to see it on (a reload of that never repeats it)."""
    return RedirectResponse(path, status_code=303)


def project_path(project_id: str, rest: str = "") -> str:
    return f"/console/projects/{project_id}{rest}"
