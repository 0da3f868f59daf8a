"""Differential privacy for any synchronous strategy, by composition: the wrappers clip each
update before the wrapped strategy sees it and add Gaussian noise to the model change it returns.

Server-side formulation (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models", DP-FedAvg with a fixed denominator):

    delta_i' = delta_i * min(1, C / ||delta_i||_2)          (norm over all float tensors)
    w_{t+1}  = w_t + A(delta_1', ..., delta_m') + N(0, (sigma * C / m)^2 I)

where A is the wrapped strategy's model change and m is ``num_sampled_clients`` (when given)
or the number of updates received. The wrappers forward every clipped update with
``num_examples = 1``: the sensitivity C/m of the mean holds only for *unweighted* averaging,
so DP here is unweighted on purpose. The guarantee is exact when A is a mean of the clipped
deltas (FedAvg, FedProx). For server optimizers (FedAvgM, FedOpt) the noise lands after the
optimizer and the optimizer's state sees un-noised means; for robust aggregators the median's
sensitivity is not C/m. Use client-side DP (:func:`clip_and_noise`) for those.

Only floating-point tensors are clipped and noised; integer/bool tensors (e.g. BatchNorm's
``num_batches_tracked``) pass through unprotected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from strategies.base import (
    ClientUpdate,
    Strategy,
    StrategyError,
    Weights,
    rng_from_state,
    rng_state,
)
from strategies.registry import make_strategy

__all__ = ["DPAdaptiveClipping", "DPClientSide", "DPFixedClipping", "clip_and_noise", "l2_norm"]


def l2_norm(delta: Mapping[str, np.ndarray]) -> float:
    """L2 norm of all floating-point tensors of ``delta`` taken together, in float64."""
    total = 0.0
    for v in delta.values():
        if v.dtype.kind == "f":
            total += float(np.sum(np.square(v, dtype=np.float64)))
    return math.sqrt(total)


def _clip(delta: Mapping[str, np.ndarray], clipping_norm: float) -> tuple[Weights, float, float]:
    """Scale the float tensors so the joint L2 norm is at most ``clipping_norm``.
    Returns (clipped float64 delta, norm before clipping, scale applied)."""
    norm = l2_norm(delta)
    scale = 1.0 if norm <= clipping_norm else clipping_norm / norm
    out = {k: (np.asarray(v, dtype=np.float64) * scale if v.dtype.kind == "f" else v)
           for k, v in delta.items()}
    return out, norm, scale


def _add_noise(tensors: Weights, std: float, rng: np.random.Generator) -> None:
    """In place, float tensors only, in sorted-name order so the draw is reproducible."""
    if std <= 0:
        return
    for k in sorted(tensors):
        v = tensors[k]
        if v.dtype.kind == "f":
            tensors[k] = v + rng.normal(0.0, std, size=v.shape)


def clip_and_noise(
    delta: Mapping[str, np.ndarray],
    clipping_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> tuple[Weights, dict[str, Any]]:
    """Client-side (local) DP for one update, applied by the trainer before sending.

    Scales the floating-point tensors of ``delta`` so their joint L2 norm is at most
    ``clipping_norm`` (C), then adds independent N(0, (noise_multiplier * C)^2) to every float
    coordinate: the Gaussian mechanism with sensitivity C on one client's update. Integer and
    bool tensors are returned unchanged. ``delta`` is not modified; the result has the input's
    names, shapes and dtypes. ``rng`` is advanced (draws in sorted tensor-name order).

    Returns ``(noised_delta, report)`` where report has ``norm`` (before clipping),
    ``clipped`` (bool), ``scale``, ``clipping_norm``, ``noise_multiplier`` and ``noise_stddev``.
    """
    c, z = _check_clip(clipping_norm), _check_noise(noise_multiplier)
    clipped, norm, scale = _clip(delta, c)
    _add_noise(clipped, z * c, rng)
    out = {k: np.asarray(clipped[k]).astype(v.dtype, copy=False) for k, v in delta.items()}
    report = {"norm": norm, "clipped": scale < 1.0, "scale": scale, "clipping_norm": c,
              "noise_multiplier": z, "noise_stddev": z * c}
    return out, report


def _check_clip(c: float) -> float:
    if not (math.isfinite(c) and c > 0):
        raise StrategyError(f"clipping_norm must be finite and > 0, got {c}")
    return float(c)


def _check_noise(z: float) -> float:
    if not (math.isfinite(z) and z >= 0):
        raise StrategyError(f"noise_multiplier must be finite and >= 0, got {z}")
    return float(z)


def _as_strategy(strategy: Strategy | Mapping[str, Any]) -> Strategy:
    if isinstance(strategy, Mapping):
        extra = sorted(set(strategy) - {"name", "params"})
        if "name" not in strategy or extra:
            raise StrategyError(f"wrapped strategy must be {{name, params}}; got keys "
                                f"{sorted(strategy)}")
        built = make_strategy(str(strategy["name"]), strategy.get("params") or {})
        if not isinstance(built, Strategy):
            raise StrategyError(f"DP wrappers need a synchronous Strategy, got "
                                f"{type(built).__name__} for {strategy['name']!r}")
        return built
    if not isinstance(strategy, Strategy):
        raise StrategyError(f"DP wrappers need a synchronous Strategy, got "
                            f"{type(strategy).__name__}")
    return strategy


class _DPWrapper(Strategy):
    """Clip in ``accumulate``, noise in ``finish``; subclasses choose C and update it."""

    def __init__(self, strategy: Strategy | Mapping[str, Any], noise_multiplier: float,
                 num_sampled_clients: int | None, seed: int) -> None:
        self.strategy = _as_strategy(strategy)
        self.noise_multiplier = _check_noise(noise_multiplier)
        if num_sampled_clients is not None and int(num_sampled_clients) < 1:
            raise StrategyError(f"num_sampled_clients must be >= 1 or None, "
                                f"got {num_sampled_clients}")
        self.num_sampled_clients = None if num_sampled_clients is None \
            else int(num_sampled_clients)
        self._rng = np.random.default_rng(seed)
        self._global: Weights = {}
        self._round = 0
        self._count = 0
        self._unclipped = 0
        self.last_report: dict[str, Any] = {}
        # The aggregator reads these from the instance: mirror the wrapped strategy's.
        self.needs_all_updates = self.strategy.needs_all_updates  # type: ignore[misc]
        self.aux_models = self.strategy.aux_models  # type: ignore[misc]
        self.client_aux_models = self.strategy.client_aux_models  # type: ignore[misc]
        if hasattr(self.strategy, "max_updates"):
            self.max_updates = int(self.strategy.max_updates)

    @property
    def clipping_norm(self) -> float:
        raise NotImplementedError

    @property
    def num_accumulated(self) -> int:
        return self._count

    def report(self) -> dict[str, Any]:
        return dict(self.last_report)

    def client_config(self, round: int) -> dict[str, Any]:
        return self.strategy.client_config(round)

    def client_tensors(self, round: int) -> Weights:
        return self.strategy.client_tensors(round)

    def begin(self, weights: Weights, round: int) -> None:
        self._global = weights
        self._round = int(round)
        self._count = 0
        self._unclipped = 0
        self.strategy.begin(weights, round)

    def accumulate(self, update: ClientUpdate) -> None:
        clipped, norm, scale = _clip(update.delta, self.clipping_norm)
        if not math.isfinite(norm):
            raise StrategyError(f"update from {update.sender!r} has non-finite values")
        self.strategy.accumulate(ClientUpdate(
            sender=update.sender, delta=clipped, num_examples=1, base_round=update.base_round,
            staleness=update.staleness, metrics=update.metrics, aux=update.aux))
        self._count += 1
        self._unclipped += int(scale == 1.0)

    def _finish(self, model_noise_multiplier: float) -> tuple[Weights, dict[str, Any]]:
        new = self.strategy.finish()
        m = self.num_sampled_clients or self._count
        c = self.clipping_norm
        std = model_noise_multiplier * c / m if m else 0.0
        change = {k: np.asarray(new[k], dtype=np.float64) - w for k, w in self._global.items()
                  if w.dtype.kind == "f"}
        _add_noise(change, std, self._rng)
        out = {k: ((w + change[k]).astype(w.dtype) if k in change else new[k])
               for k, w in self._global.items()}
        report = {"round": self._round, "num_updates": self._count,
                  "num_clipped": self._count - self._unclipped, "denominator": m,
                  "clipping_norm": c, "noise_multiplier": model_noise_multiplier,
                  "noise_stddev": std}
        return out, report

    def state_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy.state_dict(), "rng": rng_state(self._rng),
                "last_report": dict(self.last_report)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.strategy.load_state_dict(state.get("strategy", {}))
        self._rng = rng_from_state(state["rng"])
        self.last_report = dict(state.get("last_report", {}))


class DPFixedClipping(_DPWrapper):
    """Server-side DP with a fixed clipping norm (McMahan et al. 2018, DP-FedAvg): clip every
    delta to L2 norm ``clipping_norm``, aggregate with the wrapped strategy (unweighted), add
    N(0, (noise_multiplier * clipping_norm / m)^2) to the model change.

    Args:
        strategy: the wrapped Strategy, or ``{"name": ..., "params": {...}}`` from a manifest.
        noise_multiplier: sigma, noise std in units of the per-client sensitivity.
        clipping_norm: C, the L2 bound on each update's delta.
        num_sampled_clients: m for the noise std sigma*C/m; ``None`` uses updates received.
        seed: seed of the noise RNG (its state is in ``state_dict``).

    ``last_report`` (also in ``state_dict``) gives the round's noise multiplier, clip, noise
    std, denominator and how many updates were clipped.
    """

    name: ClassVar[str] = "dp_fixed"

    def __init__(self, strategy: Strategy | Mapping[str, Any], noise_multiplier: float,
                 clipping_norm: float, num_sampled_clients: int | None = None,
                 seed: int = 0) -> None:
        super().__init__(strategy, noise_multiplier, num_sampled_clients, seed)
        self._clip = _check_clip(clipping_norm)

    @property
    def clipping_norm(self) -> float:
        return self._clip

    def finish(self) -> Weights:
        out, self.last_report = self._finish(self.noise_multiplier)
        return out


class DPAdaptiveClipping(_DPWrapper):
    """Server-side DP with an adaptive clipping norm (Andrew et al. 2021, "Differentially
    Private Learning with Adaptive Clipping", Algorithm 1).

    Each round, with b_i = 1[||delta_i|| <= C] and m the denominator:

        b      = (sum_i b_i + N(0, clipped_count_stddev^2)) / m       (noised unclipped share)
        C_next = C * exp(-clip_norm_lr * (b - target_clipped_quantile))   (geometric update)

    The privacy budget ``noise_multiplier`` (z) is split between the count and the model
    (Sec. 3.1): the model gets z_delta = (z^-2 - (2 * clipped_count_stddev)^-2)^-1/2, which needs
    2 * clipped_count_stddev > z. ``clipped_count_stddev`` defaults to m / 20 (the paper's
    suggestion). With neither it nor ``num_sampled_clients`` given, m is the number of updates
    received, and a round with too few of them for that split raises ``StrategyError``.

    Args:
        strategy: the wrapped Strategy, or ``{"name": ..., "params": {...}}``.
        noise_multiplier: z, the total noise multiplier.
        initial_clipping_norm: C at round one.
        target_clipped_quantile: gamma, the share of updates that should be left unclipped.
        clip_norm_lr: eta_C, the geometric step size.
        clipped_count_stddev: sigma_b; ``None`` means m / 20.
        num_sampled_clients: m; ``None`` uses updates received.
        seed: seed of the noise RNG.
    """

    name: ClassVar[str] = "dp_adaptive"

    def __init__(self, strategy: Strategy | Mapping[str, Any], noise_multiplier: float,
                 num_sampled_clients: int | None = None, initial_clipping_norm: float = 0.1,
                 target_clipped_quantile: float = 0.5, clip_norm_lr: float = 0.2,
                 clipped_count_stddev: float | None = None, seed: int = 0) -> None:
        super().__init__(strategy, noise_multiplier, num_sampled_clients, seed)
        self._clip = _check_clip(initial_clipping_norm)
        if not 0 <= target_clipped_quantile <= 1:
            raise StrategyError(f"target_clipped_quantile must be in [0, 1], "
                                f"got {target_clipped_quantile}")
        if not (math.isfinite(clip_norm_lr) and clip_norm_lr > 0):
            raise StrategyError(f"clip_norm_lr must be > 0, got {clip_norm_lr}")
        if clipped_count_stddev is not None and not clipped_count_stddev >= 0:
            raise StrategyError(f"clipped_count_stddev must be >= 0, got {clipped_count_stddev}")
        self.target_clipped_quantile = float(target_clipped_quantile)
        self.clip_norm_lr = float(clip_norm_lr)
        self.clipped_count_stddev = clipped_count_stddev
        if self.num_sampled_clients is not None or clipped_count_stddev is not None:
            # Fail at construction, not mid-run, whenever sigma_b is already known.
            self._split(self.num_sampled_clients or 1)

    @property
    def clipping_norm(self) -> float:
        return self._clip

    def _split(self, m: int) -> tuple[float, float]:
        """(model noise multiplier, count stddev) for a denominator of m."""
        sigma_b = m / 20.0 if self.clipped_count_stddev is None \
            else float(self.clipped_count_stddev)
        z = self.noise_multiplier
        if z == 0:
            return 0.0, sigma_b
        if 2 * sigma_b <= z:
            raise StrategyError(
                f"dp_adaptive: noise_multiplier={z} needs 2*clipped_count_stddev > z, but "
                f"clipped_count_stddev={sigma_b} (m={m}); set clipped_count_stddev above {z / 2}")
        return (z ** -2 - (2 * sigma_b) ** -2) ** -0.5, sigma_b

    def finish(self) -> Weights:
        m = self.num_sampled_clients or self._count
        if m == 0:
            out, self.last_report = self._finish(0.0)
            self.last_report["next_clipping_norm"] = self._clip
            return out
        z_delta, sigma_b = self._split(m)
        out, report = self._finish(z_delta)
        noisy_count = self._unclipped + (float(self._rng.normal(0.0, sigma_b)) if sigma_b else 0.0)
        unclipped_share = noisy_count / m
        step = unclipped_share - self.target_clipped_quantile
        self._clip *= math.exp(-self.clip_norm_lr * step)
        report.update({"clipped_count_stddev": sigma_b, "unclipped_fraction": unclipped_share,
                       "next_clipping_norm": self._clip, "total_noise_multiplier":
                       self.noise_multiplier})
        self.last_report = report
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "clipping_norm": self._clip}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._clip = float(state["clipping_norm"])


class DPClientSide(Strategy):
    """Local DP: every trainer clips its delta to ``clipping_norm`` and adds its own Gaussian
    noise N(0, (noise_multiplier * C)^2) before sending (``clip_and_noise``), so the server
    never sees an un-noised update. The server side is the wrapped strategy, unchanged.

    The trainer reads ``dp_clipping_norm`` and ``dp_noise_multiplier`` from the round's
    config and reports ``dp_clipped`` / ``dp_noise_multiplier`` in its update metrics.
    """

    name: ClassVar[str] = "dp_client"

    def __init__(self, strategy: Strategy | Mapping[str, Any], noise_multiplier: float,
                 clipping_norm: float) -> None:
        self.strategy = _as_strategy(strategy)
        self.noise_multiplier = _check_noise(noise_multiplier)
        self.clipping_norm = _check_clip(clipping_norm)
        self.needs_all_updates = self.strategy.needs_all_updates  # type: ignore[misc]
        self.aux_models = self.strategy.aux_models  # type: ignore[misc]
        self.client_aux_models = self.strategy.client_aux_models  # type: ignore[misc]

    @property
    def num_accumulated(self) -> int:
        return self.strategy.num_accumulated

    def report(self) -> dict[str, Any]:
        return self.strategy.report()

    def client_config(self, round: int) -> dict[str, Any]:
        return {**self.strategy.client_config(round), "dp_clipping_norm": self.clipping_norm,
                "dp_noise_multiplier": self.noise_multiplier}

    def client_tensors(self, round: int) -> Weights:
        return self.strategy.client_tensors(round)

    def begin(self, weights: Weights, round: int) -> None:
        self.strategy.begin(weights, round)

    def accumulate(self, update: ClientUpdate) -> None:
        self.strategy.accumulate(update)

    def finish(self) -> Weights:
        return self.strategy.finish()

    def state_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.strategy.load_state_dict(state.get("strategy", {}))
