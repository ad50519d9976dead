# cython: language_level=3
"""The framing loops of the wire layer, compiled (optional).

Framing the replies of a run of plain gets and sets was most of the Python
a pipelined request cost (``bench/opcodes.py``: ~95 of the direct path's
161 opcodes per request at 16 in flight), and scanning a client's run of
plain requests the largest part of a lone get's. This module frames in C
the replies that are plain and complete (``ResponseReader.read_raw`` and
``read_each``, also a run's multi-key gets; ``read_aligned``): the first one that is not (a reply the
Python code would refuse or raise for, an error line, an incomplete reply)
ends the loop, and the Python code goes on from there, answering it
exactly as without this module; and it scans runs of plain requests
(``request.scan_plain``) to the same result as the Python code. So mcproxy
runs the same without it (it is built only where a C compiler is; see
setup.py); tests/wire/test_frames.py compares the two.
"""

from cpython.bytes cimport (PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize,
                            PyBytes_GET_SIZE)
from libc.string cimport memcmp

# The longest key; the most digits of a VALUE line's flags and cas, and of
# a size (response.py's _VALUE_LINE, request.py's _SET_LINE); of a set
# line's flags and exptime (_SET_LINE).
cdef enum:
    MAX_KEY = 250
    MAX_NUMBER = 20
    MAX_SIZE_DIGITS = 9
    SET_FLAGS_DIGITS = 19
    SET_EXPTIME_DIGITS = 18

# The bytes the loops test for, as C constants: Cython indexes a bytes
# literal (b" "[0]) at run time, a call per test, which was about a fifth
# of what scanning and framing a 10-key multiget took.
cdef enum:
    SPACE = 0x20
    CR = 0x0D
    LF = 0x0A
    ZERO = 0x30
    NINE = 0x39


cdef inline bytes _part(bytes data, Py_ssize_t start, Py_ssize_t end):
    """``data[start:end]`` without the slice object and index conversions
    that Cython's slicing of bytes goes through."""
    if start == 0 and end == PyBytes_GET_SIZE(data):
        return data
    return PyBytes_FromStringAndSize(PyBytes_AS_STRING(data) + start, end - start)


cdef inline Py_ssize_t _digits(const char *b, Py_ssize_t p, Py_ssize_t size,
                               Py_ssize_t most) noexcept:
    """How many ASCII digits (at most ``most``) start at ``b[p]``."""
    cdef Py_ssize_t n = 0
    while p + n < size and n < most and ZERO <= b[p + n] <= NINE:
        n += 1
    return n


cdef Py_ssize_t _value_item(const char *b, Py_ssize_t pos, Py_ssize_t size,
                            Py_ssize_t *key_at, Py_ssize_t *key_len) noexcept:
    """Where the complete plain ``VALUE`` item (its line as _VALUE_LINE
    matches it, its data and CRLF) at ``b[pos]`` ends, its key's offset and
    length in ``key_at`` and ``key_len``; 0 for anything else."""
    cdef Py_ssize_t p, start, n, vlen, vend
    cdef int i
    if size - pos < 6 or memcmp(b + pos, b"VALUE ", 6) != 0:
        return 0
    p = pos + 6
    start = p
    while p < size and p - start < MAX_KEY and b[p] != SPACE and b[p] != CR \
            and b[p] != LF:
        p += 1
    if p == start or p >= size or b[p] != SPACE:
        return 0
    key_at[0] = start
    key_len[0] = p - start
    p += 1
    n = _digits(b, p, size, MAX_NUMBER)  # flags
    if n == 0 or p + n >= size or b[p + n] != SPACE:
        return 0
    p += n + 1
    n = _digits(b, p, size, MAX_SIZE_DIGITS)
    if n == 0:
        return 0
    vlen = 0
    for i in range(n):
        vlen = vlen * 10 + (b[p + i] - ZERO)
    p += n
    if p < size and b[p] == SPACE:  # a cas
        n = _digits(b, p + 1, size, MAX_NUMBER)
        if n == 0:
            return 0
        p += n + 1
    if size - p < 2 or b[p] != CR or b[p + 1] != LF:
        return 0
    vend = p + 2 + vlen + 2
    if vend > size or b[vend - 2] != CR or b[vend - 1] != LF:
        return 0
    return vend


