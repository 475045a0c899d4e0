"""Runs apart from requests: background responses, their event logs for stream resumption,
cancellation, and the leases that end any run whose process died."""
