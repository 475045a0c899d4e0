"""Who may do what, and how much: projects and keys, rate limits, budgets, usage and
idempotency. Everything here hangs off `Access.principal`, which every data-plane route passes
through (relay.api.auth)."""
