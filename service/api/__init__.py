"""The API layer: HTTP and WebSocket edge of an API process (FastAPI); never imports onnxruntime."""

from service.api.app import create_app

__all__ = ["create_app"]
