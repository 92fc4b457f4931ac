"""The cross-field checks of a `RunConfig` (what `RunConfig.validate()` runs): value ranges, settings that need each
other (or CUDA), known estimator / policy-loss names, and the batch arithmetic across parallel ranks.

Single values are already type-checked by `config_loader` while loading; every violation here raises `ConfigError` with
one actionable line.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from mssr_megatron.config_loader import ConfigError

__all__ = ["check_run_config", "fp8_recipe_problem"]

MXFP8_MIN_CAPABILITY = (10, 0)  # Blackwell: Transformer Engine runs MXFP8 GEMMs from compute capability 10.0 on


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(cfg: Any, *keys: str) -> None:
    for key in keys:
        value = _get(cfg, key)
        _require(value is None or value > 0, f"{key}={value!r} must be > 0")


def _non_negative(cfg: Any, *keys: str) -> None:
    for key in keys:
        value = _get(cfg, key)
        _require(value is None or value >= 0, f"{key}={value!r} must be >= 0")


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _registries() -> tuple[Any, Any]:
    """(ESTIMATORS, POLICY_LOSSES), imported lazily: mssr_megatron.algorithms imports the config classes."""
    from mssr_megatron.algorithms import ESTIMATORS, POLICY_LOSSES

    return ESTIMATORS, POLICY_LOSSES


def fp8_recipe_problem(recipe: str, capability: tuple[int, int]) -> str | None:
    """Why FP8 recipe `recipe` cannot run on a CUDA device of compute capability `capability` (major, minor), or None.
    MXFP8 needs Blackwell (compute capability >= 10.0); H100/H200 (9.0) and older are refused."""
    if recipe == "mxfp8" and tuple(capability) < MXFP8_MIN_CAPABILITY:
        major, minor = capability
        return (f"model.fp8_recipe=mxfp8 needs a Blackwell GPU (compute capability >= 10.0) but this GPU has "
                f"{major}.{minor}: use model.fp8_recipe=delayed or tensorwise on this GPU")
    return None


def _check_fp8_on_this_gpu(m: Any, device: str) -> None:
    """The FP8 recipe against the CUDA device this process sees, when the run is on CUDA and one is visible."""
    if m.fp8 is None or device == "cpu":
        return
    import torch

    if torch.cuda.is_available():  # GPU-only: not run (no GPU was available)
        problem = fp8_recipe_problem(m.fp8_recipe, torch.cuda.get_device_capability())
        _require(problem is None, problem or "")


def _check_eval(cfg: Any) -> None:
    """The eval: section, and trainer.eval_every's suite (checked here, before a run spends hours to fail at it)."""
    e = cfg.eval
    _positive(cfg, "eval.max_new_tokens", "eval.k", "eval.batch_size", "eval.limit", "eval.judge.concurrency",
              "eval.judge.timeout_s", "eval.judge.max_tokens")
    _non_negative(cfg, "eval.temperature", "eval.judge.retries")
    _require(0 < e.top_p <= 1, f"eval.top_p={e.top_p!r} must be in (0, 1]")
    _require(e.k == 1 or e.temperature > 0, f"eval.k={e.k} with eval.temperature=0 repeats one greedy answer k "
             "times: set eval.temperature > 0 for avg@k, or eval.k=1")
    if cfg.trainer.eval_every:
        _require(bool(e.suite), f"trainer.eval_every={cfg.trainer.eval_every} needs eval.suite (a suite YAML, e.g. "
                 "runs/tiny/eval_suite.yaml from `mssr make-tiny`), or trainer.eval_every=0")
        _require(os.path.isfile(e.suite), f"eval.suite={e.suite!r} does not exist (trainer.eval_every="
                 f"{cfg.trainer.eval_every}): give the path of a suite YAML, or set trainer.eval_every=0")


