"""Checks: is an artifact right? The PyTorch reference, graph and end-to-end parity at export, the `check` and
`eval` verbs, and the tables that report them."""
