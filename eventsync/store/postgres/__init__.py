"""The PostgreSQL backend: any number of `serve` replicas on one database, in one schema."""
