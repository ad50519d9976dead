"""A route's string answer to a key of a split multiget.

The keys of a multiget a route takes are routed one by one and the proxy
writes the multiget's END after the last: a key's string answer must not
carry an END of its own, or the client reads the extra END as the reply to
its next request.
"""

from __future__ import annotations

import pytest
from twisted.internet.testing import StringTransport

from mcproxy.server.protocol import ProxyServerProtocol
from tests.server.memorycore import MemoryCore

CONFIG = """
function mcp_config_pools()
    return mcp.pool({{ mcp.backend("b1", "127.0.0.1", 11211) }})
end
function mcp_config_routes(p)
    mcp.attach(mcp.CMD_GET, function(r) return {answer} end)
    mcp.attach(mcp.CMD_GAT, function(r) return {answer} end)
end
"""


def exchange(engine, data: bytes) -> bytes:
    client = ProxyServerProtocol(MemoryCore(engine))
    client.makeConnection(StringTransport())
    client.dataReceived(data)
    return client.transport.value()


@pytest.mark.parametrize(("answer", "one", "two"), [
    ('"END\\r\\n"', b"END\r\n", b"END\r\n"),
    ('"VALUE " .. r:key() .. " 0 1\\r\\nx\\r\\nEND\\r\\n"',
     b"VALUE a 0 1\r\nx\r\nEND\r\n", b"VALUE a 0 1\r\nx\r\nVALUE b 0 1\r\nx\r\nEND\r\n"),
    ('"SERVER_ERROR nope\\r\\n"', b"SERVER_ERROR nope\r\n",
     b"SERVER_ERROR nope\r\nSERVER_ERROR nope\r\nEND\r\n"),
])
@pytest.mark.parametrize("command", [b"get", b"gat 10"])
def test_a_string_answer_per_key_ends_with_one_end(engine, load, answer, one, two, command):
    load(CONFIG.format(answer=answer))
    got = exchange(engine, command + b" a\r\n" + command + b" a b\r\nmn\r\n")
    assert got == one + two + b"MN\r\n"