def _finite_numbers(node: Any, prefix: str = "") -> None:
    """Every float setting is a finite number: YAML reads .inf and .nan as floats, and none of the settings means
    anything at infinity (reward_timeout_s=.inf, for one, would fail at every grade with an OverflowError)."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _finite_numbers(value, key + ".")
        elif isinstance(value, float):
            _require(math.isfinite(value), f"{key}={value!r} must be a finite number")


def check_run_config(cfg: Any, world_size: int | None = None) -> None:
    """Cross-field checks of a RunConfig (see RunConfig.validate); the first violation raises ConfigError."""
    m, p, r, o, d = cfg.model, cfg.parallel, cfg.rollout, cfg.optimizer, cfg.data
    a, b = cfg.algorithm, cfg.algorithm.baseline
    _finite_numbers(cfg)
    _positive(cfg, "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size",
              "parallel.micro_batch_size", "parallel.timeout_minutes", "rollout.n", "rollout.max_new_tokens",
              "rollout.engine_tp_size", "parallel.max_tokens_per_microbatch",
              "rollout.weight_bucket_mb", "rollout.val_max_new_tokens", "rollout.temperature", "rollout.hf_batch_size",
              "algorithm.shaping_kappa", "algorithm.norm_var_floor", "algorithm.baseline.kl_target",
              "algorithm.baseline.kl_window", "algorithm.baseline.spo_d_half", "algorithm.baseline.n0",
              "optimizer.lr", "optimizer.adam_eps", "optimizer.mini_batch_size", "optimizer.ppo_epochs",
              "optimizer.lr_decay_steps", "data.prompts_per_step", "data.max_prompt_tokens", "data.reward_timeout_s",
              "data.val_size", "data.min_pixels", "data.max_pixels", "trainer.total_steps", "logging.log_every", "model.fp8_amax_history_len",
              "model.logprob_chunk_tokens", "trainer.max_logprob_mismatch")
    _non_negative(cfg, "model.attention_dropout", "model.hidden_dropout", "model.fp8_margin", "rollout.val_temperature",
                  "algorithm.shaping_alpha", "algorithm.grpo_eps", "algorithm.kl_loss_coef", "algorithm.kl_reward_coef",
                  "algorithm.entropy_coef", "algorithm.crossmodal_coef", "algorithm.baseline.init_rollouts",
                  "optimizer.weight_decay", "optimizer.grad_clip", "optimizer.warmup_steps", "optimizer.min_lr",
                  "data.format_reward_weight", "data.reward_workers", "trainer.val_every", "trainer.eval_every",
                  "trainer.max_nonfinite_steps", "checkpoint.save_every", "checkpoint.keep_last")

    # model
    _require(m.attention_dropout < 1 and m.hidden_dropout < 1, "model dropout probabilities must be < 1")
    _require(m.fp8 is None or m.transformer_impl == "transformer_engine",
             f"model.fp8={m.fp8!r} needs Transformer Engine; set model.transformer_impl=transformer_engine (GPU only)")
    if m.recompute_granularity == "full":
        _require(m.recompute_method is not None and m.recompute_num_layers is not None,
                 "model.recompute_granularity=full needs model.recompute_method (uniform or block) "
                 "and model.recompute_num_layers")
    else:
        _require(m.recompute_method is None and m.recompute_num_layers is None,
                 "model.recompute_method/recompute_num_layers apply only with model.recompute_granularity=full")

    # parallel / device
    _require(not p.sequence_parallel or p.tensor_model_parallel_size > 1,
             "parallel.sequence_parallel splits activations over the tensor-parallel ranks and needs "
             f"parallel.tensor_model_parallel_size > 1 (got {p.tensor_model_parallel_size}); set it false at TP 1")
    _require(p.max_tokens_per_microbatch is None or p.pipeline_model_parallel_size == 1,
             f"parallel.max_tokens_per_microbatch={p.max_tokens_per_microbatch} makes micro-batches of different row "
             "counts, but a pipeline pass exchanges one fixed [rows, sequence] shape between stages: set "
             "parallel.max_tokens_per_microbatch=null (fixed parallel.micro_batch_size) with "
             f"parallel.pipeline_model_parallel_size={p.pipeline_model_parallel_size}")
    device = cfg.trainer.device
    if device == "cpu":
        _require(p.backend != "nccl", "parallel.backend=nccl needs CUDA; use gloo (or auto) with trainer.device=cpu")
        _require(m.transformer_impl == "local",
                 "model.transformer_impl=transformer_engine needs CUDA; use local with trainer.device=cpu")
        _require(r.engine == "hf",
                 f"rollout.engine={r.engine} needs CUDA; use rollout.engine=hf with trainer.device=cpu")

    _check_fp8_on_this_gpu(m, device)
    _check_eval(cfg)
    _require(not (cfg.trainer.overwrite and cfg.checkpoint.resume),
             f"trainer.overwrite=true starts the run over and checkpoint.resume={cfg.checkpoint.resume} continues it: "
             "set one of them")

    # rollout
    _require(0 < r.top_p <= 1, f"rollout.top_p={r.top_p!r} must be in (0, 1]")
    _require(r.top_k == -1 or r.top_k > 0, f"rollout.top_k={r.top_k!r} must be -1 (disabled) or > 0")
    _require(0 < r.mem_fraction <= 1, f"rollout.mem_fraction={r.mem_fraction!r} must be in (0, 1]")
    _require(not (r.engines == "per_node" and r.colocate and p.pipeline_model_parallel_size > 1),
             "rollout.engines=per_node puts an engine on the GPUs of every rank, but with parallel."
             f"pipeline_model_parallel_size={p.pipeline_model_parallel_size} only pipeline-stage-0 ranks receive the "
             "full weights: use rollout.engines=per_dp_group (one engine per replica, on stage 0) or single")

    # algorithm
    estimators, losses = _registries()
    _require(a.estimator in estimators, f"algorithm.estimator: {estimators.unknown_message(a.estimator)}")
    _require(a.policy_loss in losses, f"algorithm.policy_loss: {losses.unknown_message(a.policy_loss)}")
    _require(not estimators.get(a.estimator).needs_groups or r.n >= 2,
             f"algorithm.estimator={a.estimator} is a group estimator and needs rollout.n >= 2 rollouts per prompt "
             f"(got rollout.n={r.n}); e.g. rollout.n=8 with data.prompts_per_step divided by 8")
    _require(not a.kl_in_reward or a.estimator == "reinforce_pp",
             f"algorithm.kl_in_reward is for estimator reinforce_pp only (got {a.estimator}); "
             "use algorithm.use_kl_loss")
    _require(0 < a.clip_ratio_low < 1, f"algorithm.clip_ratio_low={a.clip_ratio_low!r} must be in (0, 1)")
    _require(a.clip_ratio_high > 0, f"algorithm.clip_ratio_high={a.clip_ratio_high!r} must be > 0")
    _require(a.dual_clip is None or a.dual_clip > 1,
             f"algorithm.dual_clip={a.dual_clip!r} must be > 1, or null to disable dual clipping")
    # A cap below 1 would down-weight even tokens where engine and trainer agree (ratio 1): a rescaled, biased loss
    # rather than a truncation of the rare large ratios TIS is for; at 1 exactly it only ever lowers weights.
    _require(a.tis_cap >= 1, f"algorithm.tis_cap={a.tis_cap!r} must be >= 1 (the TIS weight min(ratio, cap) must "
             "leave an on-policy token's ratio 1 unchanged); 2 is the usual choice")

    # baseline
    _require(0 <= b.rho_min <= b.rho_max <= 1, f"algorithm.baseline needs 0 <= rho_min <= rho_max <= 1 "
             f"(got rho_min={b.rho_min!r}, rho_max={b.rho_max!r})")
    _require(0 <= b.constant_rho <= 1, f"algorithm.baseline.constant_rho={b.constant_rho!r} must be in [0, 1]")
    _require(0 <= b.prior_mean <= 1, f"algorithm.baseline.prior_mean={b.prior_mean!r} must be in [0, 1]")
    _ = b.effective_n0  # raises when rho_min = 1 and n0 is unset

    # optimizer and batch arithmetic
    _require(0 <= o.adam_beta1 < 1 and 0 <= o.adam_beta2 < 1, "optimizer.adam_beta1/adam_beta2 must be in [0, 1)")
    _require(o.min_lr <= o.lr, f"optimizer.min_lr={o.min_lr!r} must be <= optimizer.lr={o.lr!r}")
    rollouts = d.prompts_per_step * r.n
    _require(rollouts % o.mini_batch_size == 0,
             f"rollouts per step ({d.prompts_per_step} prompts x {r.n} rollouts = {rollouts}) must be divisible by "
             f"optimizer.mini_batch_size={o.mini_batch_size}")
    _require(o.mini_batch_size % p.micro_batch_size == 0,
             f"optimizer.mini_batch_size={o.mini_batch_size} must be divisible by "
             f"parallel.micro_batch_size={p.micro_batch_size}")
    if world_size is not None:
        model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
        _require(world_size % model_parallel == 0, f"world size {world_size} must be divisible by tensor x pipeline "
                 f"parallel size {model_parallel}")
        dp = world_size // model_parallel
        _require(o.mini_batch_size % (p.micro_batch_size * dp) == 0,
                 f"optimizer.mini_batch_size={o.mini_batch_size} must be divisible by parallel.micro_batch_size="
                 f"{p.micro_batch_size} x data-parallel size {dp}")

    # data
    _require("{problem}" in d.prompt_template, "data.prompt_template must contain the placeholder {problem}")
    _require(d.min_pixels is None or d.max_pixels is None or d.min_pixels <= d.max_pixels,
             f"data.min_pixels={d.min_pixels} must be at most data.max_pixels={d.max_pixels}")
    _require(d.format_reward_weight <= 1, f"data.format_reward_weight={d.format_reward_weight} must be at most 1 (the "
             "reward is (1 - w) * answer + w * format)")
