"""mcproxy.backends.hashing against the byte-compatibility vectors of mcp-api.md 7.5."""

from __future__ import annotations

import pytest

from mcproxy.backends import hashing
from mcproxy.backends.hashing import (
    build_continuum,
    jump_hash,
    make_filter,
    make_selector,
    md5_key_hash,
    pool_seed,
    xxh3_key_hash,
)

KEYS = [
    b"",
    b"a",
    b"foo",
    b"/foo/a1",
    b"/bar/b1",
    b"hello world",
    b"key:1234567890",
    b"{user1}:profile",
]

# key -> (XXH3-64 seed 0, jump n=3, n=5, n=10, MD5-le32)
KEY_VECTORS = {
    b"": (3244421341483603138, 0, 0, 0, 3649838548),
    b"a": (16629034431890738719, 1, 1, 8, 3111502092),
    b"foo": (12352915711150947722, 2, 2, 2, 3675831724),
    b"/foo/a1": (12002662946551637658, 1, 3, 8, 145760243),
    b"/bar/b1": (9148467824048574374, 1, 1, 6, 3816918270),
    b"hello world": (15296390279056496779, 0, 4, 4, 3141252702),
    b"key:1234567890": (14139561301613457125, 1, 4, 6, 3498520197),
    b"{user1}:profile": (15811918210937388115, 0, 4, 6, 4039594501),
}

# seed string -> (pool seed, jump n=3 index for each of KEYS)
SEEDED_POOLS = {
    b"z1": (7273408066088704005, [1, 1, 0, 0, 1, 1, 2, 2]),
    b"z2": (7552762824107439516, [1, 2, 2, 1, 2, 0, 1, 0]),
    b"foo": (12352915711150947722, [2, 1, 2, 0, 1, 2, 1, 1]),
}

JUMP_BUCKETS = (1, 2, 3, 7, 100)
RAW_JUMP = {
    0: (0, 0, 0, 0, 0),
    1: (0, 0, 0, 6, 55),
    0xDEADBEEF: (0, 1, 2, 5, 87),
    2**64 - 1: (0, 1, 2, 2, 92),
    12345678901234567890: (0, 0, 0, 0, 49),
}

RING_SERVERS = [("127.0.0.1", "11211"), ("127.0.0.2", "11212"), ("127.0.0.3", "11213")]

# omode -> ((smallest point, server id), (largest point, server id)); ids 1-based
RING_EXTREMES = {
    "default": ((2303638, 3), (4286789131, 2)),
    "ketama": ((13595443, 1), (4292320248, 1)),
    "twemproxy": ((15605088, 3), (4292932786, 1)),
    "evcache": ((15351248, 3), (4281775261, 1)),
}

# omode -> (indexes with the md5 key hash, indexes with the xxh3 key hash)
RING_SELECTED = {
    "default": ([2, 2, 1, 1, 0, 2, 1, 2], [0, 1, 2, 0, 0, 1, 2, 0]),
    "ketama": ([1, 1, 1, 1, 1, 0, 1, 1], [1, 0, 0, 2, 0, 2, 2, 2]),
    "twemproxy": ([1, 0, 0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 2, 2, 2]),
    "evcache": ([2, 0, 0, 2, 0, 0, 2, 0], [2, 0, 0, 0, 0, 0, 0, 2]),
}


def servers(count: int) -> list[tuple[str, str]]:
    return [(f"10.0.0.{i}", "11211") for i in range(count)]


@pytest.mark.parametrize("key", KEYS)
def test_xxh3_key_hash(key: bytes) -> None:
    assert xxh3_key_hash(key, 0) == KEY_VECTORS[key][0]


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("seed", [0, 1, 2**64 - 1])
def test_md5_key_hash_ignores_seed(key: bytes, seed: int) -> None:
    assert md5_key_hash(key, seed) == KEY_VECTORS[key][4]


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize(("column", "buckets"), [(1, 3), (2, 5), (3, 10)])
def test_jump_unseeded(key: bytes, column: int, buckets: int) -> None:
    expected = KEY_VECTORS[key][column]
    assert jump_hash(KEY_VECTORS[key][0], buckets) == expected
    assert make_selector("jump", "xxh3", 0, None, servers(buckets))(key) == expected


@pytest.mark.parametrize("seed", SEEDED_POOLS)
def test_pool_seed(seed: bytes) -> None:
    assert pool_seed(seed) == SEEDED_POOLS[seed][0]


def test_seeded_xxh3_example() -> None:
    assert xxh3_key_hash(b"/foo/a1", pool_seed(b"z1")) == 239158797240687403


