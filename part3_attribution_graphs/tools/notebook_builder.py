"""Build the exercises and solutions notebooks from one lesson source.

    python -m part3_attribution_graphs.tools.notebook_builder # write both, execute the solutions one
    python -m part3_attribution_graphs.tools.notebook_builder --no-execute # write both, no outputs (fast)
    python -m part3_attribution_graphs.tools.notebook_builder --check # exit 1 if the committed ones are stale
    python -m part3_attribution_graphs.tools.notebook_builder --demo out/instructor_demo [--world toy]

The source, `notebook_source/attribution_graphs.md`, is Markdown:

- Prose becomes markdown cells. A new cell starts at every heading and at a `<!-- cell -->` line.
  `<!-- only exercises -->` ... `<!-- end only -->` (or `solutions`) keeps prose in one notebook.
  `<!--# ... -->` lines are notes for authors and are dropped. Code inside prose uses `~~~` fences.
- A ```` ```python ```` fence is a code cell. Words after `python`: `exercises` or `solutions` (only that
  notebook), `id=...` (cell id), `tags=a,b` (cell tags).
- Exercises come from the registry, `part3_attribution_graphs/exercises.py`. A `<!-- exercise NAME -->` line
  in prose is replaced by that exercise's header (difficulty, importance, suggested time). A ```` ```exercise
  NAME ```` fence is the exercise's code cell: the solutions notebook shows the reference source
  (`inspect.getsource`); the exercises notebook shows the fence body (a scaffold), or, when the body is empty,
  the signature, docstring and a `raise NotImplementedError(...)` that names the exercise, followed in both
  cases by `if USE_REFERENCE_SOLUTIONS: name = solutions.name`. The next cell must call
  `tests.test_NAME(...)`. The build fails on a name the registry lacks, on a registered exercise without
  exactly one header and one fence, and on a `tests.test_<x>` the autograder does not have. A scaffold is
  either written out in full, or it is the reference source with regions hidden: each `<<hide from="REGEX"
  to="REGEX">>` line, followed by the lines to show instead, replaces the reference lines from the one line
  matching `from` to the next line matching `to` (`<<hide after="REGEX" before="REGEX">>` hides the lines
  strictly between the two matches).
- A ```` ```given module:a,b ```` fence is the reference source of `a` and `b` as a code cell in both
  notebooks; a ```` ```listing module:a,b ```` fence shows it as a read-only listing (for classes the
  notebook imports, so that every helper and test sees the same class).
- `{{REPO_URL}}`, `{{COLAB_URL}}`, `{{NOTEBOOK_PATH}}` and `{{NOTEBOOK_KIND}}` are substituted everywhere.

The build is deterministic: cell ids derive from the cell's marker or content, and nothing records a
time. `--check` compares cell ids, types, sources and tags, ignoring outputs and execution counts.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import copy
import difflib
import hashlib
import importlib
import inspect
import json
import os
import re
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from ..exercises import EXERCISES, Exercise

__all__ = [
    "REPO_URL",
    "SOURCE",
    "NOTEBOOKS",
    "KERNEL_NAME",
    "build",
    "check",
    "ensure_kernel",
    "execute_solutions",
    "main",
]

# The one place the repository URL lives: the Colab badge and the Colab install cell both use it.
REPO_URL = "https://github.com/part3-attribution-graphs/part3_attribution_graphs"

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "notebook_source" / "attribution_graphs.md"
NOTEBOOKS = {
    "exercises": ROOT / "notebooks" / "part3_attribution_graphs_exercises.ipynb",
    "solutions": ROOT / "solutions" / "part3_attribution_graphs_solutions.ipynb",
}
KINDS = ("exercises", "solutions")
CODE_KINDS = ("python", "exercise", "given", "listing")
# Names IPython puts in every namespace.
IPYTHON_NAMES = {"display", "get_ipython", "In", "Out", "exit", "quit"}

# Two kernels, on purpose. The committed notebooks name the kernel every Jupyter and Colab knows,
# `python3` (Colab answers any other name with "Unrecognized runtime"; a fresh Jupyter asks to pick one).
# The project's own kernel, registered inside its venv (`make install`, or `ensure_kernel`), is the one the
# builder, the tests and the demo execute with, so nothing is ever written over a user's `python3`;
# `make lab` puts the venv's own `python3` first on JUPYTER_PATH for the learner's session.
KERNEL_NAME = "part3-attribution-graphs"
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
NB_METADATA = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}


class BuildError(RuntimeError):
    """The lesson source is malformed or out of step with the reference code."""


# --------------------------------------------------------------------------------------------------
# Parsing the source
# --------------------------------------------------------------------------------------------------


@dataclass
class Block:
    """One cell-to-be of the source, before it is specialised for a notebook."""

    kind: str  # "markdown" | "python" | "exercise" | "given" | "listing"
    body: str
    line: int  # where it starts in the source, for error messages
    only: str | None = None  # "exercises" | "solutions" | None (both)
    target: str = ""  # "module:name[,name]" for exercise / given / listing
    cell_id: str | None = None
    tags: list[str] = field(default_factory=list)


def _parse_fence_info(info: str, line: int) -> Block:
    words = info.split()
    kind, rest = words[0], words[1:]
    block = Block(kind=kind, body="", line=line)
    for word in rest:
        if word in KINDS:
            block.only = word
        elif word.startswith("id="):
            block.cell_id = word[3:]
        elif word.startswith("tags="):
            block.tags = [t for t in word[5:].split(",") if t]
        elif (":" in word or kind == "exercise") and not block.target:
            block.target = word
        else:
            raise BuildError(f"line {line}: unknown word {word!r} after ```{kind}")
    if kind in ("given", "listing") and not block.target:
        raise BuildError(f"line {line}: ```{kind} needs a `module:name` target")
    if kind == "exercise":
        block.target = _exercise(block.target, line).name
    return block


def _exercise(name: str, line: int) -> Exercise:
    """The registry record an exercise fence or header names (by name, or by its `module:qualname`)."""
    for record in EXERCISES:
        if name in (record.name, record.reference):
            return record
    raise BuildError(
        f"line {line}: {name!r} is not a registered exercise. Add a record to "
        f"part3_attribution_graphs/exercises.py, or use one of: {', '.join(e.name for e in EXERCISES)}."
    )


EXERCISE_HEADER = re.compile(r"<!--\s*exercise\s+(\S+)\s*-->")


def parse_source(text: str, headers: list[tuple[str, int]] | None = None) -> list[Block]:
    """Split the lesson source into markdown and code blocks, in order.

    `headers`, if given, receives (exercise name, line) for every `<!-- exercise NAME -->` header.
    """
    headers = [] if headers is None else headers
    blocks: list[Block] = []
    prose: list[str] = []
    prose_start = 1
    only: str | None = None
    lines = text.splitlines()
    in_tilde = False

    def flush() -> None:
        body = "\n".join(prose).strip("\n")
        if body.strip():
            blocks.append(Block("markdown", body, prose_start, only=only))
        prose.clear()

    i = 0
    while i < len(lines):
        raw = lines[i]
        stripped = raw.strip()
        lineno = i + 1
        if stripped.startswith("~~~"):
            in_tilde = not in_tilde
        if (
            not in_tilde
            and raw.startswith("```")
            and raw[3:].split()[:1]
            and raw[3:].split()[0] in CODE_KINDS
        ):
            flush()
            block = _parse_fence_info(raw[3:], lineno)
            body = []
            i += 1
            while i < len(lines) and lines[i].rstrip() != "```":
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise BuildError(f"line {lineno}: ```{block.kind} fence is never closed")
            block.body = "\n".join(body).strip("\n")
            if block.only is None:
                block.only = only
            elif only is not None and block.only != only:
                raise BuildError(f"line {lineno}: a `{block.only}` cell inside an `only {only}` region")
            blocks.append(block)
            i += 1
            prose_start = i + 1
            continue
        if not in_tilde and stripped.startswith("<!--#"):
            # An author's note: dropped, up to and including the line that closes it.
            while "-->" not in lines[i]:
                i += 1
                if i == len(lines):
                    raise BuildError(f"line {lineno}: `<!--#` note is never closed by `-->`")
            i += 1
            prose_start = i + 1
            continue
        m = EXERCISE_HEADER.fullmatch(stripped)
        if not in_tilde and m:
            record = _exercise(m.group(1), lineno)
            prose.extend(record.header_markdown().splitlines())
            headers.append((record.name, lineno))
            i += 1
            continue
        m = re.fullmatch(r"<!--\s*only\s+(exercises|solutions)\s*-->", stripped)
        if not in_tilde and m:
            flush()
            only = m.group(1)
            i += 1
            prose_start = i + 1
            continue
        if not in_tilde and re.fullmatch(r"<!--\s*end only\s*-->", stripped):
            flush()
            only = None
            i += 1
            prose_start = i + 1
            continue
        if not in_tilde and (stripped == "<!-- cell -->" or (raw.startswith("#") and prose)):
            flush()
            prose_start = lineno
            if stripped == "<!-- cell -->":
                i += 1
                prose_start = i + 1
                continue
        prose.append(raw)
        i += 1
    if in_tilde:
        raise BuildError("a ~~~ fence is never closed")
    if only is not None:
        raise BuildError(f"`<!-- only {only} -->` is never closed by `<!-- end only -->`")
    flush()
    return blocks


# --------------------------------------------------------------------------------------------------
# Pulling reference code
# --------------------------------------------------------------------------------------------------


def _resolve(target: str) -> list[tuple[str, str, object]]:
    """`module:a,b` -> [(module, name, object)]."""
    module_name, names = target.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise BuildError(f"cannot import {module_name}: {err}") from err
    out = []
    for name in names.split(","):
        if not hasattr(module, name):
            raise BuildError(f"{module_name} has no attribute {name!r}")
        out.append((module_name, name, getattr(module, name)))
    return out


def reference_source(obj: object) -> str:
    """The reference definition of `obj`, dedented, without trailing blank lines."""
    return textwrap.dedent(inspect.getsource(obj)).rstrip() + "\n"


def _def_node(source: str, name: str | None = None) -> ast.FunctionDef | ast.ClassDef:
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and (
            name is None or node.name == name
        ):
            return node
    raise BuildError(f"no definition of {name!r} in the source")


def _header_lines(lines: list[str], node: ast.AST) -> list[str]:
    """Decorators, signature and (if any) docstring of a def / class node, as source lines."""
    first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    body0 = node.body[0]
    has_doc = (
        isinstance(body0, ast.Expr)
        and isinstance(getattr(body0, "value", None), ast.Constant)
        and isinstance(body0.value.value, str)
    )
    last = body0.end_lineno if has_doc else body0.lineno - 1
    return lines[first - 1 : last]


def stub_source(obj: object) -> str:
    """Signature, docstring and `raise NotImplementedError()` of a reference function."""
    src = reference_source(obj)
    lines = src.splitlines()
    node = _def_node(src)
    if isinstance(node, ast.ClassDef):
        raise BuildError(f"{node.name} is a class: give the exercise a scaffold")
    header = _header_lines(lines, node)
    indent = re.match(r"\s*", lines[node.body[0].lineno - 1]).group(0)
    return "\n".join(header + [f"{indent}raise NotImplementedError()"]) + "\n"


HIDE = re.compile(r'<<hide (?P<how>from|after)="(?P<start>[^"]+)" (?:to|before)="(?P<end>[^"]+)">>')


def hide_regions(scaffold: str, src: str, where: str) -> str:
    """The reference source with each `<<hide from=.. to=..>>` region replaced by the lines after it."""
    lines = src.splitlines()
    directives: list[tuple[bool, str, str, list[str]]] = []
    for line in scaffold.splitlines():
        m = HIDE.fullmatch(line.strip())
        if m:
            if ('after="' in line) != ('before="' in line):
                raise BuildError(f"{where}: use from=/to= or after=/before=, not a mix: {line.strip()!r}")
            directives.append((m["how"] == "after", m["start"], m["end"], []))
        elif directives:
            directives[-1][3].append(line)
        elif line.strip():
            raise BuildError(f"{where}: text before the first <<hide>>: {line!r}")
    for exclusive, start_re, end_re, shown in directives:
        starts = [i for i, line in enumerate(lines) if re.search(start_re, line)]
        if len(starts) != 1:
            raise BuildError(
                f"{where}: hide {start_re!r} matches {len(starts)} reference lines, not 1: "
                "the reference changed, update the scaffold"
            )
        first = starts[0] + exclusive
        last = next((i for i in range(first, len(lines)) if re.search(end_re, lines[i])), None)
        if last is None:
            raise BuildError(f"{where}: hide {end_re!r} matches no line after {lines[starts[0]].strip()!r}")
        last -= exclusive
        if last < first:
            raise BuildError(f"{where}: hide {start_re!r} .. {end_re!r} is an empty region")
        indent = re.match(r"\s*", lines[first]).group(0)
        body = textwrap.dedent("\n".join(shown).strip("\n")).splitlines()
        lines[first : last + 1] = [(indent + b) if b.strip() else "" for b in body]
    return "\n".join(lines)


def expand_scaffold(scaffold: str, obj: object, where: str) -> str:
    """The exercise cell for a scaffold: the reference with `<<hide ..>>` regions replaced, or the scaffold as
    written."""
    src = reference_source(obj)
    if HIDE.search(scaffold):
        expanded = hide_regions(scaffold, src, where)
    else:
        expanded = scaffold
    expanded = expanded.rstrip() + "\n"
    _check_scaffold(expanded, _def_node(src), where)
    return expanded


def _signature(node: ast.AST) -> str:
    returns = ast.unparse(node.returns) if getattr(node, "returns", None) else ""
    return f"({ast.unparse(node.args)}) -> {returns}"


def _check_scaffold(scaffold: str, ref: ast.AST, where: str) -> None:
    """A scaffold must define the reference's name with the reference's signatures, and leave work to do."""
    try:
        tops = [n for n in ast.parse(scaffold).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    except SyntaxError as err:
        raise BuildError(f"{where}: the scaffold does not parse: {err}") from err
    if [n.name for n in tops] != [ref.name]:
        raise BuildError(
            f"{where}: the scaffold must define exactly `{ref.name}`, it defines {[n.name for n in tops]}"
        )
    mine = tops[0]
    pairs = [(mine, ref)]
    if isinstance(ref, ast.ClassDef):
        ref_methods = {n.name: n for n in ref.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        for n in mine.body:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if n.name not in ref_methods:
                    raise BuildError(f"{where}: the scaffold's {ref.name}.{n.name} is not in the reference")
                pairs.append((n, ref_methods[n.name]))
        missing = set(ref_methods) - {n.name for n in mine.body if isinstance(n, (ast.FunctionDef,))}
        if missing:
            raise BuildError(f"{where}: the scaffold lacks {ref.name}.{sorted(missing)}")
    for a, b in pairs:
        if not isinstance(a, ast.ClassDef) and _signature(a) != _signature(b):
            raise BuildError(
                f"{where}: {a.name}{_signature(a)} differs from the reference {b.name}{_signature(b)}"
            )
    if "NotImplementedError" not in scaffold:
        raise BuildError(f"{where}: the scaffold leaves nothing to implement (no NotImplementedError)")


# --------------------------------------------------------------------------------------------------
# Building notebooks
# --------------------------------------------------------------------------------------------------


def _substitute(text: str, kind: str) -> str:
    path = NOTEBOOKS[kind].relative_to(ROOT).as_posix()
    colab = REPO_URL.replace("https://github.com/", "https://colab.research.google.com/github/")
    values = {
        "REPO_URL": REPO_URL,
        "NOTEBOOK_PATH": path,
        "COLAB_URL": f"{colab}/blob/main/{path}",
        "NOTEBOOK_KIND": kind,
    }
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    if "{{" in text and re.search(r"\{\{[A-Z_]+\}\}", text):
        raise BuildError(f"unknown template variable in: {re.search(r'{{[A-Z_]+}}', text).group(0)}")
    return text


def _cell_id(seed: str, used: set[str]) -> str:
    base = hashlib.sha1(seed.encode()).hexdigest()[:10]
    cid, n = base, 1
    while cid in used:
        n += 1
        cid = f"{base}-{n}"
    return cid


def _cells_for(block: Block, kind: str) -> list[tuple[str, str, str]]:
    """(cell type, source, id seed) for one block in one notebook."""
    if block.only is not None and block.only != kind:
        return []
    where = f"{SOURCE.name}:{block.line}"
    if block.kind == "markdown":
        return [("markdown", block.body, "md:" + block.body)]
    if block.kind == "python":
        return [("code", block.body, "code:" + block.body)]
    if block.kind == "exercise":
        return _exercise_cell(block, kind, where)
    resolved = _resolve(block.target)
    if block.kind == "listing":
        code = "\n\n".join(reference_source(obj).rstrip() for _, _, obj in resolved)
        names = ", ".join(f"<code>{name}</code>" for _, name, _ in resolved)  # HTML: backticks would show
        module = resolved[0][0]
        body = (
            f"<details open><summary>Source of {names} (imported from <code>{module}</code>)</summary>\n\n"
            f"~~~python\n{code}\n~~~\n\n</details>"
        )
        if block.body:
            body = block.body + "\n\n" + body
        return [("markdown", body, "listing:" + block.target)]
    if block.kind == "given":
        if block.body:
            raise BuildError(f"{where}: a ```given fence takes no body")
        code = "\n\n\n".join(reference_source(obj).rstrip() for _, _, obj in resolved) + "\n"
        return [("code", code, "given:" + block.target)]
    raise BuildError(f"{where}: unknown block kind {block.kind!r}")


def _name_the_stub(code: str, record: Exercise) -> str:
    """Every bare `raise NotImplementedError()` of an exercise cell, with a message naming the exercise."""
    message = f"Exercise {record.qualname}: replace this line with your code"
    return code.replace("raise NotImplementedError()", f'raise NotImplementedError("{message}")')


def _exercise_cell(block: Block, kind: str, where: str) -> list[tuple[str, str, str]]:
    record = _exercise(block.target, block.line)
    name, obj = record.qualname, record.load_reference()
    if kind == "solutions":
        code = reference_source(obj)
    else:
        code = expand_scaffold(block.body, obj, where) if block.body else stub_source(obj)
        code = _name_the_stub(code, record)
        code += f"\n\nif USE_REFERENCE_SOLUTIONS:\n    {name} = solutions.{name}\n"
    return [("code", code.rstrip() + "\n", "exercise:" + record.reference)]


def build_notebook(blocks: list[Block], kind: str) -> nbformat.NotebookNode:
    """The notebook of one kind, without outputs."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = copy.deepcopy(NB_METADATA)
    used: set[str] = set()
    for block in blocks:
        for cell_type, source, seed in _cells_for(block, kind):
            source = _substitute(source.rstrip("\n"), kind)
            if block.cell_id:
                cid = block.cell_id
                if cid in used:
                    raise BuildError(
                        f"line {block.line}: cell id {cid!r} is used twice in the {kind} notebook"
                    )
            else:
                cid = _cell_id(seed, used)
            used.add(cid)
            if cell_type == "markdown":
                cell = nbformat.v4.new_markdown_cell(source, id=cid)
            else:
                cell = nbformat.v4.new_code_cell(source, id=cid)
            if block.tags:
                cell.metadata["tags"] = list(block.tags)
            nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


