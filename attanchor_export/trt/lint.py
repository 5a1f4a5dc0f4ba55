"""TensorRT lint of a whole artifact: every graph, in the form TensorRT would be given it.

    report = lint_artifact("out/tiny", target="10.3")    # graph name -> attanchor_graphs LintReport
    report.ok; report.format_table(); report.to_json()

The graph-level checks are :func:`attanchor_graphs.trt_lint.lint_model`; this module only knows the
artifact: which file TensorRT builds per graph (``Manifest.graph_file(graph, "trt")``: a quantized
artifact may hand TensorRT decoder.trt.onnx with QDQ INT4 instead of onnxruntime's MatMulNBits file)
and which graphs may have data-dependent shapes (those whose manifest entry notes
``data_dependent_shapes``).
"""

from __future__ import annotations

from attanchor_graphs.trt_lint import LintReport, lint_model
from attanchor_graphs.trt_ops import table
from attanchor_runtime.manifest import Manifest, NoGraphForm

from attanchor_export.errors import ExportError

__all__ = ["ArtifactLintReport", "lint_artifact"]


class ArtifactLintReport(dict):
    """graph name -> LintReport (a dict, so callers iterate ``.items()``), plus the artifact-level view."""

    def __init__(self, folder: str, target: str, graphs: dict[str, LintReport]):
        super().__init__(graphs)
        self.folder, self.target = folder, target

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.values())

    def to_json(self) -> dict:
        return {"folder": self.folder, "target": self.target, "ok": self.ok,
                "graphs": {k: r.to_json() for k, r in self.items()}}

    def format_table(self) -> str:
        return "\n".join(r.format_table() for r in self.values())


def _file_for_tensorrt(manifest: Manifest, graph: str) -> str:
    try:
        return manifest.graph_file(graph, "trt")
    except NoGraphForm:  # no TensorRT form (MatMulNBits only): linting the onnxruntime file shows why
        return manifest.graphs[graph].file


def lint_artifact(folder, target: str = "10.3") -> ArtifactLintReport:
    """Lint every graph listed in the artifact's manifest.json for a TensorRT target (external data unread)."""
    try:
        table(target)
    except ValueError as e:  # a user's --target: one line, not an internal error
        raise ExportError(str(e)) from None
    manifest = Manifest.load(folder, verify="none")
    reports = {}
    for graph, spec in manifest.graphs.items():
        file = _file_for_tensorrt(manifest, graph)
        allow = spec.notes.data_dependent_shapes
        reports[graph] = lint_model(manifest.path(file), target, allow_data_dependent=allow, name=file)
    return ArtifactLintReport(str(manifest.folder), target, reports)
