"""Property tests of the client protocol under memcached 1.6.45's wire
behaviour (bare-LF lines, CLIENT_ERROR words, close at once on an unknown
command): however the stream is cut and the answers come, the same
requests are routed, the connection hangs up the same way, and only whole
replies are written (fuzz/checks.py, shared with the fuzz targets)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fuzz.checks import check_client_stream_1_6_45, chunked, run_protocol
from mcproxy.wire import request as rq
from mcproxy.wire.behaviour import WIRE_1_6_45
from tests.routing.test_properties import SLOW, client_streams, hooked_sets, plain_streams


@SLOW
@given(client_streams(), st.lists(st.integers(0, 10**6), max_size=12), hooked_sets)
def test_client_stream_split_anywhere(stream, cuts, hooked):
    check_client_stream_1_6_45(stream, chunked(stream, cuts), hooked)


@SLOW
@given(plain_streams(), st.lists(st.integers(0, 10**6), max_size=12),
       st.sampled_from([frozenset(rq.COMMANDS.values()), frozenset((rq.CMD_GET, rq.CMD_SET))]))
def test_plain_streams_split_anywhere(stream, cuts, hooked):
    check_client_stream_1_6_45(stream, chunked(stream, cuts), hooked)


def test_bare_lf_lines_are_routed_as_crlf_lines():
    stream = b"get a\nset k 0 0 1\nx\r\nget b\r\n"
    hooked = frozenset(rq.COMMANDS.values())
    for chunks in ([stream], chunked(stream, [3, 6, 9, 17])):
        routed, output, closed, _ = run_protocol(chunks, hooked, wire=WIRE_1_6_45)
        assert routed == [(b"get a\r\n", None, False), (b"set k 0 0 1\r\n", b"x\r\n", False),
                          (b"get b\r\n", None, False)]
        assert output == b"<1>\r\n<2>\r\n<3>\r\n" and not closed
    check_client_stream_1_6_45(stream, chunked(stream, [3, 9, 17]), hooked)