@pytest.mark.parametrize("seed", SEEDED_POOLS)
def test_jump_seeded(seed: bytes) -> None:
    select = make_selector("jump", "xxh3", pool_seed(seed), None, servers(3))
    assert [select(key) for key in KEYS] == SEEDED_POOLS[seed][1]


@pytest.mark.parametrize("h", RAW_JUMP)
def test_jump_raw(h: int) -> None:
    assert tuple(jump_hash(h, n) for n in JUMP_BUCKETS) == RAW_JUMP[h]


def test_jump_no_buckets() -> None:
    assert jump_hash(12345, 0) == -1


@pytest.mark.parametrize("omode", RING_EXTREMES)
def test_ring_continuum_extremes(omode: str) -> None:
    continuum = build_continuum(RING_SERVERS, omode, 160)
    assert len(continuum) == 480
    (low, low_id), (high, high_id) = RING_EXTREMES[omode]
    assert continuum[0] == (low, low_id - 1)
    assert continuum[-1] == (high, high_id - 1)
    assert continuum == sorted(continuum)


@pytest.mark.parametrize("omode", RING_SELECTED)
@pytest.mark.parametrize(("column", "hasher"), [(0, "md5"), (1, "xxh3")])
def test_ring_selected(omode: str, column: int, hasher: str) -> None:
    select = make_selector("ring", hasher, 0, None, RING_SERVERS, omode=omode)
    assert [select(key) for key in KEYS] == RING_SELECTED[omode][column]


def test_ring_defaults_are_default_omode_160_buckets() -> None:
    expected = build_continuum(RING_SERVERS, "default", 160)
    assert build_continuum(RING_SERVERS) == expected
    assert build_continuum(RING_SERVERS, None, None) == expected
    assert build_continuum(RING_SERVERS, b"default", 160.0) == expected


def test_ring_accepts_hasher_callables() -> None:
    select = make_selector("ring", md5_key_hash, 0, None, RING_SERVERS, omode="ketama")
    assert [select(key) for key in KEYS] == RING_SELECTED["ketama"][0]


@pytest.mark.parametrize(("omode", "obuckets", "points"), [
    ("default", 7, 7),
    ("ketama", 7, 4),
    ("twemproxy", 8, 8),
    ("evcache", 3, 0),
])
def test_ring_points_per_server(omode: str, obuckets: int, points: int) -> None:
    assert len(build_continuum(RING_SERVERS, omode, obuckets)) == 3 * points


def test_ring_wraps_to_first_point() -> None:
    continuum = build_continuum(RING_SERVERS, "ketama")
    select = make_selector("ring", lambda key, seed: 0xFFFFFFFF, 0, None,
                           RING_SERVERS, omode="ketama")
    assert continuum[-1][0] < 0xFFFFFFFF
    assert select(b"anything") == continuum[0][1]


def test_ring_uses_low_32_bits() -> None:
    continuum = build_continuum(RING_SERVERS)
    point, index = continuum[100]
    select = make_selector("ring", lambda key, seed: (7 << 32) | point, 0, None,
                           RING_SERVERS)
    assert select(b"k") == index


def test_twemproxy_omits_default_port() -> None:
    default_port = [("127.0.0.1", "11211")]
    other_port = [("127.0.0.1", "11212")]
    assert (build_continuum(default_port, "twemproxy")
            != build_continuum(default_port, "ketama"))
    assert (build_continuum(other_port, "twemproxy")
            == build_continuum(other_port, "ketama"))


def test_host_and_port_as_bytes_or_str() -> None:
    as_bytes = [(host.encode(), port.encode()) for host, port in RING_SERVERS]
    as_int_port = [(host, int(port)) for host, port in RING_SERVERS]
    for omode in hashing.OMODES:
        expected = build_continuum(RING_SERVERS, omode)
        assert build_continuum(as_bytes, omode) == expected
        assert build_continuum(as_int_port, omode) == expected


@pytest.mark.parametrize("omode", ["", "Ketama", "ring", 1, True, b"nope"])
def test_ring_bad_omode(omode: object) -> None:
    with pytest.raises(ValueError, match=r"^ring_hash: bad omode argument$"):
        make_selector("ring", "md5", 0, None, RING_SERVERS, omode=omode)


@pytest.mark.parametrize("obuckets", [0, -4, 2.5, True, "many", b"x", [4]])
def test_ring_bad_obuckets(obuckets: object) -> None:
    with pytest.raises(
        ValueError, match=r"^ring_hash: option argument must be a positive integer$"
    ):
        build_continuum(RING_SERVERS, "default", obuckets)


