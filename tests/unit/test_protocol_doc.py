"""docs/PROTOCOL.md stays true to the code: codes, frames, routes, settings, examples.

Conventions the doc keeps so that this test can read it:
- a fenced block with the info string `json client-frame` is one client frame, and
  `json server-frame` one server frame; every block whose info string starts with
  `json` is valid JSON;
- endpoints and frames are `###` headings ending in `(v1)`, `(v1.1)`, `(v1.2)` or
  `(v2)`, e.g.
  ``### `POST /auth/login` (v1)`` and ``### `send` (v1)``;
- tables with a `since` column say one of those versions; the first column of the
  error-code and close-code tables is the code.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import typing
from pathlib import Path
from typing import Any, cast

import pytest
from websockets.frames import CloseCode as WsCloseCode

from chatnode import api, frames, openapi
from chatnode.config import Settings
from chatnode.errors import HTTP_STATUS, CloseCode, Code

ROOT = Path(__file__).resolve().parents[2]
DOC_PATH = ROOT / "docs" / "PROTOCOL.md"
V1_PATH = ROOT.parent / "shared" / "PROTOCOL.md"  # v1 as first agreed, beside the repo
VERSIONS = {"v1", "v1.1", "v1.2", "v2"}
ME = "tester"  # parse_client's user: a name no example frame sends to
GATEWAY = ("GET", "/ws")  # the WebSocket handshake, not an aiohttp route
ROUTE_RE = re.compile(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`?\s]*)")
SETTING_RE = re.compile(r"CHATNODE_[A-Z0-9_]*[A-Z0-9]")
VERSION_MARK_RE = re.compile(r"\((v1(?:\.[12])?|v2)\)\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
    info: str
    text: str
    line: int


def doc() -> str:
    return DOC_PATH.read_text(encoding="utf-8")


def blocks(text: str) -> list[Block]:
    """Fenced code blocks: info string, content, line number of the opening fence."""
    out: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            info, start = lines[i][3:].strip(), i
            i += 1
            body = []
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            out.append(Block(info, "\n".join(body), start + 1))
        i += 1
    return out


def tagged(text: str, tag: str) -> list[Block]:
    return [b for b in blocks(text) if b.info.split()[:2] == ["json", tag]]


def section(text: str, title: str, level: int = 2) -> str:
    """The text under a heading, up to the next heading of the same or a higher level."""
    lines = text.splitlines()
    marks = "#" * level
    start = next((i for i, ln in enumerate(lines) if ln == f"{marks} {title}"), None)
    assert start is not None, f"docs/PROTOCOL.md has no '{marks} {title}' section"
    end = len(lines)
    for i in range(start + 1, len(lines)):
        m = re.match(r"(#+) ", lines[i])
        if m and len(m.group(1)) <= level:
            end = i
            break
    return "\n".join(lines[start + 1 : end])


def headings(text: str, level: int) -> list[str]:
    return [ln[level + 1 :] for ln in text.splitlines() if ln.startswith("#" * level + " ")]


def cells(line: str) -> list[str]:
    """A markdown table row's cells; `\\|` inside a cell is not a separator."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every table: its header cells and its rows."""
    out: list[tuple[list[str], list[list[str]]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines) - 1:
        if lines[i].startswith("|") and re.match(r"^\|[\s:|-]+\|$", lines[i + 1].strip()):
            header = cells(lines[i])
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(cells(lines[i]))
                i += 1
            out.append((header, rows))
        else:
            i += 1
    return out


def only_table(text: str) -> tuple[list[str], list[list[str]]]:
    found = tables(text)
    assert len(found) == 1, f"expected one table, found {len(found)}"
    return found[0]


def column(header: list[str], name: str) -> int:
    assert name in header, f"no '{name}' column in {header}"
    return header.index(name)


def ticked(cell: str) -> str:
    """The code in a cell like `` `invalid_frame` ``."""
    m = re.fullmatch(r"`([^`]+)`", cell)
    assert m, f"expected one `code` in the cell, got {cell!r}"
    return m.group(1)


# -- what the code defines ------------------------------------------------------------


def client_frame_types() -> set[str]:
    kinds = set()
    for cls in typing.get_args(frames.ClientFrame):
        (tag,) = (f.default for f in dataclasses.fields(cls) if f.name == "type")
        kinds.add(cast(str, tag))
    return kinds


def server_frame_types() -> set[str]:
    """The `type` of every frame frames.py encodes."""
    return set(re.findall(r'"type": "(\w+)"', inspect.getsource(frames)))


# One sample of each server frame, made by frames.py: the keys and JSON types a doc
# example must have.
SERVER_SAMPLES: dict[str, bytes] = {
    "hello": frames.hello("+15550000001", "node-a", 30),
    "accepted": frames.accepted("c-1", "1-0", 1),
    "message": frames.message("1-0", "c-1", "+15550000001", "hi", 1),
    "receipt": frames.receipt("1-0", "read", "+15550000001", ["c-1"], 1),
    "typing": frames.typing("+15550000001", "start"),
    "error": frames.error(Code.INVALID_FRAME, "invalid frame", "c-1"),
}
NULLABLE = {("error", "ref")}  # fields a server frame may send as null
# Other shapes a frame type has: a doc example matches its sample or one of these.
SERVER_VARIANTS: dict[str, list[bytes]] = {
    "hello": [frames.hello("+15550000001", "node-a", 30, "7")],  # a named device's (v2)
    # a copy of the user's own send, and their own read, for their other devices (v2)
    "message": [frames.message("1-0", "c-1", "+15550000001", "hi", 1, "+15550000002")],
    "receipt": [frames.receipt("1-0", "read", "+15550000002", ["c-1"], 1, "+15550000001")],
}


def app_routes() -> set[tuple[str, str]]:
    services = cast(api.Services, None)  # building the router reads no service
    routes = set()
    for app in (api.build(services), api.metrics_app(services)):
        for route in app.router.routes():
            if route.method != "HEAD":  # aiohttp adds HEAD beside every GET
                routes.add((route.method, route.resource.canonical))
    return routes


def openapi_routes() -> set[tuple[str, str]]:
    paths: dict[str, dict[str, Any]] = openapi.document()["paths"]
    return {(method.upper(), path) for path, ops in paths.items() for method in ops}


def setting_names() -> dict[str, dataclasses.Field[Any]]:
    return {f"CHATNODE_{f.name.upper()}": f for f in dataclasses.fields(Settings)}


# -- the tests ----------------------------------------------------------------------


def test_the_doc_starts_with_its_versions() -> None:
    text = doc()
    assert headings(text, 2)[0] == "Versions"
    versions = section(text, "Versions")
    header, rows = only_table(versions)
    assert {re.sub(r"\*", "", row[column(header, "version")]) for row in rows} == VERSIONS
    assert "keep working" in versions


def test_every_json_block_is_json() -> None:
    found = [b for b in blocks(doc()) if b.info.split()[:1] == ["json"]]
    assert found
    for block in found:
        try:
            json.loads(block.text)
        except json.JSONDecodeError as exc:
            pytest.fail(f"docs/PROTOCOL.md line {block.line}: not JSON: {exc}")


def test_client_frame_examples_parse() -> None:
    found = tagged(doc(), "client-frame")
    for block in found:
        try:
            frames.parse_client(block.text, ME)
        except frames.FrameError as exc:
            pytest.fail(f"docs/PROTOCOL.md line {block.line}: {exc.code}: {exc.message}")
    shown = {json.loads(b.text)["type"] for b in found}
    assert shown == client_frame_types(), "every client frame type needs an example"


def test_server_frame_examples_match_the_encoders() -> None:
    assert set(SERVER_SAMPLES) == server_frame_types(), "frames.py encodes a new frame type"
    found = tagged(doc(), "server-frame")
    for block in found:
        where = f"docs/PROTOCOL.md line {block.line}"
        obj = json.loads(block.text)
        assert isinstance(obj, dict), where
        kind = obj.get("type")
        assert kind in SERVER_SAMPLES, f"{where}: unknown server frame type {kind!r}"
        shapes = [json.loads(s) for s in [SERVER_SAMPLES[kind], *SERVER_VARIANTS.get(kind, [])]]
        sample = next((s for s in shapes if list(s) == list(obj)), shapes[0])
        assert list(obj) == list(sample), f"{where}: fields differ from frames.{kind}()"
        for key, value in obj.items():
            if value is None and (kind, key) in NULLABLE:
                continue
            assert type(value) is type(sample[key]), f"{where}: {key} has the wrong type"
    shown = {json.loads(b.text)["type"] for b in found}
    assert shown == server_frame_types(), "every server frame type needs an example"


@pytest.mark.parametrize(
    ("title", "kinds"),
    [("Client frames", client_frame_types), ("Server frames", server_frame_types)],
)
def test_every_frame_type_has_a_versioned_heading(title: str, kinds: Any) -> None:
    found = {}
    for heading in headings(section(doc(), title), 3):
        m = re.fullmatch(r"`(\w+)` \((v1(?:\.[12])?|v2)\)", heading)
        assert m, f"frame heading {heading!r} is not like ### `name` (v1)"
        found[m.group(1)] = m.group(2)
    assert set(found) == kinds()


def test_every_error_code_is_documented_with_its_http_status() -> None:
    header, rows = only_table(section(doc(), "Error codes"))
    status_col = column(header, "HTTP status")
    documented = {}
    for row in rows:
        code = ticked(row[0])
        assert code in {c.value for c in Code}, f"`{code}` is not an errors.Code"
        documented[code] = row[status_col]
    assert set(documented) == {c.value for c in Code}
    for code, status in documented.items():
        expected = HTTP_STATUS.get(Code(code))
        assert status == (str(expected) if expected else "—"), f"`{code}` answers {expected}"


def test_every_close_code_is_documented() -> None:
    _header, rows = only_table(section(doc(), "Close codes"))
    documented = {int(row[0]) for row in rows}
    ours = {v for k, v in vars(CloseCode).items() if k.isupper()}
    assert ours <= documented, f"close codes missing: {sorted(ours - documented)}"
    known = ours | {c.value for c in WsCloseCode}
    assert documented <= known, f"not close codes: {sorted(documented - known)}"


def test_every_route_is_documented() -> None:
    text = doc()
    endpoints = set(ROUTE_RE.findall(text))
    routes = app_routes() | openapi_routes()
    missing = sorted(routes - endpoints)
    assert not missing, f"routes not in docs/PROTOCOL.md: {missing}"
    unknown = sorted(endpoints - routes - {GATEWAY})
    assert not unknown, f"docs/PROTOCOL.md names routes the app lacks: {unknown}"


def test_every_endpoint_heading_is_versioned() -> None:
    found = 0
    for heading in headings(section(doc(), "HTTP API"), 3):
        if not ROUTE_RE.match(heading):
            continue
        found += 1
        assert VERSION_MARK_RE.search(heading), f"heading {heading!r} has no (v1)/(v1.1)"
    assert found


def test_every_since_cell_is_a_version() -> None:
    checked = 0
    for header, rows in tables(doc()):
        if "since" not in header:
            continue
        at = header.index("since")
        for row in rows:
            assert row[at] in VERSIONS, f"'since' cell {row[at]!r} in row {row}"
            checked += 1
    assert checked


def test_every_setting_named_exists() -> None:
    named = set(SETTING_RE.findall(doc()))
    unknown = sorted(named - set(setting_names()))
    assert not unknown, f"docs/PROTOCOL.md names settings config.py lacks: {unknown}"


def test_every_setting_is_documented() -> None:
    named = set(SETTING_RE.findall(doc()))
    missing = sorted(set(setting_names()) - named)
    assert not missing, f"settings not in docs/PROTOCOL.md: {missing}"


def _default_matches(field: dataclasses.Field[Any], cell: str) -> bool:
    default = field.default
    if isinstance(default, str):
        return cell.startswith("none") if default == "" else f"`{default}`" in cell
    number = re.match(r"-?[0-9][0-9,]*(?:\.[0-9]+)?", cell)
    return number is not None and float(number.group(0).replace(",", "")) == default


def test_documented_defaults_match_config() -> None:
    settings = setting_names()
    checked = 0
    for header, rows in tables(doc()):
        if "default" not in header:
            continue
        at = header.index("default")
        for row in rows:
            names = [n for c in row[:at] + row[at + 1 :] for n in SETTING_RE.findall(c)]
            values = [v.strip() for v in row[at].split(" / ")]
            if not names or len(names) != len(values):
                continue
            for name, value in zip(names, values, strict=True):
                field = settings[name]
                if field.default is dataclasses.MISSING:
                    continue  # made when the settings are (the node id)
                assert _default_matches(field, value), f"{name}: documented {value!r}"
                checked += 1
    assert checked >= len(settings) - 1


# -- v1 as first agreed: what it has is marked v1, and only that --------------------


# What v1 as first agreed names (../shared/PROTOCOL.md, frozen: v1 never changes, and the
# file is not in the repository).
V1_ROUTES = {
    ("POST", "/auth/signup"),
    ("POST", "/auth/login"),
    ("POST", "/auth/signin"),
    ("POST", "/auth/logout"),
    ("POST", "/block-action/block"),
    ("DELETE", "/block-action/unblock"),
    ("GET", "/block-action/list"),
    ("GET", "/profile/lastseen"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
}
V1_FRAMES = {"send", "ack", "read", "typing", "hello", "accepted", "message", "receipt", "error"}
V1_CODES = {
    "blocked",
    "conflict",
    "inbox_full",
    "internal",
    "invalid_credentials",
    "invalid_frame",
    "invalid_request",
    "not_found",
    "payload_too_large",
    "rate_limited",
    "too_large",
    "unauthorized",
    "unavailable",
    "unknown_recipient",
}
V1_CLOSE_CODES = {1008, 1009, 1011, 1012, 4001, 4003}


def test_the_frozen_v1_names_match_the_agreed_file_where_it_is_here() -> None:
    if not V1_PATH.exists():
        pytest.skip(f"{V1_PATH} is not here")
    v1 = V1_PATH.read_text(encoding="utf-8")
    assert set(ROUTE_RE.findall(v1)) == V1_ROUTES
    assert set(re.findall(r'\{"type":"(\w+)"', v1)) == V1_FRAMES
    assert set(re.findall(r"`(\w+)`", v1)) & {c.value for c in Code} == V1_CODES
    close_paragraph = v1[v1.index("Close codes:") :].split("\n\n")[0]
    assert {int(n) for n in re.findall(r"\b[14]0\d\d\b", close_paragraph)} == V1_CLOSE_CODES


def test_v1_endpoints_are_marked_v1() -> None:
    v1 = V1_ROUTES
    text = doc()
    assert v1 <= set(ROUTE_RE.findall(text))
    for heading in headings(section(text, "HTTP API"), 3):
        m, mark = ROUTE_RE.match(heading), VERSION_MARK_RE.search(heading)
        if m and mark:
            assert (mark.group(1) == "v1") == (m.groups() in v1), heading


def test_v1_frames_are_marked_v1() -> None:
    v1 = V1_FRAMES
    text = doc()
    for title in ("Client frames", "Server frames"):
        for heading in headings(section(text, title), 3):
            m = re.fullmatch(r"`(\w+)` \((v1(?:\.[12])?|v2)\)", heading)
            assert m
            assert (m.group(2) == "v1") == (m.group(1) in v1), heading


def test_v1_codes_are_marked_v1() -> None:
    v1_codes = V1_CODES
    header, rows = only_table(section(doc(), "Error codes"))
    since = column(header, "since")
    for row in rows:
        assert (row[since] == "v1") == (ticked(row[0]) in v1_codes), row

    v1_close = V1_CLOSE_CODES
    header, rows = only_table(section(doc(), "Close codes"))
    since = column(header, "since")
    marked_v1 = {int(row[0]) for row in rows if row[since] == "v1"}
    assert marked_v1 == v1_close
