"""The pieces of one RL step, each one call from the loop in trainer.py.

Per-token tensors are [B, L-1] (see experience.py); B is the step's rollouts (prompts_per_step * n).

Devices: the Experience, the algorithm state and everything the algorithm computes (advantages, shaping, KL,
tracker) live on the CPU; the models live on `ctx.actor.device` (parallel.compute_device). Two crossings, both here:
`token_logprobs` brings the models' per-token results back to the CPU, and `update_policy` moves what its loss reads
(advantages, old and reference log-probs, mask) to the actor's device once per call. Micro-batch inputs are moved
by `provider.run_microbatches`, one micro-batch at a time.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mssr_megatron.train import crossmodal
from mssr_megatron.train.experience import Experience, build_experience, sequence_multiple
from mssr_megatron.rollout.logprob_agreement import logprob_mismatch
from mssr_megatron.rollout.protocol import SamplingParams
from mssr_megatron.parallel import run_on_hosts
from mssr_megatron.train.run_context import RunContext


def sampling_params(ctx: RunContext, *, validation: bool = False, seed: int | None = None) -> SamplingParams:
    r = ctx.cfg.rollout
    return SamplingParams(
        temperature=r.val_temperature if validation else r.temperature,
        top_p=1.0 if validation else r.top_p,
        top_k=-1 if validation else r.top_k,
        max_new_tokens=(r.val_max_new_tokens or r.max_new_tokens) if validation else r.max_new_tokens,
        stop=list(r.stop), n=1 if validation else r.n, seed=seed,
    )


def generate(ctx: RunContext, records, sampling: SamplingParams):
    """Rollouts for the records (n per record, flat, record order), on every rank. Each engine (`ctx.engine_slots`)
    generates a contiguous slice of the records on its host while the other ranks wait outside any collective
    (`parallel.run_on_hosts`); request ids are global record positions, and the slices are concatenated in engine
    order, which is record order.

    Seeds: engine k gets sampling.seed + start_k * n, so SGLang and vLLM, which seed request i's samples with
    seed + i * n + sample, give each request the seeds a single engine would. The HF engine seeds its whole call once
    (torch.manual_seed), so its rollouts depend on how the records are split over engines."""
    from dataclasses import replace

    from mssr_megatron.data.prompts import PromptFormat, build_request
    from mssr_megatron.rollout.placement import prompt_slices

    slices = prompt_slices(len(records), len(ctx.engine_slots))
    prompt_format = PromptFormat.from_config(ctx.cfg.data)

    def run():
        start, end = slices[_own_slot(ctx)]
        if start == end:
            return []
        requests = [build_request(records[i], prompt_format, ctx.processor, request_id=f"{i}")
                    for i in range(start, end)]
        seed = None if sampling.seed is None else sampling.seed + start * sampling.n
        return ctx.engine.generate(requests, replace(sampling, seed=seed))

    parts = run_on_hosts(run, [slot.host_rank for slot in ctx.engine_slots], "rollout generation")
    return [rollout for part in parts for rollout in part]


def grade(ctx: RunContext, records, rollouts) -> tuple[list[float], dict[str, float]]:
    """Rewards per rollout and reward metrics, on every rank: each engine's host grades the rollouts of its slice of
    the records in its worker pool (the other ranks wait as in `generate`); metrics are over the whole batch."""
    from mssr_megatron.rewards import BatchScores
    from mssr_megatron.rollout.placement import prompt_slices

    slices = prompt_slices(len(records), len(ctx.engine_slots))

    def run():
        start, end = slices[_own_slot(ctx)]
        mine = [r for r in rollouts if start <= int(r.request_id) < end]
        if not mine:
            return BatchScores([], [], [], [])
        answers = [records[int(r.request_id)].answer for r in mine]
        return ctx.grader.score([r.text for r in mine], answers, ctx.cfg.data.format_reward_weight)

    parts = run_on_hosts(run, [slot.host_rank for slot in ctx.engine_slots], "reward grading")
    offsets = [sum(len(p.scores) for p in parts[:k]) for k in range(len(parts))]  # failures index the whole batch
    scores = BatchScores([s for p in parts for s in p.scores], [c for p in parts for c in p.correct],
                         [f for p in parts for f in p.format],
                         [(offset + i, why) for offset, p in zip(offsets, parts) for i, why in p.failures])
    metrics = scores.as_metrics()
    count = max(len(rollouts), 1)
    metrics["rollout/error_frac"] = sum(r.finish_reason == "error" for r in rollouts) / count
    metrics["rollout/truncated_frac"] = sum(r.finish_reason == "length" for r in rollouts) / count
    metrics["rollout/response_length"] = sum(len(r.response_ids) for r in rollouts) / count
    return scores.scores, metrics


def _own_slot(ctx: RunContext) -> int:
    """The index of the engine this rank hosts (called on hosts only)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return next(slot.index for slot in ctx.engine_slots if slot.host_rank == rank)


