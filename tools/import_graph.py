"""Print the imports between clinqa's packages (and any module-level import cycle) from the code.

    python tools/import_graph.py            # a text table: package -> packages it imports
    python tools/import_graph.py --mermaid  # the same as a mermaid graph (docs/design.md)
    python tools/import_graph.py --check    # exit 1 on an import cycle or an arrow pointing up
    python tools/import_graph.py --write-doc  # regenerate the picture in docs/design.md

Imports inside functions count too (they are still dependencies); `TYPE_CHECKING` blocks do not.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "clinqa"

# The layers of the brief, top to bottom; a package may import only packages in lower layers
# (or its own). The ground floor (errors, jsonl, runs, textsafe, ...) is everything not listed.
LAYERS: list[set[str]] = [
    {"cli"},
    {"serve"},
    {"records", "experiments"},
    {"adapt", "analysis"},
    {"evaluate", "specialties"},
    {"data", "models"},
]


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                for sub in ast.walk(child):
                    if hasattr(sub, "lineno"):
                        out.add(sub.lineno)
    return out


def module_imports() -> dict[str, set[str]]:
    """module -> clinqa modules it imports (absolute and relative imports resolved)."""
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_lines(tree)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import module` depends on the module, not on pkg's __init__
                subs = [f"{base}.{a.name}" for a in node.names]
                names = [n for n in subs if n in modules] or [base]
            for name in names:
                if name.startswith("clinqa") and name in modules and name != mod:
                    graph[mod].add(name)
    return graph


def package_of(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) == 1:
        return "clinqa"
    return parts[1]


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for mod, deps in graph.items():
        src = package_of(mod)
        out[src]
        for d in deps:
            dst = package_of(d)
            if dst != src and dst != "clinqa":
                out[src].add(dst)
    return dict(out)


def layer(pkg: str) -> int:
    for i, names in enumerate(LAYERS):
        if pkg in names:
            return i
    return len(LAYERS)  # ground floor


def upward_arrows(pg: dict[str, set[str]]) -> list[tuple[str, str]]:
    ground = len(LAYERS)
    return sorted(
        (a, b)
        for a, deps in pg.items()
        for b in deps
        if a != b and layer(b) <= layer(a) and not (layer(a) == layer(b) == ground)
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Module-level import cycles (Tarjan's strongly connected components of size > 1)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def mermaid(pg: dict[str, set[str]]) -> str:
    """Packages and their imports; the ground floor (errors, jsonl, ...) that everything may use is left out."""
    ground = len(LAYERS)
    lines = ["graph TD"]
    for a in sorted(pg, key=lambda p: (layer(p), p)):
        if layer(a) == ground:
            continue
        for b in sorted(pg[a], key=lambda p: (layer(p), p)):
            if layer(b) != ground:
                lines.append(f"  {a} --> {b}")
    return "\n".join(lines)


DOC = SRC.parents[1] / "docs" / "design.md"
START, END = "<!-- import-graph:start -->", "<!-- import-graph:end -->"


def doc_block(text: str) -> str:
    """The mermaid block between the markers of docs/design.md."""
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def rendered_block() -> str:
    return "```mermaid\n" + mermaid(package_graph(module_imports())) + "\n```"


def main(argv: list[str]) -> int:
    graph = module_imports()
    pg = package_graph(graph)
    if "--mermaid" in argv:
        print(mermaid(pg))
        return 0
    if "--write-doc" in argv:
        text = DOC.read_text(encoding="utf-8")
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        DOC.write_text(f"{head}{START}\n{rendered_block()}\n{END}{tail}", encoding="utf-8")
        return 0
    found = cycles(graph)
    up = upward_arrows(pg)
    if "--check" not in argv:
        for pkg in sorted(pg, key=lambda p: (layer(p), p)):
            print(f"{pkg:12} -> {', '.join(sorted(pg[pkg], key=lambda p: (layer(p), p))) or '-'}")
    for comp in found:
        print("cycle: " + " <-> ".join(comp))
    for a, b in up:
        print(f"arrow up: {a} -> {b}")
    return 1 if (found or up) and "--check" in argv else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
