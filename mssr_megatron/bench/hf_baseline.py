"""A plain Hugging Face training update of the same model on the same data: the baseline of `mssr bench`.

`HFBaseline.update(...)` does what `rl_step.update_policy` + `MegatronActor.train_step` do, with transformers'
`Qwen2_5_VLForConditionalGeneration` and `torch.optim.AdamW` instead of Megatron-Core:
for each PPO epoch and mini-batch (optimizer.mini_batch_size rows), for each micro-batch (parallel.micro_batch_size
rows, the SAME rows, token ids, images, mrope inputs and padding as Megatron's): forward -> per-token log-prob and
entropy of the next token (the same fused op and masked tokens) -> the same loss object (`ctx.algo.loss`, with the
same old/reference log-probs, advantages and mini-batch normaliser) -> backward (gradients accumulate over the
micro-batches); then gradient-norm clipping at optimizer.grad_clip and one AdamW step at optimizer.lr (betas, eps and
weight decay from the config; no decay on biases and 1-D weights, as Megatron's optimizer groups them). The AdamW is
torch's default, on the CPU its per-parameter loop ("plain PyTorch"); `fused_adam=True` takes torch's fused kernel, as
Megatron's optimizer does on the CPU (actor.use_fused_torch_adam): the baseline without that difference.
Timed on both sides: forward, backward, clipping, optimizer step, zero_grad. Megatron's time also holds what its
train_step adds (DDP gradient buffers, the non-finite gradient check, the LR scheduler); the HF loop has none of it.
Attention: torch's SDPA on both sides (HF's default "sdpa"; the local layer spec's models/sdpa_attention.py).
The weights start as the rollout engine's (= the policy's after the last sync), so the PPO ratios start near 1.
"""

from __future__ import annotations

import torch

from mssr_megatron.train.actor import shifted_logprobs


class HFBaseline:
    def __init__(self, model_dir: str, ctx, device: torch.device, fused_adam: bool = False):
        """fused_adam: torch's fused AdamW kernel instead of its default (the per-parameter loop on the CPU)."""
        from transformers import Qwen2_5_VLForConditionalGeneration

        cfg = ctx.cfg
        dtype = getattr(torch, cfg.model.params_dtype)
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).to(device)
        if ctx.engine is not None and hasattr(ctx.engine, "model") and ctx.engine.model is not None:
            self.model.load_state_dict(ctx.engine.model.state_dict())  # the policy's current weights
        self.model.model.visual.requires_grad_(cfg.model.train_vision)
        self.model.train()
        self.device = device
        self.vocab_size = ctx.hf_config.text_config.vocab_size
        self.image_token_id = ctx.hf_config.image_token_id
        o = cfg.optimizer
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (no_decay if name.endswith(".bias") or param.ndim == 1 else decay).append(param)
        self.params = decay + no_decay
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, fused=fused_adam or None)
        self.grad_clip = o.grad_clip

    def _inputs(self, batch: dict, lengths: torch.Tensor) -> dict:
        """HF inputs of one Megatron micro-batch: input_ids [b, L], attention_mask [b, L] (1 on the real,
        right-padded tokens), mm_token_type_ids [b, L] (HF derives the same mrope positions from them),
        pixel_values [patches, C*T*P*P], image_grid_thw [images, 3]."""
        ids = batch["input_ids"]
        attention = (torch.arange(ids.shape[1]) < lengths[batch["rows"]].unsqueeze(1)).long()
        out = {"input_ids": ids, "attention_mask": attention,
               "mm_token_type_ids": (ids == self.image_token_id).long()}
        if "pixel_values" in batch:
            out["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
            out["image_grid_thw"] = batch["image_grid_thw"]
        return {k: v.to(self.device) for k, v in out.items()}

    def logprobs(self, batch: dict, lengths: torch.Tensor, temperature: float, blocked_ids) -> tuple:
        """(logprobs, entropy), each [b, L-1], of one micro-batch: the HF forward's logits [b, L, V] through the same
        op and masked tokens as MegatronActor (with grad when the model is in a grad-enabled context)."""
        logits = self.model(**self._inputs(batch, lengths)).logits
        return shifted_logprobs(logits, batch["input_ids"].to(self.device), self.vocab_size, temperature, blocked_ids)

    def update(self, ctx, exp, rows: torch.Tensor, lengths: torch.Tensor, advantages, old_logprobs,
               ref_logprobs) -> dict[str, float]:
        """One RL step's policy update (all PPO epochs and mini-batches) on this model; returns the mean loss.

        rows: the experience rows [R]; lengths [len(exp)]: real tokens per row; advantages, old/ref log-probs:
        [R, L-1] as rl_step.update_policy receives them."""
        cfg = ctx.cfg
        temperature = cfg.rollout.temperature
        mask = exp.response_mask[rows]
        position = {int(r): i for i, r in enumerate(rows.tolist())}
        losses = []
        for _ in range(cfg.optimizer.ppo_epochs):
            for start in range(0, len(rows), cfg.optimizer.mini_batch_size):
                part = torch.arange(start, start + cfg.optimizer.mini_batch_size)
                # The same normaliser as rl_step.update_policy (single process: no data-parallel sum).
                normalizer = float(mask[part].sum()) if cfg.algorithm.loss_agg_mode == "token-mean" else float(
                    (mask[part].sum(-1) > 0).float().sum())
                self.optimizer.zero_grad(set_to_none=True)
                for batch in exp.microbatches(rows[part], cfg.parallel.micro_batch_size):
                    logprobs, entropy = self.logprobs(batch, lengths, temperature, ctx.blocked_ids)
                    local = torch.tensor([position[int(r)] for r in batch["rows"]])
                    dev = self.device
                    ref = None if ref_logprobs is None else ref_logprobs[local].to(dev)
                    loss, _ = ctx.algo.loss(logprobs, old_logprobs[local].to(dev), advantages[local].to(dev),
                                            mask[local].to(dev), ref_logprobs=ref,
                                            rollout_logprobs=exp.rollout_logprobs[batch["rows"]].to(dev),
                                            entropy=entropy, normalizer=normalizer)
                    loss.backward()
                    losses.append(float(loss.detach()))
                if self.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
                self.optimizer.step()
        return {"loss": sum(losses) / max(len(losses), 1)}
