"""A small least-recently-used map, for encoded subjects and loaded weights."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable, List, Optional


class LRU:
    """Keeps at most ``capacity`` items; ``on_evict(value)`` runs for each dropped value.
    ``hits`` counts successful lookups (diagnostics and tests)."""

    def __init__(self, capacity: int, on_evict: Optional[Callable[[Any], None]] = None):
        self.capacity = capacity
        self.on_evict = on_evict
        self.hits = 0
        self._items: "OrderedDict[Hashable, Any]" = OrderedDict()

    def get(self, key: Hashable) -> Any:
        """The value for ``key`` (marked most recent), or None."""
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return self._items[key]

    def put(self, key: Hashable, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            _, old = self._items.popitem(last=False)
            if self.on_evict:
                self.on_evict(old)

    def values(self) -> List[Any]:
        return list(self._items.values())

    def remove_if(self, predicate: Callable[[Any], bool]) -> None:
        for key in [k for k, v in self._items.items() if predicate(v)]:
            del self._items[key]

    def clear(self) -> None:
        self._items.clear()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
