"""The route engine: loads a route config into Lua and runs its routes.

A load follows memcached's two phases, each in its own Lua state: the
*config* state runs the file and ``mcp_config_pools``; its return value is
deep-copied (with memcached's copy rules) into the *routes* state, which runs
the file again and ``mcp_config_routes``. Only a load where every phase
succeeded becomes the active :class:`Routes`; requests keep the Routes they
started on, so a reload never disturbs a request in flight.

The engine never touches sockets: a route that calls a pool yields the pool
and request; the engine asks the pool for a backend and resumes the route's
coroutine from the backend's reply callback.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from copy import copy
from functools import cached_property, partial
from importlib.resources import files
from itertools import accumulate, count
from time import monotonic

from lupa import lua54
from twisted.logger import Logger

from mcproxy.backends.pool import BackendRegistry, Broadcast
from mcproxy.counters import ProxyStats
from mcproxy.routing import direct, native, rcontext
from mcproxy.routing.crons import Crons
from mcproxy.routing.direct import DirectRoutes, select_backend
from mcproxy.routing.host import Host
from mcproxy.routing.native.common import KeysReply
from mcproxy.routing.poolnames import named_pools
from mcproxy.routing.runs import RunRouter, RunsReply
from mcproxy.routing.shapes import ShapeReader
from mcproxy.routing.tunables import Tunables
from mcproxy.routing.userstats import UserStats
from mcproxy.units import KeyBatch, KeyFetch, ReplyRun, ReplySink
from mcproxy.wire import errors
from mcproxy.wire.behaviour import AUTO, BEHAVIOURS, WIRE_1_6_15, WIRE_1_6_45
from mcproxy.wire.request import (
    BROADCAST_COMMANDS,
    CMD_FLUSH_ALL,
    CMD_GET,
    CMD_SET,
    COMMAND_CONSTANTS,
    KeyRequests,
    Request,
    key_request,
)
from mcproxy.wire.response import MCMC_CODES, Response, client_bytes, key_reply, string_reply

try:
    from mcproxy.routing import _keyloops
except ImportError:  # not built (mcproxy.compiled): mcp.lua's own loops
    _keyloops = None

# What a route step reports (mirrors mcp.lua).
DONE_RESPONSE = 0
DONE_STRING = 1
DONE_BAD = 2
DONE_ERROR = 3
YIELD_POOL = 4
YIELD_AWAIT = 5
YIELD_WAIT = rcontext.YIELD_WAIT
# What start_keys/resume_keys report of a key beyond those (mcp.lua).
KEY_POOL = 7
KEY_STEP = 8

AWAIT_GOOD = 0
AWAIT_ANY = 1
AWAIT_OK = 2
AWAIT_FIRST = 3
AWAIT_FASTGOOD = 4
AWAIT_BACKGROUND = 5

_EMPTY = b""

#: The fewest events a poll must bring (writes.WriteBatch.events) for the
#: lone requests of its connections to be gathered: those routed in Lua
#: (one call into Lua for all saves more than the gathering costs from
#: two), those of the direct path or a native failover (joined into one
#: run per backend: from four; with fewer, the joining does not pay for
#: the gathering).
GATHER_LUA = 2
GATHER_JOINED = 4
#: the most keys of a multi-key get gathered (RunRouter.gather_multigets)
GATHER_MULTIGET_KEYS = 16

#: Numbers for the batches of _LuaKeys.
_batch_ids = count()

#: Bytes of values handed to Lua between two collections of its garbage.
#: Lua sees a response as a small table and collects at the pace of its own
#: small allocations, while each may hold a value of up to megabytes: left
#: alone, responses whose routes are done pile up by the hundred MB.
LUA_COLLECT_BYTES = 8 * 2**20

#: Every Lua state's collector runs in generational mode, where each
#: collection ends with the finalizers of what it freed (lgc.c's
#: finishgencycle). lupa keeps the userdata of the Python objects Lua holds
#: in a weak-valued table whose slots luaL_ref hands out: in incremental
#: mode a dead userdata's slot is cleared steps before its finalizer frees
#: it, and a Python object pushed in between may be given that slot (the
#: table's length can end at any hole), two userdata then share it and the
#: table's free list breaks. A routes state then gained about 200,000
#: entries and 4 MB per 300,000 multigets, each collection slower (and
#: lupa, asked again for an object it had pushed, could find another's
#: userdata in its slot). A config may still tune the generational
#: collector, not leave it.
_COLLECTOR_LUA = b"""
collectgarbage("generational")
local collect = collectgarbage
function collectgarbage(opt, ...)
    if opt == "incremental" then
        error("collectgarbage: mcproxy runs Lua's collector in generational mode only", 2)
    end
    return collect(opt, ...)
end
"""

#: Deepest table nesting copied from mcp_config_pools to the routes state.
MAX_COPY_DEPTH = 64
#: Seconds between two logged route errors (the rest are counted).
ERROR_LOG_INTERVAL = 1.0

_LUA_DIR = files("mcproxy.routing")
_MCP_LUA = _LUA_DIR.joinpath("mcp.lua").read_bytes()
#: The V2 route API, installed by mcp.lua into each routes state.
_V2_LUA = _LUA_DIR.joinpath("v2.lua").read_bytes()
#: Lua libraries shipped with mcproxy, available to configs as
#: ``require("mcproxy.NAME")`` (mcproxy/routing/NAME.lua).
_LIBRARIES = {
    f"mcproxy.{entry.name[:-4]}".encode(): entry.read_bytes()
    for entry in _LUA_DIR.iterdir()
    if entry.name.endswith(".lua") and entry.name not in ("mcp.lua", "v2.lua", "routelib.lua")
}
#: The route library (``--config=routelib``): a config that builds its
#: routes from the declarative file given as its argument (mcp.start_arg).
ROUTELIB = "routelib"
ROUTELIB_PATH = str(_LUA_DIR.joinpath("routelib.lua"))
#: The bundled chunks as Lua bytecode, compiled once per process (chunk name
#: -> string.dump of it, debug information kept, so errors and tracebacks
#: name the same files and lines). Compiling mcp.lua and v2.lua was most of
#: what setting up a Lua state cost (about 1.3 ms of 1.5): twice a load, on
#: every reload and in each test that loads a config.
_BYTECODE: dict[bytes, bytes] = {}

#: Constants every config sees in ``mcp``, beyond the CMD_* ids.
_CONSTANTS = {
    "P_OK": 0,
    "AWAIT_GOOD": AWAIT_GOOD,
    "AWAIT_ANY": AWAIT_ANY,
    "AWAIT_OK": AWAIT_OK,
    "AWAIT_FIRST": AWAIT_FIRST,
    "AWAIT_FASTGOOD": AWAIT_FASTGOOD,
    "AWAIT_BACKGROUND": AWAIT_BACKGROUND,
    **COMMAND_CONSTANTS,
    **MCMC_CODES,
}


class ConfigError(Exception):
    """The route config could not be loaded; the text names file and line."""


def _message(error: BaseException) -> str:
    """A Lua error's message, without the stack traceback lupa appends."""
    text = error.args[0] if error.args else str(error)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return str(text).split("\nstack traceback:", 1)[0].strip()


