"""The engine layer: ONNX Runtime models, the step scheduler and every session's state."""
