"""Typed configuration for a whole run: dataclasses with a docstring per field, loaded from YAML with dotted overrides.

    cfg = load_config("examples/configs/tiny_cpu.yaml", ["algorithm.baseline.rho_min=0.9", "rollout.stop=[END]"])
    cfg.rollouts_per_step          # data.prompts_per_step * rollout.n
    dump_yaml(cfg, run_dir + "/config.yaml")   # load_config(that file) == cfg

A file may start with `base: other.yaml` (relative to the file) to inherit from another file, recursively; see
`config_loader` for the merge rules and value conversions. Every problem raises `ConfigError` with one actionable line.
`help_text()` lists every key with its type, default and docstring.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Sequence

from mssr_megatron.config_checks import check_run_config
from mssr_megatron.config_loader import (
    ConfigError,
    apply_overrides,
    dump_yaml,
    field_docs,
    from_dict,
    load_yaml_file,
    to_dict,
)
from mssr_megatron.config_loader import help_text as _help_text
from mssr_megatron.eval.config import EvalConfig

__all__ = [
    "ConfigError", "RunConfig", "ModelConfig", "ParallelConfig", "RolloutConfig", "AlgorithmConfig", "BaselineConfig",
    "OptimizerConfig", "DataConfig", "TrainerConfig", "LoggingConfig", "CheckpointConfig", "EvalConfig",
    "load_config", "dump_yaml", "to_dict", "field_docs", "help_text",
]

DEFAULT_PROMPT_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}."


@dataclass
class ModelConfig:
    hf_path: str | None = None
    """Hugging Face directory of the initial policy (weights, config, tokenizer, processor)."""
    ref_hf_path: str | None = None
    """Hugging Face directory of the frozen reference policy for the KL term; null = the same as hf_path."""
    params_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Dtype of the Megatron parameters and activations (optimizer master weights stay float32)."""
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    """Megatron layer spec: plain torch with SDPA attention ('local', CPU and GPU) or Transformer Engine (GPU only,
    needed for FP8)."""
    fp8: Literal[None, "e4m3", "hybrid"] = None
    """FP8 training format (Transformer Engine only); null = no FP8."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    """FP8 scaling recipe passed to Transformer Engine."""
    fp8_amax_history_len: int = 1024
    """Length of the amax history window for delayed FP8 scaling."""
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    """How the FP8 scale is computed from the amax history."""
    fp8_margin: int = 0
    """Margin (power-of-two exponent) subtracted when computing FP8 scales."""
    recompute_granularity: Literal[None, "full", "selective"] = None
    """Activation recomputation: null = none, 'selective' = attention core only, 'full' = whole layers."""
    recompute_method: Literal[None, "uniform", "block"] = None
    """How layers are chosen for full recomputation (needed when recompute_granularity is 'full')."""
    recompute_num_layers: int | None = None
    """Layers per recompute unit ('uniform') or per pipeline stage ('block') for full recomputation."""
    train_vision: bool = True
    """Train the vision tower and patch merger (the paper does); false freezes them."""
    vision_balance: Literal["replicate", "tp_balanced"] = "replicate"
    """Vision tower at TP>1: every TP rank encodes every image, or each ~1/TP of the patches (features all-gathered)."""
    attention_dropout: float = 0.0
    """Dropout probability on attention weights (0 for RL: logprobs must be reproducible)."""
    hidden_dropout: float = 0.0
    """Dropout probability on hidden states (0 for RL)."""
    logprob_chunk_tokens: int | None = 2048
    """Tokens per chunk of the fused log-prob/entropy op (its fp32 scratch is chunk x vocab/TP); null = all at once."""


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    """Megatron tensor-parallel size (TP)."""
    pipeline_model_parallel_size: int = 1
    """Megatron pipeline-parallel size (PP); data-parallel size = world size / (TP * PP)."""
    sequence_parallel: bool = False
    """Shard activations along the sequence inside TP regions (needs TP > 1; micro-batch lengths a multiple of TP)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer states and fp32 main weights across data-parallel ranks (Megatron distributed optimizer)."""
    micro_batch_size: int = 1
    """Rollouts per micro-batch (one forward/backward) on each data-parallel rank."""
    max_tokens_per_microbatch: int | None = None
    """Micro-batch token budget (rows x padded width + image patches; rows also dealt to DP ranks by cost:
    train/token_budget.py); null: fixed rows."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend: 'auto' = nccl with CUDA, gloo otherwise."""
    timeout_minutes: float = 60.0
    """Collective timeout (NCCL watchdog, gloo); 60 covers a 7B checkpoint save/load or HF export on slow storage."""