cdef Py_ssize_t _plain_reply(const char *b, Py_ssize_t pos, Py_ssize_t size,
                             const char *key, Py_ssize_t klen, bint is_set) noexcept:
    """Where the plain, complete reply at ``b[pos]`` to a plain ``get`` of
    ``key`` (with ``is_set``, a plain ``set``) ends; 0 for any other
    reply, which Python judges. The same rules as ``_plain_end`` and its
    ``_VALUE_LINE`` for what they accept."""
    cdef Py_ssize_t end, key_at = 0, key_len = 0
    if is_set:
        if size - pos >= 8 and memcmp(b + pos, b"STORED\r\n", 8) == 0:
            return pos + 8
        if size - pos >= 12 and memcmp(b + pos, b"NOT_STORED\r\n", 12) == 0:
            return pos + 12
        if size - pos >= 8 and memcmp(b + pos, b"EXISTS\r\n", 8) == 0:
            return pos + 8
        if size - pos >= 11 and memcmp(b + pos, b"NOT_FOUND\r\n", 11) == 0:
            return pos + 11
        return 0
    if size - pos >= 5 and memcmp(b + pos, b"END\r\n", 5) == 0:
        return pos + 5
    end = _value_item(b, pos, size, &key_at, &key_len)
    if end == 0 or key_len != klen or memcmp(b + key_at, key, klen) != 0 \
            or size - end < 5 or memcmp(b + end, b"END\r\n", 5) != 0:
        return 0
    return end + 5


cdef Py_ssize_t _find_key(list keys, Py_ssize_t index, const char *b, Py_ssize_t key_at,
                          Py_ssize_t key_len):
    """The index of the first of ``keys[index:]`` that is ``b[key_at:]``'s
    key, or -1."""
    cdef bytes key
    cdef Py_ssize_t i
    for i in range(index, len(keys)):
        key = keys[i]
        if PyBytes_GET_SIZE(key) == key_len \
                and memcmp(PyBytes_AS_STRING(key), b + key_at, key_len) == 0:
            return i
    return -1


cdef Py_ssize_t _joined_reply(const char *b, Py_ssize_t pos, Py_ssize_t size,
                              const char *keys, Py_ssize_t length) noexcept:
    """``_multi_end`` for a get of the keys that ``keys`` joins with spaces
    (a run's multi-key get): where its complete, plain reply at ``b[pos]``
    ends, or 0 for anything else (Python's to judge, and to raise for: a
    key not asked for, or out of order)."""
    cdef Py_ssize_t end, key_at = 0, key_len = 0, at = 0, stop
    while True:
        end = _value_item(b, pos, size, &key_at, &key_len)
        if end == 0:
            break
        while True:  # the first of the keys from `at` that is this one
            if at > length:
                return 0
            stop = at
            while stop < length and keys[stop] != SPACE:
                stop += 1
            if stop - at == key_len and memcmp(keys + at, b + key_at, key_len) == 0:
                at = stop + 1
                break
            at = stop + 1
        pos = end
    if size - pos >= 5 and memcmp(b + pos, b"END\r\n", 5) == 0:
        return pos + 5
    return 0


def plain_run(buf, Py_ssize_t pos, list keys, Py_ssize_t first, Py_ssize_t count, sets,
              widths, list each=None):
    """Frame up to ``count`` plain, complete replies at ``buf[pos]``, to the
    requests ``first``, ``first + 1``, ... of a run (``keys`` their keys, a
    multi-key get's joined by spaces; ``sets`` None or the indexes of the
    sets, ``widths`` None or a dict whose keys are the indexes of the
    multi-key gets); return ``(end, framed)``: where the framed replies end
    and how many there were, each appended to ``each`` unless it is None.
    (Python frames anything but bytes, such as a bytearray fed by a test.)"""
    if not PyBytes_CheckExact(buf):
        return pos, 0
    cdef const char *b = PyBytes_AS_STRING(buf)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(buf)
    cdef Py_ssize_t framed = 0, end
    cdef bytes key
    cdef bint is_set
    while framed < count and pos < size:
        key = keys[first + framed]
        if widths is not None and (first + framed) in widths:
            end = _joined_reply(b, pos, size, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))
        else:
            is_set = sets is not None and (first + framed) in sets
            end = _plain_reply(b, pos, size, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key),
                               is_set)
        if end == 0:
            break
        if each is not None:
            each.append(_part(buf, pos, end))
        pos = end
        framed += 1
    return pos, framed


