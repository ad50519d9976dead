"""memcached 1.6.45's request methods (r:raw_line, r:raw_value,
r:flag_token_int, r:flag_add/set/replace/del, r:match_res) and response
methods (res:flag_blank, res:raw_string) on a network-free engine: what
they return, the exact bytes the backend and the client get, and their
error messages (asked of the 1.6.45 binary: tests/e2e/
test_reqmethods_differential.py). Also on the lazy requests and responses
of a Lua-routed multiget."""

from __future__ import annotations

import pytest

from mcproxy.wire.request import parse_request
from mcproxy.wire.response import Response
from tests.enginekit import FakeBackends, run
from tests.routing.luapaths import POOLS, LuaProxy

ONE_POOL = """
function mcp_config_pools()
    return mcp.pool({ mcp.backend("z1", "127.0.0.1", "1") })
end
"""

#: Lua helpers for the routes below: `show(...)` renders values as text.
SHOW = """
local function show(...)
    local parts = {}
    for i = 1, select("#", ...) do
        local v = select(i, ...)
        parts[i] = type(v) == "string" and ("'" .. v .. "'") or tostring(v)
    end
    return table.concat(parts, "|")
end
"""


def edit_route(edit: str, send: bool) -> str:
    """Every command's route runs ``edit`` (an expression on ``r``), then
    sends r to the pool (``send``) or answers what it returned and the
    edited line."""
    tail = "return p(r)" if send else 'return show(got) .. " " .. r:raw_line() .. "\\r\\n"'
    return ONE_POOL + SHOW + f"""
function mcp_config_routes(p)
    local function route(r)
        local got = {edit}
        {tail}
    end
    for _, cmd in ipairs({{ mcp.CMD_MG, mcp.CMD_MS, mcp.CMD_MD, mcp.CMD_GET, mcp.CMD_SET,
                           mcp.CMD_GAT, mcp.CMD_INCR }}) do
        mcp.attach(cmd, route)
    end
end
"""


def test_raw_line_and_raw_value(engine, load):
    load(edit_route('r:raw_line() .. "|" .. tostring(r:raw_value())', False))
    assert run(engine, b"ms k 2 T0\r\n", b"hi\r\n") == b"'ms k 2 T0|hi\r\n' ms k 2 T0\r\n"
    assert run(engine, b"mg k v  t\r\n") == b"'mg k v  t|nil' mg k v  t\r\n"


