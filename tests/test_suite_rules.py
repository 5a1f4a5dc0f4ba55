"""Rules the test suite holds itself to, checked over its own source.

CI installs the base dependencies and the [export] extra; a test that `pytest.importorskip`s one of them
would turn a broken install into a green run of skips. Optional extras (tensorrt, a GPU) may skip.
"""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def required_modules() -> set[str]:
    """Import names of the base dependencies and the [export] extra, read from pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text()
    base = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    export = re.search(r"^export = \[(.*?)^\]", text, re.S | re.M).group(1)
    names = re.findall(r'"([A-Za-z0-9_.-]+)', base + export)
    aliases = {"Pillow": "PIL", "easy-vqa": "easy_vqa", "huggingface_hub": "huggingface_hub"}
    return {aliases.get(n, n.replace("-", "_")) for n in names}


def test_required_dependencies_are_never_skipped():
    required = required_modules()
    assert {"torch", "transformers", "peft", "onnxruntime", "PIL"} <= required, required  # the parse found them
    offenders = []
    for path in sorted(TESTS.glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for name in re.findall(r"importorskip\(\s*[\"']([\w.]+)", line):
                if name.split(".")[0] in required or name.startswith("attanchor_"):
                    offenders.append(f"{path.name}:{number}: {name}")
    assert not offenders, "import these, do not skip on them: " + ", ".join(offenders)
