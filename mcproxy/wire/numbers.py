"""memcached's readings of number tokens (its ``safe_strto*`` functions).

Pure. A request line is forwarded only when the proxy reads its numbers as
memcached will: a length read differently would make memcached take part
of the payload for a command, or a command for the payload. C's
``strto[u]l`` skip leading white space, take an optional sign and decimal
digits, and memcached accepts the token only when white space or its end
follows the digits.
"""

from __future__ import annotations

INT_MAX = 2**31 - 1
U32 = 2**32 - 1
U64 = 2**64 - 1
INT64_MIN = -2**63
INT64_MAX = 2**63 - 1

#: C's isspace() in the "C" locale.
SPACES = frozenset(b" \t\n\v\f\r")
#: More digits than any 64-bit number has (after leading zeros).
_MAX_DIGITS = 20


def strto(token: bytes) -> tuple[int, bool] | None:
    """The magnitude and sign that C's strto[u]l reads from ``token``.

    None when there are no digits, or when something other than white
    space follows them (memcached's safe_strto* then fail). A magnitude
    beyond 64 bits is given as ``U64 + 1`` (strto[u]l's ERANGE), so that
    no token is converted digit by digit past what any check needs.
    """
    n = len(token)
    i = 0
    while i < n and token[i] in SPACES:
        i += 1
    negative = False
    if i < n and token[i] in b"+-":
        negative = token[i] == 45
        i += 1
    j = i
    while j < n and 48 <= token[j] <= 57:
        j += 1
    if j == i or (j < n and token[j] not in SPACES):
        return None
    digits = token[i:j].lstrip(b"0")
    if len(digits) > _MAX_DIGITS:
        return U64 + 1, negative
    return int(digits or b"0"), negative


def strtoull(token: bytes) -> int | None:
    """memcached's safe_strtoull: a uint64, "-0" allowed, "-1" refused."""
    if token.isdigit() and len(token) < 20:
        return int(token)
    parsed = strto(token)
    if parsed is None or parsed[0] > U64:
        return None
    value = -parsed[0] & U64 if parsed[1] else parsed[0]
    if value >= 2**63 and parsed[1]:
        return None
    return value


def strtol(token: bytes) -> int | None:
    """C's strtol on a 64-bit platform, as safe_strtol checks it: None
    without digits, with trailing garbage, or out of the int64 range."""
    if token.isdigit() and len(token) < 19:
        return int(token)
    parsed = strto(token)
    if parsed is None:
        return None
    value = -parsed[0] if parsed[1] else parsed[0]
    if not INT64_MIN <= value <= INT64_MAX:
        return None
    return value


def strtoul32(token: bytes) -> int | None:
    """memcached's safe_strtoul: a 64-bit parse truncated to 32 bits."""
    if token.isdigit() and len(token) < 10:
        return int(token)
    value = strtoull(token)
    return None if value is None else value & U32


def strtol32(token: bytes) -> int | None:
    """memcached's safe_strtol: a 64-bit signed parse truncated to int32."""
    value = strtol(token)
    if value is None:
        return None
    value &= U32
    return value - 2**32 if value > INT_MAX else value
