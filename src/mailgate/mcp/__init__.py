"""The agent's tools over the Model Context Protocol.

``mailgate mcp`` (or ``python -m mailgate.mcp``) serves them on stdin/stdout for a
local client such as Claude Desktop; ``/mcp`` on the gateway's HTTP app serves them
over streamable HTTP (:mod:`mailgate.mcp.http`). Both are the same tools
(:mod:`mailgate.mcp.server`) over the same services, acting as one agent key.
"""

from mailgate.mcp.server import TOOL_NAMES, build_mcp_server

__all__ = ["TOOL_NAMES", "build_mcp_server"]