@pytest.mark.parametrize("line, edit, result, edited", [
    (b"mg k v\r\n", 'r:flag_add("F")', b"true", b"mg k v F"),
    (b"mg k v\r\n", 'r:flag_add("F", "1234")', b"true", b"mg k v F1234"),
    (b"mg k v\r\n", 'r:flag_add("F", 5678)', b"true", b"mg k v F5678"),
    (b"mg k\r\n", 'r:flag_add("F", 1.5)', b"true", b"mg k F1.5"),
    (b"mg k v  \r\n", 'r:flag_add("F")', b"true", b"mg k v   F"),
    (b"mg k v\r\n", 'r:flag_add("v", "x")', b"false", b"mg k v"),
    (b"mg k\r\n", 'r:flag_add("F", "a b")', b"true", b"mg k Fa b"),
    (b"mg k v F12\r\n", 'r:flag_set("F")', b"true", b"mg k v F"),
    (b"mg k F1 v  \r\n", 'r:flag_set("F", "4321")', b"true", b"mg k F4321 v  "),
    (b"mg k   F1   v\r\n", 'r:flag_set("F", 9)', b"true", b"mg k   F9 v"),
    (b"mg k v\r\n", 'r:flag_set("O", "new")', b"true", b"mg k v Onew"),
    (b"mg k F1  \r\n", 'r:flag_set("F")', b"true", b"mg k F"),
    (b"mg k F1 v\r\n", 'r:flag_replace("F", "O", "foo")', b"true", b"mg k Ofoo v"),
    (b"mg k v\r\n", 'r:flag_replace("F", "O")', b"true", b"mg k v O"),
    (b"mg k v O5 t\r\n", 'r:flag_del("O")', b"true", b"mg k v t"),
    (b"mg k O1   v  \r\n", 'r:flag_del("O")', b"true", b"mg k v  "),
    (b"mg k v O1  \r\n", 'r:flag_del("O")', b"true", b"mg k v"),
    (b"mg k O5 O6\r\n", 'r:flag_del("O")', b"true", b"mg k O6"),
    (b"mg dk v\r\n", 'r:flag_del("d")', b"false", b"mg dk v"),
    (b"ms k 2 T0\r\n", 'r:flag_add("F")', b"true", b"ms k 2 T0 F"),
    (b"set k 0 0 2\r\n", 'r:flag_add("F")', b"true", b"set k 0 0 2 F"),
    (b"incr k 1\r\n", 'r:flag_add("F")', b"true", b"incr k 1 F"),
    # refused: the line would not be one request memcached reads as one
    (b"get k\r\n", 'r:flag_add("F")', b"false", b"get k"),
    (b"gat 10 k\r\n", 'r:flag_add("k")', b"false", b"gat 10 k"),
    (b"mg k\r\n", 'r:flag_add("F", "a\\r\\nmn")', b"false", b"mg k"),
    (b"mg k\r\n", 'r:flag_add("F", "a\\0b")', b"false", b"mg k"),
    (b"ms k 2 a b c d e f g h i j k l m n o p\r\n", 'r:flag_add("F")', b"false",
     b"ms k 2 a b c d e f g h i j k l m n o p"),
    # within 500 bytes (memcached's proxy's limits, asked of the binary)
    (b"mg k\r\n", 'r:flag_add("F", string.rep("x", 491))', b"true", b"mg k F" + b"x" * 491),
    (b"mg k\r\n", 'r:flag_add("F", string.rep("x", 492))', b"false", b"mg k"),
    (b"mg k O1\r\n", 'r:flag_set("O", string.rep("x", 489))', b"true", b"mg k O" + b"x" * 489),
    (b"mg k O1\r\n", 'r:flag_set("O", string.rep("x", 490))', b"false", b"mg k O1"),
])
def test_flag_edits(engine, load, line, edit, result, edited):
    value = b"hi\r\n" if line[:2] in (b"ms", b"se") else None
    load(edit_route(edit, False))
    assert run(engine, line, value) == result + b" " + edited + b"\r\n"


def test_an_edited_request_reaches_the_backend_edited_with_its_payload(engine, load):
    load(edit_route('r:flag_add("O", "opq")', True))
    fake = FakeBackends(engine, {"z1": b"HD Oopq\r\n"})
    assert run(engine, b"ms k 2 T0\r\n", b"hi\r\n") == b"HD Oopq\r\n"
    assert fake.sent == [("z1", b"ms k 2 T0 Oopq\r\nhi\r\n")]


def test_a_refused_edit_sends_the_request_as_it_was(engine, load):
    load(edit_route('r:flag_add("F", "a\\r\\nmn")', True))
    fake = FakeBackends(engine, {"z1": b"EN\r\n"})
    assert run(engine, b"mg k\r\n") == b"EN\r\n"
    assert fake.sent == [("z1", b"mg k\r\n")]


def test_an_added_q_flag_makes_the_request_quiet(engine, load):
    load(edit_route('r:flag_add("q")', True))
    fake = FakeBackends(engine, {"z1": b"EN\r\n"})
    assert run(engine, b"mg k v\r\n") == b""
    assert fake.sent == [("z1", b"mg k v\r\n")]


@pytest.mark.parametrize("call, message", [
    ('r:flag_add("FF")', "request: meta flag must be a single character"),
    ('r:flag_add("1")', "request: invalid flag, must be A-Z,a-z"),
    ('r:flag_add("@")', "request: invalid flag, must be A-Z,a-z"),
    ("r:flag_add()", "bad argument #1 to 'flag_add' (string expected, got no value)"),
    ("r:flag_add({})", "bad argument #1 to 'flag_add' (string expected, got table)"),
    ('r:flag_add("F", true)', "request: invalid flag argument"),
    ('r:flag_set("O", false)', "request: invalid flag argument"),
    ('r:flag_replace("O", "9")', "request: invalid flag, must be A-Z,a-z"),
    ('r:flag_replace("O")', "bad argument #2 to 'flag_replace' (string expected, got no value)"),
    ('r:flag_del("")', "request: meta flag must be a single character"),
    ('r:flag_token_int("TT")', "has_flag(): meta flag must be a single character"),
    ('r:match_res("x")', "bad argument #1 to 'match_res' (mcp.response expected, got string)"),
])
def test_argument_errors(engine, load, call, message):
    load(edit_route(f"select(2, pcall(function() return {call} end))", False))
    got = run(engine, b"mg k v\r\n")
    assert got.endswith(f"{message}' mg k v\r\n".encode())
    assert got.startswith(b"'")


