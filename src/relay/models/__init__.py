"""The value and config models Relay's settings are made of: a project's or key's policy and a
price (`policy`), each provider kind's deployment config (`deployments`). They sit below
`relay.config`, `relay.access` and `relay.providers`, which all read them, so that none of
those imports another for them."""
