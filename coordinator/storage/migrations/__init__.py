"""The store's schema migrations (Alembic): the schema is what ``versions/`` builds, revision by revision, on
SQLite and PostgreSQL alike. ``coordinator/storage/schema.py`` runs them."""