# --------------------------------------------------------------------------------------------------
# Static check: every name a code cell reads is defined by an earlier cell (or is a builtin)
# --------------------------------------------------------------------------------------------------


def _parseable(code: str) -> str:
    # IPython shell escapes and magics are not Python: blank them out for the analysis.
    return "\n".join(re.sub(r"^(\s*)[!%].*$", r"\1pass", line) for line in code.splitlines())


class _Names(ast.NodeVisitor):
    def __init__(self) -> None:
        self.bound: set[str] = set()
        self.top_bound: set[str] = set()
        self.loaded: set[str] = set()
        self.depth = 0

    def _bind(self, name: str) -> None:
        self.bound.add(name)
        if self.depth == 0:
            self.top_bound.add(name)

    def visit_Name(self, node: ast.Name) -> None:
        (self.loaded if isinstance(node.ctx, ast.Load) else self.bound).add(node.id)
        if not isinstance(node.ctx, ast.Load) and self.depth == 0:
            self.top_bound.add(node.id)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._bind((alias.asname or alias.name).split(".")[0])

    visit_ImportFrom = visit_Import  # noqa: N815

    def _scope(self, node: ast.AST) -> None:
        if hasattr(node, "name"):
            self._bind(node.name)
        for deco in getattr(node, "decorator_list", []):
            self.visit(deco)
        self.depth += 1
        args = getattr(node, "args", None)
        if isinstance(args, ast.arguments):
            for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
                if a is not None:
                    self.bound.add(a.arg)
            for d in args.defaults + [d for d in args.kw_defaults if d is not None]:
                self.visit(d)
        for child in getattr(node, "body", []) if not isinstance(node, ast.Lambda) else [node.body]:
            self.visit(child)
        for base in getattr(node, "bases", []):
            self.visit(base)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = _scope  # noqa: N815

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self._bind(node.name)
        self.generic_visit(node)

    def visit_arg(self, node: ast.arg) -> None:
        self.bound.add(node.arg)


