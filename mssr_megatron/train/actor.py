"""The policy on this rank: a Qwen2.5-VL stage wrapped in Megatron DDP, its optimizer and LR schedule.

    actor = MegatronActor(hf_config, cfg.model, cfg.optimizer, total_optimizer_steps, device=device,
                          parallel_cfg=cfg.parallel)
    actor.load_hf_state(hf_state)
    out = actor.token_logprobs(batches, temperature)    # last stage: [(logprobs [B, S-1], entropy [B, S-1]), ...]
    metrics = actor.train_step(batches, loss_fn)        # forward, backward, grad finalisation, clip, optimizer step

Token t's log-prob is read from the logits at position t - 1 (the usual shift), through the fused vocab-parallel op.
A reference policy is the same class without an optimizer (`optim_cfg=None`).
parallel_cfg (cfg.parallel) switches on sequence parallelism and Megatron's distributed optimizer (optimizer states
and fp32 main weights sharded over the data-parallel ranks, gradients reduce-scattered); None: neither.

Device: the stage lives on `device` (`parallel.compute_device`; default the CPU) and `actor.device` says where.
Micro-batches may be anywhere: their model inputs are moved to the model's device one micro-batch at a time
(`provider.run_microbatches`), so per-token results come back on `actor.device`, and a train_step loss_fn gets
log-probs there and must bring its own per-token tensors (advantages, old log-probs, mask) to the same device.
"""

from __future__ import annotations

from typing import Callable

import torch

from mssr_megatron.checkpoint.hf_bridge import load_hf_weights
from mssr_megatron.checkpoint.mapping import ModelDims
from mssr_megatron.models.provider import build_model, module_device, run_microbatches
from mssr_megatron.models.qwen2_5_vl import padded_vocab_size
from mssr_megatron.ops import vocab_parallel_logprobs_entropy
from mssr_megatron.train.crossmodal import PAIRED_KEY, split_paired_output
from mssr_megatron.train.finite_check import NonFiniteError, nonfinite_gradient, nonfinite_weight

_LR_STYLES = {"constant": "constant", "cosine": "cosine", "linear": "linear"}


