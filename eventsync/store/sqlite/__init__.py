"""The mirror in SQLite: the connection and the migrations (the embedded default)."""