def test_flag_add_of_a_present_flag_is_false_before_its_token_is_checked(engine, load):
    load(edit_route('r:flag_add("v", true)', False))
    assert run(engine, b"mg k v\r\n") == b"false mg k v\r\n"


@pytest.mark.parametrize("flags, expected", [
    (b"T30 N-5 Oabc v s", b"true|30,true|-5,true,false,false,false"),
    (b"T N05 O99999999999999999999", b"false,true|5,true,false,false,false"),
    (b"T+5 N- O00000000000000000000000000000000005",
     b"true,true|0,false,false,false,false"),
    (b"T9223372036854775807 N9223372036854775808 O-9223372036854775808",
     b"true|9223372036854775807,true,true|-9223372036854775808,false,false,false"),
    (b"T1 T2", b"true|1,false,false,false,false,false"),
])
def test_flag_token_int(engine, load, flags, expected):
    load(ONE_POOL + SHOW + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_MG, function(r)
            local out = {}
            for _, f in ipairs({ "T", "N", "O", "v", "Z", "s" }) do
                out[#out + 1] = show(r:flag_token_int(f))
            end
            return table.concat(out, ",") .. "\\r\\n"
        end)
    end
    """)
    assert run(engine, b"mg k " + flags + b"\r\n") == expected + b"\r\n"


def test_flag_token_int_of_a_get_and_of_a_digit(engine, load):
    load(edit_route('show(r:flag_token_int("1"), r:flag_token_int("T"))', False))
    assert run(engine, b"get k\r\n") == b"'false|false' get k\r\n"


MATCH = ONE_POOL + SHOW + """
function mcp_config_routes(p)
    mcp.attach(mcp.CMD_MG, function(r)
        local res = p(r)
        local k = r:key()
        if k == "late" then r:flag_set("O", "999") end
        if k == "trim" then r:ltrimkey(1) end
        if k == "closed" then res:close() end
        return show(r:match_res(res)) .. "\\r\\n"
    end)
end
"""


@pytest.mark.parametrize("line, reply, expected", [
    (b"mg k O123 k v\r\n", b"VA 2 O123 kk\r\nhi\r\n", b"true|nil"),
    (b"mg k O123 v\r\n", b"VA 2 O123\r\nhi\r\n", b"true|nil"),
    (b"mg k k v\r\n", b"VA 2 kk\r\nhi\r\n", b"true|nil"),
    (b"mg k v\r\n", b"VA 2\r\nhi\r\n", b"false|nil"),
    (b"mg k O12 k\r\n", b"EN\r\n", b"false|'opaque in request but not in response'"),
    (b"mg late O123 k\r\n", b"HD O123 klate\r\n",
     b"false|'request opaque does not match response opaque'"),
    (b"mg trim O1 k\r\n", b"HD O1 ktrim\r\n",
     b"false|'key in response does not match request key'"),
    (b"mg k O1\r\n", b"SERVER_ERROR out of memory\r\n",
     b"false|'opaque in request but not in response'"),
    (b"mg closed O1\r\n", b"HD O1\r\n", b"false|'failed to parse response'"),
])
def test_match_res(engine, load, line, reply, expected):
    load(MATCH)
    FakeBackends(engine, {"z1": reply})
    assert run(engine, line) == expected + b"\r\n"


def test_match_res_of_a_failed_response(engine, load):
    load(MATCH)
    fake = FakeBackends(engine, hold=True)
    out = []
    engine.route(parse_request(b"mg k O1\r\n"), out.append)
    fake.pending.pop()[1](Response.failure("timeout"))
    assert out == [b"false|'failed to parse response'\r\n"]


BLANK = ONE_POOL + SHOW + """
function mcp_config_routes(p)
    local function route(r)
        local res = p(r)
        local k = r:key()
        if k == "ret" then
            res:flag_blank("O")
            return res
        end
        local first = res:flag_blank("k")
        local again = res:flag_blank("k")
        return show(first, again, res:line(), res:raw_string()) .. "\\r\\n"
    end
    mcp.attach(mcp.CMD_MG, route)
    mcp.attach(mcp.CMD_GET, route)
end
"""


@pytest.mark.parametrize("line, reply, client", [
    (b"mg ret O123 k v\r\n", b"VA 2 O123 kret\r\nhi\r\n", b"VA 2      kret\r\nhi\r\n"),
    (b"mg ret Ok k\r\n", b"HD Ok kret\r\n", b"HD    kret\r\n"),
    (b"mg ret k O1\r\n", b"HD kret O1\r\n", b"HD kret   \r\n"),
    (b"mg ret\r\n", b"HD\r\n", b"HD\r\n"),
    (b"mg k O123 k t\r\n", b"EN O123 kk\r\n",
     b"true|false|'O123   '|'EN O123   \r\n'\r\n"),
    (b"mg k v\r\n", b"VA 2 kk\r\nhi\r\n", b"true|false|'  '|'VA 2   \r\nhi\r\n'\r\n"),
    (b"get k\r\n", b"VALUE k 0 2\r\nhi\r\nEND\r\n",
     b"false|false|'VALUE k 0 2'|'VALUE k 0 2\r\nhi\r\nEND\r\n'\r\n"),
    (b"get k\r\n", b"END\r\n", b"false|false|'END'|'END\r\n'\r\n"),
])
def test_flag_blank_and_raw_string(engine, load, line, reply, client):
    load(BLANK)
    FakeBackends(engine, {"z1": reply})
    assert run(engine, line) == client


def test_flag_blank_argument_errors(engine, load):
    load(ONE_POOL + SHOW + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_MG, function(r)
            local res = p(r)
            return show(select(2, pcall(res.flag_blank, res, "")),
                        select(2, pcall(res.flag_blank, res, "9")),
                        res:flag_blank("s")) .. "\\r\\n"
        end)
    end
    """)
    FakeBackends(engine, {"z1": b"HD O1\r\n"})
    assert run(engine, b"mg k O1\r\n").endswith(
        b"request: meta flag must be a single character'|"
        b"'request: invalid flag, must be A-Z,a-z'|false\r\n")


