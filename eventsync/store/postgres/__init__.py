"""The mirror in PostgreSQL: the connection, the dialect, the migrations and the coordination
of replicas (leadership, the shared request budget)."""