def check_names(nb: nbformat.NotebookNode, kind: str) -> None:
    """Raise if a code cell reads a name that no earlier cell (nor Python, nor IPython) defines."""
    defined = set(dir(builtins)) | IPYTHON_NAMES
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(_parseable(cell.source))
        except SyntaxError as err:
            raise BuildError(f"{kind} notebook, cell {index} ({cell.id}): syntax error: {err}") from err
        names = _Names()
        names.visit(tree)
        missing = names.loaded - names.bound - defined
        if missing:
            first = cell.source.splitlines()[0] if cell.source else ""
            raise BuildError(
                f"{kind} notebook, cell {index} ({cell.id}, {first!r}) reads undefined "
                f"name(s) {sorted(missing)}: import them in the setup cell"
            )
        defined |= names.top_bound


# --------------------------------------------------------------------------------------------------
# Writing, executing, checking
# --------------------------------------------------------------------------------------------------


TEST_CALL = re.compile(r"\btests\.(test_\w+)")


def check_exercises(blocks: list[Block], headers: list[tuple[str, int]]) -> None:
    """Raise unless the lesson and the registry agree: every registered exercise has one header, one fence and
    a test cell right after the fence, and every `tests.test_<x>` the lesson mentions exists."""
    from .. import tests as autograder

    for block in blocks:
        for m in TEST_CALL.finditer(block.body):
            if not hasattr(autograder, m.group(1)):
                raise BuildError(
                    f"line {block.line}: the lesson calls tests.{m.group(1)}, which does not exist; the "
                    f"autograder has {', '.join(e.test_name for e in EXERCISES)}."
                )
    for record in EXERCISES:
        fences = [i for i, b in enumerate(blocks) if b.kind == "exercise" and b.target == record.name]
        lines = [line for name, line in headers if name == record.name]
        if len(fences) != 1 or len(lines) != 1:
            raise BuildError(
                f"exercise {record.name!r} is registered, so the lesson needs exactly one "
                f"`<!-- exercise {record.name} -->` header and one ```exercise {record.name} fence; it "
                f"has {len(lines)} and {len(fences)}."
            )
        nxt = blocks[fences[0] + 1] if fences[0] + 1 < len(blocks) else None
        if nxt is None or nxt.kind != "python" or f"tests.{record.test_name}(" not in nxt.body:
            raise BuildError(
                f"line {blocks[fences[0]].line}: the ```exercise {record.name} fence must be followed by "
                f"a code cell calling tests.{record.test_name}({record.qualname})."
            )
        if lines[0] > blocks[fences[0]].line:
            raise BuildError(
                f"line {lines[0]}: the header of {record.name!r} comes after its exercise fence."
            )


