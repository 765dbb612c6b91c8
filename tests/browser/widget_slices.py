"""The cells a notebook's widgets need, and nothing else: what the browser suite runs in JupyterLab.

nbval executes every notebook top to bottom once; the browser suite then only has to prove that each
widget works in a real browser. Re-running whole notebooks for that (notebook 11 trains for minutes)
would execute every notebook twice, so the suite runs a *slice*: every ``show(...)`` cell, plus the
earlier cells that define the names it uses, transitively (a def-use closure over the cells' ASTs).

What the slice cannot see: state changed by a call's side effect (``store.append(...)`` inside a
helper). A widget whose data arrives that way shows what it shows without it; notebook 11's rollout
browser, for instance, falls back to its demonstration rollouts when no training cell ran.
"""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import nbformat

BUILTINS = frozenset(dir(builtins)) | {"display", "get_ipython"}


def _parse(source: str) -> ast.Module | None:
    """The cell's AST, IPython magics and shell lines (``%``, ``!``) dropped; None if it is not Python."""
    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
    try:
        return ast.parse("\n".join(lines))
    except SyntaxError:
        return None


def _bound_by(target: ast.AST) -> set[str]:
    """Names an assignment target binds or modifies (``x``, ``a, b``, ``x[i]``, ``x.attr`` → ``x``)."""
    if isinstance(target, ast.Name):
        return {target.id}
    if isinstance(target, (ast.Tuple, ast.List)):
        return set().union(*(_bound_by(t) for t in target.elts)) if target.elts else set()
    if isinstance(target, ast.Starred):
        return _bound_by(target.value)
    if isinstance(target, (ast.Subscript, ast.Attribute)):
        return _bound_by(target.value)
    return set()


def defined_names(tree: ast.Module) -> set[str]:
    """Names a cell binds at the notebook's top level (not inside its functions or classes)."""
    names: set[str] = set()

    def visit(statements):
        for node in statements:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, ast.Assign):
                names.update(*(_bound_by(t) for t in node.targets))
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                names.update(_bound_by(node.target))
            elif isinstance(node, (ast.For, ast.AsyncFor)):
                names.update(_bound_by(node.target))
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                names.update(*(_bound_by(i.optional_vars) for i in node.items if i.optional_vars is not None))
            for field in ("body", "orelse", "finalbody"):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    visit(getattr(node, field, []))
            for handler in getattr(node, "handlers", []):
                visit(handler.body)
        for node in ast.walk(ast.Module(body=list(statements), type_ignores=[])):
            if isinstance(node, ast.NamedExpr):
                names.add(node.target.id)

    visit(tree.body)
    return names


def used_names(tree: ast.Module) -> set[str]:
    """Every name a cell reads, inside its functions too (they run later, with the notebook's globals)."""
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - BUILTINS


def modified_names(tree: ast.Module) -> set[str]:
    """Names a cell changes in place at its top level: ``x[k] = …``, ``x.a = …``, ``x += …``."""
    names: set[str] = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            if isinstance(target, (ast.Subscript, ast.Attribute)) or (
                isinstance(node, ast.AugAssign) and isinstance(target, ast.Name)
            ):
                names |= _bound_by(target)
    return names


def is_widget_cell(source: str) -> bool:
    """A cell that displays a course widget: it calls ``show(...)`` (``helpers.widgets.show``)."""
    tree = _parse(source)
    return tree is not None and any(
        isinstance(n, ast.Call) and (getattr(n.func, "id", None) == "show" or getattr(n.func, "attr", None) == "show")
        for n in ast.walk(tree)
    )


def widget_slice(cells: list[str]) -> list[int]:
    """Indices (ascending) of the cells the widget cells need: the widget cells and, transitively, the
    latest earlier cell that defines each name they read."""
    trees = [_parse(c) for c in cells]
    defines = [defined_names(t) if t else set() for t in trees]
    uses = [used_names(t) if t else set() for t in trees]
    modifies = [modified_names(t) if t else set() for t in trees]
    wanted = {i for i, c in enumerate(cells) if is_widget_cell(c)}
    todo = sorted(wanted)
    while todo:
        i = todo.pop()
        for name in uses[i] - defines[i]:
            source = next((j for j in range(i - 1, -1, -1) if name in defines[j]), None)
            if source is not None and source not in wanted:
                wanted.add(source)
                todo.append(source)
        # a cell that modifies a name (x[k] = …, x.a = …, x += …) needs the cell that made it
        for name in modifies[i]:
            source = next((j for j in range(i - 1, -1, -1) if name in defines[j]), None)
            if source is not None and source not in wanted:
                wanted.add(source)
                todo.append(source)
    return sorted(wanted)


def slice_notebook(path: Path) -> nbformat.NotebookNode:
    """A copy of the notebook at ``path`` with only its widget slice, outputs cleared, run in the
    notebook's own folder (a first cell changes to it, so relative paths resolve as in the course)."""
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    keep = widget_slice([c.source for c in code])
    cells = [nbformat.v4.new_code_cell(f"import os\nos.chdir({str(path.parent.resolve())!r})")]
    for i in keep:
        cells.append(nbformat.v4.new_code_cell(code[i].source))
    return nbformat.v4.new_notebook(cells=cells, metadata=notebook.metadata)