class _State:
    """One Lua state with ``mcp`` installed for a phase."""

    def __init__(self, host: Host, phase: str) -> None:
        self.runtime = lua54.LuaRuntime(encoding=None, register_eval=False,
                                        register_builtins=False,
                                        unpack_returned_tuples=True)
        self.globals = self.runtime.globals()
        self.runtime.execute(_COLLECTOR_LUA, name=b"=collector", mode=b"t")
        self._compile = self.runtime.eval(
            "function(source, name) return string.dump(assert(load(source, name, 't'))) end")
        build = self._bundled(_MCP_LUA, b"=mcp.lua")()
        v2 = self._bundled(_V2_LUA, b"=v2.lua")()
        #: the compiled loops this state's mcp.lua runs (None: its own)
        self.loops = self._loops()
        self.mcp, self.engine = build(host, phase.encode(), v2, self.loops)
        for name, value in _CONSTANTS.items():
            self.mcp[name.encode()] = value
        self._install_hashing()
        self.globals.mcp = self.mcp
        self.globals.python = None
        self._install_libraries()

    def _loops(self):
        """The compiled loops of mcp.lua's start_keys and resume_keys for
        this state (mcproxy.routing._keyloops), or None: mcp.lua's own."""
        if _keyloops is None:
            return None
        where = self.runtime.eval('string.format("%p", (coroutine.running()))')
        if not _keyloops.install(lua54.__file__, int(where, 16), b"_keyloops"):
            return None
        loops, self.globals._keyloops = self.globals._keyloops, None
        return loops

    def _install_libraries(self) -> None:
        """Make the bundled Lua libraries loadable with ``require``; each
        chunk gets the engine's ``declare`` (mcp.lua), which configs never
        see, to declare the shapes of the routes it builds."""
        preload = self.globals.package.preload
        loader = self.runtime.eval(
            "function(code, declare) return function() "
            "return assert(load(code, nil, 'b'))(declare) end end")
        for name, source in _LIBRARIES.items():
            chunk = b"=" + name.replace(b".", b"/") + b".lua"
            preload[name] = loader(self._bytecode(source, chunk), self.engine.declare)

    def _bytecode(self, source: bytes, name: bytes) -> bytes:
        """The bytecode of the bundled chunk ``source`` called ``name``."""
        code = _BYTECODE.get(name)
        if code is None:
            code = _BYTECODE[name] = self._compile(source, name)
        return code

    def _bundled(self, source: bytes, name: bytes):
        """The bundled chunk ``source``, loaded into this state from its
        bytecode (binary chunks only ever come from _bytecode)."""
        return self.globals.load(self._bytecode(source, name), name, b"b")

    def _install_hashing(self) -> None:
        """Distribution and hasher markers the pool options refer to."""
        table = self.runtime.table_from
        new = self.runtime.eval("function() error('distributions are built by mcp.pool') end")
        self.mcp.hash_xxhash = table({b"_hasher": b"xxh3"})
        self.mcp.dist_jump_hash = table({b"new": new, b"_dist": b"jump"})
        self.mcp.dist_ring_hash = table({b"new": new, b"_dist": b"ring",
                                         b"hash": table({b"_hasher": b"md5"})})

    def run_file(self, path: str) -> None:
        """Run the config file; the route library's (ROUTELIB_PATH), which
        ships with mcproxy, gets the engine's ``declare`` as the bundled
        libraries do (see _install_libraries)."""
        chunk = self.globals.loadfile(path.encode())
        if isinstance(chunk, tuple):  # nil plus the error message
            raise ConfigError(f"failed to load {path}: {_message(Exception(chunk[1]))}")
        try:
            if path == ROUTELIB_PATH:
                chunk(self.engine.declare)
            else:
                chunk()
        except lua54.LuaError as e:
            raise ConfigError(f"error running {path}: {_message(e)}") from None

    def call(self, name: str, *args):
        func = self.globals[name.encode()]
        if lua54.lua_type(func) != "function":
            raise ConfigError(f"configuration file missing '{name}' function")
        try:
            return func(*args)
        except lua54.LuaError as e:
            raise ConfigError(f"failed to execute {name}: {_message(e)}") from None


class RouteTable:
    """The routes of one listener tag (or of the untagged listeners): its
    command hooks, what each declared itself to be, the routes run without
    Lua (direct or by a native runner), and the commands it routes."""

    __slots__ = ("hooks", "shapes", "direct", "native", "routed")

    def __init__(self, hooks: dict, reader: ShapeReader, host: Host, direct: bool) -> None:
        self.hooks = hooks
        #: command -> what its route declared itself to be
        self.shapes = {cmd: reader.route(func) for cmd, func in hooks.items()}
        # The default: flush everything a client reads through the proxy.
        defaults = {} if CMD_FLUSH_ALL in hooks else {
            CMD_FLUSH_ALL: Broadcast.of(host.pools, host.store)}
        #: the routes run without Lua (none of those attached unless ``direct``)
        self.direct = DirectRoutes.declared(self.shapes if direct else {}, defaults)
        #: command -> the runner of its route, run natively (routing/native/)
        self.native = native.declared(self.shapes if direct else {})
        #: the commands these routes take (attached, or by default)
        self.routed = frozenset(hooks) | frozenset(self.direct.pools)


