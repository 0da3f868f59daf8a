"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML, Algorithm 1 with option II): control variates correct client drift.

Server, round r, sampled set S (|S| = updates accepted this round), N = ``num_clients``:

    Δx̄ = (1/|S|) Σ_{i∈S} Δy_i        Δc̄ = (1/|S|) Σ_{i∈S} Δc_i
    x ← x + η_g Δx̄                    c ← c + (|S|/N) Δc̄                 (lines 16-17)

with c = 0 initially. Both means are unweighted as in the paper; ``weighted=True`` weights
Δx̄ (only) by ``num_examples``. Δc̄ stays unweighted so that c = (1/N) Σ_i c_i holds.

Client contract (what a trainer's task adapter must honour):
    * ``client_config(round)`` is ``{"scaffold": True}``; ``client_tensors(round)`` carries the
      server control c as ``"scaffold.c/<param name>"``, one per model tensor, in the model's
      dtype. If those tensors are absent (only possible before the server has seen the model,
      i.e. the very first round) c is zero.
    * Each client i keeps its own control c_i, one tensor per model tensor, across rounds,
      initialised to zeros the first time it trains.
    * From x (the weights received) it runs K local steps with client learning rate η_l:
          y ← y − η_l (g_i(y) − c_i + c)                                  (line 10)
    * Option II then sets  c_i⁺ = c_i − c + (x − y) / (K η_l)                (line 12)
      where K is the number of local optimizer steps actually taken.
    * It sends ``delta = y − x`` with ``num_examples`` and, in ``aux``,
      ``"scaffold.dc/<param name>" = c_i⁺ − c_i`` for every model tensor; then stores
      c_i ← c_i⁺. An update missing any ``scaffold.dc/`` tensor is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from strategies._server_state import (
    apply_step,
    check_same_layout,
    export_tensors,
    import_tensors,
    zeros_f64,
)
from strategies.base import (
    ClientUpdate,
    Strategy,
    StrategyError,
    Weights,
    positive_count,
    positive_number,
)
from strategies.fedavg import WeightedDeltaMean

__all__ = ["CONTROL_DELTA_PREFIX", "CONTROL_PREFIX", "Scaffold"]

#: Name prefix of the server control tensors sent to clients.
CONTROL_PREFIX = "scaffold.c/"
#: Name prefix of the control-variate deltas clients return in ``ClientUpdate.aux``.
CONTROL_DELTA_PREFIX = "scaffold.dc/"


class Scaffold(Strategy):
    """Server side of SCAFFOLD.

    Args:
        num_clients: N, the total number of clients in the federation.
        server_lr: η_g, the global step size (the paper uses 1).
        weighted: weight Δx̄ by ``num_examples`` (the paper: False).
    """

    name: ClassVar[str] = "scaffold"
    aux_models: ClassVar[int] = 1  # clients return their control-variate delta
    client_aux_models: ClassVar[int] = 1  # clients receive the server control variate

    def __init__(self, num_clients: int, server_lr: float = 1.0, weighted: bool = False) -> None:
        self.num_clients = positive_count("num_clients", num_clients)
        self.server_lr = positive_number("server_lr", server_lr)
        self.weighted = bool(weighted)
        self._dx = WeightedDeltaMean()
        self._dc = WeightedDeltaMean()
        self._global: Weights = {}
        self._c: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype[Any]] = {}

    @property
    def num_accumulated(self) -> int:
        return self._dx.count

    def client_config(self, round: int) -> dict[str, Any]:
        return {"scaffold": True}

    def client_tensors(self, round: int) -> Weights:
        dtypes = self._dtypes or {k: np.dtype(np.float64) for k in self._c}
        return {CONTROL_PREFIX + k: c.astype(dtypes[k]) for k, c in self._c.items()}

    def begin(self, weights: Weights, round: int) -> None:
        if not self._c:
            self._c = zeros_f64(weights)
        check_same_layout(weights, self._c, "SCAFFOLD server control c")
        self._global = weights
        self._dtypes = {k: w.dtype for k, w in weights.items()}
        self._dx.reset(weights)
        self._dc.reset(weights)

    def accumulate(self, update: ClientUpdate) -> None:
        if self._dx.count >= self.num_clients:
            raise StrategyError(f"SCAFFOLD got more than num_clients={self.num_clients} updates "
                                f"in one round; set num_clients to the federation's size")
        dc = {k[len(CONTROL_DELTA_PREFIX):]: v for k, v in update.aux.items()
              if k.startswith(CONTROL_DELTA_PREFIX)}
        missing = sorted(set(self._global) - set(dc))
        if missing:
            raise StrategyError(f"SCAFFOLD update from {update.sender!r} lacks control deltas "
                                f"{[CONTROL_DELTA_PREFIX + k for k in missing[:5]]}"
                                f"{' ...' if len(missing) > 5 else ''}; the trainer must send "
                                f"aux['{CONTROL_DELTA_PREFIX}<name>'] = c_i+ - c_i "
                                f"for every tensor")
        # Check both before adding either, so a bad update leaves the round untouched.
        check_same_layout(self._global, dc, f"SCAFFOLD control delta from {update.sender!r}")
        check_same_layout(self._global, dict(update.delta), f"update from {update.sender!r}")
        self._dx.add(dict(update.delta), float(update.num_examples) if self.weighted else 1.0)
        self._dc.add(dc, 1.0)

    def finish(self) -> Weights:
        n = self._dx.count
        if n == 0:
            return {k: w.copy() for k, w in self._global.items()}
        dx, dc = self._dx.mean(), self._dc.mean()
        for k, c in self._c.items():
            c += (n / self.num_clients) * dc[k]
        return apply_step(self._global, {k: self.server_lr * d for k, d in dx.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"c": export_tensors(self._c)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._c = import_tensors(state, "c", "SCAFFOLD")
