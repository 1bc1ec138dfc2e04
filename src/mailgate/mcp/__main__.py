"""``python -m mailgate.mcp``: the same as ``mailgate mcp``."""

from mailgate.commands.mcp import main

main()