def build(kinds: tuple[str, ...] = KINDS) -> dict[str, nbformat.NotebookNode]:
    """Fresh notebooks (no outputs) from the source, checked against the exercise registry and for undefined
    names."""
    headers: list[tuple[str, int]] = []
    blocks = parse_source(SOURCE.read_text(encoding="utf-8"), headers)
    check_exercises(blocks, headers)
    notebooks = {kind: build_notebook(blocks, kind) for kind in kinds}
    for kind, nb in notebooks.items():
        check_names(nb, kind)
    return notebooks


def _dumps(nb: nbformat.NotebookNode) -> str:
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def write(nb: nbformat.NotebookNode, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_dumps(nb), encoding="utf-8")


def _clean_after_execution(nb: nbformat.NotebookNode) -> None:
    """Drop what execution adds that varies from run to run (kernel version, widget state, timings)."""
    nb.metadata = copy.deepcopy(NB_METADATA)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        # Widgets (tqdm's notebook bars, the explorer) have random model ids and show nothing without a
        # live kernel; their text fallback is a frozen progress bar. Drop them.
        cell.outputs = [
            out
            for out in cell.outputs
            if "application/vnd.jupyter.widget-view+json" not in out.get("data", {})
        ]


def ensure_kernel() -> str:
    """Register this Python as the `KERNEL_NAME` kernel inside its own environment (sys.prefix) if no kernel
    of that name is known; returns the name. Never touches the user-wide kernels."""
    from jupyter_client.kernelspec import KernelSpecManager

    if KERNEL_NAME in KernelSpecManager().find_kernel_specs():
        return KERNEL_NAME
    from ipykernel.kernelspec import install

    install(kernel_name=KERNEL_NAME, display_name=KERNELSPEC["display_name"], prefix=sys.prefix)
    return KERNEL_NAME


