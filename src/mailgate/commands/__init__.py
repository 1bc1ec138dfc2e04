"""Typer sub-commands of the ``mailgate`` CLI, one module per owner concern.

``common`` holds what every command shares: settings from ``--config``, one runtime
per command, ``--json`` output and error rendering. `mailgate.cli` assembles them.
"""
