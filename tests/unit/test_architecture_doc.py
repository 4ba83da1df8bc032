"""docs/ARCHITECTURE.md stays true to the code: modules, floors, keys, scripts, channel tags.

Conventions the doc keeps so that this test can read it:
- `## Module map` has `### Floor N: ...` headings, each with a table whose first column
  names module files as `chatnode/....py`;
- `## Redis keys` names every public name of keys.py as `keys.<name>`;
- `## Lua scripts` names every Script as `<module>.<NAME>` (e.g. `lua.SEND`) in the first
  column of its table;
- `## Channel messages` has one table row per tag: the tag, then `channel.<NAME>`;
- anything written in backticks as `<chatnode module>.<name>...` exists in the code.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import pytest

import chatnode
from chatnode import channel, keys, lua

ROOT = Path(__file__).resolve().parents[2]
DOC_PATH = ROOT / "docs" / "ARCHITECTURE.md"
PACKAGE = ROOT / "chatnode"
FLOOR_RE = re.compile(r"^### Floor (\d+):", re.MULTILINE)
MODULE_FILE_RE = re.compile(r"`(chatnode/[\w/]+\.py)`")
DOTTED_RE = re.compile(r"`((?:core\.)?\w+(?:\.\w+)+)(?:\([^`]*\))?`")


def doc() -> str:
    return DOC_PATH.read_text(encoding="utf-8")


def section(text: str, title: str) -> str:
    """The text under `## <title>`, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match is not None, f"docs/ARCHITECTURE.md has no section '## {title}'"
    return match.group(1)


def module_name(path: Path) -> str:
    """chatnode/core/acks.py -> chatnode.core.acks; chatnode/__init__.py -> chatnode."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py"))


def all_modules() -> list[ModuleType]:
    names = ["chatnode"] + [
        m.name for m in pkgutil.walk_packages(chatnode.__path__, prefix="chatnode.")
    ]
    return [importlib.import_module(n) for n in names]


def floors(text: str) -> dict[str, int]:
    """Module file -> its floor, from the module map's tables."""
    body = section(text, "Module map")
    heads = list(FLOOR_RE.finditer(body))
    assert heads, "the module map has no '### Floor N:' headings"
    out: dict[str, int] = {}
    for i, head in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(body)
        for line in body[head.end() : end].splitlines():
            if not line.startswith("| `chatnode/"):
                continue
            first = line.split("|")[1]
            match = MODULE_FILE_RE.search(first)
            assert match is not None, line
            assert match.group(1) not in out, f"{match.group(1)} is on two floors"
            out[match.group(1)] = int(head.group(1))
    return out


def runtime_imports(path: Path) -> set[str]:
    """chatnode modules `path` imports, leaving out imports under `if TYPE_CHECKING:`."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for orelse in child.orelse:
                    visit(orelse)
                continue
            if isinstance(child, ast.ImportFrom) and child.module:
                if child.module == "chatnode":
                    found.update(f"chatnode.{a.name}" for a in child.names)
                elif child.module.startswith("chatnode."):
                    found.add(child.module)
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("chatnode."))
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def file_of(module: str) -> str:
    """chatnode.core.acks -> chatnode/core/acks.py (a package -> its __init__.py)."""
    base = ROOT / Path(*module.split("."))
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    return str(path.relative_to(ROOT))


# -- the module map ------------------------------------------------------------------


def test_every_module_is_in_the_map() -> None:
    mapped = floors(doc())
    missing = [f for f in module_files() if f not in mapped]
    assert not missing, f"modules missing from the module map: {missing}"
    stale = sorted(set(mapped) - set(module_files()))
    assert not stale, f"the module map names files that do not exist: {stale}"


def test_no_module_imports_a_higher_floor() -> None:
    mapped = floors(doc())
    upward = []
    for rel, floor in mapped.items():
        if not (ROOT / rel).is_file():
            continue  # test_every_module_is_in_the_map names it
        for dep in sorted(runtime_imports(ROOT / rel)):
            dep_file = file_of(dep)
            if dep_file != rel and mapped.get(dep_file, 0) > floor:
                upward.append(
                    f"{rel} (floor {floor}) imports {dep_file} (floor {mapped[dep_file]})"
                )
    assert not upward, "imports upward: " + "; ".join(upward)


# -- keys, scripts, channel ----------------------------------------------------------


def public_key_names() -> list[str]:
    """keys.py's own public functions and constants."""
    names = []
    for name, value in vars(keys).items():
        if name.startswith("_") or inspect.ismodule(value) or name == "annotations":
            continue
        if inspect.isfunction(value) and value.__module__ != keys.__name__:
            continue
        names.append(name)
    return sorted(names)