class Routes:
    """A loaded config: the routes state and its command hooks, untagged
    and per listener tag (``mcp.attach(cmd, f, tag)``)."""

    def __init__(self, path: str, state: _State, host: Host, direct: bool = True,
                 config_pools=None) -> None:
        self.path = path
        #: what mcp_config_routes was given (the copy of mcp_config_pools' result)
        self.config_pools = config_pools
        self.state = state
        self.host = host
        self.loaded_at = monotonic()
        self.start = state.engine.start
        self.start_keys = state.engine.start_keys
        self.resume_keys = state.engine.resume_keys
        self.key_full = state.engine.key_full
        self.key_alone = state.engine.key_alone
        self.drop_keys = state.engine.drop_keys
        self.resume = state.engine.resume
        self.resume_error = state.engine.resume_error
        self.resume_await = state.engine.resume_await
        self.resume_wait = state.engine.resume_wait
        self.arrived = state.engine.arrived
        self.arrive = state.engine.arrive
        self.sub_arrived = state.engine.sub_arrived
        self.sub_arrive = state.engine.sub_arrive
        self.table = state.runtime.table_from
        #: written for memcached's V2 API: it attaches a function generator
        #: or a router (every route library config does); its clients get
        #: 1.6.45's wire behaviour unless --wire says otherwise
        self.v2 = bool(state.engine.v2_attached())
        reader = ShapeReader(state.engine)
        untagged = RouteTable(dict(state.engine.hooks.items()), reader, host, direct)
        #: the routes of untagged listeners, and of a tag no route names
        self.untagged = untagged
        self.hooks = untagged.hooks
        self.shapes = untagged.shapes
        self.direct = untagged.direct
        self.native = untagged.native
        self.routed = untagged.routed
        #: tag -> the routes of listeners with that tag: those attached
        #: under it, and the untagged route of every other command
        self.tagged = {
            tag.decode("utf-8", "surrogateescape"):
                RouteTable({**untagged.hooks, **dict(hooks.items())}, reader, host, direct)
            for tag, hooks in state.engine.tagged.items()}
        self._collect = state.runtime.eval("function() collectgarbage('collect') end")
        #: bytes of values handed to this state since its last collection
        self._handed = 0

    def for_tag(self, tag: str | None) -> RouteTable:
        """The routes of listeners tagged ``tag`` (None: untagged)."""
        return self.tagged.get(tag, self.untagged) if tag is not None else self.untagged

    def handed(self, size: int) -> None:
        """Account for ``size`` bytes of values handed to Lua; collect its
        garbage once LUA_COLLECT_BYTES have gone in (see there)."""
        self._handed += size
        if self._handed > LUA_COLLECT_BYTES:
            self._handed = 0
            self._collect()

    @property
    def backends(self) -> list:
        return self.host.backends

    @cached_property
    def pools(self) -> list:
        """``(name, Pool)`` of each pool these routes reach, named as they
        reach it (mcproxy.routing.poolnames); found once, when first asked."""
        roots = [*self.hooks.values(),
                 *(func for table in self.tagged.values() for func in table.hooks.values()),
                 self.state.globals]
        if self.state.engine.v2_attached():
            # V2 routes reach pools through handles: name them as
            # mcp_config_pools did
            roots.append(self.config_pools)
        return named_pools(self.state.runtime, roots, self.host.pools, self.path)


#: What separates the files of a config given as several (``a.lua:b.lua``,
#: as memcached's proxy_config takes them).
CONFIG_FILE_SEPARATOR = ":"


def load(path: str, registry: BackendRegistry, tunables: Tunables,
         user_stats: UserStats, store=None, direct: bool = True,
         arg: str | None = None, clock=None, schedule_reload=None) -> Routes:
    """Load ``path`` through both phases; raise ConfigError on any failure.
    ``path`` may name several files (``a.lua:b.lua``): each phase runs them
    in that order in its state, so one may define mcp_config_pools and the
    next mcp_config_routes. ``direct``: whether attached routes may take the
    direct path; ``arg``: what the config reads as ``mcp.start_arg``
    (memcached's proxy_arg); ``clock`` and ``schedule_reload``: the Host's."""
    files = path.split(CONFIG_FILE_SEPARATOR)
    host = Host(path, registry, tunables, user_stats, store, clock, schedule_reload)
    config = _State(host, "config")
    start_arg = None if arg is None else arg.encode()
    config.mcp.start_arg = start_arg
    for name in files:
        config.run_file(name)
    pools = config.call("mcp_config_pools", None)
    routes = _State(host, "routes")
    routes.mcp.start_arg = start_arg
    for name in files:
        routes.run_file(name)
    copied = _Copier(config, routes).copy(pools, 0)
    routes.call("mcp_config_routes", copied)
    user_stats.rename(host.stat_names)
    for backend, options in zip(host.backends, host.options, strict=True):
        backend.reconfigure(options)
    return Routes(path, routes, host, direct, copied)


class _Copier:
    """Deep-copies mcp_config_pools' result into the routes state."""

    def __init__(self, source: _State, target: _State) -> None:
        self.kind = source.engine.kind
        self.pool_proxy = target.engine.pool_proxy
        self.ratelim_proxy = target.engine.ratelim_proxy
        self.table = target.runtime.table

    def copy(self, value, depth: int):
        if value is None or isinstance(value, bool | int | float | bytes):
            return value
        if lua54.lua_type(value) != "table":
            raise ConfigError("unhandled data type in configuration table")
        marker = self.kind(value)
        if marker is not None:
            kind, pool = marker
            if kind == b"pool":
                return self.pool_proxy(pool)
            if kind == b"ratelim":
                return self.ratelim_proxy(pool)
            raise ConfigError("unhandled userdata type in configuration table")
        if depth >= MAX_COPY_DEPTH:
            raise ConfigError("configuration error: table recursion too deep")
        copy = self.table()
        for key, item in value.items():
            if isinstance(key, bool) or not isinstance(key, int | float | bytes):
                raise ConfigError("configuration table keys must be strings or numbers")
            copy[key] = self.copy(item, depth + 1)
        return copy


