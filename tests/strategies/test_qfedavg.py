"""q-FedAvg against Algorithm 2 of Li et al. 2020."""

from __future__ import annotations

import numpy as np
import pytest
from strategy_testkit import assert_sync_resume_identical, run_round, small_model, upd

from strategies import FedAvg, QFedAvg, StrategyError, make_strategy


def with_loss(sender: str, delta: dict[str, np.ndarray], loss: float, n: int = 1):
    u = upd(sender, delta, n)
    return type(u)(sender=u.sender, delta=u.delta, num_examples=u.num_examples,
                   metrics={"train_loss": loss})


def rounds(model, num_rounds: int = 3, clients: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [[with_loss(f"c{i}", {k: rng.normal(0, 0.1, v.shape) for k, v in model.items()},
                       float(rng.uniform(0.1, 3.0)), int(rng.integers(1, 20)))
             for i in range(clients)] for _ in range(num_rounds)]


def reference(model, ups, q: float, lr: float):
    """The paper's server step, coordinate by coordinate in Python floats."""
    lip = 1.0 / lr
    out = {}
    hs = []
    for u in ups:
        f = u.metrics["train_loss"] + 1e-10
        sq = sum(float(x) ** 2 for k in model for x in (-lip * u.delta[k]).ravel())
        hs.append(q * f ** (q - 1) * sq + lip * f ** q)
    for k, w in model.items():
        flat = []
        for i, x in enumerate(w.ravel()):
            num = sum((u.metrics["train_loss"] + 1e-10) ** q * (-lip * float(u.delta[k].ravel()[i]))
                      for u in ups)
            flat.append(float(x) - num / sum(hs))
        out[k] = np.array(flat).reshape(w.shape)
    return out


@pytest.mark.parametrize("q", [0.0, 0.2, 1.0, 5.0])
def test_step_matches_the_paper(q: float) -> None:
    model = small_model()
    ups = rounds(model, 1)[0]
    got = run_round(QFedAvg(q=q, learning_rate=0.05), model, 1, ups)
    want = reference(model, ups, q, 0.05)
    for k in model:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-12)


def test_q_zero_is_unweighted_fedavg() -> None:
    model = small_model()
    ups = rounds(model, 1)[0]
    got = run_round(QFedAvg(q=0.0), model, 1, ups)
    want = run_round(FedAvg(weighted=False), model, 1, ups)
    for k in model:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-15)


def test_larger_q_leans_towards_the_high_loss_client() -> None:
    model = {"w": np.zeros(2)}
    ups = [with_loss("easy", {"w": np.array([0.1, 0.0])}, 0.1),
           with_loss("hard", {"w": np.array([0.0, 0.1])}, 2.0)]
    fair = run_round(QFedAvg(q=5.0), model, 1, ups)["w"]
    plain = run_round(QFedAvg(q=0.0), model, 1, ups)["w"]
    assert fair[1] / fair[0] > 100 * (plain[1] / plain[0])


def test_refuses_updates_without_a_loss_and_bad_params() -> None:
    s = QFedAvg()
    s.begin(small_model(), 1)
    with pytest.raises(StrategyError, match="train_loss"):
        s.accumulate(upd("c", {k: np.zeros_like(v) for k, v in small_model().items()}))
    with pytest.raises(StrategyError):
        make_strategy("qfedavg", {"q": -1})
    with pytest.raises(StrategyError):
        make_strategy("qfedavg", {"learning_rate": 0})


def test_stateless_resume() -> None:
    model = small_model()
    assert_sync_resume_identical(lambda: QFedAvg(q=0.5), model, rounds(model, 4), 2)