def shifted_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, vocab_size: int, temperature: float = 1.0,
                     masked_token_ids=None, chunk_size: int | None = None, logit_mask: torch.Tensor | None = None):
    """Log-prob and full-vocabulary entropy of each next token: logits [B, S, V/TP] -> two [B, S-1] tensors.
    masked_token_ids: tokens the rollout engine never samples, left out of the softmax as the engine does.
    chunk_size: tokens per chunk of the fused op (model.logprob_chunk_tokens); None = all tokens at once.
    logit_mask [B, S]: the logits are the model's packed ones at its True positions, [1, N, V/TP]; the results are
    put back at those positions, 0 elsewhere."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group() if ps.model_parallel_is_initialized() else None
    # Targets for all S positions (the last one's is a dummy, dropped below), so the op reads the logits as they
    # are: slicing logits[:, :-1] would make them non-contiguous for B > 1 and cost the op a logits-sized copy.
    targets = input_ids.roll(-1, dims=1)
    if masked_token_ids is not None and len(masked_token_ids):
        # Prompts hold blocked tokens (<|image_pad|>, padding) whose log-prob is -inf under the engine's
        # distribution; those positions carry no loss, so any allowed id keeps them finite (0 * -inf would be NaN).
        masked = torch.as_tensor(masked_token_ids, dtype=targets.dtype, device=targets.device)
        allowed = next(i for i in range(len(masked_token_ids) + 1) if i not in set(masked_token_ids))
        targets = torch.where(torch.isin(targets, masked), torch.full_like(targets, allowed), targets)
    if logit_mask is not None:
        targets = targets[logit_mask].unsqueeze(0)  # [1, N], in the packed logits' order
    logprobs, entropy = vocab_parallel_logprobs_entropy(
        logits, targets, tp_group=group, temperature=temperature, vocab_size=vocab_size,
        masked_token_ids=masked_token_ids, chunk_size=chunk_size,
    )
    if logit_mask is not None:
        logprobs, entropy = (t.new_zeros(input_ids.shape).index_put((logit_mask,), t[0]) for t in (logprobs, entropy))
    return logprobs[:, :-1], entropy[:, :-1]


def with_logit_masks(batches: list[dict]) -> list[dict]:
    """The micro-batches, each given logit_mask [B, S] (its response_mask [B, S-1] and a False last column) where the
    model can compute the logits at those positions only (Qwen2_5_VLMegatron.forward): the loss reads log-probs and
    entropies of response tokens only, so the output layer and the log-prob op skip the prompt (image tokens
    included), most of a multimodal sequence; the results are the same at the response positions and 0 elsewhere.
    Left as they are: micro-batches without a response_mask or without any response token, and cross-modal pairs
    (their KL reads both halves' logits, crossmodal.py)."""
    out = []
    for batch in batches:
        mask = batch.get("response_mask")
        if mask is None or PAIRED_KEY in batch or not bool(mask.any()):
            out.append(batch)
            continue
        last = torch.zeros(len(mask), 1, dtype=torch.bool, device=mask.device)  # no token follows the last position
        out.append({**batch, "logit_mask": torch.cat([mask.bool(), last], 1)})
    return out


def use_fused_torch_adam(optimizer) -> int:
    """Switch the torch Adam(W) inside megatron's optimizer to torch's fused kernel where its parameters are on the
    CPU; returns the number of param groups switched. Megatron steps with Transformer Engine's or apex's fused Adam
    when either is installed (GPU nodes) and otherwise falls back to torch's AdamW with its defaults, which on the CPU
    is the per-parameter loop: a dozen elementwise passes over every parameter and Adam state (0.29 s per step for
    100M parameters on 2 cores) where the fused kernel makes one (0.07 s). Same update up to float rounding; the
    step counters stay per-parameter float32 tensors (the checkpoint layout does not change). Idempotent: called
    again after an optimizer load, whose param groups come from the checkpoint."""
    switched = 0
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        adam = getattr(inner, "optimizer", None)
        if not isinstance(adam, torch.optim.Adam):  # TE's / apex's FusedAdam, or not Adam at all
            continue
        for group in adam.param_groups:
            if not group.get("fused") and all(p.device.type == "cpu" for p in group["params"]):
                group["fused"], group["foreach"] = True, False
                switched += 1
    return switched


def lr_decay_steps(decay_steps: int | None, warmup_steps: int, total_optimizer_steps: int) -> int:
    """Optimizer steps the LR schedule decays over: optimizer.lr_decay_steps, or every optimizer step of the run
    (null); past the warmup (megatron's scheduler needs warmup < decay)."""
    return max(decay_steps or max(total_optimizer_steps, 1), warmup_steps + 1)


class MegatronActor:
    def __init__(self, hf_config, model_cfg, optim_cfg=None, total_optimizer_steps: int = 1,
                 device: torch.device | str | None = None, parallel_cfg=None):
        from megatron.core import parallel_state as ps

        self.hf_config = hf_config
        self.vocab_size = hf_config.text_config.vocab_size
        self.logprob_chunk_tokens = model_cfg.logprob_chunk_tokens  # the fused op's chunk (bounds its fp32 scratch)
        sequence_parallel = bool(parallel_cfg and parallel_cfg.sequence_parallel)
        self.use_distributed_optimizer = bool(parallel_cfg and parallel_cfg.use_distributed_optimizer)
        self.vision_balance = model_cfg.vision_balance  # tp_balanced: the tower's gradients summed over TP per step
        # on `device` before DDP and the optimizer see it
        module = build_model(hf_config, model_cfg, device, sequence_parallel=sequence_parallel)
        self.device = module_device(module)
        self.dims = ModelDims.from_hf_config(
            hf_config, padded_vocab_size(self.vocab_size, ps.get_tensor_model_parallel_world_size())
        )
        self.optimizer = self.scheduler = None
        self.nonfinite: str | None = None  # what was non-finite in the last train_step (it was then skipped)
        self.model = module
        if optim_cfg is not None:
            self._setup_training(module, optim_cfg, total_optimizer_steps)

    def _setup_training(self, module, optim_cfg, total_optimizer_steps: int) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        config = module.config
        # With the distributed optimizer, gradients are reduce-scattered and the updated weights all-gathered after
        # each step. Both stay synchronous: no --overlap-grad-reduce, because a trained parameter that gets no
        # gradient in a step (the vision tower on a mini-batch of text-only prompts) never marks its bucket ready,
        # and megatron's bookkeeping then fails at the next zero_grad_buffer (AssertionError in
        # param_and_grad_buffer.reset); no --overlap-param-gather, which would defer the all-gather to the next
        # forward pass, while the weight sync and the checkpoints read the weights right after the step. Same code on
        # gloo (CPU) and NCCL.
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=self.use_distributed_optimizer,
            overlap_grad_reduce=False, overlap_param_gather=False,
        )
        self.model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=module)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=optim_cfg.lr, min_lr=optim_cfg.min_lr, weight_decay=optim_cfg.weight_decay,
                adam_beta1=optim_cfg.adam_beta1, adam_beta2=optim_cfg.adam_beta2, adam_eps=optim_cfg.adam_eps,
                clip_grad=optim_cfg.grad_clip, bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype,
                use_distributed_optimizer=self.use_distributed_optimizer,
            ),
            [self.model],
        )
        use_fused_torch_adam(self.optimizer)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if optim_cfg.warmup_steps else optim_cfg.lr, max_lr=optim_cfg.lr,
            min_lr=optim_cfg.min_lr, lr_warmup_steps=optim_cfg.warmup_steps,
            lr_decay_steps=lr_decay_steps(optim_cfg.lr_decay_steps, optim_cfg.warmup_steps, total_optimizer_steps),
            lr_decay_style=_LR_STYLES[optim_cfg.lr_schedule], start_wd=optim_cfg.weight_decay,
            end_wd=optim_cfg.weight_decay, wd_incr_steps=1, wd_incr_style="constant",
            # on resume this config's schedule applies (resume_config says what may change): the checkpoint gives
            # only the step count (load_scheduler_state)
            use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
        )
        if self.vision_balance == "tp_balanced":
            from megatron.core import parallel_state as ps

            from mssr_megatron.models.vision_balance import allreduce_vision_grads

            def finalize_grads(model, *args, **kwargs):
                # THE tensor-parallel reduction of the vision tower's gradients under tp_balanced (each rank encoded
                # only its share of the images), over the TP group, after the backward passes and before megatron's
                # data-parallel reduction, which sums the same buffers over the other axis (no parameter is summed
                # over TP twice: vision_balance.py)
                allreduce_vision_grads(module, ps.get_tensor_model_parallel_group())
                finalize_model_grads(model, *args, **kwargs)

            config.finalize_model_grads_func = finalize_grads
        else:
            config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = self.model.no_sync
        config.grad_scale_func = self.optimizer.scale_loss

    def load_scheduler_state(self, state: dict) -> None:
        """Continue the LR schedule from a checkpoint's step count with THIS config's settings (lr, min_lr, warmup,
        decay, weight decay). The scheduler overrides its checkpointed values (override_opt_param_scheduler); the
        peak and final LR it reads are also in each param group ('max_lr', 'min_lr', set by megatron from the
        optimizer config), which the optimizer's checkpoint load restored to the old run's: reset first."""
        for group in self.optimizer.param_groups:
            group["max_lr"], group["min_lr"] = self.scheduler.max_lr, self.scheduler.min_lr
        self.scheduler.load_state_dict(state)

    @property
    def module(self):
        """The unwrapped Qwen2.5-VL stage."""
        return getattr(self.model, "module", self.model)

    def load_hf_state(self, hf_state: dict[str, torch.Tensor]) -> set[str]:
        """Copy this rank's shards from a published-name HF state dict; returns the HF names read."""
        consumed = load_hf_weights(self.module, hf_state, self.dims)
        if self.optimizer is not None:
            self.optimizer.reload_model_params()  # keep fp32 main params (bf16 training) in step with the model
        return consumed

    @torch.no_grad()
    def token_logprobs(self, batches: list[dict], temperature: float = 1.0,
                       masked_token_ids=None) -> list[tuple[torch.Tensor, ...]]:
        """Per micro-batch (logprobs [B, S-1], entropy [B, S-1]) on the last pipeline stage, on `self.device`; []
        elsewhere. Each micro-batch's logits are reduced to these as soon as they are computed (and then freed). A
        micro-batch with a response_mask gets them at its response positions only, 0 elsewhere (with_logit_masks)."""
        self.model.eval()

        def reduce(output, batch):  # the forward-only "loss": a dummy scalar, the per-token results as its report
            logprobs, entropy = shifted_logprobs(output, batch["input_ids"], self.vocab_size, temperature,
                                                 masked_token_ids, self.logprob_chunk_tokens, batch.get("logit_mask"))
            return output.new_zeros(()), {"logprobs": logprobs, "entropy": entropy}

        batches = with_logit_masks(batches)
        reports = run_microbatches(self.model, batches, forward_only=True, loss_fn=reduce, device=self.device)
        return [(r["logprobs"], r["entropy"]) for r in reports]

    def train_step(self, batches: list[dict], loss_fn: Callable, temperature: float = 1.0,
                   masked_token_ids=None) -> dict[str, float]:
        """One optimizer step over the micro-batches.

        loss_fn(logprobs [B, S-1], entropy [B, S-1], batch) -> (loss, metrics) must already divide by the token (or
        sequence) count of the WHOLE mini-batch; the schedule's averaging over micro-batches and DDP's over
        data-parallel ranks are undone here, so gradients are those of the mini-batch loss. It runs on the last
        stage with logprobs/entropy on `self.device` and the micro-batch whose model inputs were moved there (its
        other entries, e.g. `rows`, as given). A paired micro-batch (crossmodal.paired_microbatches: rows with their
        text-only copies) reaches loss_fn as its normal rows, with the per-token cross-modal KL under KL_KEY.
        A micro-batch with a response_mask gets logprobs/entropy at its response positions only, 0 elsewhere
        (with_logit_masks): loss_fn must read them through that mask, as the losses do.
        Raises NonFiniteError when the updated weights hold a NaN/Inf (on every rank: finite_check), before anything
        could save or export them.
        """
        from megatron.core import parallel_state as ps

        scale = len(batches) * ps.get_data_parallel_world_size()

        def stage_loss(output, batch):
            if PAIRED_KEY in batch:  # rows + their text-only copies (crossmodal.py): the KL joins the batch
                output, batch = split_paired_output(output, batch, self.vocab_size, temperature, masked_token_ids,
                                                    self.logprob_chunk_tokens)
            logprobs, entropy = shifted_logprobs(output, batch["input_ids"], self.vocab_size, temperature,
                                                 masked_token_ids, self.logprob_chunk_tokens, batch.get("logit_mask"))
            loss, metrics = loss_fn(logprobs, entropy, batch)
            reported = {"loss": loss, **metrics}
            return loss * scale, {k: torch.tensor(float(torch.as_tensor(v).detach())) for k, v in reported.items()}

        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        batches = with_logit_masks(batches)
        reports = run_microbatches(self.model, batches, forward_only=False, loss_fn=stage_loss, device=self.device)
        self.nonfinite = self._find_nonfinite(reports)
        if self.nonfinite is None:
            updated, grad_norm, _ = self.optimizer.step()
        else:  # skip the update: a NaN/Inf step must not reach the weights
            updated, grad_norm = False, float("nan")
        if updated:
            self.scheduler.step(increment=1)
            bad = nonfinite_weight(self.module)  # finite loss and gradients can still overflow in the update
            if bad is not None:
                raise NonFiniteError(f"non-finite weights after the optimizer step: {bad}")
        metrics = {"actor/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                   "actor/lr": self.optimizer.param_groups[0]["lr"], "actor/update_skipped": float(not updated)}
        for key in reports[0] if reports else ():
            metrics[f"actor/{key}" if "/" not in key else key] = sum(float(r[key]) for r in reports) / len(reports)
        return metrics

    def _find_nonfinite(self, reports) -> str | None:
        """Name of the first non-finite thing of this step (the loss, or a parameter's gradient), agreed by all
        ranks; None when everything is finite."""
        import torch.distributed as dist

        from mssr_megatron.parallel import collective_device

        loss_bad = any(not torch.isfinite(r["loss"]).all() for r in reports)
        found = "loss" if loss_bad else nonfinite_gradient(self.model)
        flag = torch.tensor([0.0 if found is None else 1.0], device=collective_device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and found is None:
            found = "a tensor on another rank"
        return found
