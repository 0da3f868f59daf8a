"""Admission control for large uploads (the ``ready`` / ``grant`` handshake)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedbus.compress import UpdateCodec

__all__ = ["UploadGate", "pregrant_plan", "upload_threshold"]


class UploadGate:
    """Admission control for large uploads.

    A chunked update is only foldable once all its chunks are in, and the broker interleaves
    the chunks of every sender, so N trainers uploading at once pin N half-received models in
    memory (measured: 2.4 GB for 50 x 11M params). Trainers with a large update therefore
    announce it (READY) and upload when granted (GRANT); at most ``slots`` uploads run at once,
    which bounds the aggregator's memory by ``slots`` models whatever the number of trainers.
    A grant not used within ``timeout_s`` is taken back; should its upload start after all, it
    gets a free slot again (``readmit``) rather than being refused and lost.

    The first uploads of a round need no handshake: the order itself grants them
    (``pregrant``), up to a byte budget (``round.upload_burst_mb``), each for an update of
    at most the size the order states. Those grants are a pool of their own beside the
    ``slots``: a pre-granted trainer still training holds no slot a ready one could use, and
    the memory bound becomes the burst plus ``slots`` models.
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
        #: Granted with the round's order: node -> the largest transfer it may start.
        self._pre: dict[str, int] = {}

    @property
    def pregranted(self) -> int:
        """Grants given with the order and not yet used up."""
        return len(self._pre)

    def pregrant(self, nodes: list[str], nbytes: int) -> None:
        """``nodes`` may upload an update of at most ``nbytes`` without asking first."""
        for node in nodes:
            self._pre[node] = nbytes

    def request(self, node: str) -> None:
        """``node`` is ready to upload. Asking again while granted means the grant did not
        reach it (lost, or it came before the node was ready, as a forged ``ready`` can
        arrange), or that the two crossed (a ``ready`` re-announced while the grant was on
        its way, as under a flood): the node keeps its slot, so an upload already started
        is still admitted, and the grant is sent again (a node that has sent ignores it)."""
        self._expired.discard(node)
        self._pre.pop(node, None)  # its update is larger than the order's grant allowed
        if node in self._granted:
            self._again[node] = None
            return
        self._waiting[node] = None

    def release(self, node: str) -> None:
        self._pre.pop(node, None)
        self._waiting.pop(node, None)
        self._granted.pop(node, None)
        self._expired.discard(node)
        self._again.pop(node, None)

    def reset(self) -> None:
        self._pre.clear()
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
        """``node`` holds a slot (its ``ready`` was granted)."""
        return node in self._granted

    def admits(self, node: str, nbytes: int) -> bool:
        """A transfer of ``nbytes`` from ``node`` may start: it holds a slot, or the order
        granted it one at least that large."""
        return node in self._granted or nbytes <= self._pre.get(node, -1)


#: Room above an update's tensors for its envelope, header and a signature trailer.
_SLACK = 65536


def pregrant_plan(weights: Mapping[str, np.ndarray], codec: UpdateCodec, aux_models: int,
                  burst_mb: float, *, gate_bytes: int, children: int) -> tuple[int, int]:
    """(how many updates a round's order grants outright, the bytes each may weigh) for
    ``children`` packing with ``codec`` (``round.upload_burst_mb``). None (0) when updates
    are small enough to skip the gate anyway (``gate_bytes``)."""
    dense = sum(int(v.nbytes) for v in weights.values())
    each = codec.packed_bytes(weights) + aux_models * dense
    each += each // 64 + _SLACK  # zstd's hair on incompressible data, the envelope
    if each <= gate_bytes:
        return 0, each
    return min(children, int(burst_mb * (1 << 20)) // each), each


def upload_threshold(meta: Mapping[str, Any], node: str) -> Any:
    """From a round's order: the size above which ``node``'s update asks for a slot first
    (``upload_gate_bytes``, or the grant the order gave it: ``granted`` / ``granted_bytes``).
    Not an int when the order sets no gate (an old or foreign aggregator)."""
    gate, granted, each = (meta.get("upload_gate_bytes"), meta.get("granted"),
                           meta.get("granted_bytes"))
    if isinstance(gate, int) and isinstance(each, int) and isinstance(granted, list) \
            and node in granted:
        return max(gate, each - _SLACK // 2)  # half the slack: room for a trailer
    return gate
