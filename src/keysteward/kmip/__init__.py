"""KMIP front-end: TTLV over mutual TLS, each operation a request of the access path (docs/kmip.md)."""