class RouteEngine:
    """Runs client requests through the active routes."""

    log = Logger()

    def __init__(self, stats: ProxyStats, registry: BackendRegistry,
                 tunables: Tunables, user_stats: UserStats, store=None,
                 direct: bool = True, clock=None, wire: str = AUTO,
                 batch_keys: bool = True) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        #: the clock of crons, rate limits and V2 waits with a timeout
        self.clock = clock
        #: the crons of the active routes (see stop)
        self.crons = Crons(clock)
        #: what mcp.schedule_config_reload() calls (set by the service that
        #: reloads; None: the call does nothing, as in ``mcproxy check``)
        self.schedule_reload: Callable[[], None] | None = None
        self.stats = stats
        self.registry = registry
        self.tunables = tunables
        self.user_stats = user_stats
        self.store = store
        #: whether the routes the direct path knows skip Lua, as in
        #: production; False runs every attached route's Lua body, the
        #: reference the tests hold the direct path to (read at each load)
        self.direct_routes = direct
        #: whether the keys of a multiget whose route runs in Lua are
        #: routed in one call into Lua (route_keys); False routes them
        #: one by one, the reference the tests hold that to
        self.batch_keys = batch_keys
        self.routes: Routes | None = None
        #: the listener tag this router serves (None: untagged; see view)
        self.tag: str | None = None
        #: tag -> the router of listeners with that tag
        self._views: dict[str, RouteEngine] = {}
        self._hooks: dict = {}
        self._direct = DirectRoutes({}, {})
        self._native: dict = {}
        self._routed: frozenset[int] = frozenset()
        #: None, or whether runs of plain requests (scan_plain) may hold
        #: sets as well as gets: see route_run and DirectRoutes.plain_runs
        #: (False also for gets routed in Lua, with ``batch_keys``)
        self.plain_runs: bool | None = None
        #: whether those runs may hold gets of several keys
        self.plain_multigets = False
        #: ``--wire``: a release whose wire behaviour every config gets, or
        #: AUTO: 1.6.45's for a V2 config (Routes.v2), else 1.6.15's
        self._wire_choice = None if wire == AUTO else BEHAVIOURS[wire]
        #: the wire behaviour of the active config (the protocol reads it when it
        #: refuses a line)
        self.wire = self._wire_choice or WIRE_1_6_15
        #: from how many events of a poll gather may take a request, 0:
        #: never (IRouter): gets routed in Lua (``_lua_runs``), on the direct
        #: path to a pool (``plain_runs``) or through a native failover
        self.gathers = 0
        #: whether runs of plain gets are routed in Lua (_LuaKeys)
        self._lua_runs = False
        #: whether plain sets are routed in Lua too (gathered, in runs)
        self._lua_sets = False
        self._use_runs(RunRouter(self, stats, tunables))
        self._last_error_log = 0.0
        self._errors_unlogged = 0

    def load(self, path: str, arg: str | None = None) -> Routes:
        """Load a config (``arg``: its mcp.start_arg) and make it the active one."""
        routes = load(path, self.registry, self.tunables, self.user_stats, self.store,
                      self.direct_routes, arg, self.clock, self._schedule_reload)
        self.activate(routes)
        return routes

    def view(self, tag: str | None) -> RouteEngine:
        """The router of the listeners tagged ``tag``: the engine itself for
        None (untagged), else one made on first asking and kept. A view is
        a copy of the engine that shares its stats, backends, tunables,
        cache and views, and holds its tag's routes (Routes.for_tag);
        activate switches the engine and every view at once. Its
        connections bind its methods, so a tag costs nothing per request
        (a view rate-limits the logging of its route errors on its own)."""
        if tag is None:
            return self
        view = self._views.get(tag)
        if view is None:
            view = copy(self)
            view.tag = tag
            view._use_runs(RunRouter(view, self.stats, self.tunables))
            if self.routes is not None:
                view._take(self.routes)
            self._views[tag] = view
        return view

    def _use_runs(self, runs: RunRouter) -> None:
        """Route runs, and gather lone requests, with ``runs``: its
        ``route_run`` and ``gather_plain`` are this router's (IRouter's)."""
        self.runs = runs
        #: IRouter.route_run: RunRouter.route_run documents it
        self.route_run = runs.route_run
        #: IRouter.gather_plain
        self.gather_plain = runs.gather_plain

    def _schedule_reload(self) -> None:
        if self.schedule_reload is not None:
            self.schedule_reload()

    def stop(self) -> None:
        """Stop running the active routes' crons (the engine is done)."""
        self.crons.stop()

    def activate(self, routes: Routes) -> None:
        """Make ``routes`` the active ones, of every tag at once, and run
        their crons."""
        self.crons.switch(routes.host.crons)
        self._take(routes)
        for view in self._views.values():
            view._take(routes)

    def _take(self, routes: Routes) -> None:
        """Route with ``routes``: this router's tag's table of them."""
        table = routes.for_tag(self.tag)
        self.routes = routes
        self._hooks = table.hooks
        self._direct = table.direct
        self._native = table.native
        self._routed = table.routed
        self.plain_runs = table.direct.plain_runs
        # lone plain requests of the direct path, gathered: one ReplyRun per backend
        self.gathers = GATHER_JOINED if self.batch_keys and self.plain_runs is not None else 0
        # whether gather may take plain sets too
        gather_sets = bool(self.gathers and self.plain_runs)
        self._lua_runs = self._lua_sets = False
        # the native runner that takes runs of plain requests (route_run):
        # a Failover that runs gets and sets alike (Failover.runs_like)
        runner = None
        get = table.native.get(CMD_GET)
        if self.plain_runs is None and isinstance(get, native.Failover) \
                and get.runs_like(table.native.get(CMD_SET)):
            # runs of gets and sets through the failover (Failover.send_run),
            # lone ones of many connections joined (Failover.send_joined)
            self.plain_runs = True
            runner = get
            self.gathers = GATHER_JOINED if self.batch_keys else 0
            gather_sets = self.batch_keys
        elif (self.plain_runs is None and self.batch_keys and CMD_GET in table.hooks
                and CMD_GET not in table.native):
            # runs of gets, routed in Lua (_LuaKeys), of plain sets too when
            # theirs runs in Lua; one alone is gathered with the other
            # connections' (gather_plain)
            self._lua_sets = (CMD_SET in table.hooks and CMD_SET not in table.native
                              and CMD_SET not in table.direct.pools)
            self.plain_runs = gather_sets = self._lua_sets
            self.gathers = GATHER_LUA
            self._lua_runs = True
        # multi-key gets are joined too, of up to GATHER_MULTIGET_KEYS keys (a
        # joined unit has no sink to count a reply towards the client's
        # output limit while it arrives): to the direct path's one backend,
        # and those whose routes run in Lua (route_lua_gathered)
        self.runs.configure(table.direct, runner, self._lua_runs, gather_sets, self.gathers,
                            GATHER_MULTIGET_KEYS if self.gathers and (
                                self._lua_runs or runner is None
                                and table.direct.plain_multigets) else 0)
        # a Lua route's multiget scanned too (route_run), not parsed as a line
        self.plain_multigets = self._lua_runs or table.direct.plain_multigets
        self.wire = self._wire_choice or (WIRE_1_6_45 if routes.v2 else WIRE_1_6_15)

    def hooked(self, command: int) -> bool:
        """Whether the active config routes ``command`` (else it is local)."""
        return command in self._routed

    def route(self, req: Request, done: Callable[[bytes], None]) -> None:
        """Run the route attached to ``req.command``; ``done(reply)`` once."""
        routes = self.routes
        stats = self.stats
        stats.conn_requests += 1
        stats.commands[req.command] += 1
        limit = self.tunables.active_req_limit
        if limit and stats.req_active >= limit:
            done(errors.ACTIVE_REQUEST_LIMIT)
            return
        stats.req_active += 1
        try:
            pool = self._direct.pool(req)
            if pool is None:
                runner = self._native.get(req.command)
                if runner is not None and runner.send(req, done, stats, self._route_error):
                    return
                self._advance(routes, req, done,
                              routes.start(self._hooks[req.command], req, req.key,
                                           req.command))
            else:
                direct.send(pool, req, done, stats, self._route_error)
        except Exception:
            self._internal_error(req, done)

    def gather(self, req: Request, done: Callable[[bytes], None],
               release: Callable[[], None]) -> bool:
        """Take a plain ``get <key>`` whose route runs in Lua or is a pool
        call (``gathers``), or a set without noreply when its route does
        the same, to route once this poll's events are handled, with those
        other connections sent in the same poll: the requests bound
        unedited for one backend go to it as one ReplyRun, each answered as
        if routed alone (for Lua routes one call into Lua starts all of
        their routes, see _LuaKeys). ``done(reply)`` once; ``release()``
        once it is routed: until then the connection holds back what it
        reads after it, so that nothing it sent later is routed before it.
        False, with nothing done, for any other request (the caller routes
        it). The protocol asks only in a poll of ``gathers`` events or more
        (``WriteBatch.events``): one connection's read alone has nothing to
        join. Most such requests come through gather_plain, without a
        Request; these are those scan_plain left to the line parser."""
        command = req.command
        if command == CMD_GET:
            if len(req.line) != len(req.key) + 6 or req.multiget:
                return False
            return self.gather_plain(req.key, req.line, False, done, release, req)
        if command != CMD_SET or req.noreply:
            return False
        return self.gather_plain(req.key, req.line + req.value, True, done, release, req)

    def route_keys(self, req: Request, keys: list[bytes],
                   done: Callable[[bytes], None], sink: ReplySink | None = None) -> bool:
        """Route the keys of a client ``get``/``gets`` multiget together,
        when its route is a direct pool call (see direct.py), runs natively
        (routing/native/, which answers as below) or runs in Lua (see
        _LuaKeys).

        The pool still picks each key's backend; each backend then gets its
        keys as one KeyBatch, and ``done(reply)`` runs once, with the reply
        of every key in the client's order and the ``END``. Every key counts
        as a request, as when routed one by one. ``sink`` is told of the
        reply's bytes as they arrive (units.ReplySink).

        False, with nothing done, when this does not apply (an active
        request limit; for a direct route, a backend with a depth limit or
        a key the pool cannot place): the caller then routes key by key,
        which answers, logs and counts those cases.
        """
        if self.tunables.active_req_limit:
            return False
        groups = self._direct.key_groups(req, keys)
        if groups is None:
            command = req.command
            runner = self._native.get(command)
            if runner is not None:
                return runner.send_keys(req, keys, done, self.stats, self._route_error, sink)
            if not self.batch_keys or command in self._direct.pools \
                    or command not in self._hooks:
                return False
            _LuaKeys(self, KeyRequests(command, keys, True), done, sink).start(
                self._hooks[command])
            return True
        stats = self.stats
        count = len(keys)
        stats.count_keys(req.command, count)
        name = req.tokens[0]
        reply = KeysReply(count, len(groups), stats, done)
        for backend, positions in groups.items():
            if positions is None:
                backend.send_unit(KeyBatch(name, keys, reply.answer_all, sink))
            else:
                backend.send_unit(KeyBatch(name, [keys[p] for p in positions],
                                           partial(reply.answer, positions), sink))
        return True

    def route_lua_run(self, data: bytes, start: int, keys: list[bytes], ends: list[int],
                      sets: list[int], widths: dict[int, int] | None,
                      done: Callable[[bytes], None], sink: ReplySink | None) -> bool:
        """RunRouter.route_run for a run whose routes run in Lua
        (``_lua_runs``): each request answered as alone, each multi-key get
        as route_keys routes a client's; a run of one get as the request
        alone, of one set on the line path (gathered). False, with nothing
        done, for sets whose route does not run in Lua."""
        if sets and not self._lua_sets:
            return False
        if widths:
            if len(keys) == 1:  # a multiget alone
                self._route_lua_multiget(keys[0], done, sink)
            else:
                self._route_lua_pieces(data, start, keys, ends, sets, widths, done, sink)
            return True
        if len(keys) == 1:  # not gathered (gather_plain): alone; a set as a line
            if sets:
                return False
            self.route(key_request(CMD_GET, keys[0], False), done)
            return True
        self._route_lua_stretch(data, start, keys, ends, sets, done, sink)
        return True

    def route_lua_gathered(self, keys: tuple[bytes, ...], sents: tuple[bytes, ...],
                           sets: list[int], dones: tuple,
                           widths: tuple[int, ...] | None = None) -> None:
        """RunRouter.route_gathered for gets (and sets, ``sets`` their
        indexes) whose routes run in Lua: one call into Lua starts all of
        their routes (_LuaKeys), each answered as if routed alone. With
        ``widths`` (each request's number of keys, 0 for a plain one), the
        multi-key gets among them are routed as one more _LuaKeys, the keys
        of them all as the keys of one client's multiget, each answered its
        own keys' replies and END."""
        hook = self._hooks[CMD_GET]
        if widths is not None:
            multigets = [index for index, width in enumerate(widths) if width]
            names = []
            for index in multigets:
                names += keys[index].split(b" ")
            _LuaKeys(self, KeyRequests(CMD_GET, names, True), [dones[i] for i in multigets],
                     None, [widths[i] for i in multigets]).start(hook)
            plain = [index for index, width in enumerate(widths) if not width]
            if not plain:
                return
            setting = frozenset(sets)
            sets = [at for at, index in enumerate(plain) if index in setting]
            keys = [keys[i] for i in plain]
            sents = [sents[i] for i in plain]
            dones = [dones[i] for i in plain]
        requests = KeyRequests(CMD_GET, list(keys), False, sets, list(sents)) if sets \
            else KeyRequests(CMD_GET, list(keys), False)
        _LuaKeys(self, requests, list(dones), None).start(hook)

    def _route_lua_stretch(self, data: bytes, start: int, keys: list[bytes], ends: list[int],
                           sets: list[int], done: Callable[[bytes], None],
                           sink: ReplySink | None) -> None:
        """route_run for single-key requests whose routes run in Lua: one
        _LuaKeys, each request answered as alone."""
        if sets:
            begins = [start, *ends[:-1]]
            requests = KeyRequests(CMD_GET, keys, False, sets, [
                data[begin:end] for begin, end in zip(begins, ends, strict=True)])
        else:
            requests = KeyRequests(CMD_GET, keys, False)
        _LuaKeys(self, requests, done, sink).start(self._hooks[CMD_GET])

    def _route_lua_multiget(self, keys: bytes, done: Callable[[bytes], None],
                            sink: ReplySink | None) -> None:
        """route_run for a multi-key get (``keys`` as scanned: joined by
        spaces) whose route runs in Lua: as route_keys routes a client's."""
        _LuaKeys(self, KeyRequests(CMD_GET, keys.split(b" "), True), done,
                 sink).start(self._hooks[CMD_GET])

    def _route_lua_pieces(self, data: bytes, start: int, keys: list[bytes], ends: list[int],
                          sets: list[int], widths: dict[int, int],
                          done: Callable[[bytes], None], sink: ReplySink | None) -> None:
        """route_run for a run with multi-key gets whose routes run in Lua,
        of more than one request: each multiget routed as
        _route_lua_multiget does, each stretch of single-key requests between them as
        _route_lua_stretch does; ``done`` gets their replies joined in
        order, as the requests would have had them line by line."""
        bounds = []
        first = 0
        for index in widths:
            if index > first:
                bounds.append((first, index))
            bounds.append((index, index + 1))
            first = index + 1
        if first < len(keys):
            bounds.append((first, len(keys)))
        reply = RunsReply(len(bounds), self.stats, done)
        for piece, (first, stop) in enumerate(bounds):
            answer = partial(reply.answer, piece, 0)  # (each _LuaKeys counts its own)
            if first in widths:
                self._route_lua_multiget(keys[first], answer, sink)
            else:
                self._route_lua_stretch(data, ends[first - 1] if first else start,
                                        keys[first:stop], ends[first:stop],
                                        [i - first for i in sets if first <= i < stop],
                                        answer, sink)

    def _internal_error(self, req: Request, done: Callable[[bytes], None]) -> None:
        """A bug of ours, not the config's: log it, answer, keep serving."""
        self.log.failure("internal error routing {line!r}", line=req.line)
        self.stats.req_active -= 1
        done(errors.LUA_FAILURE)

    def _advance(self, routes: Routes, req: Request,
                 done: Callable[[bytes], None], step) -> None:
        while step[0] >= YIELD_POOL:
            if step[0] == YIELD_AWAIT:
                step = self._await(routes, req, done, step)
                if step is None:
                    return
                continue
            if step[0] == YIELD_WAIT:
                step = rcontext.dispatch(routes, step, partial(self._resumed, routes, req, done))
                if step is None:
                    return
                continue
            _, co, pool, sent = step
            try:
                backend = select_backend(pool, sent)
            except ValueError as e:
                step = routes.resume_error(co, str(e).encode())
                continue

            def reply(res, co=co):
                try:
                    if res.value is not None:
                        routes.handed(len(res.value))
                    self._advance(routes, req, done,
                                  routes.resume(co, res, res.ok, res.hit))
                except Exception:
                    self._internal_error(req, done)

            backend.send(sent, reply)
            return
        self.stats.req_active -= 1
        kind = step[0]
        if kind == DONE_RESPONSE:
            done(client_bytes(step[1], req))
        elif kind == DONE_STRING:
            done(string_reply(step[1], req))
        elif kind == DONE_BAD:
            done(errors.BAD_RESPONSE)
        else:
            self._route_error(req, step[1])
            done(errors.LUA_FAILURE)

    def _resumed(self, routes: Routes, req: Request, done: Callable[[bytes], None],
                 step) -> None:
        """Go on with a route whose V2 wait a reply ended (rcontext)."""
        try:
            self._advance(routes, req, done, step)
        except Exception:
            self._internal_error(req, done)

    def _await(self, routes: Routes, req: Request, done: Callable[[bytes], None], step):
        """Send one request to several pools; resume when enough answered.

        Returns the next step when the await completes at once (background
        mode, or an error to raise in the route), else None.
        """
        _, co, sent, pools, wait_for, mode = step
        if sent.command in BROADCAST_COMMANDS:
            # Once to every backend of all the pools: one combined response.
            backends = [Broadcast.of(pools.values())]
        else:
            try:
                backends = [select_backend(pool, sent) for pool in pools.values()]
            except ValueError as e:
                return routes.resume_error(co, str(e).encode())
        if mode == AWAIT_BACKGROUND:
            for backend in backends:
                backend.send(sent, _ignore)
            return routes.resume_await(co, routes.table([]))

        def finish(responses: list[Response]) -> None:
            try:
                routes.handed(sum(len(res.value) for res in responses if res.value))
                self._advance(routes, req, done,
                              routes.resume_await(co, routes.table(responses)))
            except Exception:
                self._internal_error(req, done)

        waiter = _Await(len(backends), wait_for, mode, finish)
        for index, backend in enumerate(backends):
            backend.send(sent, partial(waiter.arrived, index))
        return None

    def _route_error(self, req: Request, message: bytes) -> None:
        """Log a route's Lua error, at most once per ERROR_LOG_INTERVAL."""
        now = monotonic()
        if now - self._last_error_log < ERROR_LOG_INTERVAL:
            self._errors_unlogged += 1
            return
        self.log.error(
            "route error for {line!r}: {error} ({suppressed} more not logged)",
            line=req.line, error=message.decode("utf-8", "replace"),
            suppressed=self._errors_unlogged, type="proxy_error")
        self._last_error_log = now
        self._errors_unlogged = 0