def notebook_client(nb: nbformat.NotebookNode, **kwargs):
    """A plain `nbclient.NotebookClient` (kept as a function so tests and the builder build it one way)."""
    from nbclient import NotebookClient

    return NotebookClient(nb, **kwargs)


def instructor_demo(out_dir: str | Path, world: str = "auto", kernel_name: str = KERNEL_NAME) -> Path:
    """Run the exercises notebook with papermill and `USE_REFERENCE_SOLUTIONS=True`; return the executed copy.

    Same as `papermill notebooks/part3_attribution_graphs_exercises.ipynb OUT.ipynb
    -p USE_REFERENCE_SOLUTIONS True -p WORLD ... -p OUTPUT_DIR ...`.
    The dashboards land in `out_dir/<prompt>/`.
    """
    import papermill

    if kernel_name == KERNEL_NAME:
        ensure_kernel()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    executed = out / NOTEBOOKS["exercises"].name.replace(".ipynb", ".executed.ipynb")
    papermill.execute_notebook(
        str(NOTEBOOKS["exercises"]),
        str(executed),
        parameters={"USE_REFERENCE_SOLUTIONS": True, "WORLD": world, "OUTPUT_DIR": str(out)},
        kernel_name=kernel_name,
        cwd=str(NOTEBOOKS["exercises"].parent),
        progress_bar=sys.stderr.isatty(),
    )
    return executed


