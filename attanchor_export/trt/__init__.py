"""TensorRT: the engine build plan (plain data), the build itself, and artifact-level TensorRT lint."""
