"""Which package may import which: the HTTP API (cm/api) imports nothing of the head (cm/head); the head
imports the API to start its thread and issue its tokens. Lazy imports inside functions count too."""

import ast
import subprocess
import sys
from pathlib import Path

import cm

CM = Path(cm.__file__).parent


def imported(path: Path) -> set[str]:
    """Every module a file imports, wherever in it (absolute names; relative ones made absolute)."""
    package = ".".join(path.relative_to(CM.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def test_the_api_imports_nothing_of_the_head():
    offending = {str(p.relative_to(CM.parent)): sorted(n for n in imported(p) if n == "cm.head" or n.startswith("cm.head."))
                 for p in sorted((CM / "api").rglob("*.py"))}
    assert {p: names for p, names in offending.items() if names} == {}


def test_loading_the_api_loads_no_head_module():
    code = ("import sys, cm.api.server, cm.api.routes, cm.api.types, cm.api.client, cm.api.openapi; "
            "print(sorted(m for m in sys.modules if m.startswith('cm.head')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