def test_every_key_name_is_in_the_keys_section() -> None:
    body = section(doc(), "Redis keys")
    names = public_key_names()
    assert {"inbox", "route", "dedupe", "revocations_loaded"} <= set(names)
    missing = [n for n in names if not re.search(rf"`keys\.{n}\b", body)]
    assert not missing, f"keys.py names missing from '## Redis keys': {missing}"


def scripts() -> dict[str, lua.Script]:
    """`<module>.<NAME>` -> every Script, named where it is defined (`NAME = ...` at the
    top of the module), not where it is imported."""
    found: dict[str, lua.Script] = {}
    for module in all_modules():
        source = inspect.getsource(module)
        for name, value in vars(module).items():
            if isinstance(value, lua.Script) and re.search(rf"^{name} = ", source, re.M):
                found[f"{module.__name__.removeprefix('chatnode.')}.{name}"] = value
    return found


def test_every_script_has_a_name() -> None:
    named = {id(s) for s in scripts().values()}
    unnamed = [s.source[:60] for s in lua.SCRIPTS if id(s) not in named]
    assert not unnamed, f"Scripts bound to no module-level name: {unnamed}"


def test_every_script_is_in_the_scripts_section() -> None:
    body = section(doc(), "Lua scripts")
    rows = [line.split("|")[1].strip() for line in body.splitlines() if line.startswith("| `")]
    listed = {row.strip("`") for row in rows}
    found = scripts()
    assert len(found) >= 14
    missing = sorted(set(found) - listed)
    assert not missing, f"scripts missing from the table in '## Lua scripts': {missing}"
    stale = sorted(listed - set(found))
    assert not stale, f"the scripts table names scripts that do not exist: {stale}"


def channel_tags() -> dict[str, str]:
    """channel.py's tag constants: one-letter strings named in capitals."""
    return {
        name: value
        for name, value in vars(channel).items()
        if name.isupper() and isinstance(value, str) and len(value) == 1
    }


def test_every_channel_tag_is_in_the_channel_section() -> None:
    body = section(doc(), "Channel messages")
    tags = channel_tags()
    assert {"PUSH", "KICK", "LOGOUT", "TYPING"} <= set(tags)
    for name, value in tags.items():
        rows = [line for line in body.splitlines() if f"`channel.{name}`" in line]
        assert rows, f"channel.{name} has no row in '## Channel messages'"
        cells = [c.strip() for c in rows[0].split("|")]
        assert cells[1] == f"`{value}`", (
            f"channel.{name} is tagged {value!r}, the doc says {cells[1]}"
        )


# -- names in backticks ----------------------------------------------------------------


def resolve(dotted: str) -> bool | None:
    """True if `dotted` (module path, then attributes) exists; None if it does not start
    with a chatnode module (then it is not a reference this test checks)."""
    parts = dotted.split(".")
    module = None
    i = 0
    for j in range(len(parts), 0, -1):
        name = "chatnode." + ".".join(parts[:j])
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        i = j
        break
    if module is None:
        return None
    obj: object = module
    for attr in parts[i:]:
        if not hasattr(obj, attr):
            return False
        obj = getattr(obj, attr)
    return True


def test_names_in_backticks_exist() -> None:
    names = sorted(n for n in set(DOTTED_RE.findall(doc())) if not n.endswith(".py"))
    checked = [n for n in names if resolve(n) is not None]
    assert len(checked) > 100, "the doc names too few code paths to check"
    wrong = [n for n in checked if not resolve(n)]
    assert not wrong, f"names in docs/ARCHITECTURE.md not found in the code: {wrong}"


@pytest.mark.parametrize("dotted", ["gateway.Gateway.nope", "core.socket.SocketCore.gone"])
def test_resolve_catches_a_wrong_name(dotted: str) -> None:
    assert resolve(dotted) is False
