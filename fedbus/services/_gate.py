"""Admission control for large uploads (the ``ready`` / ``grant`` handshake)."""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["UploadGate"]


class UploadGate:
    """Admission control for large uploads.

    A chunked update is only foldable once all its chunks are in, and the broker interleaves
    the chunks of every sender, so N trainers uploading at once pin N half-received models in
    memory (measured: 2.4 GB for 50 x 11M params). Trainers with a large update therefore
    announce it (READY) and upload when granted (GRANT); at most ``slots`` uploads run at once,
    which bounds the aggregator's memory by ``slots`` models whatever the number of trainers.
    A grant not used within ``timeout_s`` is taken back; should its upload start after all, it
    gets a free slot again (``readmit``) rather than being refused and lost.
    """

    def __init__(self, slots: int, timeout_s: float) -> None:
        if slots < 1:
            raise ValueError(f"upload slots must be >= 1, got {slots}")
        self.slots = slots
        self.timeout_s = timeout_s
        self._waiting: OrderedDict[str, None] = OrderedDict()
        self._granted: dict[str, float] = {}
        #: Grants taken back unused (only children that said ``ready`` ever hold one).
        self._expired: set[str] = set()
        #: Granted nodes that asked again: their grant is sent again by the next ``due``.
        self._again: dict[str, None] = {}

    def request(self, node: str) -> None:
        """``node`` is ready to upload. Asking again while granted means the grant did not
        reach it (lost, or it came before the node was ready, as a forged ``ready`` can
        arrange), or that the two crossed (a ``ready`` re-announced while the grant was on
        its way, as under a flood): the node keeps its slot, so an upload already started
        is still admitted, and the grant is sent again (a node that has sent ignores it)."""
        self._expired.discard(node)
        if node in self._granted:
            self._again[node] = None
            return
        self._waiting[node] = None

    def release(self, node: str) -> None:
        self._waiting.pop(node, None)
        self._granted.pop(node, None)
        self._expired.discard(node)
        self._again.pop(node, None)

    def reset(self) -> None:
        self._waiting.clear()
        self._granted.clear()
        self._expired.clear()
        self._again.clear()

    def readmit(self, node: str, now: float) -> bool:
        """``node``'s grant was taken back for not being used in time, and its upload starts
        now after all (a slow link, a paused device): give it a free slot again instead of
        refusing an update it was told to send. False when it held no such grant or no slot
        is free (``due`` hands free slots to the waiting first, so a free one means nobody
        waits)."""
        if node not in self._expired or len(self._granted) >= self.slots:
            return False
        self._expired.discard(node)
        self._granted[node] = now
        return True

    def due(self, now: float) -> tuple[list[str], list[str]]:
        """(nodes to grant now, grants taken back for not being used in time)."""
        expired = [n for n, at in self._granted.items() if now - at > self.timeout_s]
        for node in expired:
            del self._granted[node]
            self._expired.add(node)
        grant = [n for n in self._again if n in self._granted]
        for node in grant:
            self._granted[node] = now  # the grant's time starts again with the new copy
        self._again.clear()
        while self._waiting and len(self._granted) < self.slots:
            node, _ = self._waiting.popitem(last=False)
            self._granted[node] = now
            grant.append(node)
        return grant, expired

    @property
    def granted(self) -> list[str]:
        return sorted(self._granted)

    def is_granted(self, node: str) -> bool:
        return node in self._granted
