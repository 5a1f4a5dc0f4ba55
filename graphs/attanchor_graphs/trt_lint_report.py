"""The result of a TensorRT lint: findings grouped by (severity, code, op, where, message), as JSON or a table.

Produced by :func:`attanchor_graphs.trt_lint.lint_model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SEVERITIES", "Finding", "LintReport"]

SEVERITIES = ("error", "warning", "note")


@dataclass
class Finding:
    severity: str  # "error" | "warning" | "note"
    code: str  # unsupported-op, unknown-op, custom-op, opset, ir-version, dtype, type-support, const-input,
    #            restriction, data-dependent-shape, local-function, int64, inline
    message: str
    op: str | None = None
    where: str = "graph"  # "graph", "inlined function D::N", "subgraph 'body' of Loop 'x'"
    nodes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "severity": self.severity, "code": self.code, "op": self.op, "where": self.where,
            "message": self.message, "count": len(self.nodes), "nodes": self.nodes[:20],
        }


@dataclass
class LintReport:
    name: str
    target: str
    trt_version: str
    opset: int | None
    opset_range: tuple[int, int]
    ir_version: int
    local_functions: list[str]
    op_counts: dict[str, int]
    findings: list[Finding]
    allow_data_dependent: bool = False
    data_dependent: bool = False

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def notes(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "note"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict:
        return {
            "graph": self.name,
            "target": self.target,
            "tensorrt": self.trt_version,
            "ok": self.ok,
            "opset": self.opset,
            "opset_range": list(self.opset_range),
            "ir_version": self.ir_version,
            "local_functions": self.local_functions,
            "data_dependent_shapes": self.data_dependent,
            "allow_data_dependent": self.allow_data_dependent,
            "counts": {"errors": len(self.errors), "warnings": len(self.warnings), "notes": len(self.notes)},
            "findings": [f.to_json() for f in self.findings],
            "op_counts": dict(sorted(self.op_counts.items())),
        }

    def format_table(self) -> str:
        lo, hi = self.opset_range
        head = (
            f"{self.name}: TensorRT {self.trt_version} (opsets {lo}-{hi}), opset {self.opset}, IR {self.ir_version}, "
            f"local functions: {', '.join(self.local_functions) or 'none'}"
        )
        status = "OK" if self.ok else "FAIL"
        lines = [head, f"  {status}: {len(self.errors)} errors, {len(self.warnings)} warnings, {len(self.notes)} notes"]
        if self.findings:
            rows = [("severity", "code", "op", "where", "n", "message")]
            rows += [(f.severity, f.code, f.op or "-", f.where, str(len(f.nodes) or "-"), f.message)
                     for f in self.findings]
            widths = [max(len(r[i]) for r in rows) for i in range(5)]
            for r in rows:
                lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.op_counts.items()))
        lines.append(f"  ops ({sum(self.op_counts.values())}): {counts}")
        return "\n".join(lines)
