"""Layering: no import cycles among the project's modules (imports inside functions count), no
module under utils/ or models/ imports a top-level script, and each layer imports only layers
below it (models < utils.config, utils.sampling < utils.guidance, utils.data < utils.baselines,
utils.evaluation < utils.app < the entry points)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"main", "diffusion_latent", "multi_classifier", "h_classification"}
LAYERS = [("models", 0), ("utils.config", 1), ("utils.sampling", 1), ("utils.guidance", 2), ("utils.data", 2),
          ("utils.baselines", 3), ("utils.evaluation", 3), ("utils.app", 4)]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    files = [p for d in ("models", "utils") for p in (ROOT / d).rglob("*.py")]
    files += [ROOT / f"{s}.py" for s in SCRIPTS]
    return {module_name(p): p for p in files}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports, anywhere in it (module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n:
                out.add(n)
    return out


def graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {m: imports_of(p, set(mods)) - {m} for m, p in mods.items()}


def layer(mod: str) -> int | None:
    if mod in SCRIPTS:
        return 5
    return next((rank for prefix, rank in LAYERS if mod == prefix or mod.startswith(prefix + ".")), None)


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None
    for m in sorted(g):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycles():
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_library_code_never_imports_an_entry_point():
    bad = [(m, n) for m, deps in graph().items() if m not in SCRIPTS for n in deps if n in SCRIPTS]
    assert not bad, bad


def test_layers_point_down():
    bad = []
    for m, deps in graph().items():
        lm = layer(m)
        for n in deps:
            ln = layer(n)
            if lm is not None and ln is not None and ln > lm:
                bad.append(f"{m} (layer {lm}) imports {n} (layer {ln})")
    assert not bad, bad
    assert all(layer(m) is not None for m in graph() if m not in ("utils",)), \
        [m for m in graph() if layer(m) is None]


def test_only_the_entry_points_edit_sys_path():
    """models/, utils/, bench/ and scripts/ import the project as installed by ``make venv`` (a .pth
    file) or run with ``python -m``: none of them changes sys.path."""
    edits = []
    for d in ("models", "utils", "bench", "scripts"):
        for p in (ROOT / d).rglob("*.py"):
            for node in ast.walk(ast.parse(p.read_text())):
                if (isinstance(node, ast.Attribute) and node.attr in ("insert", "append", "extend")
                        and isinstance(node.value, ast.Attribute) and node.value.attr == "path"
                        and isinstance(node.value.value, ast.Name) and node.value.value.id == "sys"):
                    edits.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert not edits, edits
