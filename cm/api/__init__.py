"""The head's HTTP API (CONTRACT.md "HTTP API (v1)") and its Python client, cm.Client."""
