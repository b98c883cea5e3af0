"""Each rank's watchdog thread: heartbeats, the stop and failure news of the other ranks, dead neighbours.

It polls the side channel twice a second, on a store client of its own, while the main thread computes:

- writes this rank's heartbeat (where the main thread is, how many synchronisation points it has passed);
- passes a SIGTERM / SIGINT this rank received to the others at once (``stop/rank<r>``), and sets the stop flag
  when another rank received one, so every rank stops at its next safe point even with no collective in common;
- ends this rank as soon as any rank has failed (a failure record anywhere), even when it is busy with its own
  items (data parallel);
- watches the next rank's heartbeat and reports it dead after ``dead_after(timeout)`` seconds of silence
  (SIGKILL, the OOM killer), so everyone still ends within the timeout;
- if this rank was signalled and its main thread has not ended within the timeout (stuck somewhere it cannot see
  the flag), ends it with the stop's exit code: no signal is ignored for longer than ``--timeout``.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from k5.launch.channel import POLL_S, Channel, dead_after
from k5.launch.logs import LOGGER
from k5.launch.signals import stop_exit_code

log = logging.getLogger(LOGGER)


class Watchdog:
    def __init__(self, sup, channel: Channel):
        self.sup, self.channel = sup, channel
        self.quit = threading.Event()
        self.thread = threading.Thread(target=self._run, name="k5-watchdog", daemon=True)
        self.items_done = None  # rank 0: callback(total finished items) for the progress bar

    def start(self) -> "Watchdog":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.quit.set()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=4 * POLL_S)

    def _run(self) -> None:
        sup, channel = self.sup, self.channel
        seen_failures = seen_stops = errors = 0
        posted = False
        signalled_at = None
        neighbour = (sup.rank + 1) % sup.world
        last_n, last_change = None, time.monotonic()
        silence = dead_after(sup.timeout_s)
        while not self.quit.wait(POLL_S):
            try:
                sup.signals.drain()  # a signal that came while the main thread waits in a collective
                sup.beat(channel)
                now = time.monotonic()
                signum = sup.signals.signum
                if signum is not None and not posted:
                    channel.request_stop(signum)  # the other ranks stop at their next safe point
                    posted, signalled_at = True, now
                if signalled_at is not None and now - signalled_at > sup.timeout_s:
                    self._give_up(signum, now - signalled_at)
                count = channel.stop_count()
                if count > seen_stops:
                    seen_stops = count
                    sup.peer_stopped(channel.stop_signal())
                count = channel.failure_count()
                if count > seen_failures:
                    seen_failures = count
                    sup.on_records(channel.records())
                if self.items_done is not None:
                    self.items_done(channel.counter("items_done"))
                hb = channel.heartbeat(neighbour)
                if hb is not None and hb["state"] == "running":
                    if hb["n"] != last_n:
                        last_n, last_change = hb["n"], now
                    elif now - last_change > silence:
                        log.error("rank %d sent no heartbeat for %.0f s", neighbour, now - last_change)
                        channel.report(sup.record(
                            "dead", f"no heartbeat for {now - last_change:.0f} s (killed by a signal or out of "
                            f"memory?)", rank=neighbour, where=hb["where"]))
                        continue  # the record comes back through failure_count on the next round
                errors = 0
            except Exception as e:
                errors += 1
                if errors * POLL_S >= max(3.0, min(10.0, sup.timeout_s / 4)):
                    sup.fatal(sup.record("store", f"lost the coordination store at {channel.address} "
                                                  f"({type(e).__name__}: {e}); the launcher or rank 0 is gone"),
                              reason="lost the coordination store")

    def _give_up(self, signum: int, waited: float) -> None:
        log.error("rank %d: no safe point within --timeout %g s after %s (stuck at %s); exiting without finishing "
                  "the current item", self.sup.rank, self.sup.timeout_s, self.sup.signals.name, self.sup.where)
        self.sup.logs.flush()
        os._exit(stop_exit_code(signum))
