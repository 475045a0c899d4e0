"""The web console at /console (`console = true`): pages rendered on the server over the
admin operations (relay.access.admin) and the store, the same ones the admin API documents.

`guard.py` is the one way in (sign-in, sessions, CSRF, the gate for every page); `pages.py`
(what Relay did: the overview, responses, conversations, the audit log) and `projects.py`
(projects and keys) the handlers; `transcript.py` what stored items look like in order,
`charts.py` usage over time as SVG, `render.py` the templates, `routes.py` the table and the
headers every answer carries.
"""
