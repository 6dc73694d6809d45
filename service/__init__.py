"""hybrid-serve: the gateway (HTTP surface, router, engine client and launcher)."""

__version__ = "0.1.0"
