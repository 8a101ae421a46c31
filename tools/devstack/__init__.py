"""Developer tooling: start the whole system locally on real servers (PostgreSQL, Redis, an
S3-compatible store, as processes from pip packages), and regenerate the gRPC code."""