def make_experience(ctx: RunContext, records, rollouts, rewards) -> Experience:
    """Training tensors for the step; the images go through the processor once per prompt."""
    from mssr_megatron.data.prompts import PromptFormat

    prompt_format = PromptFormat.from_config(ctx.cfg.data)
    images_cache: dict[int, tuple] = {}
    images = []
    for r in rollouts:
        index = int(r.request_id)
        if index not in images_cache:
            images_cache[index] = _pixel_values(ctx, records[index], prompt_format)
        images.append(images_cache[index])
    exp = build_experience(
        rollouts, rewards, [records[int(r.request_id)].prompt_id for r in rollouts],
        [int(r.request_id) for r in rollouts], images,
        image_token_id=ctx.hf_config.image_token_id,
        spatial_merge_size=ctx.hf_config.vision_config.spatial_merge_size,
        pad_id=ctx.processor.tokenizer.pad_token_id,
        pad_to_multiple=sequence_multiple(ctx.cfg.model, ctx.cfg.parallel),
    )
    return balance_data_parallel(ctx, exp)


def balance_data_parallel(ctx: RunContext, exp: Experience) -> Experience:
    """With parallel.max_tokens_per_microbatch and data parallelism: the step's rows reordered so that the ranks'
    blocks cost about the same in every mini-batch (token_budget.balanced_row_order; each mini-batch keeps its rows).
    Every rank holds the same Experience and computes the same order: no collective. Unchanged otherwise."""
    from megatron.core import parallel_state as ps

    from mssr_megatron.train.token_budget import balanced_row_order, row_costs

    p, dp = ctx.cfg.parallel, ps.get_data_parallel_world_size()
    if p.max_tokens_per_microbatch is None or dp == 1:
        return exp
    costs = row_costs(exp.lengths, exp.image_grid_thw, len(exp), sequence_multiple(ctx.cfg.model, p),
                      exp.input_ids.shape[1])
    return exp.select(balanced_row_order(costs, dp, ctx.cfg.optimizer.mini_batch_size // dp))


def with_responses(ctx: RunContext, exp: Experience, responses: list) -> Experience:
    """The step's prompts (and images) with other responses: row i gets responses[i] (token ids), or keeps its own
    where that is None. The spo rule scores each prompt's response of its previous visit this way."""
    from types import SimpleNamespace

    rollouts = []
    for i, other in enumerate(responses):
        own = int(exp.response_mask[i].sum())
        prompt_len = int(exp.lengths[i]) - own if exp.lengths is not None else exp.input_ids.shape[1] - own
        response = exp.input_ids[i, prompt_len:prompt_len + own].tolist() if other is None else list(other)
        rollouts.append(SimpleNamespace(prompt_ids=exp.input_ids[i, :prompt_len].tolist(), response_ids=response,
                                        response_logprobs=[0.0] * len(response)))
    images = [None if pixels is None else (pixels, grid) for pixels, grid in
              zip(exp.pixel_values or [None] * len(exp), exp.image_grid_thw or [None] * len(exp))]
    return build_experience(
        rollouts, exp.rewards, exp.prompt_keys, exp.group_index, images,
        image_token_id=ctx.hf_config.image_token_id,
        spatial_merge_size=ctx.hf_config.vision_config.spatial_merge_size,
        pad_id=ctx.processor.tokenizer.pad_token_id,
        pad_to_multiple=sequence_multiple(ctx.cfg.model, ctx.cfg.parallel),
    )


def _pixel_values(ctx: RunContext, record, prompt_format):
    """The processor's pixel values of the record's images, resized to the pixel bounds as the engine got them."""
    if not record.images:
        return None
    from mssr_megatron.data.prompts import prompt_images

    out = ctx.processor.image_processor(images=prompt_images(record, prompt_format, ctx.processor),
                                        return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def data_parallel_rows(ctx: RunContext, num_rows: int) -> torch.Tensor:
    """This data-parallel replica's rows: a contiguous slice of the step's rollouts."""
    from megatron.core import parallel_state as ps

    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per = num_rows // dp
    return torch.arange(rank * per, (rank + 1) * per)


def microbatches(ctx: RunContext, exp: Experience, rows: torch.Tensor) -> list[dict]:
    """The micro-batches of one pass over `rows`, each cut to its own width (see experience.py); with pipeline
    parallelism all of one pass share the widest, as the stages exchange one shape. With
    parallel.max_tokens_per_microbatch, rows are packed under that budget (train/token_budget.py), as many
    micro-batches on every data-parallel rank (a collective over the data-parallel group: every rank calls this)."""
    p = ctx.cfg.parallel
    multiple = sequence_multiple(ctx.cfg.model, p)
    if p.max_tokens_per_microbatch is None:
        return exp.microbatches(rows, p.micro_batch_size, width_multiple=multiple,
                                same_width=p.pipeline_model_parallel_size > 1)
    from mssr_megatron.train.token_budget import budget_parts

    parts = budget_parts(rows, exp.lengths, exp.image_grid_thw, p.max_tokens_per_microbatch, multiple,
                         exp.input_ids.shape[1], count_group=_data_parallel_group())
    return exp.batches_of(parts, width_multiple=multiple)


def token_logprobs(ctx: RunContext, actor, exp: Experience, rows: torch.Tensor, temperature: float):
    """(logprobs, entropy), each [len(rows), L-1] in the order of `rows`, on the CPU (with the Experience), on the
    last pipeline stage; (None, None) elsewhere. Columns past a micro-batch's width (right padding) hold 0."""
    batches = microbatches(ctx, exp, rows)
    outputs = actor.token_logprobs(batches, temperature, masked_token_ids=ctx.blocked_ids)
    if not outputs:
        return None, None
    # token budgets regroup the rows: each micro-batch's results go back to its rows' places
    position = {int(r): i for i, r in enumerate(torch.as_tensor(rows).tolist())}
    logprobs, entropy = (torch.zeros(len(position), exp.input_ids.shape[1] - 1, dtype=t.dtype) for t in outputs[0])
    for batch, (lp, ent) in zip(batches, outputs):
        places = torch.tensor([position[int(r)] for r in batch["rows"]], dtype=torch.long)
        logprobs[places, : lp.shape[-1]] = lp.cpu()
        entropy[places, : ent.shape[-1]] = ent.cpu()
    return logprobs, entropy


def update_policy(ctx: RunContext, exp: Experience, rows, advantages, old_logprobs, ref_logprobs):
    """Mini-batched PPO updates over this replica's rows (gradient accumulation over micro-batches). Returns metrics.

    advantages, old/ref log-probs: [len(rows), L-1] on the last stage (None elsewhere), on any device: what the loss
    reads (with the engine's log-probs of the rows, for algorithm.rollout_correction) is moved to the actor's device
    here, once.
    """
    from megatron.core import parallel_state as ps

    cfg = ctx.cfg
    temperature = cfg.rollout.temperature
    local_mini = cfg.optimizer.mini_batch_size // ps.get_data_parallel_world_size()
    mask = exp.response_mask[rows]
    device = ctx.actor.device
    advantages, old_logprobs, ref_logprobs, rollout_logprobs, token_mask = (
        None if t is None else t.to(device)
        for t in (advantages, old_logprobs, ref_logprobs, exp.rollout_logprobs[rows], mask))
    metrics: list[dict[str, float]] = []
    for _ in range(cfg.optimizer.ppo_epochs):
        for start in range(0, len(rows), local_mini):
            part = torch.arange(start, start + local_mini)
            tokens = _global_count(mask[part])
            normalizer = tokens if cfg.algorithm.loss_agg_mode == "token-mean" else _global_count(
                (mask[part].sum(-1) > 0).float())
            position = {int(r): i for i, r in enumerate(rows.tolist())}

            def loss_fn(logprobs, entropy, batch, part=part):
                local = torch.tensor([position[int(r)] for r in batch["rows"]], device=device)
                width = logprobs.shape[-1]  # the micro-batch's own width: its per-token tensors are cut to it
                ref = None if ref_logprobs is None else ref_logprobs[local, :width]
                return ctx.algo.loss(logprobs, old_logprobs[local, :width], advantages[local, :width],
                                     token_mask[local, :width], ref_logprobs=ref,
                                     rollout_logprobs=rollout_logprobs[local, :width], entropy=entropy,
                                     crossmodal=batch.get(crossmodal.KL_KEY), normalizer=normalizer)

            batches = microbatches(ctx, exp, rows[part])
            if cfg.algorithm.crossmodal_coef != 0.0:  # each row's text-only copy runs beside it (crossmodal.py)
                batches = crossmodal.paired_microbatches(batches, exp, ctx.hf_config,
                                                         ctx.processor.tokenizer.pad_token_id)
            metrics.append(ctx.actor.train_step(batches, loss_fn, temperature, masked_token_ids=ctx.blocked_ids))
    keys = set().union(*metrics) if metrics else set()
    return {k: sum(m.get(k, 0.0) for m in metrics) / len(metrics) for k in keys}


def _global_count(mask: torch.Tensor) -> float:
    """Sum of a 0/1 mask over all data-parallel replicas (the loss normaliser of a mini-batch)."""
    from megatron.core import parallel_state as ps

    from mssr_megatron.parallel import collective_device

    total = mask.sum().to(torch.float64).reshape(1)
    if ps.get_data_parallel_world_size() > 1:
        group = ps.get_data_parallel_group()
        total = total.to(collective_device(group))
        dist.all_reduce(total, group=group)
    return float(total)


def from_last_stage(value):
    """A Python value computed on the last pipeline stage, on every rank of the pipeline group."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return value
    box = [value]
    src = dist.get_global_rank(ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_world_size() - 1)
    dist.broadcast_object_list(box, src=src, group=ps.get_pipeline_model_parallel_group())
    return box[0]


def mismatch_metrics(old_logprobs, rollout_logprobs, mask) -> dict[str, float]:
    """Engine/trainer log-prob mismatch over every data-parallel replica's rows (the same values on every rank of the
    last stage; the step's KL to the reference is the algorithm pipeline's: RLAlgorithm.advantages measures it on the
    global batch)."""
    if old_logprobs is None:
        return {}
    mismatch = logprob_mismatch(rollout_logprobs, old_logprobs, mask, group=_data_parallel_group())
    return {f"mismatch/{k}": float(v) for k, v in mismatch.items()}


def _data_parallel_group():
    """The data-parallel group when there are several replicas (each holds its own rows of the step), else None."""
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group() if ps.get_data_parallel_world_size() > 1 else None
