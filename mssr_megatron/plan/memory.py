"""The per-rank memory plan of a run: what each GPU holds while it generates and while it trains.

    plan = plan_memory(cfg, shape, world_size=8, gpu_bytes=80 * GB)
    plan.fits, plan.peak, plan.overflow()            # overflow(): None, or the phase and line past the GPU's size

Per rank of the largest pipeline stage that also holds a rollout engine's GPU (with rollout.engines=per_node every
GPU does; per_dp_group and single: the engines' GPUs), in bytes:
  weights        parameters x params_dtype (language model sharded over TP/PP; the vision tower replicated)
  gradients      Megatron DDP's gradient buffer, fp32 (grad_reduce_in_fp32) for every trained parameter
  optimizer      fp32 main parameters (bf16/fp16 training only) + Adam's two fp32 moments; / DP with the
                 distributed optimizer
  reference      the frozen reference policy's weights, when the KL loss or the kl_window rule needs it
  activations    what one 1F1B pass keeps for backward: per layer and micro-batch (see `layer_activation_bytes`)
                 x layers x micro-batches in flight (PP of them on the first stage), + one layer's worth for the
                 gradients of the layer in backward, + the trained vision tower. A micro-batch holds micro_batch_size
                 full rows, or under parallel.max_tokens_per_microbatch at most the budget's token slots (one full
                 row if longer) and at most the budget's patches (an upper bound: the budget counts both together)
  log-prob op    the logits of one micro-batch and the fused log-prob op's buffers (chunked or not), at its
                 response positions only (micro_batch_size x rollout.max_new_tokens; every position under a token
                 budget or the cross-modal term)
  cross-modal    with algorithm.crossmodal_coef != 0 each micro-batch carries a text-only copy of its rows
                 (train/crossmodal.py): the language model's activations are those of 2 x micro_batch_size rows, and
                 the copies' logits, their gradient and the KL op's fp32 scratch come on top of the log-prob op
  optimizer step with torch's unfused AdamW (fused_adam=False): one fp32 scratch copy of the trained params;
                 none with a fused Adam (Transformer Engine's or apex's on GPUs, torch's fused kernel on the CPU)
  rollout engine SGLang/vLLM: mem_fraction of the GPU (weights + KV cache); released while training when
                 colocated. HF engine: a copy of the weights in params_dtype plus its KV cache, always resident.
Training peak = persistent + max(activations + log-prob op, optimizer step): the step runs after backward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from mssr_megatron.train.experience import sequence_multiple
from mssr_megatron.plan.shapes import ModelShape

GB = 10 ** 9  # decimal gigabytes, as GPU memory is sold ("80 GB"; an H100 80GB reports 79.2 GiB to torch)
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Line:
    """One row of the plan: bytes held in the rollout phase and in the training phase."""

    key: str
    label: str
    rollout: int
    training: int
    note: str = ""


@dataclass
class MemoryPlan:
    layout: str
    gpu_bytes: int | None
    lines: list[Line]
    inputs: dict = field(default_factory=dict)

    def total(self, phase: str) -> int:
        return sum(getattr(line, phase) for line in self.lines)

    @property
    def peak(self) -> int:
        return max(self.total("rollout"), self.total("training"))

    @property
    def fits(self) -> bool:
        return self.gpu_bytes is None or self.peak <= self.gpu_bytes

    def overflow(self) -> tuple[str, Line] | None:
        """(phase, the line at which the running total of that phase passes the GPU's size), or None if it fits."""
        for phase in ("training", "rollout"):
            running = 0
            for line in self.lines:
                running += getattr(line, phase)
                if self.gpu_bytes is not None and running > self.gpu_bytes:
                    return phase, line
        return None

    def line(self, key: str) -> Line:
        return next(line for line in self.lines if line.key == key)

    def to_dict(self) -> dict:
        return {"layout": self.layout, "gpu_bytes": self.gpu_bytes, "fits": self.fits, "peak_bytes": self.peak,
                "rollout_bytes": self.total("rollout"), "training_bytes": self.total("training"),
                "lines": [asdict(line) for line in self.lines], "inputs": self.inputs}


def layer_activation_bytes(shape: ModelShape, tokens: int, tp: int, sp: bool, dtype_bytes: int,
                           recompute: str | None) -> int:
    """Bytes one language-model layer keeps for backward for one micro-batch of `tokens` (rows x sequence).

    Saved tensors (elements per token; H hidden, I intermediate, a/k query/key-value heads of dimension d):
      4 H      the inputs of the two RMSNorms and of the QKV and FC1 linears (/ TP with sequence parallelism:
               Megatron saves the sequence-sharded input and gathers it again in backward)
      (a + 2k) d / TP   Q after RoPE and K, V as the core attention receives them
      a d / TP the attention output, input of the output projection
      4 I / TP FC1's output (2I, kept whole for SiLU), SiLU's output (I) and the product (I), FC2's input
    The core attention itself (Transformer Engine's fused attention, or torch's SDPA in the local spec,
    models/sdpa_attention.py) keeps only a per-row log-sum-exp, a / TP floats per token: not counted (nor under
    recompute "selective", which recomputes the core attention and keeps its inputs).
    recompute "full": only the layer's input, H (/ TP with SP), is kept; `plan_memory` adds one layer's worth.
    """
    h, d, a, k, i = shape.hidden, shape.head_dim, shape.heads, shape.kv_heads, shape.intermediate
    split = tp if sp else 1
    if recompute == "full":
        return tokens * h // split * dtype_bytes
    per_token = 4 * h / split + ((a + 2 * k) * d + a * d + 4 * i) / tp
    return int(tokens * per_token * dtype_bytes)


def vision_activation_bytes(shape: ModelShape, patches: int, dtype_bytes: int) -> int:
    """Bytes the trained HF vision tower keeps for backward for `patches` patches: per block 10 hidden-sized
    tensors (norms, QKV, attention in and out, projection, residuals) and 4 intermediate-sized (gated MLP)."""
    per_patch = shape.v_depth * (10 * shape.v_hidden + 4 * shape.v_intermediate)
    return patches * per_patch * dtype_bytes


def logprob_op_bytes(tokens: int, vocab_local: int, dtype_bytes: int, chunk: int | None) -> int:
    """Peak bytes of the logits of one micro-batch and the fused log-prob op (ops/vocab_parallel_logprobs.py).

    Unchunked: forward fills one fp32 [tokens, V/TP] buffer and keeps it (p) for backward; backward adds the
    logits gradient and, for bf16/fp16 logits, an fp32 scratch of the same size. Chunked: the logits stay (the op
    keeps a reference), backward adds their gradient and one or two fp32 [chunk, V/TP] buffers."""
    logits = tokens * vocab_local * dtype_bytes
    scratch = 1 if dtype_bytes == 4 else 2
    if chunk is None or chunk >= tokens:
        p = tokens * vocab_local * 4
        return max(logits + p, p + logits + (scratch - 1) * p)
    return 2 * logits + scratch * chunk * vocab_local * 4


def crossmodal_kl_bytes(tokens: int, vocab_local: int, dtype_bytes: int, chunk: int | None) -> int:
    """Extra bytes of the cross-modal KL for one micro-batch of `tokens` (normal rows): the text-only copies' logits
    and their gradient, and the KL op's float32 scratch (ops/vocab_parallel_kl.py: about three [rows, V/TP] buffers
    per chunk, both softmaxes and the gradient; all `tokens` rows at most when unchunked)."""
    rows = tokens if chunk is None else min(chunk, tokens)
    return 2 * tokens * vocab_local * dtype_bytes + 3 * rows * vocab_local * 4


def plan_memory(cfg, shape: ModelShape, world_size: int, gpu_bytes: int | None = None, *,
                image_tokens: int | None = None, fused_adam: bool = True) -> MemoryPlan:
    """The plan of `cfg` on `world_size` ranks (see the module docstring). image_tokens: image tokens per rollout
    (default: half of data.max_prompt_tokens); fused_adam: False for torch's unfused AdamW (megatron's fallback
    without Transformer Engine or apex, which the actor switches to torch's fused kernel on the CPU)."""
    m, p, r = cfg.model, cfg.parallel, cfg.rollout
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp = max(world_size // (tp * pp), 1)
    b = _DTYPE_BYTES[m.params_dtype]
    multiple = sequence_multiple(m, p)
    seq = -(-(cfg.data.max_prompt_tokens + r.max_new_tokens) // multiple) * multiple
    budget = p.max_tokens_per_microbatch
    # token slots of one micro-batch: micro_batch_size full rows, or under a token budget at most the budget (a row
    # over it runs alone: one full row); the text-only copies of the cross-modal term run in the same micro-batch
    tokens = seq * p.micro_batch_size if budget is None else max(budget, seq)
    crossmodal = cfg.algorithm.crossmodal_coef != 0.0
    lm_tokens = tokens * (2 if crossmodal else 1)
    image_tokens = cfg.data.max_prompt_tokens // 2 if image_tokens is None else image_tokens
    # vision patches of one micro-batch: image_tokens x merge^2 per rollout, or at most the budget (the budget bounds
    # token slots + patches together; counting each up to the whole budget is an upper bound)
    patches = image_tokens * shape.v_merge ** 2 * p.micro_batch_size if budget is None else budget

    vision = shape.vision_params()
    stage_params = [shape.language_params(tp, pp, s) + (vision if s == 0 else 0) for s in range(pp)]
    stage = max(range(pp), key=lambda s: stage_params[s])
    params = stage_params[stage]
    trained = params - (vision if stage == 0 and not m.train_vision else 0)
    dist_opt = p.use_distributed_optimizer
    opt_per_param = (0 if b == 4 else 4) + 8
    opt_bytes = trained * opt_per_param // (dp if dist_opt else 1)
    needs_ref = cfg.algorithm.use_kl_loss or cfg.algorithm.kl_in_reward or cfg.algorithm.baseline.rho_rule == "kl_window"

    per_layer = layer_activation_bytes(shape, lm_tokens, tp, p.sequence_parallel, b,
                                       m.recompute_granularity)
    layers = shape.layers // pp
    in_flight = min(pp - stage, max(cfg.optimizer.mini_batch_size // (dp * p.micro_batch_size), 1))
    # + one layer's worth: the gradients of the layer whose backward is running, next to what it saved
    activations = per_layer * (layers * in_flight + 1)
    if m.recompute_granularity == "full":  # one recompute unit is live again during its backward
        unit = m.recompute_num_layers if m.recompute_method == "uniform" else 1
        activations += unit * layer_activation_bytes(shape, lm_tokens, tp, p.sequence_parallel,
                                                     b, None)
    trains_vision = stage == 0 and m.train_vision
    vision_act = vision_activation_bytes(shape, patches, b) * in_flight if trains_vision else 0
    vocab_local = shape.padded_vocab(tp) // tp
    last = stage == pp - 1
    # the logits exist at the response positions only (actor.with_logit_masks: at most max_new_tokens per row),
    # except for cross-modal pairs; under a token budget the rows per micro-batch are not known: its token slots
    # bound them
    packed = not crossmodal and budget is None
    logit_tokens = min(tokens, p.micro_batch_size * r.max_new_tokens) if packed else tokens
    logprob = logprob_op_bytes(logit_tokens, vocab_local, b, m.logprob_chunk_tokens) if last else 0
    kl_op = crossmodal_kl_bytes(tokens, vocab_local, b, m.logprob_chunk_tokens) if last and crossmodal else 0
    step_scratch = 0 if fused_adam else trained * 4 // (dp if dist_opt else 1)
    compute = activations + vision_act + logprob + kl_op
    backward_peak = compute >= step_scratch  # else the optimizer step, after backward, sets the training peak
    engine_rollout, engine_training, engine_note = _engine_bytes(cfg, shape, gpu_bytes, b)

    unchunked = logprob_op_bytes(logit_tokens, vocab_local, b, None) if last else 0
    no_dist = trained * opt_per_param
    recompute_alts = {g: per_layer_alt * (layers * in_flight + 1) for g, per_layer_alt in (
        (g, layer_activation_bytes(shape, lm_tokens, tp, p.sequence_parallel, b, g))
        for g in (None, "selective", "full"))}
    lines = [
        Line("weights", f"weights ({m.params_dtype})", params * b, params * b,
             f"{params / 1e9:.2f}B params on this rank"),
        Line("gradients", "gradients (fp32 buffer)", trained * 4, trained * 4, f"{trained / 1e9:.2f}B trained"),
        Line("optimizer", "optimizer states", opt_bytes, opt_bytes,
             (f"distributed over DP {dp}; {_gb(no_dist)} without" if dist_opt else
              f"{_gb(no_dist // dp)} with the distributed optimizer (DP {dp})")),
        Line("reference", f"reference model ({m.params_dtype})", params * b if needs_ref else 0,
             params * b if needs_ref else 0, "" if needs_ref else "not needed (no KL term)"),
        Line("activations", "activations", 0, activations + vision_act if backward_peak else step_scratch,
             (f"mbs {p.micro_batch_size} x {seq} tokens" if budget is None else
              f"token budget {budget} ({tokens} token slots or patches)")
             + f"{' (x2: text-only copies)' if crossmodal else ''} x "
             f"{in_flight} in flight, recompute "
             f"{m.recompute_granularity or 'none'}; none/selective/full: "
             + "/".join(_gb(v) for v in recompute_alts.values())
             + (f"; vision tower {_gb(vision_act)}" if vision_act else "")
             + ("" if backward_peak else f"; the optimizer step's scratch ({_gb(step_scratch)}, after backward) "
                f"is larger than activations + log-prob op ({_gb(compute)})")),
        Line("logprob", "logits + log-prob op", 0, logprob if backward_peak else 0,
             f"chunk {m.logprob_chunk_tokens}; unchunked {_gb(unchunked)}" if m.logprob_chunk_tokens
             else f"unchunked; {_gb(logprob_op_bytes(logit_tokens, vocab_local, b, 2048))} with chunk 2048"),
        Line("crossmodal", "cross-modal KL (copies' logits + KL op)", 0, kl_op if backward_peak else 0,
             f"algorithm.crossmodal_coef={cfg.algorithm.crossmodal_coef:g}" if crossmodal else "off"),
        Line("engine", f"rollout engine ({r.engine})", engine_rollout, engine_training, engine_note),
    ]
    layout = f"TP{tp} PP{pp} DP{dp} on {world_size} rank(s), stage {stage}"
    inputs = {"world_size": world_size, "tp": tp, "pp": pp, "dp": dp, "micro_batch_size": p.micro_batch_size,
              "sequence_tokens": seq, "image_tokens_per_rollout": image_tokens, "stage": stage,
              "params_on_rank": params, "trained_params_on_rank": trained, "fused_adam": fused_adam}
    return MemoryPlan(layout=layout, gpu_bytes=gpu_bytes, lines=lines, inputs=inputs)


def _engine_bytes(cfg, shape: ModelShape, gpu_bytes: int | None, b: int) -> tuple[int, int, str]:
    """(bytes in the rollout phase, in the training phase, note) of the rollout engine on one of its GPUs."""
    r = cfg.rollout
    weights = shape.total_params() * b // r.engine_tp_size
    if r.engine == "hf":
        seq = cfg.data.max_prompt_tokens + r.max_new_tokens
        kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * b * seq * r.hf_batch_size
        return weights + kv, weights + kv, f"weights {_gb(weights)} + KV cache {_gb(kv)} (resident)"
    if gpu_bytes is None:
        return 0, 0, f"mem_fraction {r.mem_fraction} of the GPU (no GPU size given)"
    held = int(r.mem_fraction * gpu_bytes)
    note = (f"mem_fraction {r.mem_fraction}: weights {_gb(weights)} (engine TP {r.engine_tp_size}) + KV cache "
            f"{_gb(max(held - weights, 0))}")
    return held, 0 if r.colocate else held, note + ("; released while training" if r.colocate else "")


def _gb(n: int | float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 10 ** 6:.1f} MB"

