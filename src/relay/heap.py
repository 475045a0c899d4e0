"""The garbage collector, tuned for a server whose heap is mostly built at start-up.

A full (generation 2) collection walks every tracked object, and a worker starts with a few
hundred thousand of them (schemas, the routes, the providers' clients, imported modules) that
live as long as it does. Under load the collector walked them all every few seconds, a pause of
tens of milliseconds that every request in flight waited for: the p99 at 64 connections.
`freeze_startup_heap` moves what start-up built out of the collector's sight (`gc.freeze`), so
that a full collection walks only what requests left behind. Once a process: an application
started again in it (tests, an embedding program) must not freeze the garbage of the
previous one for good."""

from __future__ import annotations

import gc

_frozen = False


def freeze_startup_heap() -> None:
    global _frozen
    if _frozen:
        return
    _frozen = True
    # Collected first, so that start-up's garbage is freed rather than frozen for good.
    gc.collect()
    gc.freeze()
