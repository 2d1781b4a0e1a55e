"""Training, evaluation and ONNX export of word-level LSTM/GRU language models."""
