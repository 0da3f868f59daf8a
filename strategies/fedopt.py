"""FedAdagrad, FedAdam and FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization",
ICLR, Algorithm 2): an adaptive optimizer on the server over the round's mean delta.

With Δ_t the mean client delta of round t (the pseudo-gradient, already pointing downhill
since fedbus deltas are local - global), per coordinate and with all operations elementwise:

    m_t = beta1 * m_{t-1} + (1 - beta1) * Δ_t
    v_t = v_{t-1} + Δ_t²                                               (FedAdagrad)
    v_t = beta2 * v_{t-1} + (1 - beta2) * Δ_t²                         (FedAdam)
    v_t = v_{t-1} - (1 - beta2) * Δ_t² * sign(v_{t-1} - Δ_t²)          (FedYogi)
    x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)

Initial state, as Algorithm 2 states its input: m_{-1} = 0 and v_{-1} >= tau²; this module
uses v_{-1} = tau² (``initial_v=None``). Pass ``initial_v=0.0`` to match implementations that
start v at zero. By default there is no bias correction (no 1/(1 - beta^t) factors): the paper
omits it. ``bias_correction=True`` (FedAdam, FedYogi) applies Adam's correction in the step
size form of Kingma and Ba (2015, Sec. 2):

    eta_t = eta * sqrt(1 - beta2^t) / (1 - beta1^t),   t = rounds with updates so far (1, 2, ...)

(``bias_offset`` adds to t: Flower 1.42's FedAdam uses its server round + 1, so 1 there.)

which shrinks the first steps that zero-initialised moments would otherwise make too large.
The paper's Δ_t is the unweighted mean (1/|S|) Σ Δ_i; the default
here weights by ``num_examples`` like the rest of the FedAvg family, ``weighted=False`` is the
literal Algorithm 2.

A round with no (or only zero-weight) updates leaves the model, m and v untouched.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from strategies._server_state import (
    MeanDeltaStep,
    check_same_layout,
    export_tensors,
    import_tensors,
    zeros_f64,
)
from strategies.base import StrategyError, Weights, positive_number

__all__ = ["FedAdagrad", "FedAdam", "FedOpt", "FedYogi"]


class FedOpt(MeanDeltaStep):
    """Shared machinery of Algorithm 2; subclasses define the second-moment update.

    Args:
        eta: server learning rate.
        eta_l: client learning rate; sent to trainers as ``{"lr": eta_l}`` only when given.
        beta1: first-moment decay in [0, 1).
        beta2: second-moment decay in [0, 1) (unused by FedAdagrad).
        tau: adaptivity / numerical floor > 0.
        initial_v: v_{-1}; ``None`` means tau² (Algorithm 2 requires v_{-1} >= tau²).
        weighted: weight the pseudo-gradient by ``num_examples`` (True) or equally.
        bias_correction: Adam's bias-corrected step size (not for FedAdagrad).
        bias_offset: added to t in the correction's exponents. Flower 1.42's FedAdam uses
            the server round + 1 there (its first round is corrected as Adam's second step):
            ``bias_correction: true, bias_offset: 1, initial_v: 0`` reproduces it.
    """

    def __init__(self, eta: float = 1e-2, eta_l: float | None = None, beta1: float = 0.9,
                 beta2: float = 0.99, tau: float = 1e-3, initial_v: float | None = None,
                 weighted: bool = True, bias_correction: bool = False,
                 bias_offset: int = 0) -> None:
        self.eta = positive_number("eta", eta)
        if eta_l is not None and not (np.isfinite(eta_l) and eta_l > 0):
            raise StrategyError(f"eta_l must be a finite number > 0 or omitted, got {eta_l}")
        for label, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= beta < 1:
                raise StrategyError(f"{label} must be in [0, 1), got {beta}")
        self.tau = positive_number("tau", tau)
        if initial_v is not None and not (np.isfinite(initial_v) and initial_v >= 0):
            raise StrategyError(f"initial_v must be a finite number >= 0, got {initial_v}")
        self.eta_l = None if eta_l is None else float(eta_l)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.initial_v = self.tau**2 if initial_v is None else float(initial_v)
        self.bias_correction = bool(bias_correction)
        if isinstance(bias_offset, bool) or not isinstance(bias_offset, int) or bias_offset < 0:
            raise StrategyError(f"bias_offset must be a whole number >= 0, got {bias_offset!r}")
        self.bias_offset = bias_offset
        if self.bias_correction and not self._has_beta2:
            raise StrategyError(f"{type(self).__name__} has no second-moment decay to correct "
                                "for; bias_correction is for fedadam and fedyogi")
        super().__init__(weighted)
        self._steps = 0
        self._m: dict[str, np.ndarray] = {}
        self._v: dict[str, np.ndarray] = {}

    def client_config(self, round: int) -> dict[str, Any]:
        return {} if self.eta_l is None else {"lr": self.eta_l}

    def _ready_state(self, weights: Weights) -> None:
        if not self._m:
            self._m = zeros_f64(weights)
            self._v = {k: np.full(w.shape, self.initial_v, dtype=np.float64)
                       for k, w in weights.items()}
        check_same_layout(weights, self._m, f"{type(self).__name__} first moment")
        check_same_layout(weights, self._v, f"{type(self).__name__} second moment")

    def _step(self, delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._steps += 1
        eta = self.eta
        if self.bias_correction:
            t = self._steps + self.bias_offset
            eta *= np.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t)
        step: dict[str, np.ndarray] = {}
        for k, d in delta.items():
            m, v = self._m[k], self._v[k]
            m *= self.beta1
            m += (1.0 - self.beta1) * d
            self._update_v(v, d * d)
            step[k] = eta * m / (np.sqrt(v) + self.tau)
        return step

    #: Whether the second moment decays with beta2 (Adam, Yogi), so bias correction applies.
    _has_beta2: ClassVar[bool] = True

    @abstractmethod
    def _update_v(self, v: np.ndarray, d2: np.ndarray) -> None:
        """Update the second moment ``v`` in place from the squared pseudo-gradient."""

    def state_dict(self) -> dict[str, Any]:
        return {"m": export_tensors(self._m), "v": export_tensors(self._v), "t": self._steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        owner = type(self).__name__
        m, v = import_tensors(state, "m", owner), import_tensors(state, "v", owner)
        check_same_layout(m, v, f"{owner} second moment (against the first moment)")
        self._m, self._v = m, v
        self._steps = int(state.get("t", 0))  # checkpoints from before bias correction: 0


class FedAdagrad(FedOpt):
    """FedAdagrad: v_t = v_{t-1} + Δ_t² (``beta2`` is ignored)."""

    name: ClassVar[str] = "fedadagrad"
    _has_beta2: ClassVar[bool] = False

    def _update_v(self, v: np.ndarray, d2: np.ndarray) -> None:
        v += d2


class FedAdam(FedOpt):
    """FedAdam: v_t = beta2 v_{t-1} + (1 - beta2) Δ_t², without bias correction."""

    name: ClassVar[str] = "fedadam"

    def _update_v(self, v: np.ndarray, d2: np.ndarray) -> None:
        v *= self.beta2
        v += (1.0 - self.beta2) * d2


class FedYogi(FedOpt):
    """FedYogi: v_t = v_{t-1} - (1 - beta2) Δ_t² sign(v_{t-1} - Δ_t²)."""

    name: ClassVar[str] = "fedyogi"

    def _update_v(self, v: np.ndarray, d2: np.ndarray) -> None:
        v -= (1.0 - self.beta2) * d2 * np.sign(v - d2)
