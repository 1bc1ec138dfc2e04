"""SMTP ingest benchmark: mailgate end to end beside two bare aiosmtpd baselines.

Absolute messages/s drift between machines and runs, so every figure is printed next
to baselines measured in the same run on the same machine: an aiosmtpd sink that
discards, and one that writes the raw bytes durably to SQLite. The ratios are the
result; ``python -m bench`` (``make bench``) runs it, ``--quick`` smoke-tests it.
"""
