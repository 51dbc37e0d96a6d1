"""The mirror in PostgreSQL: the connection and the dialect (driver.py, dialect.py), the
migrations, and the coordination of replicas (coordination.py: leadership, the shared request
budget)."""