@pytest.mark.parametrize("obuckets", [1, 1.0, "12", b"12"])
def test_ring_good_obuckets(obuckets: object) -> None:
    assert build_continuum(RING_SERVERS, "default", obuckets)


@pytest.mark.parametrize(("conf", "key", "hashed"), [
    (b"|#|", b"foo:bar|#|rest", b"foo:bar"),
    (b"|#|", b"foo:bar", b"foo:bar"),
    (b"|#|", b"|#|rest", b""),
    (b"|#|", b"a|#|b|#|c", b"a"),
    (b"|#|", b"", b""),
    ("::", b"x::y", b"x"),
])
def test_filter_stop(conf: bytes | str, key: bytes, hashed: bytes) -> None:
    assert make_filter("stop", conf)(key) == hashed


@pytest.mark.parametrize(("conf", "key", "hashed"), [
    (b"{}", b"a{user1}b", b"user1"),
    (b"{}", b"{user1}:profile", b"user1"),
    (b"{}", b"{}x", b""),
    (b"{}", b"a{b{c}d}", b"b{c"),
    (b"{}", b"a}b{c", b"a}b{c"),
    (b"{}", b"a{bc", b"a{bc"),
    (b"{}", b"abc", b"abc"),
    (b"{}xyz", b"a{b}c", b"b"),
    (b"$$", b"a$tag$b", b"tag"),
    (b"$$", b"$$", b""),
    (b"$$", b"a$b", b"a$b"),
    (b"$$", b"$", b"$"),
])
def test_filter_tags(conf: bytes, key: bytes, hashed: bytes) -> None:
    assert make_filter("tags", conf)(key) == hashed


@pytest.mark.parametrize("dist", ["jump", "ring"])
def test_filter_applies_before_hashing(dist: str) -> None:
    plain = make_selector(dist, "xxh3", 0, None, servers(10))
    tagged = make_selector(dist, "xxh3", 0, make_filter(b"tags", b"{}"), servers(10))
    stopped = make_selector(dist, "xxh3", 0, make_filter(b"stop", b"|#|"), servers(10))
    for key in (k for k in KEYS if b"{" not in k):
        assert tagged(b"x{%s}y" % key) == plain(key)
        assert stopped(key + b"|#|" + key) == plain(key)


@pytest.mark.parametrize("name", ["", "Stop", "tag", b"prefix"])
def test_filter_unknown(name: bytes | str) -> None:
    shown = name.decode() if isinstance(name, bytes) else name
    with pytest.raises(ValueError) as info:
        make_filter(name, b"{}")
    assert str(info.value) == f"unknown hash filter specified: {shown}"


@pytest.mark.parametrize("conf", [b"", b"{", b"{}{}{}", "x"])
def test_filter_conf_length(conf: bytes | str) -> None:
    with pytest.raises(
        ValueError, match=r"^hash filter conf must be between 2 and 5 characters$"
    ):
        make_filter("tags", conf)


@pytest.mark.parametrize("conf", [None, 12, ["{}"]])
def test_filter_conf_missing(conf: object) -> None:
    with pytest.raises(
        ValueError, match=r"^hash filter requires 'filter_conf' string$"
    ):
        make_filter("stop", conf)


def test_filter_name_checked_before_conf() -> None:
    with pytest.raises(ValueError, match=r"^unknown hash filter specified: nope$"):
        make_filter("nope", None)


OUT_OF_BOUNDS = r"^key dist hasher tried to use out of bounds index$"


@pytest.mark.parametrize("dist", ["jump", "ring"])
def test_empty_pool(dist: str) -> None:
    select = make_selector(dist, "xxh3", 0, None, [])
    with pytest.raises(ValueError, match=OUT_OF_BOUNDS):
        select(b"foo")


def test_empty_continuum() -> None:
    select = make_selector("ring", "md5", 0, None, RING_SERVERS,
                           omode="ketama", obuckets=3)
    with pytest.raises(ValueError, match=OUT_OF_BOUNDS):
        select(b"foo")


@pytest.mark.parametrize("dist", ["jump", "ring"])
def test_single_server(dist: str) -> None:
    select = make_selector(dist, "md5", 0, None, servers(1))
    assert {select(key) for key in KEYS} == {0}


def test_unknown_dist_and_hasher() -> None:
    with pytest.raises(ValueError):
        make_selector("modulo", "xxh3", 0, None, servers(2))
    with pytest.raises(ValueError):
        make_selector("jump", "crc32", 0, None, servers(2))
