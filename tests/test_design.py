"""docs/design.md's picture of the packages must be the one the code has (tools/import_graph.py)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_design_picture_matches_the_code():
    tool = _tool()
    doc = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    assert tool.doc_block(doc) == tool.rendered_block(), "run: python tools/import_graph.py --write-doc"


def test_import_graph_finds_a_planted_cycle_and_an_upward_arrow():
    tool = _tool()
    graph = {"clinqa.a.x": {"clinqa.b.y"}, "clinqa.b.y": {"clinqa.a.x"}, "clinqa.c.z": set()}
    assert tool.cycles(graph) == [["clinqa.a.x", "clinqa.b.y"]]
    assert tool.upward_arrows({"data": {"specialties"}, "specialties": {"data"}}) == [("data", "specialties")]


def test_no_arrow_points_up():
    tool = _tool()
    assert tool.upward_arrows(tool.package_graph(tool.module_imports())) == []


MAX_MODULE_LINES = 600  # "a module you read in one sitting" (docs/design.md)


def test_no_module_is_longer_than_a_sitting():
    long = {
        str(p.relative_to(ROOT)): n
        for p in sorted((ROOT / "src" / "clinqa").rglob("*.py"))
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"split these along a seam that is already there: {long}"
