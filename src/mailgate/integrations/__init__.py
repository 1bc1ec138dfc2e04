"""Bridges from agent frameworks to the gateway (``mailgate.integrations.autogen``, the
MCP server). Nothing is imported here: each bridge imports its framework itself, so
``import mailgate`` never needs an optional extra."""
