"""What the client protocol needs of the proxy behind it.

A client connection frames and parses requests, keeps their replies in
order and applies the client limits; everything else it asks of an
:class:`IProxyCore`, which the application provides (mcproxy.app.service)
and unit tests implement in memory. The protocol keeps references to the
router's bound methods, so the interface costs nothing per request.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IRouter(Interface):
    """The routing of client requests (mcproxy.routing.engine.RouteEngine,
    or its view for a listener tag)."""

    plain_runs = Attribute(
        "None, or whether runs of plain requests (wire.request.scan_plain) may be "
        "handed to route_run with sets as well as gets; read per chunk, as it "
        "changes with the routes")
    plain_multigets = Attribute("whether those runs may hold gets of several keys")
    wire = Attribute(
        "the wire behaviour (mcproxy.wire.behaviour.Wire) clients get: line ends, "
        "error words, what closes; read when a line is refused, as it changes "
        "with the routes")
    gathers = Attribute(
        "the fewest I/O events (writes.WriteBatch.events) a poll must bring for gather "
        "and gather_plain to be asked, 0: never; read for each request routed alone")

    def hooked(command):
        """Whether the routes take ``command`` (else it is answered locally)."""

    def route(req, done):
        """Route one request; ``done(client_bytes)`` exactly once."""

    def gather(req, done, release):
        """Take ``req`` to route at the end of this poll, with other
        connections' requests; ``done(client_bytes)`` once, ``release()``
        once routed (the connection reads nothing on until then). False
        (nothing done) if the caller must route it."""

    def gather_plain(key, sent, is_set, done, release, req=None, width=0):
        """``gather`` for a run of one plain request (wire.request.scan_plain):
        the ``get`` of ``key``, or the set, ``sent`` (its line, a set's
        payload too); ``req`` its Request if the caller has one; ``width``
        the number of keys of a multi-key get (``key`` its keys joined by
        spaces, as scanned), which it may refuse."""

    def route_keys(req, keys, done, sink=None):
        """Route a ``get``/``gets`` of several ``keys`` with one reply;
        False (nothing done) if it must be split into one request per key."""

    def route_run(data, start, keys, ends, sets, widths, done, sink=None):
        """Route a run of plain requests with one reply; False (nothing
        done) if they must be routed one by one."""


class IProxyCore(Interface):
    """The proxy as one client connection sees it."""

    router = Attribute(
        "the IRouter requests are routed through, unless the connection's "
        "listener has its own (a tagged listener's, see ProxyServerFactory.routed_by)")
    stats = Attribute("the ProxyStats a connection counts into (mcproxy.counters)")
    clock = Attribute(
        "the IReactorTime of idle times, the idle sweep and the binary header wait")
    watchers = Attribute(
        "the watch registry (mcproxy.ops.watch.WatchRegistry: add(transport, "
        "streams) -> error line or None), or None where watching is not served")

    def answer(req):
        """The reply to a request no route takes and the protocol does not
        answer itself (``version``, ``stats``, the embedded cache); empty
        bytes for none (noreply)."""