def aligned_values(buf, Py_ssize_t pos, list keys, list parts):
    """The plain ``VALUE`` items of ``read_aligned``'s loop: append to
    ``parts`` each complete plain item at ``buf[pos]`` that is of one of
    ``keys[len(parts):]`` in order (None for each key it skips) and return
    where they end; the first other reply is Python's."""
    if not PyBytes_CheckExact(buf):
        return pos
    cdef const char *b = PyBytes_AS_STRING(buf)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(buf)
    cdef Py_ssize_t index = len(parts), found, end, key_at = 0, key_len = 0
    while True:
        end = _value_item(b, pos, size, &key_at, &key_len)
        if end == 0:
            return pos
        found = _find_key(keys, index, b, key_at, key_len)
        if found < 0:
            return pos
        while index < found:
            parts.append(None)
            index += 1
        parts.append(_part(buf, pos, end))
        index += 1
        pos = end


cdef inline bint _key_byte(char c) noexcept:
    """A byte of a key as the fast paths take it (request.py's _KEY)."""
    return c != SPACE and c != CR and c != LF and c != 0


def scan_plain(bytes data, Py_ssize_t pos, bint sets, Py_ssize_t max_payload,
               Py_ssize_t limit, Py_ssize_t multigets):
    """request.py's ``scan_plain``, compiled: the same run of plain
    requests in ``data`` (bytes), the same result."""
    cdef const char *b = PyBytes_AS_STRING(data)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    cdef list keys = [], ends = [], set_at = []
    cdef object widths = None
    cdef Py_ssize_t p, start, tokens, n, vlen, end
    cdef int i
    while pos < size and len(keys) < limit:
        if size - pos >= 4 and memcmp(b + pos, b"get ", 4) == 0:
            # "get" and keys of 1 to MAX_KEY bytes, one space between them
            p = pos + 4
            tokens = 0
            while True:
                start = p
                while p < size and p - start < MAX_KEY and _key_byte(b[p]):
                    p += 1
                if p == start or p >= size:
                    tokens = 0
                    break
                tokens += 1
                if b[p] == SPACE:
                    p += 1
                    continue
                if b[p] == CR and p + 1 < size and b[p + 1] == LF:
                    p += 2
                else:
                    tokens = 0
                break
            if tokens == 1:
                keys.append(_part(data, pos + 4, p - 2))
                ends.append(p)
                pos = p
                continue
            if tokens > 1:
                if tokens > multigets:  # (none, without multigets)
                    break
                if widths is None:
                    widths = {}
                widths[len(keys)] = tokens
                keys.append(_part(data, pos + 4, p - 2))
                ends.append(p)
                pos = p
                continue
            break
        if not sets or size - pos < 4 or memcmp(b + pos, b"set ", 4) != 0:
            break
        # "set <key> <flags> <exptime> <bytes>" and the payload
        p = pos + 4
        start = p
        while p < size and p - start < MAX_KEY and _key_byte(b[p]):
            p += 1
        if p == start or p >= size or b[p] != SPACE:
            break
        end = p
        p += 1
        n = _digits(b, p, size, SET_FLAGS_DIGITS)
        if n == 0 or p + n >= size or b[p + n] != SPACE:
            break
        p += n + 1
        n = _digits(b, p, size, SET_EXPTIME_DIGITS)
        if n == 0 or p + n >= size or b[p + n] != SPACE:
            break
        p += n + 1
        n = _digits(b, p, size, MAX_SIZE_DIGITS)
        if n == 0 or size - (p + n) < 2 or b[p + n] != CR or b[p + n + 1] != LF:
            break
        vlen = 0
        for i in range(n):
            vlen = vlen * 10 + (b[p + i] - ZERO)
        vlen += 2
        p += n + 2
        if vlen > max_payload + 2 or p + vlen > size \
                or b[p + vlen - 2] != CR or b[p + vlen - 1] != LF:
            break
        set_at.append(len(keys))
        keys.append(_part(data, start, end))
        ends.append(p + vlen)
        pos = p + vlen
    return pos, keys, ends, set_at, widths
