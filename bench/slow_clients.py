"""Slow clients beside a normal one: what a server's front buys (issue 18, "what they buy").

`slow_clients_beside_one` opens `slow` connections that each send a POST's headers and then its body a few bytes at
a time, never finishing it, so each keeps whatever reads it busy; while they trickle, one normal client posts the
image, one request after another on a connection of its own, and measures each latency. A server that reads bodies
in its workers (gunicorn's sync workers) has its workers held by the first slow clients; one that reads them apart
from the work (nginx in front, an event loop) should keep serving the normal client. Everything is closed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Trickle:
    """What the slow clients did: connections opened and closed, those the server ended (an answer or a close:
    each was opened again), and the body bytes sent."""

    opened: int = 0
    closed: int = 0
    ended_by_server: int = 0
    bytes_sent: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def open_now(self) -> int:
        return self.opened - self.closed


def request_head(host: str, port: int, path: str, length: int) -> bytes:
    """A POST's request line and headers for a JPEG body of `length` bytes, on a connection closed after it."""
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode()


async def trickle(host: str, port: int, path: str, body: bytes, source: str, chunk: int, interval_s: float,
                  stop: asyncio.Event, figures: Trickle, wanted: int) -> None:
    """One slow client from loopback address `source`: the headers, then `chunk` bytes of `body` every `interval_s`,
    until `stop`; a connection that the server ends is opened again. Closed on the way out, whatever happens."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
        except OSError:
            await asyncio.sleep(interval_s)
            continue
        figures.opened += 1
        answered = asyncio.ensure_future(reader.read(1))  # done when the server answers or closes
        try:
            writer.write(request_head(host, port, path, len(body)))
            if figures.opened >= wanted:
                figures.started.set()
            sent = 0
            while not stop.is_set():
                stopped = asyncio.ensure_future(stop.wait())
                done, _ = await asyncio.wait({answered, stopped}, timeout=interval_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                if answered in done:
                    figures.ended_by_server += 1
                    break
                if stop.is_set() or sent >= len(body) - 1:  # never the last byte: the request never completes
                    continue
                piece = body[sent : min(sent + chunk, len(body) - 1)]
                writer.write(piece)
                sent += len(piece)
                figures.bytes_sent += len(piece)
        except OSError:
            figures.ended_by_server += 1
        finally:
            answered.cancel()
            writer.transport.abort()  # at once, unsent bytes dropped: nothing lingers after the run
            figures.closed += 1


async def post(host: str, port: int, path: str, body: bytes, timeout_s: float) -> tuple[int | str, float]:
    """One POST of `body` on a connection of its own: its status (or "timeout", "error") and the seconds it took."""
    started, connection = time.perf_counter(), []

    async def exchange() -> int:
        reader, writer = await asyncio.open_connection(host, port)
        connection.append(writer)
        writer.write(request_head(host, port, path, len(body)) + body)
        status_line = await reader.readline()
        await reader.read()  # Connection: close: the answer ends at EOF
        return int(status_line.split()[1])

    try:
        status = await asyncio.wait_for(exchange(), timeout_s)
    except asyncio.TimeoutError:  # not TimeoutError alone: Python 3.10's asyncio raises its own
        status = "timeout"
    except (OSError, IndexError, ValueError):
        status = "error"
    for writer in connection:
        writer.transport.abort()
    return status, time.perf_counter() - started


async def _run(host, port, path, body, slow, seconds, timeout_s, chunk, interval_s, settle_s, sources):
    stop, figures = asyncio.Event(), Trickle()
    slow_tasks = [asyncio.create_task(trickle(host, port, path, body, sources[i % len(sources)], chunk, interval_s,
                                              stop, figures, slow))
                  for i in range(slow)]
    try:
        if slow:
            # fewer may connect within the time: the figures say how many did
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(figures.started.wait(), 10)
        await asyncio.sleep(settle_s)  # the server takes them in: its workers, or its front, start reading them
        held = figures.open_now
        answers = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            answers.append(await post(host, port, path, body, timeout_s))
    finally:
        stop.set()
        await asyncio.gather(*slow_tasks, return_exceptions=True)
    return answers, figures, held


def slow_clients_beside_one(host: str, port: int, path: str, body: bytes, slow: int = 64, seconds: float = 20,
                            timeout_s: float = 10, chunk: int = 16, interval_s: float = 1.0, settle_s: float = 1.0,
                            sources: list[str] | None = None) -> dict:
    """`slow` trickling uploads of `body` (each from its own loopback address of `sources`, default 127.0.1.x), and
    for `seconds` one normal client posting `body` one request at a time (a request's timeout: `timeout_s`; the
    last one may end up to that much later). Its answers by status, p50/p99 of those answered 200, p99 of all (a
    failure at the time it took), and the slow connections: held when it started, opened in all, ended by the
    server, and left open at the end (0: each is closed on the way out)."""
    sources = sources or [f"127.0.1.{i % 250 + 1}" for i in range(max(slow, 1))]
    answers, figures, held = asyncio.run(
        _run(host, port, path, body, slow, seconds, timeout_s, chunk, interval_s, settle_s, sources))
    statuses: dict[str, int] = {}
    for status, _ in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    ok = np.array([latency for status, latency in answers if status == 200]) * 1000
    every = np.array([latency for _, latency in answers]) * 1000  # a failure at the time it took, a timeout's

    def percentile(values, q):
        return round(float(np.percentile(values, q)), 2) if len(values) else None

    return {
        "slow_clients": slow,
        "seconds": seconds,
        "timeout_s": timeout_s,
        "trickle": f"{chunk} bytes every {interval_s:g} s",
        "sent": len(answers),
        "answered_200": int(len(ok)),
        "failed": len(answers) - int(len(ok)),
        "timed_out": statuses.get("timeout", 0),
        "statuses": statuses,
        "p50_ms": percentile(ok, 50),
        "p99_ms": percentile(ok, 99),
        "p99_all_ms": percentile(every, 99),
        "max_ms": round(float(ok.max()), 2) if len(ok) else None,
        "slow_held_at_start": held,
        "slow_opened": figures.opened,
        "slow_ended_by_server": figures.ended_by_server,
        "slow_body_bytes_sent": figures.bytes_sent,
        "slow_left_open": figures.open_now,
    }
