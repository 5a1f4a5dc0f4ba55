"""JUnit XML for CI systems (`check --junit FILE`, `eval --junit FILE`): one test case per check.

The format is the one GitHub Actions reporters, GitLab, Jenkins and Azure Pipelines render: <testsuites>
holding one <testsuite> with <properties> and <testcase classname=... name=...>, each either passing
(empty), failed (<failure message=...>) or errored (<error message=...>), with <system-out> for the
figures. Written with xml.etree (no dependency), to a temporary sibling renamed into place, so a CI
step never uploads half a file.
"""

from __future__ import annotations

import os
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Case:
    classname: str
    name: str
    failure: str | None = None  # the one line saying what fell short
    error: str | None = None  # the run could not judge this case (the verb stopped with an error)
    output: str | None = None  # figures worth reading beside a pass (<system-out>)
    seconds: float = 0.0


def write_junit(path: Path, suite: str, cases: list[Case], properties: dict | None = None,
                seconds: float = 0.0) -> Path:
    failures = sum(c.failure is not None for c in cases)
    errors = sum(c.error is not None for c in cases)
    counts = {"tests": str(len(cases)), "failures": str(failures), "errors": str(errors), "skipped": "0",
              "time": f"{seconds:.3f}"}
    root = ET.Element("testsuites", {"name": "attanchor-export", **counts})
    node = ET.SubElement(root, "testsuite", {
        "name": suite, **counts, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())})
    if properties:
        props = ET.SubElement(node, "properties")
        for key, value in properties.items():
            if value is not None:
                ET.SubElement(props, "property", {"name": key, "value": str(value)})
    for c in cases:
        case = ET.SubElement(node, "testcase", {"classname": c.classname, "name": c.name, "time": f"{c.seconds:.3f}"})
        if c.failure is not None:
            ET.SubElement(case, "failure", {"message": c.failure, "type": "threshold"}).text = c.failure
        if c.error is not None:
            ET.SubElement(case, "error", {"message": c.error, "type": "error"}).text = c.error
        if c.output:
            ET.SubElement(case, "system-out").text = c.output
    ET.indent(root)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
    os.replace(tmp, path)
    return path


def check_cases(rows: list[dict]) -> list[Case]:
    """`check`: one case per check row (graph, case, metric), as the --json report lists them."""
    cases = []
    for r in rows:
        value, limit = r["value"], r["limit"]
        relation = ">=" if r.get("higher_is_better") else "<="
        shown = f"{r['metric']} = {value:g} (limit {relation} {limit:g})"
        failure = None if r["passed"] else f"{r['graph']} {r['case']}: {shown}"
        cases.append(Case(f"check.{r['graph']}", f"{r['case']}: {r['metric']}", failure=failure, output=shown))
    return cases


def error_case(verb: str, message: str) -> Case:
    """The one case of a run that stopped with an error before it could judge anything."""
    return Case(verb, verb, error=message)


__all__ = ["Case", "check_cases", "error_case", "write_junit"]