@dataclass
class RolloutConfig:
    engine: Literal["hf", "sglang", "vllm"] = "hf"
    """Rollout engine: in-process Hugging Face generate (CPU default), SGLang (GPU clusters) or vLLM."""
    n: int = 1
    """Rollouts per prompt (MSSR/MVSR: 1; group estimators such as GRPO: >= 2)."""
    temperature: float = 1.0
    """Sampling temperature for training rollouts."""
    top_p: float = 1.0
    """Nucleus sampling threshold for training rollouts (1 = disabled)."""
    top_k: int = -1
    """Top-k sampling for training rollouts (-1 = disabled)."""
    max_new_tokens: int = 4096
    """Maximum response length in tokens."""
    stop: list[str] = field(default_factory=list)
    """Extra stop strings (end-of-turn tokens always stop generation)."""
    seed: int = 0
    """Base seed of the rollout sampler (offset per step and rank)."""
    engine_tp_size: int = 1
    """Tensor-parallel size of each rollout engine instance (SGLang/vLLM)."""
    engines: Literal["per_node", "per_dp_group", "single"] = "per_node"
    """Rollout engines (rollout/placement.py): fill every node's GPUs, one per data-parallel replica, or one per job."""
    colocate: bool = True
    """Share GPUs between training and rollout: release the engine's memory while training, resume it for rollout."""
    mem_fraction: float = 0.6
    """Fraction of GPU memory the rollout engine may use for weights and KV cache."""
    weight_bucket_mb: int = 512
    """Size in MiB of each bucket of weights sent from the trainer to the rollout engine."""
    val_temperature: float = 0.6
    """Sampling temperature for validation (0 = greedy)."""
    val_max_new_tokens: int | None = None
    """Maximum response length for validation; null = max_new_tokens."""
    hf_batch_size: int = 64
    """HF engine only: rollouts decoded together in one generate call (SGLang and vLLM batch by themselves)."""

    @property
    def weight_bucket_bytes(self) -> int:
        """weight_bucket_mb in bytes: the size every weight sync packs its buckets to."""
        return int(self.weight_bucket_mb * 2**20)


@dataclass
class BaselineConfig:
    rho_rule: Literal["kl_window", "spo", "constant"] = "kl_window"
    """Forgetting-factor rule of the Beta baseline: windowed-KL global rho (MSSR default), per-prompt SPO, constant."""
    rho_min: float = 0.875
    """Lower bound of rho (also sets the default prior strength N0 = 1 / (1 - rho_min))."""
    rho_max: float = 0.96
    """Upper bound of rho."""
    kl_target: float = 0.01
    """kl_window rule: rho rises linearly from rho_min to rho_max as the windowed KL goes from 0 to this target."""
    kl_window: int = 10
    """Steps whose KL the kl_window rule averages (released code hard-codes 10; its config field 20 is unused)."""
    kl_aggregation: Literal["token_mean", "seq_mean"] = "seq_mean"
    """kl_window rule's step KL: mean of per-sequence token means of k3 clamped to +-10 (released), or token mean."""
    spo_d_half: float = 0.06
    """SPO rule: logprob drift D at which rho halves, rho = 2^(-D / spo_d_half)."""
    constant_rho: float = 0.96
    """rho used by the constant rule."""
    init_smoothing: Literal["mean", "spo"] = "mean"
    """Tracker initialisation: plain mean reward ('mean') or SPO's (s + 0.5) / (n + 1) smoothing ('spo')."""
    init_rollouts: int = 1
    """Rollouts per training prompt from the initial policy before step 0 (0 = start every prompt at prior_mean)."""
    prior_mean: float = 0.5
    """Baseline value of prompts that were never initialised or seen."""
    binarize_rewards: bool = False
    """Feed the tracker reward > 0.5 as 0/1 instead of the raw (format-mixed) score; the advantages keep the raw one."""
    n0: float | None = None
    """Prior strength a + b of an initialised prompt; null = 1 / (1 - rho_min)."""

    @property
    def effective_n0(self) -> float:
        """N0 actually used: n0 if set, else 1 / (1 - rho_min)."""
        if self.n0 is not None:
            return self.n0
        if self.rho_min >= 1.0:
            raise ConfigError("algorithm.baseline.rho_min=1 makes the default n0 infinite; set algorithm.baseline.n0")
        return 1.0 / (1.0 - self.rho_min)


