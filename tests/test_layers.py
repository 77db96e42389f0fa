"""The runtime's modules form layers whose imports point one way (docs/design.md): a test reads every import of
`ilc.runtime` and `ilc.kernels` and fails on an import that climbs, a cycle, or an import hidden in a function."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"ilc.runtime": ROOT / "runtime", "ilc.runtime.vllm": ROOT / "runtime" / "vllm", "ilc.kernels": ROOT / "kernels"}

# Lowest first; a module may import only from layers below its own (docs/design.md draws the same picture).
LAYERS = (
    ("ilc.kernels.table",),  # the kernels import nothing from the runtime
    ("ilc.kernels.decode",),
    ("ilc.kernels.quant_decode",),
    ("ilc.kernels.prefill",),
    ("ilc.kernels",),
    ("ilc.kernels.ops",),
    ("ilc.runtime.heads",),  # vocabulary: modes, head kinds, selection, the savings formula
    ("ilc.runtime.bits",),  # precision per head and its byte rule
    ("ilc.runtime.plan", "ilc.runtime.quant"),  # the format; KV integers
    ("ilc.runtime.architectures", "ilc.runtime.adapter", "ilc.runtime.selection", "ilc.runtime.sequence",
     "ilc.runtime.slots"),
    ("ilc.runtime.cache",),
    ("ilc.runtime.static_cache", "ilc.runtime.report"),
    ("ilc.runtime.attention_common",),
    ("ilc.runtime.reference", "ilc.runtime.replay"),
    ("ilc.runtime.kernel_dispatch",),
    ("ilc.runtime.attention",),
    ("ilc.runtime.apply",),
    ("ilc.runtime",),
    # the vLLM plugin sits on top: vLLM's model, cache spec and attention around the same plan
    ("ilc.runtime.vllm.layout",),  # imports no vLLM
    ("ilc.runtime.vllm.spec",),
    ("ilc.runtime.vllm.attention",),
    ("ilc.runtime.vllm.model",),
    ("ilc.runtime.vllm.plugin",),
    ("ilc.runtime.vllm",),
)
RANK = {module: rank for rank, layer in enumerate(LAYERS) for module in layer}
# Imports allowed inside functions: optional heavy dependencies, loaded where they are used.
LAZY_OK = {"peft", "ilc.kernels.decode", "ilc.kernels.quant_decode", "ilc.kernels.prefill"}  # the kernels' modules import Triton


def modules():
    for package, folder in PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            yield (package if path.stem == "__init__" else f"{package}.{path.stem}"), path


def imports(name: str, path: Path):
    """(imported module, line, inside a function) for every import of one module, relative ones resolved."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in RANK else base for a in node.names]
        else:
            continue
        for target in targets:
            yield target, node.lineno, id(node) in nested


def edges():
    """(importer, imported, line) between our modules, with the package of a module imported across packages."""
    for name, path in modules():
        for target, line, _ in imports(name, path):
            if target not in RANK:
                continue
            yield name, target, line
            parent = target.rsplit(".", 1)[0]
            if parent in RANK and not name.startswith(parent + ".") and name != parent:
                yield name, parent, line


def test_every_runtime_and_kernel_module_has_a_layer():
    assert {name for name, _ in modules()} == set(RANK)


def test_imports_point_down_the_layers():
    climbing = [f"{a} (line {line}) imports {b}" for a, b, line in edges() if RANK[a] <= RANK[b] and a != b]
    assert climbing == [], "imports that climb or stay within a layer:\n" + "\n".join(climbing)


def test_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges():
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}

    def visit(node, path):
        if state.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(node):] + [node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        visit(node, [])


def test_no_import_hidden_in_a_function():
    hidden = [f"{name}:{line} imports {target}" for name, path in modules() for target, line, inside in
              imports(name, path) if inside and target not in LAZY_OK]
    assert hidden == [], "imports inside functions (a hidden cycle, or a dependency to declare):\n" + "\n".join(hidden)


def test_layer_check_catches_a_climbing_import(tmp_path, monkeypatch):
    """The walk itself sees a climbing import (guards the tests above against reading nothing)."""
    folder = tmp_path / "runtime"
    folder.mkdir()
    (folder / "heads.py").write_text("def f():\n    from .apply import apply_plan\n")
    monkeypatch.setitem(PACKAGES, "ilc.runtime", folder)
    monkeypatch.setitem(PACKAGES, "ilc.kernels", tmp_path / "none")
    monkeypatch.setitem(PACKAGES, "ilc.runtime.vllm", tmp_path / "none")
    assert [(a, b) for a, b, _ in edges()] == [("ilc.runtime.heads", "ilc.runtime.apply")]
    assert [inside for _, _, inside in imports("ilc.runtime.heads", folder / "heads.py")] == [True]


def test_runtime_imports_neither_the_compiler_nor_its_dependencies():
    code = ("import sys\nimport ilc.runtime, ilc.kernels\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('networkx', 'scipy') or "
            "(m.startswith('ilc.') and not m.startswith(('ilc.runtime', 'ilc.kernels'))))\nprint(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
