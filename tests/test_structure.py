"""How the package reads: the runner's steps as one short function, a report from one run record, no callbacks
into the runner, a dozen top-level modules beside the sub-packages, and no import cycle."""
import ast
import inspect
from pathlib import Path

import finetune
from finetune.train import recipe

PACKAGE = Path(finetune.__file__).parent


def test_the_run_is_one_short_function_of_named_steps():
    tree = ast.parse(inspect.getsource(recipe.steps))
    branches = [n for n in ast.walk(tree) if isinstance(n, (ast.If, ast.IfExp, ast.For, ast.While, ast.Try,
                                                            ast.Match))]
    lines = inspect.getsource(recipe.steps).count("\n")
    assert lines <= 60 and len(branches) <= 5, (lines, len(branches))
    assert len(inspect.signature(recipe.report).parameters) <= 4


def test_no_module_takes_a_run_function_as_an_argument():
    """Walk-forward and stages import the plain run; nothing receives the runner's functions to call back."""
    from finetune.train import stages, walk_forward
    for function in (stages.run_stages, walk_forward.run_folds):
        assert list(inspect.signature(function).parameters) == ["cfg", "run_dir"], function


def imports(path: Path) -> set[str]:
    """The finetune modules a file imports, at any depth of the file (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("finetune")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finetune") \
                and node.level == 0:
            for alias in node.names:  # `from finetune.x import y`: y is a module when a file says so
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if module_path(candidate) else node.module)
    return found


def module_path(name: str) -> Path | None:
    base = PACKAGE.parent / name.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles():
    graph = {module_name(p): {m for m in imports(p) if module_path(m)} for p in PACKAGE.rglob("*.py")}
    for name in graph:
        graph[name].discard(name)
    state, cycles = {}, []

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"
    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_a_dozen_top_level_modules_beside_the_sub_packages():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert len(modules) <= 12, modules
    assert {"config", "data", "eval", "rundir", "serving", "tasks", "train"} <= set(packages), packages
