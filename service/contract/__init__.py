"""The shared contract of engine and API: tokenizer, vocabulary, artifact, limits, wire protocol."""
