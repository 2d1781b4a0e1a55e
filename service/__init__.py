"""nextword service: ONNX Runtime engine, session state, batching and the FastAPI app."""