# The parameters cell's default OUTPUT_DIR: where a reader's own run writes its pages.
READER_OUTPUT_DIR = "attribution_graph_outputs"


def _relocate_outputs(nb: nbformat.NotebookNode, folder: str, reader_folder: str) -> None:
    """Name the pages a build wrote into a temporary `folder` as a reader's run names them (`reader_folder`),
    so no committed output points at a path that exists only on the build machine."""
    olds = sorted({str(folder), str(Path(folder).resolve())}, key=len, reverse=True)

    def fix(text: str) -> str:
        for old in olds:
            text = text.replace(old + os.sep, reader_folder + "/").replace(old, reader_folder)
        return text

    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = fix(out["text"])
            for mime, value in out.get("data", {}).items():
                if isinstance(value, str):
                    out["data"][mime] = fix(value)


def execute_solutions(nb: nbformat.NotebookNode, timeout: int = 900) -> float:
    """Execute the solutions notebook in place on the planted world (where "auto" lands offline); returns the
    wall time in seconds."""
    env_overrides = {
        "P3AG_WORLD": "planted",
        # Not needed to finish (plain nbclient runs the notebook as it is): finished bars leave their timings
        # as text, which would make the committed outputs differ from run to run.
        "TQDM_DISABLE": "1",
        "PLOTLY_RENDERER": "plotly_mimetype",  # figure JSON only, not 4 MB of plotly.js per notebook
    }
    saved = {k: os.environ.get(k) for k in [*env_overrides, "P3AG_OUTPUT_DIR"]}
    with tempfile.TemporaryDirectory(prefix="p3ag_nb_") as tmp:
        os.environ.update(env_overrides)
        os.environ["P3AG_OUTPUT_DIR"] = tmp
        try:
            client = notebook_client(
                nb,
                timeout=timeout,
                kernel_name=ensure_kernel(),
                record_timing=False,
                resources={"metadata": {"path": str(NOTEBOOKS["solutions"].parent)}},
            )
            start = time.perf_counter()
            client.execute()
            elapsed = time.perf_counter() - start
            _relocate_outputs(nb, tmp, READER_OUTPUT_DIR)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    _clean_after_execution(nb)
    return elapsed


