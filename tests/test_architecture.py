"""The house rules, checked from the code itself: imports walk one way (no cycle anywhere in
pcr_fast, kernels included), no module reaches for another module's private names, and every
"DESIGN §N" reference points at a section of docs/DESIGN.md that exists."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent


def package_modules() -> Dict[str, Path]:
    """Module name → file for pcr_fast/ and kernels/ (installed as pcr_fast.kernels)."""
    out: Dict[str, Path] = {}
    for base, prefix in ((ROOT / "pcr_fast", "pcr_fast"), (ROOT / "kernels", "pcr_fast.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_edges(modules: Dict[str, Path]) -> Tuple[Dict[str, Set[str]], List[str], List[str]]:
    """(edges between package modules, private names imported across modules, private
    attributes read from another package module)."""
    edges: Dict[str, Set[str]] = {m: set() for m in modules}
    private_imports: List[str] = []
    private_attrs: List[str] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"
        aliases: Dict[str, str] = {}  # local name → package module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in modules:
                        edges[name].add(a.name)
                        if a.asname:
                            aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(name, is_package, node)
                if not target.startswith("pcr_fast"):
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in modules:
                        edges[name].add(sub)
                        aliases[a.asname or a.name] = sub
                    elif target in modules:
                        edges[name].add(target)
                        if a.name.startswith("_") and not a.name.startswith("__"):
                            private_imports.append(f"{name}: from {target} import {a.name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases and node.attr.startswith("_") and not node.attr.startswith("__"):
                private_attrs.append(f"{name}: {node.value.id}.{node.attr} ({aliases[node.value.id]})")
        edges[name].discard(name)
    return edges, private_imports, private_attrs


def find_cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycle_in_the_package():
    edges, _, _ = import_edges(package_modules())
    assert sum(len(e) for e in edges.values()) > 50, "the walk found too few imports to mean anything"
    assert find_cycles(edges) == []


def test_the_cycle_finder_finds_a_cycle():
    """The walk above must be able to fail."""
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_private_name_crosses_a_module_boundary():
    _, private_imports, private_attrs = import_edges(package_modules())
    assert private_imports == []
    assert private_attrs == []


def test_kernels_are_read_through_one_launch_module():
    """TRITON_INTERPRET is read in exactly one place (kernels/launch.py)."""
    hits = [p for p in (ROOT / "pcr_fast").rglob("*.py") if "TRITON_INTERPRET\"" in p.read_text()
            or "TRITON_INTERPRET')" in p.read_text()]
    hits += [p for p in (ROOT / "kernels").rglob("*.py") if "os.environ" in p.read_text()
             and "TRITON_INTERPRET" in p.read_text()]
    assert [p.relative_to(ROOT).as_posix() for p in hits] == ["kernels/launch.py"]


def _tracked_text_files() -> List[Path]:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, check=True)
        names = out.stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / n for n in names if n.endswith((".py", ".md", ".sh", ".txt")) and (ROOT / n).exists()]


def test_every_design_reference_points_at_an_existing_section():
    design = ROOT / "docs" / "DESIGN.md"
    sections = set(re.findall(r"^#+ §(\d+)\b", design.read_text(encoding="utf-8"), flags=re.M))
    assert len(sections) >= 5, "docs/DESIGN.md must number its sections '## §N ...'"
    refs = []
    for path in _tracked_text_files():
        for n in re.findall(r"DESIGN §(\d+)", path.read_text(encoding="utf-8", errors="replace")):
            refs.append((path.relative_to(ROOT).as_posix(), n))
    assert refs, "no DESIGN references found: the check would be vacuous"
    missing = [(p, n) for p, n in refs if n not in sections]
    assert missing == []
