"""AnchorInsert as an ONNX model-local function, its numpy reference, and graph passes.

Depends on onnx and numpy only, so both the exporter and the torch-free runtime can use it.
"""
