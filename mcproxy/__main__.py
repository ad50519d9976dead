"""``python -m mcproxy`` (or the ``mcproxy`` script): tools next to twistd.

The proxy itself runs under ``twistd mcproxy``; this entry point holds the
commands an operator runs beside it.
"""

from __future__ import annotations

import argparse
import signal
import sys

from mcproxy._version import __version__


def _inherited(text: str) -> tuple[int, str]:
    """``FD=ENDPOINT`` of ``mcproxy worker --fd``, as (FD, ENDPOINT)."""
    fd, separator, description = text.partition("=")
    if not (fd.isdigit() and separator and description):
        raise argparse.ArgumentTypeError(f"expected FD=ENDPOINT, not {text!r}")
    return int(fd), description


def ignore_hup() -> None:
    """Let no SIGHUP kill a worker before its reload handler is installed.

    Ignored from here on (before Twisted and Lua are imported) until the
    worker's ProxyService replaces this with its handler. Up to here the
    supervisor's block on SIGHUP, inherited through the exec, held any HUP
    pending; setting SIG_IGN discards it, unblocking lets later ones reach
    the handler. The supervisor passes a HUP that came while the worker
    started on once the worker reports it is ready.
    """
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the command; the exit status."""
    parser = argparse.ArgumentParser(
        prog="mcproxy",
        description="Tools for mcproxy; run the proxy itself with 'twistd mcproxy'.")
    parser.add_argument("--version", action="version", version=f"mcproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser(
        "check", help="load a route config without connecting anywhere; print OK or the error",
        description="Load a route config through both phases in a scratch Lua "
                    "state, without opening backend connections. Prints OK and "
                    "exits 0, or prints the error (with file:line) and exits 1.")
    check.add_argument("config", help="the route config (Lua) to check, or 'routelib'")
    check.add_argument("--config-arg", metavar="FILE",
                       help="with 'routelib': the route library file to check "
                            "(as twistd mcproxy --config=routelib --config-arg=FILE)")
    worker = commands.add_parser(
        "worker", help="internal: one worker process of 'twistd mcproxy --workers=N'",
        description="Run one worker of 'twistd mcproxy --workers=N' on listening "
                    "sockets inherited from it; started by the supervisor, not by hand.")
    worker.add_argument("--worker-id", type=int, required=True, help="the worker's slot")
    worker.add_argument("--fd", type=_inherited, action="append", default=[],
                        help="FD=ENDPOINT: an inherited listening socket and the "
                             "--listen endpoint it was bound for (repeatable)")
    worker.add_argument("options", nargs=argparse.REMAINDER,
                        help="'--' and the mcproxy options, as for twistd mcproxy")
    args = parser.parse_args(argv)
    if args.command == "worker":
        ignore_hup()
        from mcproxy.app.worker import run_worker

        options = args.options[1:] if args.options[:1] == ["--"] else args.options
        return run_worker(args.worker_id, args.fd, options)
    from mcproxy.app.check import main as check_main

    return check_main(args.config, args.config_arg)


if __name__ == "__main__":
    sys.exit(main())