def _structure(nb: nbformat.NotebookNode) -> list[dict]:
    return [
        {"id": c.get("id"), "type": c.cell_type, "source": c.source, "tags": c.metadata.get("tags", [])}
        for c in nb.cells
    ]


def check(verbose: bool = True) -> list[str]:
    """Differences between the committed notebooks and a fresh build, outputs ignored; [] when in step."""
    problems = []
    for kind, fresh in build().items():
        path = NOTEBOOKS[kind]
        if not path.exists():
            problems.append(f"{path.relative_to(ROOT)} is missing")
            continue
        committed = nbformat.read(path, as_version=4)
        a, b = _structure(committed), _structure(fresh)
        if a == b and committed.metadata.get("kernelspec") == KERNELSPEC:
            continue
        diff = difflib.unified_diff(
            json.dumps(a, indent=1).splitlines(),
            json.dumps(b, indent=1).splitlines(),
            "committed",
            "fresh build",
            lineterm="",
            n=1,
        )
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        problems.append(
            f"{rel} differs from a fresh build:\n"
            + "\n".join(list(diff)[:60])
            + f"\nEdited {SOURCE.relative_to(ROOT)} or the package? Rebuild: `make notebooks` (python -m "
            "part3_attribution_graphs.tools.notebook_builder). Only opened in Jupyter (an autosave, a "
            f"kernel picked)? Drop that: `git checkout -- {rel}`."
        )
    if verbose:
        for p in problems:
            print(p, file=sys.stderr)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed notebooks are stale")
    parser.add_argument(
        "--no-execute", action="store_true", help="write the solutions notebook without outputs"
    )
    parser.add_argument("--demo", metavar="OUT_DIR", help="instead: run the instructor demo into OUT_DIR")
    parser.add_argument("--world", default=os.environ.get("P3AG_WORLD", "auto"), help="world for --demo")
    args = parser.parse_args(argv)
    if args.demo:
        start = time.perf_counter()
        executed = instructor_demo(args.demo, world=args.world)
        print(f"Instructor demo ({args.world}) done in {time.perf_counter() - start:.0f} s: {executed}")
        for page in sorted(Path(args.demo).resolve().rglob("index.html")):
            print(f"  dashboard: {page}")
        return 0
    try:
        if args.check:
            problems = check()
            if problems:
                print(
                    "Rebuild with `python -m part3_attribution_graphs.tools.notebook_builder`.",
                    file=sys.stderr,
                )
                return 1
            print("Notebooks are in step with notebook_source/.")
            return 0
        notebooks = build()
    except BuildError as err:
        print(f"notebook_builder: {err}", file=sys.stderr)
        return 2
    if not args.no_execute:
        elapsed = execute_solutions(notebooks["solutions"])
        print(f"Executed the solutions notebook (planted world) in {elapsed:.0f} s.")
    for kind, nb in notebooks.items():
        write(nb, NOTEBOOKS[kind])
        n_ex = sum(1 for c in nb.cells if c.cell_type == "code" and "USE_REFERENCE_SOLUTIONS:\n" in c.source)
        print(
            f"Wrote {NOTEBOOKS[kind].relative_to(ROOT)}: {len(nb.cells)} cells"
            + (f", {n_ex} exercises" if kind == "exercises" else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
