"""A PyTorch adapter for the Task protocol, with the client halves of FedProx, FedDyn, SCAFFOLD.

Imported only by trainers (needs the 'trainer' extra). Training is deterministic given the
seed, the partition and the round: batches come from a numpy RNG seeded from those, never from
torch's global RNG, which several trainers in one process would share.

Client-side contracts (keys come from the strategy's ``client_config`` / ``client_tensors``):
  ``lr``             overrides the local learning rate (FedOpt's eta_l)
  ``proximal_mu``    FedProx: adds (mu/2)||w - w_global||^2 to the loss
  ``feddyn_alpha``   FedDyn: adds -<g_k, w> + (alpha/2)||w - w_global||^2 and keeps g_k
  ``scaffold.c/<p>`` SCAFFOLD (option II): corrects each step by (c - c_k); returns
                     ``scaffold.dc/<p>`` = c_k+ - c_k in ``FitResult.aux``
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from fedbus.task import EvalResult, FitResult

__all__ = ["TorchTask"]

_SCAFFOLD_C = "scaffold.c/"
_SCAFFOLD_DC = "scaffold.dc/"


class TorchTask:
    """Supervised classification/regression on in-memory tensors.

    Args:
        model: the network; its ``state_dict`` names are the wire names.
        train: (x, y) tensors of this client's partition (may be empty on the aggregator).
        test: (x, y) tensors used by ``evaluate``.
        loss_fn: e.g. ``nn.CrossEntropyLoss()``.
        epochs, lr, batch_size, momentum, weight_decay: local SGD settings.
        seed, partition: make batch order reproducible.
    """

    def __init__(
        self,
        model: nn.Module,
        train: tuple[torch.Tensor, torch.Tensor],
        test: tuple[torch.Tensor, torch.Tensor],
        *,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        epochs: int = 1,
        lr: float = 0.05,
        batch_size: int = 32,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        seed: int = 0,
        partition: int | None = None,
    ) -> None:
        self.model = model
        self.train_x, self.train_y = train
        self.test_x, self.test_y = test
        self.loss_fn = loss_fn or nn.CrossEntropyLoss()
        self.epochs = int(epochs)
        self.lr = float(lr)
        self.batch_size = int(batch_size)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.seed = int(seed)
        self.partition = -1 if partition is None else int(partition)
        self._lock = threading.Lock()
        # Client state that persists across rounds (FedDyn's gradient, SCAFFOLD's c_k).
        self._feddyn_grad: dict[str, torch.Tensor] = {}
        self._scaffold_c: dict[str, torch.Tensor] = {}

    # --- weights -------------------------------------------------------------------------
    def get_weights(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        state = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in weights.items()}
        self.model.load_state_dict(state, strict=True)

    # --- client state (simulation: one task object serves many virtual clients) -----------
    def client_state(self) -> dict[str, np.ndarray]:
        """FedDyn's gradient and SCAFFOLD's c_k as named arrays, for a client-state store."""
        with self._lock:
            out = {"feddyn/" + k: v.numpy().copy() for k, v in self._feddyn_grad.items()}
            out.update({"scaffold/" + k: v.numpy().copy() for k, v in self._scaffold_c.items()})
            return out

    def load_client_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the client state (empty: a client that never trained)."""
        with self._lock:
            self._feddyn_grad = {k[len("feddyn/"):]: torch.from_numpy(np.array(v, copy=True))
                                 for k, v in state.items() if k.startswith("feddyn/")}
            self._scaffold_c = {k[len("scaffold/"):]: torch.from_numpy(np.array(v, copy=True))
                                for k, v in state.items() if k.startswith("scaffold/")}

    # --- training ------------------------------------------------------------------------
    def fit(self, config: Mapping[str, Any], extra: Mapping[str, np.ndarray]) -> FitResult:
        with self._lock:
            return self._fit(config, extra)

    def _fit(self, config: Mapping[str, Any], extra: Mapping[str, np.ndarray]) -> FitResult:
        n = int(self.train_x.shape[0])
        if n == 0:
            return FitResult(num_examples=0, metrics={"loss": float("nan")})
        lr = float(config.get("lr", self.lr))
        epochs = int(config.get("epochs", self.epochs))
        mu = float(config.get("proximal_mu", 0.0))
        alpha = float(config.get("feddyn_alpha", 0.0))
        round_ = int(config.get("round", 0))
        params = dict(self.model.named_parameters())
        global_params = {k: p.detach().clone() for k, p in params.items()}
        c_server = {k[len(_SCAFFOLD_C) :]: torch.from_numpy(np.array(v, copy=True))
                    for k, v in extra.items() if k.startswith(_SCAFFOLD_C)}
        use_scaffold = bool(c_server)
        if use_scaffold:
            for k, p in params.items():
                self._scaffold_c.setdefault(k, torch.zeros_like(p))
        if alpha > 0:
            for k, p in params.items():
                self._feddyn_grad.setdefault(k, torch.zeros_like(p))

        opt = torch.optim.SGD(
            self.model.parameters(), lr=lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        rng = np.random.default_rng([self.seed, self.partition + 1, round_])
        self.model.train()
        total_loss, steps, seen = 0.0, 0, 0
        for _ in range(epochs):
            order = torch.from_numpy(rng.permutation(n))
            for start in range(0, n, self.batch_size):
                idx = order[start : start + self.batch_size]
                xb, yb = self.train_x[idx], self.train_y[idx]
                opt.zero_grad(set_to_none=True)
                loss = self.loss_fn(self.model(xb), yb)
                data_loss = float(loss.detach())
                if mu > 0:
                    loss = loss + (mu / 2) * sum(
                        ((p - global_params[k]) ** 2).sum() for k, p in params.items()
                    )
                if alpha > 0:
                    for k, p in params.items():
                        loss = loss - (self._feddyn_grad[k] * p).sum()
                        loss = loss + (alpha / 2) * ((p - global_params[k]) ** 2).sum()
                loss.backward()  # type: ignore[no-untyped-call]
                if use_scaffold:
                    with torch.no_grad():
                        for k, p in params.items():
                            if p.grad is not None:
                                p.grad.add_(c_server[k] - self._scaffold_c[k])
                opt.step()
                total_loss += data_loss * len(idx)
                seen += len(idx)
                steps += 1
        aux: dict[str, np.ndarray] = {}
        with torch.no_grad():
            if alpha > 0:
                for k, p in params.items():
                    self._feddyn_grad[k] -= alpha * (p.detach() - global_params[k])
            if use_scaffold:
                for k, p in params.items():
                    # Option II: c_k+ = c_k - c + (x - y) / (K * lr)
                    new_c = self._scaffold_c[k] - c_server[k] + (
                        global_params[k] - p.detach()
                    ) / (steps * lr)
                    aux[_SCAFFOLD_DC + k] = (new_c - self._scaffold_c[k]).numpy().copy()
                    self._scaffold_c[k] = new_c
        return FitResult(num_examples=n, metrics={"train_loss": total_loss / max(seen, 1)},
                         aux=aux)

    # --- evaluation ----------------------------------------------------------------------
    def evaluate(self) -> EvalResult:
        with self._lock, torch.no_grad():
            self.model.eval()
            n = int(self.test_x.shape[0])
            if n == 0:
                return EvalResult(num_examples=0, loss=float("nan"))
            out = self.model(self.test_x)
            loss = float(self.loss_fn(out, self.test_y))
            metrics: dict[str, float] = {}
            if out.ndim == 2 and self.test_y.dtype in (torch.int64, torch.int32):
                metrics["accuracy"] = float((out.argmax(dim=1) == self.test_y).float().mean())
            return EvalResult(num_examples=n, loss=loss, metrics=metrics)