@dataclass
class AlgorithmConfig:
    estimator: str = "mssr"
    """Advantage estimator, a registered name: mssr, mvsr, grpo, drgrpo, rloo, reinforce_pp."""
    entropy_shaping: bool | None = None
    """Entropy-based advantage shaping; null = the estimator's default (on for mssr, off otherwise)."""
    shaping_alpha: float = 0.4
    """Shaping slope: psi_t = min(alpha * H_t, |A| / kappa)."""
    shaping_kappa: float = 2.0
    """Shaping cap divisor: psi_t never exceeds |A| / kappa."""
    entropy_source: Literal["full", "sampled"] = "full"
    """Entropy used for shaping: full-vocabulary H_t (paper) or the sampled-token -p log p (released code)."""
    norm_var_floor: float = 1e-6
    """Floor on the batch variance when normalising advantages: (A - mean) / sqrt(max(var, floor))."""
    grpo_eps: float = 1e-6
    """GRPO: epsilon added to the group std in (r - mean) / (std + eps)."""
    policy_loss: str = "ppo_clip"
    """Policy loss, a registered name."""
    clip_ratio_low: float = 0.2
    """PPO clip: ratios below 1 - clip_ratio_low are clipped."""
    clip_ratio_high: float = 0.3
    """PPO clip: ratios above 1 + clip_ratio_high are clipped (clip-higher)."""
    dual_clip: float | None = 3.0
    """Dual-clip constant C (> 1) bounding the loss of negative advantages; null = no dual clip."""
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    """How per-token losses are reduced over the mini-batch."""
    use_kl_loss: bool = True
    """Add a KL loss to the frozen reference policy."""
    kl_loss_coef: float = 0.01
    """Coefficient of the KL loss."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator: k1 = log-ratio, k2 = half squared log-ratio, k3 = exp(ref - logp) - (ref - logp) - 1."""
    kl_in_reward: bool = False
    """REINFORCE++ only: put a per-token KL penalty in the reward instead of (or besides) the KL loss."""
    kl_reward_coef: float = 0.01
    """Coefficient of the in-reward KL penalty."""
    entropy_coef: float = 0.0
    """Entropy bonus: loss -= entropy_coef * token-mean entropy (ablation; 0 = off)."""
    entropy_loss_source: Literal["full", "sampled"] = "full"
    """Entropy the bonus maximises, with gradient: full-vocabulary H_t, or sampled-token -p log p (released ablation)."""
    crossmodal_coef: float = 0.0
    """KL(pi(.|text, image) || pi(.|text only)) with gradient through both passes (train/crossmodal.py); 0 = off."""
    rollout_correction: Literal["none", "tis"] = "none"
    """Engine/trainer mismatch correction of the policy loss: 'tis' = truncated importance sampling; 'none' = off."""
    tis_cap: float = 2.0
    """TIS cap C (>= 1): each token's pg loss is weighted by min(exp(logp_trainer - logp_rollout_engine), C)."""
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    """Per-prompt Beta baseline tracker (MSSR/MVSR)."""

    def shaping_enabled(self) -> bool:
        """Whether entropy shaping applies: entropy_shaping if set, else the estimator's registered default."""
        if self.entropy_shaping is not None:
            return self.entropy_shaping
        from mssr_megatron.algorithms import ESTIMATORS  # lazy: the algorithms import this module's classes

        return ESTIMATORS.get(self.estimator).shaping_default


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 0.5
    """Global gradient-norm clipping threshold (0 = no clipping)."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after warmup."""
    warmup_steps: int = 0
    """Linear warmup length in optimizer steps."""
    min_lr: float = 0.0
    """Final learning rate of the cosine/linear schedules."""
    lr_decay_steps: int | None = None
    """Optimizer steps over which cosine/linear decay; null = all optimizer steps of the run."""
    mini_batch_size: int = 128
    """Rollouts per optimizer step (global, across data-parallel ranks)."""
    ppo_epochs: int = 1
    """Passes over each step's rollouts."""


@dataclass
class DataConfig:
    train_path: str | None = None
    """Training set file (jsonl or parquet, Vision-R1-RL style)."""
    val_path: str | None = None
    """Validation set file; null = no validation."""
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    """File format; 'auto' = from the file extension."""
    prompts_per_step: int = 2048
    """Prompts sampled per RL step (rollouts per step = prompts_per_step * rollout.n)."""
    image_key: str = "images"
    """Column holding the image(s) of an example."""
    problem_key: str = "problem"
    """Column holding the question text."""
    answer_key: str = "answer"
    """Column holding the ground-truth answer."""
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    """User-turn text; the literal '{problem}' is replaced by the question (plain replacement, not str.format)."""
    prompt_template_file: str | None = None
    """Jinja file of the user-turn text, rendered with `problem` per row; replaces prompt_template when set."""
    max_prompt_tokens: int = 2048
    """Prompts longer than this (image tokens included) are skipped."""
    min_pixels: int | None = None
    """Smaller images are upscaled (aspect kept, sides multiples of patch x merge size); null = processor's bounds."""
    max_pixels: int | None = None
    """Larger images are downscaled (aspect kept, sides multiples of patch x merge size); null = processor's bounds."""
    shuffle: bool = True
    """Shuffle the training set every epoch."""
    seed: int = 0
    """Seed of the training-set shuffle."""
    reward: str = "math"
    """Reward function, a registered name (math, multiple choice, ...)."""
    format_reward_weight: float = 0.0
    """Weight of the format reward mixed into the answer reward (0 = answer only, the paper's setting)."""
    reward_workers: int = 2
    """Worker processes per node that verify answers, split over its engine hosts (0 = in the trainer process)."""
    reward_timeout_s: float = 5.0
    """Per-answer verification time limit in seconds; a timeout scores 0."""
    val_size: int | None = None
    """Validation examples used; null = the whole validation set."""


