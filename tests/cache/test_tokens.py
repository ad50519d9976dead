"""Unit tests for memcached's tokenizer as the cache reads lines."""

from __future__ import annotations

from mcproxy.cache.tokens import MAX_TOKENS, ntokens, tokenize


def test_spaces_separate_tokens_and_the_line_end_goes():
    assert tokenize(b"get a  b \r\n") == [b"get", b"a", b"b"]
    assert tokenize(b"get a\n") == [b"get", b"a"]
    assert tokenize(b"get a") == [b"get", b"a"]


def test_only_spaces_separate():
    assert tokenize(b"get a\tb\r\n") == [b"get", b"a\tb"]


def test_a_nul_byte_ends_the_line():
    assert tokenize(b"get a\0b c\r\n") == [b"get", b"a"]


def test_the_count_includes_the_terminal_token_up_to_the_cap():
    assert ntokens([b"get", b"a"]) == 3
    assert ntokens([b"x"] * 100) == MAX_TOKENS
    assert ntokens([b"x"] * (MAX_TOKENS - 1)) == MAX_TOKENS
