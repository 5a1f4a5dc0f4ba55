"""Precision: fp16, int8 and int4 forms of an artifact, the int8 calibration inputs and the accuracy gate
that decides whether each form is kept."""
