"""SPO as published (issue 13 item 5): rho(x) = 2^(-D(x)/0.06) with D(x) the drift of the policy on prompt x SINCE
x's PREVIOUS VISIT, measured on the response kept at that visit (the SPO authors' verl recipe). Driven through the
algorithm pipeline over three steps and checked against values worked by hand, then checkpointed and restored."""

from __future__ import annotations

import pytest
import torch

from mssr_megatron.algorithms.forgetting import SPORho
from mssr_megatron.algorithms.pipeline import RLAlgorithm
from mssr_megatron.config import AlgorithmConfig, BaselineConfig

SPO = AlgorithmConfig(baseline=BaselineConfig(rho_rule="spo"))


def _row(values, width=3, fill=0.0):
    return values + [fill] * (width - len(values))


def _step(algo, prompts, responses, new, now_on_previous):
    """One after_update as the trainer drives it: this step's responses (token lists), the updated policy's log-probs
    on them (`new`), and on each prompt's previous response (`now_on_previous`, per row; its own where none)."""
    previous = algo.previous_responses(prompts)
    mask = torch.tensor([_row([1] * len(r)) for r in responses], dtype=torch.bool)
    ids = torch.tensor([_row(r, fill=0) for r in responses])
    prev_mask = torch.tensor([_row([1] * len(p if p is not None else r)) for p, r in zip(previous, responses)],
                             dtype=torch.bool)
    metrics = algo.after_update(prompts, torch.tensor([1.0, 0.0]), mask, response_ids=ids,
                                new_logprobs=torch.tensor([_row(v) for v in new], dtype=torch.float64),
                                previous_logprobs=torch.tensor([_row(v) for v in now_on_previous],
                                                               dtype=torch.float64),
                                previous_mask=prev_mask)
    return previous, algo.last_rho, metrics


def test_two_visit_drift_matches_hand_worked():
    algo = RLAlgorithm(SPO)
    # step 1: x and y are new. Nothing is stored: D = 0, rho = 2^0 = 1 -> clipped to rho_max 0.96.
    previous, rho, _ = _step(algo, ["x", "y"], [[5, 6], [7, 8, 9]], new=[[-1.0, -2.0], [-0.5, -0.25, -1.5]],
                             now_on_previous=[[-1.0, -2.0], [-0.5, -0.25, -1.5]])
    assert previous == [None, None]
    assert rho.tolist() == [0.96, 0.96]
    # step 2: y comes back (z is new). Its response of step 1, [7, 8, 9], kept with log-probs [-0.5, -0.25, -1.5]
    # (the policy after step 1's update), is scored by the policy after step 2's update: [-0.497, -0.259, -1.494].
    # D(y) = (0.003 + 0.009 + 0.006) / 3 = 0.006 -> rho = 2^(-0.006 / 0.06) = 2^-0.1 = 0.9330329915368074.
    previous, rho, metrics = _step(algo, ["y", "z"], [[3], [4, 4]], new=[[-0.75], [-0.125, -2.0]],
                                   now_on_previous=[[-0.497, -0.259, -1.494], [-0.125, -2.0]])
    assert previous == [[7, 8, 9], None]
    assert rho.tolist() == pytest.approx([0.9330329915368074, 0.96], abs=1e-12)
    assert metrics["tracker/spo_drift_mean"] == pytest.approx(0.003, abs=1e-12)
    # the tracker used it: y had a = b = 4 (prior, N0 = 8); step 1 (r = 0 for row 1): a = 3.84, b = 4.84;
    # step 2 (r = 1 for row 0): a = 0.9330329915368074 * 3.84 + 1, b = 0.9330329915368074 * 4.84
    a, b = algo.tracker.params(["y"])
    assert (float(a[0]), float(b[0])) == pytest.approx((4.582846687501340, 4.515879679038148), abs=1e-12)
    # step 3: x comes back after two updates; its step-1 response [5, 6] ([-1, -2] then) now scores
    # [-1.0036, -1.9964]: D = 0.0036 -> rho = 2^-0.06 = 0.9592641193252643. y's kept response is now step 2's, [3].
    previous, rho, _ = _step(algo, ["x", "y"], [[1, 2], [3]], new=[[-0.1, -0.2], [-0.75]],
                             now_on_previous=[[-1.0036, -1.9964], [-0.7]])
    assert previous == [[5, 6], [3]]
    # y: |-0.75 - (-0.7)| = 0.05 -> 2^(-0.05/0.06) = 0.5612310241546865 -> clipped to rho_min 0.875
    assert rho.tolist() == pytest.approx([0.9592641193252643, 0.875], abs=1e-12)


def test_kept_responses_survive_a_checkpoint():
    algo = RLAlgorithm(SPO)
    _step(algo, ["x", "y"], [[5, 6], [7, 8, 9]], new=[[-1.0, -2.0], [-0.5, -0.25, -1.5]],
          now_on_previous=[[-1.0, -2.0], [-0.5, -0.25, -1.5]])
    state = algo.state_dict()
    restored = RLAlgorithm(SPO)
    restored.load_state_dict(state)
    assert restored.previous_responses(["y", "x", "q"]) == [[7, 8, 9], [5, 6], None]
    assert restored.state_digest() == algo.state_digest()
    for run in (algo, restored):  # both continue identically
        _step(run, ["y", "z"], [[3], [4, 4]], new=[[-0.75], [-0.125, -2.0]],
              now_on_previous=[[-0.497, -0.259, -1.494], [-0.125, -2.0]])
    assert restored.state_digest() == algo.state_digest()
    assert restored.last_rho.tolist() == algo.last_rho.tolist()


def test_drift_refuses_rows_that_are_not_the_kept_response():
    rule = SPORho(0.875, 0.96, 0.06)
    rule.remember(["x"], torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]), torch.tensor([[-1.0, -2.0, 0.0]]))
    with pytest.raises(ValueError, match="previous_responses"):
        rule.drift(["x"], torch.zeros(1, 3), torch.tensor([[1, 1, 1]]))
    with pytest.raises(ValueError, match="corrupt spo state"):
        rule.load_state_dict({**rule.state_dict(), "lengths": torch.tensor([3])})
