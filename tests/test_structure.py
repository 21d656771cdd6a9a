"""The package's shape: imports go one way (no cycle, no cpt_jax import hidden in a function
body), and every config field declares its kinds beside its default."""

import ast
import pathlib
import re
import subprocess
import sys

from cpt_jax import config

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "cpt_jax"
# Imports inside functions allowed where they defer an optional heavy dependency, said in a comment.
LAZY_WORDS = ("optional", "heavy", "lm-eval", "lm_eval", "torch")


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _resolve(name: str, modules: dict) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: pathlib.Path, modules: dict) -> list[tuple[str, bool, str]]:
    """(imported cpt_jax module, inside a function, the source lines around it) of `module`."""
    tree, lines = ast.parse(path.read_text()), path.read_text().splitlines()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names]
            for name in names:
                target = _resolve(name, modules) if name.startswith("cpt_jax") else None
                if target and target != module:
                    near = " ".join(lines[max(0, child.lineno - 2):child.lineno])
                    out.append((target, in_function, near))
            visit(child, inner)

    visit(tree, False)
    return out


def test_no_cpt_jax_import_is_hidden_in_a_function():
    modules = _modules()
    hidden = [f"{m} -> {target}" for m, path in modules.items() if m != "cpt_jax"  # the package's lazy exports
              for target, in_function, near in _imports(m, path, modules)
              if in_function and not ("#" in near and any(w in near.lower() for w in LAZY_WORDS))]
    assert hidden == []


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    edges = {m: set() for m in modules}
    for m, path in modules.items():
        for target, in_function, _ in _imports(m, path, modules):
            if m == "cpt_jax" and in_function:
                continue  # the package's lazy exports run after it is imported
            edges[m].add(target)
            parent = target.rpartition(".")[0]
            while parent != "cpt_jax" and not m.startswith(parent + "."):
                edges[m].add(parent)  # importing a submodule from outside its package runs the package first
                parent = parent.rpartition(".")[0]
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m, stack):
        state[m] = 1
        for t in sorted(edges[m]):
            if t == m:
                continue
            if state.get(t) == 1 and not cycle:
                cycle.extend(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [m])
    assert cycle == []


def test_a_hidden_import_and_a_cycle_are_found(tmp_path, monkeypatch):
    """The two checks above can fail: a function-level import and a two-module cycle are seen."""
    pkg = tmp_path / "cpt_jax"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cpt_jax import b\n")
    (pkg / "b.py").write_text("def f():\n    from cpt_jax import a\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    modules = _modules()
    assert ("cpt_jax.a", True) in [(t, f) for t, f, _ in _imports("cpt_jax.b", modules["cpt_jax.b"], modules)]
    try:
        test_the_import_graph_has_no_cycle()
    except AssertionError:
        return
    raise AssertionError("the cycle a -> b -> a was not found")


def test_every_config_field_declares_its_kinds():
    declared = config._flat_fields(config._declared())
    assert all(isinstance(f, config.Field) for f in declared.values()), [
        k for k, f in declared.items() if not isinstance(f, config.Field)]
    kinds = {config.RESUME, config.BRANCH, config.NUMERICS}
    assert all(f.kinds <= kinds for f in declared.values())
    flat = config.flatten(config.base().to_dict())
    covered = lambda k: any(k == f or k.startswith(f + ".") for f in declared)  # noqa: E731
    assert [k for k in flat if not covered(k)] == []
    # A field may change on resume or in a branch, not both kinds at once (RESUME already allows a branch).
    assert not set(config.fields(config.RESUME)) & set(config.fields(config.BRANCH))


def test_the_docs_list_every_config_field_with_its_default():
    """docs/running.md's reference table is config.reference() itself: it cannot drift from the code."""
    text = (pathlib.Path(__file__).parent.parent / "docs" / "running.md").read_text()
    begin, end = "<!-- config reference: begin -->\n", "\n<!-- config reference: end -->"
    assert text[text.index(begin) + len(begin):text.index(end)] == config.reference()
    rows = config.reference().splitlines()[2:]
    assert [r.split("`")[1] for r in rows] == list(config._flat_fields(config._declared()))
    assert "| `optimizer.peak_lr` | `0.0002` | in a branch |" in config.reference()  # the paper's 2e-4


def test_the_loader_and_its_old_name_in_a_fresh_notebook():
    """`import cpt_jax` then `cpt_jax.load`, and the old `cpt_jax.models.load`, as a fresh
    interpreter sees them (the package imports nothing heavy until asked)."""
    code = ("import sys, cpt_jax; assert 'jax' not in sys.modules; assert cpt_jax.models.load is cpt_jax.load; "
            "from cpt_jax.inference import load; assert load is cpt_jax.load")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent, timeout=120)


def test_every_extra_the_docs_name_is_one_setup_py_defines():
    """`pip install -e '.[a,b]'` in the README and docs/ installs what it says (TensorBoard once had none)."""
    tree = ast.parse((PACKAGE.parent / "setup.py").read_text())
    extras = next(k.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                  for k in node.keywords if k.arg == "extras_require")
    defined = {key.value for key in extras.keys}
    root = PACKAGE.parent
    docs = [root / "README.md", *(root / "docs").rglob("*.md"), *(root / "launch").rglob("*")]
    named = {name for path in docs if path.is_file()
             for group in re.findall(r"\.\[([a-z0-9_,-]+)\]", path.read_text()) for name in group.split(",")}
    assert "tensorboard" in named and named <= defined, sorted(named - defined)
