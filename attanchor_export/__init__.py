"""Export AttAnchor vision-language models to ONNX graphs and TensorRT engines."""

__version__ = "0.1.0"