class _LuaKeys:
    """The keys of one client ``get``/``gets`` multiget, or the requests of
    a run of plain gets (``KeyRequests``), whose route runs in Lua, routed
    together (RouteEngine.route_keys, route_run) as they would be one by
    one, with fewer crossings: one call into Lua starts every key's
    coroutine (mcp.lua's start_keys, with lazy requests), the keys those
    send unedited to the same backend go as one KeyFetch (a run's as one
    ReplyRun: separate requests stay separate on the wire), and one call
    resumes the coroutines of a KeyFetch's keys (resume_keys, with lazy
    responses). A key whose route does anything else (edits or makes a
    request, awaits, waits, fails) goes on alone, driven by _advance as any
    route is. ``done`` gets every key's reply in order (and a multiget's
    END); or, a list of one per key (the requests RouteEngine.gather took
    from many connections), each gets its key's reply once it has it; or,
    with ``widths`` (the multigets of many connections, joined: each's
    number of keys, in order), a list of one per multiget, each gets its
    keys' replies and the END once it has them."""

    __slots__ = ("engine", "routes", "keys", "names", "name", "sink", "done", "dones",
                 "parts", "pending", "id", "widths", "firsts", "left")

    def __init__(self, engine: RouteEngine, keys: KeyRequests,
                 done: Callable[[bytes], None] | list[Callable[[bytes], None]],
                 sink: ReplySink | None, widths: list[int] | None = None) -> None:
        self.engine = engine
        self.routes = engine.routes
        self.keys = keys
        self.names = names = keys.keys
        self.name = keys.name
        #: the number Lua knows the batch by
        self.id = next(_batch_ids)
        self.sink = sink
        self.done = done
        self.dones = done if done.__class__ is list else None
        count = len(names)
        self.parts: list[bytes | None] = [None] * count
        self.pending = count
        self.widths = widths
        #: with ``widths``, once a key is answered on its own: each
        #: multiget's first key, and how many keys each waits for
        self.firsts = self.left = None
        if keys.sets:
            engine.stats.count_run(count, len(keys.sets))
        else:
            engine.stats.count_keys(keys.command, count)

    def start(self, handler) -> None:
        try:
            keys = self.keys
            routes = self.routes
            if keys.sets:  # and the sets' route
                kinds = bytearray(len(self.names))
                for i in keys.sets:
                    kinds[i] = 1
                # Lua holds them (the sets' payloads too) until it collects
                routes.handed(sum(map(len, keys.sent)))
                started = routes.start_keys(handler, self.engine._hooks[CMD_SET], self.id,
                                            keys, keys.command, CMD_SET, False, bytes(kinds),
                                            *self.names)
            else:
                started = routes.start_keys(handler, None, self.id, keys, keys.command, None,
                                            keys.multiget, False, *self.names)
            if len(started) == 2:  # every key sent its own request to one pool
                every = range(len(self.names))
                self.send(started[1], every, every)
            else:
                self.settle(range(len(self.names)), started[0], started, 1)
        except Exception:
            self.internal_error(range(len(self.names)))

    def settle(self, positions, full, steps: tuple, at: int) -> None:
        """Go on with the keys at ``positions`` after a call into Lua: their
        steps (three values each) are ``steps[at:]``, ``full`` the full
        steps kept for some (see mcp.lua's key_step). What the routes send
        reaches each backend in the keys' order, as one by one: the keys
        sent unedited before a key that goes on alone are sent before it."""
        made = self.keys.made
        multiget = self.keys.multiget
        pools = None
        answered = 0
        try:
            for i, kind, a, b in zip(positions, steps[at::3], steps[at + 1::3], steps[at + 2::3],
                                     strict=True):
                if kind == KEY_POOL:
                    if pools is None:
                        pools = {a: [i, b]}
                    else:
                        sent = pools.get(a)
                        if sent is None:
                            pools[a] = [i, b]
                        else:
                            sent += (i, b)
                elif kind == DONE_RESPONSE:
                    req = made.get(i) if made else None
                    if req is not None:  # made, so maybe edited: as _advance does
                        data = client_bytes(a if b is False else a.response(b), req)
                    elif b is not False:
                        # a unit's lazy response to an unedited key: what
                        # client_bytes would give, without a Response
                        if multiget:
                            data = a.parts[b]
                        elif a.__class__ is ReplyRun:
                            data = a.reply(b)
                        else:
                            data = client_bytes(a.response(b), self.keys.request(i))
                    else:
                        data = key_reply(a) if multiget else client_bytes(a, self.keys.request(i))
                    answered += self._keep(i, data)
                elif kind == DONE_STRING:
                    answered += self._keep(i, string_reply(a, self.keys.request(i)))
                else:
                    if pools is not None:
                        for pool, sent in pools.items():
                            self.send(pool, sent[0::2], sent[1::2])
                        pools = None
                    self.alone(i, self.routes.key_full(full, i))
        finally:  # what was answered counts, also after a bug of ours
            self._answered(answered)
        if pools is not None:
            for pool, sent in pools.items():
                self.send(pool, sent[0::2], sent[1::2])

    def _answered(self, count: int) -> None:
        if count:
            self.engine.stats.req_active -= count
            self.pending -= count
            if not self.pending:
                self.finish()

    def settle_own(self, positions: list[int], fetch: KeyFetch | ReplyRun) -> None:
        """Go on with the keys at ``positions`` after each returned the
        response ``fetch`` gave it (mcp.lua's resume_keys): what settle
        does for those steps, without them."""
        if self.keys.made:  # a route made a key's request: maybe edited
            steps = []
            for j in range(len(positions)):
                steps += (DONE_RESPONSE, fetch, j)
            self.settle(positions, False, steps, 0)
            return
        # a multiget's keys went as KeyFetches, a run's as ReplyRuns
        if self.keys.multiget:
            datas = fetch.parts
        elif len(fetch.replies) == len(positions):  # each request has its reply
            datas = fetch.replies
        else:
            datas = map(fetch.reply, range(len(positions)))
        count = len(self.parts)
        if positions.__class__ is range and self.pending == count:
            # every key, in order (start sent them all as one): all at once
            self.parts = parts = list(datas)
            try:
                if self.widths is not None:
                    self._answer_multigets()
                elif self.dones is not None:  # each request its own reply
                    for done, data in zip(self.dones, parts, strict=True):
                        done(data)
            finally:
                self._answered(count)
            return
        answered = 0
        try:
            for i, data in zip(positions, datas, strict=True):
                answered += self._keep(i, data)
        finally:
            self._answered(answered)

    def _keep(self, index: int, data: bytes) -> int:
        """Key ``index``'s reply, kept (1) unless it has one (0: what comes
        after is a bug's); counted by the caller (_answered)."""
        parts = self.parts
        if parts[index] is not None:
            return 0
        parts[index] = data
        if self.dones is not None:
            self._tell(index, data)
        return 1

    def _tell(self, index: int, data: bytes) -> None:
        """Key ``index`` has its reply, ``data``: tell its connection (one
        done per key), or with ``widths`` its multiget's, if that was the
        last key it waited for."""
        if self.widths is None:
            self.dones[index](data)
            return
        if self.firsts is None:
            self.firsts = list(accumulate(self.widths, initial=0))
            self.left = list(self.widths)
        owner = bisect_right(self.firsts, index) - 1
        left = self.left
        left[owner] -= 1
        if not left[owner]:
            self.dones[owner](self._multiget_reply(self.firsts[owner], self.widths[owner]))

    def _answer_multigets(self) -> None:
        """Every key has its reply: answer each multiget (``widths``)."""
        first = 0
        for done, width in zip(self.dones, self.widths, strict=True):
            done(self._multiget_reply(first, width))
            first += width

    def _multiget_reply(self, first: int, width: int) -> bytes:
        """The reply to the multiget of the ``width`` keys from ``first``."""
        return _EMPTY.join(self.parts[first:first + width]) + errors.END

    def send(self, pool, routes, indexes) -> None:
        """Send what the pool calls of some keys' routes sent to ``pool``
        (``routes``: the index of each route's key, ``indexes``: of the key
        it sent): each backend its keys as one KeyFetch."""
        names = self.names
        if len(pool.backends) == 1:  # serves every key if it serves one
            try:
                backend = pool.select(names[indexes[0]])
            except ValueError:
                pass  # each key finds out below
            else:
                self.fetch(backend, pool, routes, indexes)
                return
        groups: dict = {}
        for i, index in zip(routes, indexes, strict=True):
            try:
                backend = pool.select(names[index])
            except ValueError as e:
                lua = self.routes
                self.alone(i, lua.resume_error(lua.key_alone(self.id, i), str(e).encode()))
                continue
            group = groups.get(backend)
            if group is None:
                groups[backend] = ([i], [index])
            else:
                group[0].append(i)
                group[1].append(index)
        for backend, (mine, theirs) in groups.items():
            self.fetch(backend, pool, mine, theirs)

    def fetch(self, backend, pool, routes: list[int], indexes: list[int]) -> None:
        """Send the keys at ``indexes`` (sent by the routes of the keys at
        ``routes``) to ``backend``, as one KeyFetch; to a backend with a
        depth limit (it counts units) each as it would go alone."""
        if backend.options.depth_limit:
            for i, index in zip(routes, indexes, strict=True):
                self.alone(i, (YIELD_POOL, self.routes.key_alone(self.id, i), pool,
                               self.keys.request(index)))
            return
        done = partial(self.fetched, routes)
        names = self.names
        # every key, in order (start sent them all as one): the names themselves
        keys = names if indexes == range(len(names)) else [names[index] for index in indexes]
        requests = self.keys
        if requests.multiget:
            unit = KeyFetch(self.name, keys, done, self.sink)
        elif requests.sets:  # as sent, the sets' payloads too
            sets = frozenset(requests.sets)
            sent = requests.sent
            unit = ReplyRun(keys, done, self.sink, b"".join([sent[i] for i in indexes]),
                            [at for at, i in enumerate(indexes) if i in sets])
        else:
            unit = ReplyRun(keys, done, self.sink)
        backend.send_unit(unit)

    def fetched(self, positions: list[int], fetch: KeyFetch | ReplyRun) -> None:
        """A KeyFetch's (or ReplyRun's) answer: resume the coroutines of its
        keys."""
        # Lua holds the unit (lazy responses) until its next collection:
        # let go of what leads back to the routes and the client.
        fetch.done = fetch.sink = None
        try:
            routes = self.routes
            routes.handed(fetch.value_bytes())
            if positions.__class__ is range:  # every key (start sent them all as one)
                steps = routes.resume_keys(self.id, fetch, fetch.flags())
            else:
                steps = routes.resume_keys(self.id, fetch, fetch.flags(), *positions)
            if len(steps) == 2:  # every key returned the response it was given
                self.settle_own(positions, fetch)
            else:
                self.settle(positions, steps[0], steps, 1)
        except Exception:
            self.internal_error(positions)

    def alone(self, index: int, step) -> None:
        """Drive key ``index``'s route on its own from ``step``."""
        req = self.keys.request(index)
        done = partial(self.answer, index)
        engine = self.engine
        try:
            engine._advance(self.routes, req, done, step)
        except Exception:
            engine._internal_error(req, done)

    def internal_error(self, positions) -> None:
        """A bug of ours: each key at ``positions`` not yet answered gets
        what _internal_error answers."""
        self.routes.drop_keys(self.id)
        for i in positions:
            if self.parts[i] is None:
                self.engine._internal_error(self.keys.request(i), partial(self.answer, i))

    def answer(self, index: int, data: bytes) -> None:
        """Key ``index``'s reply (once; what comes after is a bug's)."""
        parts = self.parts
        if parts[index] is not None:
            return
        parts[index] = data
        self.pending -= 1
        if self.dones is not None:
            self._tell(index, data)
        if not self.pending:
            self.finish()

    def finish(self) -> None:
        if self.dones is not None:
            return
        parts = self.parts
        if self.keys.multiget:
            parts.append(errors.END)
        self.done(_EMPTY.join(parts))


