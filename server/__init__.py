"""gRPC reranking service."""

__version__ = "0.1.0"
