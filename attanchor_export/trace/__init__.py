"""Trace: checkpoint -> fp32 ONNX graphs. Graph specs (every input, output and dynamic axis, declared once),
the vision and decoder traces, the hand-written embedding graph, the anchor threshold and the decoder rewrite."""
