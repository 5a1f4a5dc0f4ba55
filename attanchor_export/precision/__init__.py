"""Precision: fp16, int8 and int4 forms of an artifact, the calibration inputs they need and the accuracy gate
that decides whether each form is kept."""
