"""Checks: is an artifact right? Graph and end-to-end parity against the source model (at export and in
`check`), task accuracy (`eval`, and the gate's task part), how outputs are compared, and the tables."""
