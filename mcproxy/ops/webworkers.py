"""``--metrics`` under ``--workers``: the supervisor's /metrics and status page.

The supervisor proxies nothing; at each request it asks every running
worker over its control pipe (mcproxy.app.workers) for its snapshot
(mcproxy.ops.stats.Snapshot, sent as JSON data), waits up to its
``ask_timeout``, and renders from what came in what mcproxy.ops.web renders
for a single process. A worker that did not answer in time is left out
(and counted: see ``mcproxy_workers_answering``).

``/metrics`` holds every worker's samples, each with a ``worker`` label
(its slot), as Prometheus' multi-process exporters do: ``sum without
(worker)`` adds them up. A worker's process metrics are read from its
/proc entry by its pid. ``/`` is one section per worker, as web.py renders
a single process, under the supervisor's own line.

``supervisor`` below is what the application runs (WorkerSupervisor): its
``count`` of slots, running ``workers`` by slot (each with a ``pid``),
``restarts``, ``started`` (unix time), ``ask_timeout`` and
``ask_snapshots()``, which fires with ``{slot: (worker, Snapshot or None)}``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from twisted.application import strports
from twisted.application.service import Service
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mcproxy.ops import web
from mcproxy.ops.stats import Snapshot

#: The label naming the worker a sample came from.
WORKER_LABEL = "worker"


def worker_families(pid: int, snap: Snapshot) -> list[Any]:
    """What a worker's own /metrics would hold: its proxy's figures, then
    its process's and the platform's."""
    process = ProcessCollector(pid=lambda: str(pid), registry=None)
    return [*web.proxy_families(snap), *process.collect(),
            *PlatformCollector(registry=None).collect()]


def relabel(workers: dict[int, list[Any]]) -> list[Any]:
    """Every worker's metric families (by slot) as one list, each sample
    labelled with its worker's slot. A family's help and type are those of
    the first worker that has it."""
    families: dict[str, Any] = {}
    for slot, found in sorted(workers.items()):
        for family in found:
            samples = [s._replace(labels={**s.labels, WORKER_LABEL: str(slot)})
                       for s in family.samples]
            if family.name in families:
                families[family.name].samples += samples
            else:
                family.samples = samples
                families[family.name] = family
    return list(families.values())


def supervisor_families(supervisor: Any, answering: int) -> list[Any]:
    """The supervisor's own metrics (no worker label)."""
    prefix = web.PREFIX
    return [
        GaugeMetricFamily(prefix + "workers", "worker processes asked for (--workers)",
                          value=supervisor.count),
        GaugeMetricFamily(prefix + "workers_running", "worker processes running",
                          value=len(supervisor.workers)),
        GaugeMetricFamily(prefix + "workers_answering", "workers whose metrics this "
                          f"scrape holds: those that answered within "
                          f"{supervisor.ask_timeout:g}s", value=answering),
        CounterMetricFamily(prefix + "worker_restarts", "workers that ended and were "
                            "started again", value=supervisor.restarts),
    ]


class _Families:
    """What generate_latest renders: a fixed list of metric families."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


def metrics_text(supervisor: Any, answers: dict) -> bytes:
    """``/metrics``, from the workers' snapshots (see ``ask_snapshots``)."""
    workers = {slot: worker_families(worker.pid, snap)
               for slot, (worker, snap) in answers.items() if snap is not None}
    families = supervisor_families(supervisor, len(workers)) + relabel(workers)
    return generate_latest(_Families(families))


def status_page(supervisor: Any, answers: dict) -> str:
    """``/``: the supervisor's line, then each worker's section."""
    now = time.time()
    answering = sum(snap is not None for _worker, snap in answers.values())
    if answering == supervisor.count:
        verdict = "ok"
    else:
        verdict = "bad" if answering == 0 else "warn"
    out = [f'<div class="summary {verdict}" id="summary">supervisor: '
           f"{len(supervisor.workers)} of {supervisor.count} workers running, "
           f"{answering} answering; {supervisor.restarts} restarts</div>"]
    for slot in range(supervisor.count):
        worker, snap = answers.get(slot, (None, None))
        body = None
        if worker is None:
            heading = f"worker {slot}: not running (restarting)"
        else:
            heading = f"worker {slot} &middot; pid {worker.pid}"
            if snap is None:
                body = (f'<p class="failed">did not answer within '
                        f'{supervisor.ask_timeout:g}s</p>')
            else:
                body = web.status_sections(snap, now, prefix=f"worker-{slot}-")
        out.append(f'<section class="worker" id="worker-{slot}" data-worker="{slot}">'
                   f'<h2 class="worker">{heading}</h2>{body or ""}</section>')
    return web.page(web.page_sub(os.getpid(), supervisor.started, now), "\n".join(out))


class GatheredPage(Resource):
    """A page made by ``render(supervisor, answers)`` from the workers'
    snapshots, once they are in; ``/`` is this page too."""

    log = Logger()

    def __init__(self, supervisor: Any, content_type: bytes,
                 render: Callable[[Any, dict], bytes]) -> None:
        super().__init__()
        self.supervisor = supervisor
        self.content_type = content_type
        self.render_answers = render

    def getChild(self, path: bytes, request) -> Resource:
        if path == b"":
            return self
        return super().getChild(path, request)

    def render_GET(self, request):
        gone: list = []
        request.notifyFinish().addErrback(gone.append)  # the client left

        def send(body: bytes) -> None:
            if not gone:
                request.setHeader(b"content-type", self.content_type)
                request.setHeader(b"cache-control", b"no-store")
                request.write(body)
                request.finish()

        def failed(failure) -> None:
            self.log.failure("could not render {path}", failure, path=request.path)
            if not gone:
                request.setResponseCode(500)
                request.finish()

        answers = self.supervisor.ask_snapshots()
        answers.addCallback(lambda found: self.render_answers(self.supervisor, found))
        answers.addCallback(send).addErrback(failed)
        return NOT_DONE_YET


def metrics_service(supervisor: Any, endpoint: str) -> Service:
    """A service serving the workers' metrics and status pages on ``endpoint``."""
    root = GatheredPage(supervisor, b"text/html; charset=utf-8",
                        lambda s, answers: status_page(s, answers).encode())
    root.putChild(b"metrics", GatheredPage(supervisor, CONTENT_TYPE_LATEST.encode(),
                                           metrics_text))
    return strports.service(endpoint, web.quiet_site(root))
