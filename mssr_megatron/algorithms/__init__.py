"""Everything that turns rewards and log-probs into a loss: estimators, the Beta baseline, shaping, losses."""

from mssr_megatron.algorithms.advantages import (
    ESTIMATORS,
    AdvantageBatch,
    AdvantageOutput,
    compute_advantages,
    register_estimator,
)
from mssr_megatron.algorithms.baseline_tracker import BetaBaselineTracker
from mssr_megatron.algorithms.forgetting import FORGETTING_RULES, build_forgetting_rule
from mssr_megatron.algorithms.losses import (
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    POLICY_LOSSES,
    aggregate,
    compute_policy_loss,
    crossmodal_kl,
    kl_penalty,
)
from mssr_megatron.algorithms.shaping import ENTROPY_SOURCES, shape_advantages, shaping_entropy

__all__ = [
    "ESTIMATORS",
    "ENTROPY_SOURCES",
    "FORGETTING_RULES",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "POLICY_LOSSES",
    "AdvantageBatch",
    "AdvantageOutput",
    "BetaBaselineTracker",
    "aggregate",
    "build_forgetting_rule",
    "compute_advantages",
    "compute_policy_loss",
    "crossmodal_kl",
    "kl_penalty",
    "register_estimator",
    "shape_advantages",
    "shaping_entropy",
]
