"""Relay: a self-hostable server for the OpenAI Responses API."""

__version__ = "0.1.0"
