"""REST bridge over the gRPC contract: the legacy endpoints, TEI's and Infinity's /rerank, Cohere's /v1 and /v2."""

from rest_bridge.app import create_app, start_bridge
from rest_bridge.config import BridgeConfig

__all__ = ["BridgeConfig", "create_app", "start_bridge"]
