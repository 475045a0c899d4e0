"""JSON Schemas that clients send (tool parameters, `text.format` schemas) are checked before
anything runs: an invalid one is the client's error (a 400 naming it), not the upstream's 502.

Checked against the meta-schema of the draft the schema names in `$schema` (2020-12 when it
names none) by `jsonschema`. That costs about 0.8 ms per schema on a small machine, and agents
send the same tools on every turn, so verdicts are remembered by a digest of the schema's
canonical JSON: a schema seen before costs a hash. `jsonschema` (with its referencing and
rpds libraries, about 3 MB a process) is imported by the first schema to check.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import orjson

from relay.errors import InvalidRequest

REMEMBERED = 1024
MAX_MESSAGE = 200
# Digest -> the error message for an invalid schema, None for a valid one.
_verdicts: OrderedDict[bytes, str | None] = OrderedDict()


def _problem(schema: dict[str, Any]) -> str | None:
    import jsonschema
    from jsonschema.validators import validator_for

    if not isinstance(schema.get("$schema", ""), str):
        return "'$schema' must be a string naming a JSON Schema draft"
    try:
        validator = validator_for(schema, default=jsonschema.Draft202012Validator)
        error = jsonschema.exceptions.best_match(
            validator(validator.META_SCHEMA).iter_errors(schema)
        )
    except Exception as failure:  # not seen; the library's failure must not be a 500
        return f"it cannot be read as a JSON Schema ({type(failure).__name__})"
    if error is None:
        return None
    where = "".join(f"[{step!r}]" for step in error.absolute_path)
    # The message quotes the offending value, which may be long.
    return str(error.message)[:MAX_MESSAGE] + (f" (at {where[:MAX_MESSAGE]})" if where else "")


def check_json_schema(schema: dict[str, Any], param: str) -> None:
    """Raise a 400 naming `param` when `schema` is not a valid JSON Schema."""
    key = hashlib.blake2b(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS), digest_size=16)
    digest = key.digest()
    if digest in _verdicts:
        _verdicts.move_to_end(digest)
        problem = _verdicts[digest]
    else:
        problem = _problem(schema)
        _verdicts[digest] = problem
        if len(_verdicts) > REMEMBERED:
            _verdicts.popitem(last=False)
    if problem is not None:
        raise InvalidRequest(
            f"Invalid schema for '{param}': {problem}", param=param, code="invalid_json_schema"
        )