def _ignore(response: Response) -> None:
    """Callback for background requests, whose answers nobody waits for."""


class _Await:
    """Collects the responses of one ``mcp.await`` until it is satisfied.

    Responses are kept in arrival order; those arriving after completion
    are dropped (the backend still consumes them, so nothing leaks).
    """

    __slots__ = ("remaining", "wait_for", "mode", "finish", "results", "good", "done")

    def __init__(self, total: int, wait_for: int, mode: int, finish) -> None:
        self.remaining = total
        if mode == AWAIT_FIRST:
            wait_for = 1
        self.wait_for = min(wait_for, total) if wait_for > 0 else 0
        self.mode = mode
        self.finish = finish
        self.results: list[Response] = []
        self.good = 0
        self.done = False

    def arrived(self, index: int, res: Response) -> None:
        self.remaining -= 1
        if self.done:
            return
        mode = self.mode
        if mode == AWAIT_FIRST:
            if index == 0:
                self._complete([res])
            return
        self.results.append(res)
        if mode == AWAIT_ANY:
            self.good += 1
        elif mode == AWAIT_OK or mode == AWAIT_FASTGOOD:
            self.good += res.ok
        else:
            self.good += res.hit
        if (mode == AWAIT_FASTGOOD and res.hit) or (self.wait_for and self.good >= self.wait_for) \
                or not self.remaining:
            self._complete(self.results)

    def _complete(self, results: list[Response]) -> None:
        self.done = True
        self.finish(results)
