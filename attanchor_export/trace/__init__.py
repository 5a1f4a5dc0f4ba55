"""Trace: checkpoint -> fp32 ONNX graphs, as the family's graph specs declare them: the vision and decoder
traces, the hand-written embedding graph, the anchor threshold, and decoder rewrites with their parity."""
