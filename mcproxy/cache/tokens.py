"""memcached's command-line tokenizer, as the embedded cache reads lines.

The proxy's own parser (:mod:`mcproxy.wire.request`) decides what a line
is; the cache re-reads it as memcached's ``tokenize_command`` would, so
its quirks (the NUL byte, the token cap) give memcached's answers.
"""

from __future__ import annotations

KEY_MAX_LENGTH = 250
#: memcached indexes at most this many tokens (the last is the remainder).
MAX_TOKENS = 24
NOREPLY = b"noreply"


def tokenize(line: bytes) -> list[bytes]:
    """Split a command line on spaces, as memcached's tokenizer does.

    memcached stops at the first NUL byte and drops the line ending.
    """
    if line.endswith(b"\r\n"):
        body = line[:-2]
    elif line.endswith(b"\n"):
        body = line[:-1]
    else:
        body = line
    if b"\0" in body:
        body = body[:body.index(b"\0")]
    tokens = body.split(b" ")
    if b"" in tokens:
        tokens = [t for t in tokens if t]
    return tokens


def ntokens(tokens: list[bytes]) -> int:
    """memcached's token count: indexed tokens plus the terminal one."""
    return min(len(tokens), MAX_TOKENS - 1) + 1