@dataclass
class TrainerConfig:
    total_steps: int = 150
    """RL steps to train."""
    val_every: int = 5
    """Validate every this many steps (0 = never)."""
    val_before_train: bool = True
    """Validate once before the first step."""
    eval_every: int = 0
    """Run the benchmark suite eval.suite every this many steps, into <output_dir>/eval/step_<N>/ (0 = never)."""
    seed: int = 42
    """Global seed (model init, dropout, sampler)."""
    output_dir: str = "runs/mssr"
    """Run directory: resolved config, logs, checkpoints, exported model."""
    overwrite: bool = False
    """Start a fresh run in an output_dir that holds one: delete its metrics, summary, plots, checkpoints first."""
    max_nonfinite_steps: int = 3
    """Abort after this many consecutive steps with a non-finite loss or gradient (skipped steps)."""
    max_logprob_mismatch: float | None = None
    """Alarm threshold on a step's mean |engine - trainer| log-prob difference (nats, global batch); null = off."""
    on_logprob_mismatch: Literal["warn", "stop"] = "warn"
    """What the mismatch alarm does: log a warning, or save a checkpoint and stop the run."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: 'auto' = CUDA when available."""


@dataclass
class LoggingConfig:
    jsonl: bool = True
    """Write per-step metrics to <output_dir>/metrics.jsonl."""
    tensorboard: bool = True
    """Write TensorBoard event files (needs the tensorboard package)."""
    progress_bar: bool = True
    """Show a progress bar on rank 0."""
    log_every: int = 1
    """Log metrics every this many steps."""
    run_name: str | None = None
    """Run name in logs; null = the output_dir folder name."""


@dataclass
class CheckpointConfig:
    save_dir: str | None = None
    """Checkpoint folder; null = <output_dir>/checkpoints."""
    save_every: int = 25
    """Save every this many steps (0 = only at the end)."""
    keep_last: int = 3
    """Keep this many newest checkpoints (0 = keep all)."""
    resume: str | None = None
    """Resume from 'auto' (newest complete checkpoint that verifies, if any) or a path; null = fresh. Changes that
    are allowed: train/resume_config."""
    async_save: bool = False
    """Write checkpoints in the background (Megatron async dist_checkpointing)."""
    export_hf_at_end: bool = True
    """Export the final policy as a Hugging Face directory in <output_dir>/hf."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Policy model and numerics."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Megatron parallel layout and micro-batching."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout engine and sampling."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """Advantage estimator, shaping, losses, baseline tracker."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer, schedule and mini-batching."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets, prompts and rewards."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Loop length, validation cadence, run directory."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics outputs."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving, resuming and export."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Benchmark evaluation (`mssr eval`, and trainer.eval_every inside training)."""

    @property
    def rollouts_per_step(self) -> int:
        """Rollouts generated per RL step: data.prompts_per_step * rollout.n."""
        return self.data.prompts_per_step * self.rollout.n

    @property
    def optimizer_steps_per_step(self) -> int:
        """Optimizer steps per RL step: rollouts_per_step / optimizer.mini_batch_size * optimizer.ppo_epochs."""
        return self.rollouts_per_step // self.optimizer.mini_batch_size * self.optimizer.ppo_epochs

    @property
    def checkpoint_dir(self) -> str:
        """checkpoint.save_dir, or <trainer.output_dir>/checkpoints when unset."""
        return self.checkpoint.save_dir or os.path.join(self.trainer.output_dir, "checkpoints")

    def validate(self, world_size: int | None = None) -> RunConfig:
        """Check cross-field constraints (and, given world_size, the data-parallel split); return self or raise."""
        check_run_config(self, world_size)
        return self


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a RunConfig from a YAML file (None = defaults), apply dotted key=value overrides, validate it."""
    data = load_yaml_file(path) if path is not None else {}
    data = apply_overrides(RunConfig, data, list(overrides))
    return from_dict(RunConfig, data).validate()


def help_text() -> str:
    """Every config key with its type, default and docstring, one entry per field."""
    return _help_text(RunConfig)
