"""The web console at /console (`console = true`): pages rendered on the server over the
admin operations (relay.access.admin) and the store, the same ones the admin API documents.

`guard.py` is the one way in (sign-in, sessions, CSRF, the gate for every page), `pages.py`
the handlers, `transcript.py` what a stored response's items look like as a conversation,
`render.py` the templates, `routes.py` the table and the headers every answer carries.
"""
