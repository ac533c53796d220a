"""Rendered heatmap PNGs kept in memory by job and options, so a repeated request costs nothing."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable


class RenderCache:
    """Encoded images by key, least recently used evicted past `capacity_bytes`; thread-safe."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> bytes | None:
        """The image stored under `key`, or None."""
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: bytes) -> None:
        """Keep `value` (an image larger than the whole cache is not kept)."""
        if len(value) > self.capacity_bytes:
            return
        with self._lock:
            previous = self._items.pop(key, None)
            self._size += len(value) - (len(previous) if previous is not None else 0)
            self._items[key] = value
            while self._size > self.capacity_bytes:
                _, evicted = self._items.popitem(last=False)
                self._size -= len(evicted)
