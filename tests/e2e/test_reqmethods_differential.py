"""memcached 1.6.45's request and response methods (r:raw_line,
r:raw_value, r:flag_token_int, r:flag_add/set/replace/del, r:match_res,
res:flag_blank, res:raw_string) in mcproxy and in the 1.6.45 binary, both
running tests/e2e/reqmethods/routes.lua in front of one memcached: every
request of the corpus gets the same bytes from both, but for DIFFERENCES,
edits memcached's proxy makes that would forward what memcached does not
read as one request (mcproxy refuses them as memcached's proxy refuses an
edit it cannot parse: the method returns false). The corpus runs against
one proxy, the server is flushed, and it runs against the other. Skipped,
with the reason, where the reference binary cannot run.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.test_v2_differential import ANCHOR, anchor_can_run, ask
from tests.servers import Memcached, Proxy, free_port, wait_for_port

ROUTES = Path(__file__).resolve().parent / "reqmethods" / "routes.lua"

CORPUS = [
    b'mg add/k v\r\n',
    b'mg addstr/k v\r\n',
    b'mg addnum/k v\r\n',
    b'mg addneg/k\r\n',
    b'mg addfloat/k\r\n',
    b'mg addbool/k\r\n',
    b'mg addtable/k\r\n',
    b'mg addempty/k\r\n',
    b'mg addexist/k v\r\n',
    b'mg addexist/k s\r\n',
    b'mg addlong/k\r\n',
    b'mg add400/k\r\n',
    b'mg addspace/k\r\n',
    b'mg addcrlf/k\r\n',
    b'mg addnul/k\r\n',
    b'mg addk/k\r\n',
    b'mg addO/k\r\n',
    b'mg addq/k\r\n',
    b'mg adddigit/k\r\n',
    b'mg addtwo/k\r\n',
    b'mg addnone/k\r\n',
    b'mg addlow/k\r\n',
    b'mg addbrace/k\r\n',
    b'mg set/k v\r\n',
    b'mg set/k v F12\r\n',
    b'mg setstr/k F1 v\r\n',
    b'mg setnum/k v\r\n',
    b'mg setexist/k O1 v\r\n',
    b'mg setexist/k v\r\n',
    b'mg setflag/k Oabc v\r\n',
    b'mg setv/k v\r\n',
    b'mg setlong/k O1\r\n',
    b'mg setbool/k O1\r\n',
    b'mg repl/k F1 v\r\n',
    b'mg repl/k v\r\n',
    b'mg repl2/k F v\r\n',
    b'mg replO/k v O5 t\r\n',
    b'mg replbad/k O5\r\n',
    b'mg del/k v O5 t\r\n',
    b'mg del/k O5\r\n',
    b'mg del/k O5 O6\r\n',
    b'mg delv/k v\r\n',
    b'mg delnone/k v\r\n',
    b'mg delbad/k v\r\n',
    b'mg delkey/k v\r\n',
    b'mg fti/k T30 N-5 Oabc v s\r\n',
    b'mg fti/k T Nx O99999999999999999999\r\n',
    b'mg fti/k\r\n',
    b'mg ftibad/k\r\n',
    b'mg ftidigit/k\r\n',
    b'mg line/k v t\r\n',
    b'ms line/k 2 T0\r\nhi\r\n',
    b'set line/k 0 0 2\r\nhi\r\n',
    b'get line/k\r\n',
    b'ms add/k 2\r\nhi\r\n',
    b'ms addstr/k 2 T0\r\nhi\r\n',
    b'ms addnum/send/k 2\r\nhi\r\n',
    b'ms del/k 2 O1 T0\r\nhi\r\n',
    b'set add/k 0 0 2\r\nhi\r\n',
    b'get add/k\r\n',
    b'get addstr/k\r\n',
    b'get set/k\r\n',
    b'get del/k\r\n',
    b'get fti/k\r\n',
    b'gat 10 add/k\r\n',
    b'get add/k add/j\r\n',
    b'incr add/k 1\r\n',
    b'delete add/k\r\n',
    b'delete del/k\r\n',
    b'touch add/k 10\r\n',
    b'md add/k\r\n',
    b'md del/k q\r\n',
    b'ma add/k\r\n',
    b'mg token/k v\r\n',
    b'mg addk/send/k v\r\n',
    b'mg addO/send/k v\r\n',
    b'mg addq/send/k v\r\n',
    b'mg addstr/send/k v\r\n',
    b'mg del/send/k v O5 t\r\n',
    b'mg repl/send/k F1 v\r\n',
    b'mg addspace/send/k\r\n',
    b'mg addcrlf/send/k\r\n',
    b'ms addO/send/k 2\r\nhi\r\n',
    b'ms match/k 2\r\nhi\r\nmg match/k O123 k v\r\n',
    b'mg match/k O123 v\r\n',
    b'mg match/k k v\r\n',
    b'mg match/k v\r\n',
    b'mg match/miss O12 k\r\n',
    b'mg matchO/k O123 k v\r\n',
    b'mg matchadd/k k v\r\n',
    b'mg matchk/k O1 k v\r\n',
    b'mg matchbad/k O1\r\n',
    b'mg match/down/k O1\r\n',
    b'get match/k\r\n',
    b'mg blank/k O123 k v\r\n',
    b'mg blank/k k v\r\n',
    b'mg blank/k\r\n',
    b'mg blankk/k O123 k v t\r\n',
    b'mg blanks/k O123 s v\r\n',
    b'mg blankv/k t v\r\n',
    b'get blank/k\r\n',
    b'mg blank/down/k O1\r\n',
    b'mg raw/k v\r\n',
    b'mg raw/k\r\n',
    b'mg raw/miss v\r\n',
    b'get raw/k\r\n',
    b'get raw/miss\r\n',
    b'incr raw/k 1\r\n',
    b'mg raw/down/k v\r\n',
    b'mg addn/k/400\r\n',
    b'mg addn/k/480\r\n',
    b'mg addn/k/482\r\n',
    b'mg addn/k/483\r\n',
    b'mg addn/k/484\r\n',
    b'mg addn/k/485\r\n',
    b'mg addn/k/490\r\n',
    b'mg addn/k/990\r\n',
    b'mg setn/k/480 O1\r\n',
    b'mg setn/k/481 O1\r\n',
    b'mg setn/k/482 O1\r\n',
    b'mg setn/k/483 O1\r\n',
    b'mg setn/k/484 O1\r\n',
    b'mg setn/k/482 O1 v\r\n',
    b'mg setn/k/483 O1 v\r\n',
    b'mg setn/k/484 O1 v\r\n',
    b'mg fti/k T+5 N05 O5x\r\n',
    b'mg fti/k T9223372036854775807 N9223372036854775808 O-9223372036854775808\r\n',
    b'mg fti/k T-9223372036854775809 N0x10 O\r\n',
    b'mg fti/k T1 T2\r\n',
    b'ms raw/k 2 T0\r\nhi\r\n',
    b'mg raw/k v t s f\r\n',
    b'mg raw/k s\r\n',
    b'ms blank/k 2 T0\r\nhi\r\n',
    b'mg blank/k Ok k v\r\n',
    b'mg blank/k Oa Ob v\r\n',
    b'mg blank/k k Ox\r\n',
    b'ms add/k 2 a b c d e f g h i j k l m n o\r\nhi\r\n',
    b'ms add/k 2 a b c d e f g h i j k l m n o p\r\nhi\r\n',
    b'ms addO/send/k 2 T0 I E1 M F C1 b q s\r\nhi\r\n',
    b'get addk/k\r\n',
    b'md addq/send/k\r\n',
    b'mg fti/k  T5   N6 \r\n',
    b'mg add/k  v   t\r\n',
    b'mg del/k  O1   t\r\n',
    b'mg del/k v  O1\r\n',
    b'mg del/k v O1  \r\n',
    b'mg set/k v  O1  t\r\n',
    b'mg setstr/k F1 v  \r\n',
    b'mg setstr/k F1   v\r\n',
    b'mg setstr/k   F1   v  \r\n',
    b'mg del/k O1   v  \r\n',
    b'mg del/k v O1  t  \r\n',
    b'mg set/k F1  \r\n',
    b'mg add/k v  \r\n',
    b'mg repl/k F1  v  t\r\n',
    b'mg setn/k/0 O1\r\n',
    b'mg fti/k T- N-0 O00000000000000000000000000000000005\r\n',
]

#: Where mcproxy answers otherwise, why, and what it answers.
_TWO_LINES = "a token with CRLF would make the line two requests"
_SECOND_KEY = "a flag after a get's key would be a second key of a multiget"
DIFFERENCES = {
    b'mg addcrlf/k\r\n': (_TWO_LINES, b"R false 'mg addcrlf/k'\r\n"),
    # memcached answers the second line too: a reply nobody waits for
    b'mg addcrlf/send/k\r\n': (_TWO_LINES, b"EN\r\n"),
    b'mg addnul/k\r\n': ("memcached reads a line up to a NUL",
                          b"R false 'mg addnul/k'\r\n"),
    b'get add/k\r\n': (_SECOND_KEY, b"R false 'get add/k'\r\n"),
    b'get addstr/k\r\n': (_SECOND_KEY, b"R false 'get addstr/k'\r\n"),
    b'get set/k\r\n': (_SECOND_KEY, b"R false 'get set/k'\r\n"),
    b'get addk/k\r\n': (_SECOND_KEY, b"R false 'get addk/k'\r\n"),
    b'gat 10 add/k\r\n': (_SECOND_KEY, b"R false 'gat 10 add/k'\r\n"),
    b'get add/k add/j\r\n': (_SECOND_KEY,
                              b"R false 'get add/k'\r\nR false 'get add/j'\r\nEND\r\n"),
    # memcached answers CLIENT_ERROR options flags too long, then reads the
    # payload as a command
    b'ms add/k 2 a b c d e f g h i j k l m n o p\r\nhi\r\n': (
        "an ms line of more than 16 flags",
        b"R false 'ms add/k 2 a b c d e f g h i j k l m n o p'\r\n"),
}


class Anchor:
    """memcached 1.6.45's proxy running ROUTES on a free port."""

    def __init__(self, env: dict) -> None:
        self.port = free_port()
        args = [str(ANCHOR), "-t", "1", "-m", "64", "-U", "0", "-l", "127.0.0.1",
                "-p", str(self.port), "-o", f"proxy_config={ROUTES}"]
        if os.geteuid() == 0:
            args += ["-u", "root"]
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for_port(self.port, proc=self.proc)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def run_corpus(port: int, server: Memcached) -> list[bytes]:
    assert server.call(b"flush_all\r\n") == b"OK\r\n"
    return [ask(port, request) for request in CORPUS]


@pytest.fixture(scope="module")
def replies():
    reason = anchor_can_run()
    if reason is not None:
        pytest.skip(reason)
    server = Memcached().start()
    env = {**os.environ, "RM_MAIN": str(server.port), "RM_DOWN": str(free_port())}
    try:
        anchor = Anchor(env)
        try:
            theirs = run_corpus(anchor.port, server)
        finally:
            anchor.stop()
        proxy = Proxy(ROUTES, env=env).start()
        try:
            ours = run_corpus(proxy.port, server)
        finally:
            proxy.stop()
    finally:
        server.stop()
    return dict(zip(CORPUS, zip(theirs, ours, strict=True), strict=True))


def test_corpus_is_distinct():
    assert len(set(CORPUS)) == len(CORPUS)
    assert set(DIFFERENCES) <= set(CORPUS)


@pytest.mark.parametrize("request_bytes", CORPUS, ids=[r[:40].decode("latin1") for r in CORPUS])
def test_same_reply_as_memcached_1_6_45(replies, request_bytes):
    theirs, ours = replies[request_bytes]
    if request_bytes in DIFFERENCES:
        _why, expected = DIFFERENCES[request_bytes]
        assert theirs != expected
        assert ours == expected
    else:
        assert ours == theirs
