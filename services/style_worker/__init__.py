"""Style worker: pretrained style networks on ONNX Runtime (style embeddings, stylization)."""
