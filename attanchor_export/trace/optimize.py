"""The decoder optimisation step of an export: the grouped-attention pass on decoder.onnx, in place.

The pass itself (what it rewrites and why) is attanchor_graphs.attention_pass, a pure ONNX graph
pass; this step loads the exported decoder without its weights, runs the pass, and replaces the
file, after an ONNX Runtime parity check against the original when asked
(trace.decoder_parity). Weights (external data) are never read or rewritten.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import onnx
from attanchor_graphs.attention_pass import OPTIMIZE_VERSION, optimize_decoder_model

from attanchor_export.trace.decoder_parity import decoder_parity


def optimize_decoder(path, dims, check: bool = False, atol: float = 1e-4, output=None) -> dict:
    """Rewrite decoder.onnx at `path` in place (or to `output`, next to it so the external data
    resolves); returns a JSON-able report. With check=True the rewritten graph is compared with
    the original in ONNX Runtime first and the file is only replaced when the parity holds
    (ValueError otherwise, original untouched)."""
    started = time.perf_counter()
    path = Path(path)
    target = Path(output) if output is not None else path
    if target.parent.resolve() != path.parent.resolve():
        raise ValueError("optimize_decoder writes next to the original graph: its external data is shared")
    model = onnx.load(str(path), load_external_data=False)
    report = optimize_decoder_model(model, dims.num_heads, dims.num_kv_heads, dims.head_dim)
    tmp = target.with_name(target.name + ".optimizing")
    tmp.write_bytes(model.SerializeToString())
    try:
        onnx.checker.check_model(str(tmp))
        if check:
            parity = decoder_parity(path, tmp, dims)
            report["parity"] = parity
            if not parity["max_abs_diff"] <= atol:
                raise ValueError(
                    f"optimized decoder differs from the original by {parity['max_abs_diff']:.3g} (> {atol}); "
                    f"kept {path} unchanged"
                )
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report


__all__ = ["OPTIMIZE_VERSION", "optimize_decoder"]
