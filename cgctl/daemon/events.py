"""The daemon's event feed: every event is logged, kept for `events --since` and handed to each
client that follows the feed."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator

from cgctl.runtime.api import Event, EventType

log = logging.getLogger("cgctld")
HISTORY = 1000  # events kept for `events --since`


class EventLog:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.history: deque[Event] = deque(maxlen=HISTORY)
        self.subscribers: list[queue.Queue[Event]] = []
        self.closed = False

    def emit(self, type: EventType, name: str, attributes: dict[str, str] | None = None) -> None:
        event = Event(time=time.time(), type=type, name=name, attributes=attributes or {})
        with self.lock:
            self.history.append(event)
            for subscriber in self.subscribers:
                subscriber.put(event)
        log.info("%s %s %s", type, name, " ".join(f"{k}={v}" for k, v in event.attributes.items()))

    def follow(self, since: float | None = None, until: float | None = None) -> Iterator[Event]:
        """Past events from `since` on, then new ones as they happen until `until` (None: forever)."""
        subscription: queue.Queue[Event] = queue.Queue()
        with self.lock:
            past = [event for event in self.history if since is not None and event.time >= since]
            self.subscribers.append(subscription)
        try:
            yield from (event for event in past if until is None or event.time <= until)
            while not self.closed and (until is None or time.time() < until):
                try:
                    event = subscription.get(timeout=1.0)
                except queue.Empty:
                    continue
                if until is not None and event.time > until:
                    return
                yield event
        finally:
            with self.lock:
                self.subscribers.remove(subscription)
