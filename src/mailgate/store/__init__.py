"""Persistence: schema, migrations, the database handle and the blob store."""
