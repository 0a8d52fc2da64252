"""The package's import graph, read from the source (every import statement, function-level ones
included): no cycle, `distributed.py` a leaf, `rl/` importing nothing of the package outside
`rl/`, and `lora.py` not importing model loading (model.py depends on lora.py, not back)."""
import ast
import importlib
import pkgutil
from pathlib import Path

import safegrpo

PKG = Path(safegrpo.__file__).parent


def module_names() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(PKG)], "safegrpo."))


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PKG / rel).with_suffix(".py").is_file() or (PKG / rel / "__init__.py").is_file()


def imports_of(name: str) -> set[str]:
    """The package modules `name` imports anywhere in its source (`from .x import y` counts as
    .x.y when y is a module, else .x)."""
    rel = Path(*name.split(".")[1:])
    is_pkg = (PKG / rel / "__init__.py").is_file()
    path = PKG / rel / "__init__.py" if is_pkg else (PKG / rel).with_suffix(".py")
    here = name.split(".") if is_pkg else name.split(".")[:-1]        # the package relative imports start from
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "safegrpo"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif (node.module or "").split(".")[0] == "safegrpo":
                base = node.module.split(".")
            else:
                continue
            for a in node.names:
                full = ".".join(base + [a.name])
                out.add(full if _is_module(full) else ".".join(base))
    return {m for m in out if m != name and m != "safegrpo"}


def graph() -> dict[str, set[str]]:
    return {m: imports_of(m) for m in module_names()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph g as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(g.get(u, ())):
            if state.get(v) == "open":
                return stack[stack.index(v):] + [v]
            if v not in state and (c := visit(v)):
                return c
        state[u] = "done"
        stack.pop()
        return None
    for u in sorted(g):
        if u not in state and (c := visit(u)):
            return c
    return None


def test_the_cycle_finder_finds_cycles_and_only_them():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert imports_of("safegrpo.trainer") >= {"safegrpo.collect", "safegrpo.update", "safegrpo.policy",
                                              "safegrpo.distributed", "safegrpo.data.prepare"}


def test_every_module_imports_and_no_import_cycle_exists():
    for m in module_names():
        importlib.import_module(m)
    g = graph()
    assert find_cycle(g) is None, " -> ".join(find_cycle(g))


def test_layers_depend_in_one_direction():
    g = graph()
    assert g["safegrpo.distributed"] == set(), g["safegrpo.distributed"]          # a leaf
    for m, deps in g.items():
        if m.startswith("safegrpo.rl."):
            assert all(d.startswith("safegrpo.rl.") for d in deps), (m, deps)   # the engine is self-contained
    assert "safegrpo.model" not in g["safegrpo.lora"] and "safegrpo.lora" in g["safegrpo.model"]