def test_raw_string_of_a_failure_and_of_a_closed_response(engine, load):
    load(ONE_POOL + SHOW + """
    function mcp_config_routes(p)
        mcp.attach(mcp.CMD_MG, function(r)
            local res = p(r)
            local failed = res:raw_string()
            res:close()
            return show(failed, res:raw_string(), res:flag_blank("O")) .. "\\r\\n"
        end)
    end
    """)
    FakeBackends(engine, {"z1": b"HD O1\r\n"})
    assert run(engine, b"mg k O1\r\n") == b"'HD O1\r\n'|nil|false\r\n"


LAZY = POOLS + """
function mcp_config_routes(p)
    mcp.attach(mcp.CMD_SET, function(r) return p.b(r) end)
    mcp.attach(mcp.CMD_GET, function(r)
        local line = r:raw_line()
        local edited = r:flag_add("F")
        local res = p.b(r)
        return "SERVER_ERROR " .. line .. " " .. tostring(r:raw_value()) .. " "
            .. tostring(edited) .. " " .. tostring(r:flag_token_int("F")) .. " "
            .. (res:raw_string():gsub("\\r\\n", "/")) .. " " .. tostring(res:flag_blank("k"))
            .. " " .. tostring(r:match_res(res)) .. "\\r\\n"
    end)
end
"""


@pytest.mark.parametrize("batch_keys", [True, False])
def test_on_the_lazy_requests_and_responses_of_a_multiget(tmp_path, batch_keys):
    path = tmp_path / "lazy.lua"
    path.write_text(LAZY)
    proxy = LuaProxy(str(path), batch_keys)
    got = proxy.exchange([b"set b1 0 0 1\r\nx\r\n", b"get b1 b2\r\n"])
    assert got == (b"STORED\r\n"
                   b"SERVER_ERROR get b1 nil false false VALUE b1 0 1/x/END/ false false\r\n"
                   b"SERVER_ERROR get b2 nil false false END/ false false\r\n"
                   b"END\r\n")
    # the refused edit left each key's request as it was
    assert proxy.sent[1:] == [b"get b1 b2\r\n"]
