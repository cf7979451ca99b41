"""REST bridge: the legacy JSON endpoints and a Cohere-style /v1/rerank, over the gRPC contract."""

from rest_bridge.app import create_app, start_bridge
from rest_bridge.config import BridgeConfig

__all__ = ["BridgeConfig", "create_app", "start_bridge"]
