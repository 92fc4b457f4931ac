"""Everything a training run holds, built once from the config: process groups, policy and reference models,
the rollout engines, data, reward grader, algorithm state, metrics and checkpoints.

Placement (`rollout.engines`, rollout/placement.py; `RunContext.engine_slots`): one engine per slot, built on its
host rank (a pipeline-stage-0 trainer rank; `ctx.engine` is None on every other rank). per_node (the default) fills
each node's GPUs with engines of `rollout.engine_tp_size` GPUs (on the CPU: one HF engine per trainer rank);
per_dp_group puts one on each data-parallel replica's weight owner; single one on global rank 0. Each engine
generates, and its host grades, a contiguous slice of the step's prompts (rl_step.generate / grade); every rank gets
all rollouts and rewards in prompt order; each data-parallel replica trains on its slice of the rollouts; every host
receives the full weights from its own pipeline group (weight_export.sync_weights with `hosts`).

Device: `parallel.compute_device(trainer.device)` decides it once, after the process groups exist (on GPU:
cuda:<LOCAL_RANK>); the policy, the reference model and the HF rollout engine are placed there (`RunContext.device`).

Memory on an engine's GPU (`RunContext.colocation`, rollout.colocate): the engines are built FIRST, on an empty GPU
(SGLang sizes its KV cache and vLLM checks its share from the free memory at start), then released; the policy and
reference models are built into that room. The context returned holds an engine serving the policy's weights: its
weights are resumed, filled by a weight sync, then its KV cache is resumed (factory.Colocation).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mssr_megatron.config import RunConfig, dump_yaml
from mssr_megatron.rollout.placement import EngineSlot

log = logging.getLogger("mssr")


@dataclass
class RunContext:
    cfg: RunConfig
    hf_config: object
    processor: object
    actor: object
    reference: object | None
    engine: object | None
    colocation: object
    """factory.Colocation: releases / resumes the engine's memory around the training phase (no-ops without an
    engine on this rank or with rollout.colocate=false)."""
    grader: object
    algo: object
    train: object
    val: object | None
    sampler: object
    logger: object
    blocked_ids: list[int]
    run_dir: str
    step: int = 0
    extra: dict = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where the models run (parallel.compute_device of trainer.device); Experience and algorithm state stay on the
    CPU."""
    engine_slots: list = field(default_factory=lambda: [EngineSlot(0, 0, 0, ())])
    """placement.EngineSlot of every engine of the job, in prompt-slice order (the same list on every rank)."""
    resume_path: str | None = None
    """The verified checkpoint this run resumes from (run_checkpoint.resolve_resume); None = a fresh run."""
    run_id: str | None = None
    """The run's id (train/run_dir.py): written into its checkpoints, which keep-last and resume=auto go by."""

    @property
    def engine_hosts(self) -> list[int]:
        """Global ranks that drive an engine (and receive the full weights in a sync)."""
        return [slot.host_rank for slot in self.engine_slots]

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def is_driver(self) -> bool:
        """The rank that logs and writes the run's files (global rank 0; engines have their own hosts)."""
        return self.rank == 0

    def close(self) -> None:
        """Stop the reward workers and the engine, close the logs, tear down the process groups."""
        from mssr_megatron.parallel import destroy_megatron

        self.grader.close()
        if self.engine is not None:
            self.engine.shutdown()
        self.logger.close()
        destroy_megatron()


def looks_like_hub_id(path: str) -> bool:
    """'owner/name' that is not a local path: what from_pretrained would fetch from the Hugging Face hub."""
    return (not os.path.exists(path) and path.count("/") == 1 and not path.startswith((".", "~"))
            and all(part and part.replace("-", "").replace("_", "").replace(".", "").isalnum()
                    for part in path.split("/")))


def load_hf_config(model_dir: str):
    """The HF config of model.hf_path, a local directory only: the trainer never downloads (cluster nodes have no
    internet, and every rank would fetch on its own), so a hub id or a missing directory is refused, saying how."""
    from transformers import AutoConfig

    if looks_like_hub_id(model_dir):
        raise FileNotFoundError(
            f"model.hf_path={model_dir!r} looks like a Hugging Face hub id; download it on a machine with internet "
            f"access (`huggingface-cli download {model_dir} --local-dir DIR`, DIR on storage every node sees) and "
            "point model.hf_path at the local directory DIR")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"model.hf_path={model_dir!r} has no config.json: point it at a local Hugging Face "
                                "Qwen2.5-VL directory (the published configs hold a placeholder path to replace; for "
                                "the tiny default, run `mssr make-tiny` first)")
    return AutoConfig.from_pretrained(model_dir)


def build_context(cfg: RunConfig) -> RunContext:
    """Set up the whole run. Config and data problems are raised here, before any model is built."""
    from megatron.core import parallel_state as ps

    from mssr_megatron.train import benchmark_eval
    from mssr_megatron.train.actor import MegatronActor
    from mssr_megatron.algorithms.pipeline import RLAlgorithm
    from mssr_megatron.checkpoint.dist_io import HFTensors, hf_tensor_index
    from mssr_megatron.data.prompts import load_split
    from mssr_megatron.data.sampler import PromptSampler
    from mssr_megatron.metrics import MetricsLogger
    from mssr_megatron.models.provider import check_layout
    from mssr_megatron.models.processor import load_processor
    from mssr_megatron.parallel import compute_device, init_megatron, run_on_hosts
    from mssr_megatron.plan import check_training_start
    from mssr_megatron.rewards import RewardGrader
    from mssr_megatron.rollout.factory import Colocation
    from mssr_megatron.rollout.nccl_env import set_engine_nccl_env
    from mssr_megatron.rollout.placement import live_engine_slots, reward_workers_per_host
    from mssr_megatron.rollout.sampling import blocked_token_ids
    from mssr_megatron.rollout.weight_export import sync_weights
    from mssr_megatron.train.resume_config import check_resume_config
    from mssr_megatron.train.run_checkpoint import resolve_resume
    from mssr_megatron.train.run_dir import apply_on_rank0, plan_run_dir

    run_dir_plan = plan_run_dir(cfg)  # a fresh run into a used directory is refused here, before anything is loaded
    set_engine_nccl_env(cfg.rollout.engine)  # every rank, before any communicator: as the engine's rank will have it
    hf_config = load_hf_config(cfg.model.hf_path)
    hf_tensor_index(cfg.model.hf_path)  # weight files whole (sizes vs headers): a damaged one named in one line, now
    check_layout(hf_config, cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    processor = load_processor(cfg.model.hf_path)
    train_set = load_split(cfg.data.train_path, cfg.data, "train", processor)
    val_set = load_split(cfg.data.val_path, cfg.data, "val", processor) if cfg.data.val_path else None
    p = cfg.parallel
    init_megatron(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, seed=cfg.trainer.seed,
                  backend=p.backend, device=cfg.trainer.device, timeout_minutes=p.timeout_minutes)
    device = compute_device(cfg.trainer.device)
    cfg.validate(world_size=dist.get_world_size())
    # collective: the checkpoint's files are checked before anything is built or written
    resume_path = resolve_resume(cfg, run_dir_plan.run_id)
    # before config.yaml is rewritten and any model is built: what may change from the checkpoint's run
    check_resume_config(cfg, resume_path)
    check_training_start(cfg, hf_config, dist.get_world_size(), device)  # CUDA: refuse a plan over the GPU's memory
    run_dir = cfg.trainer.output_dir
    run_id = apply_on_rank0(run_dir_plan, cfg)  # before anything else in the run directory is written
    rank0 = dist.get_rank() == 0
    if rank0:
        os.makedirs(run_dir, exist_ok=True)
        dump_yaml(cfg, os.path.join(run_dir, "config.yaml"))
        log.info(train_set.summary())
        if val_set is not None:
            log.info(val_set.summary())
    # the engines before the models (see module docstring); the other ranks wait outside any collective meanwhile
    slots = live_engine_slots(cfg.rollout, device)
    eval_sets = benchmark_eval.read_sets(cfg, [slot.host_rank for slot in slots])  # trainer.eval_every's suite
    own = [slot for slot in slots if slot.host_rank == dist.get_rank()]
    engine = run_on_hosts(lambda: _build_engine(cfg, device, own[0]), [slot.host_rank for slot in slots],
                          "rollout engine start-up", share=False)
    colocation = Colocation.from_config(cfg, engine)
    colocation.release()
    torch.manual_seed(cfg.trainer.seed)  # after the engine: the same RNG stream on every rank, with any engine
    total_updates = cfg.trainer.total_steps * cfg.optimizer_steps_per_step
    actor = MegatronActor(hf_config, cfg.model, cfg.optimizer, total_updates, device=device, parallel_cfg=cfg.parallel)
    actor.load_hf_state(HFTensors(cfg.model.hf_path))
    needs_reference = (cfg.algorithm.use_kl_loss or cfg.algorithm.kl_in_reward
                       or cfg.algorithm.baseline.rho_rule == "kl_window")
    reference = None
    if needs_reference:
        reference = MegatronActor(hf_config, cfg.model, device=device, parallel_cfg=cfg.parallel)
        reference.load_hf_state(HFTensors(cfg.model.ref_hf_path or cfg.model.hf_path))
    with colocation.weight_update():  # the engine serves the policy's weights from here on
        sync_weights(actor.module, actor.dims, engine, cfg.rollout.weight_bucket_bytes,
                     hosts=[slot.host_rank for slot in slots])
    # the algorithm state's reductions span the data-parallel replicas; the last pipeline stage shares its inputs
    algo = RLAlgorithm(cfg.algorithm, dp_group=ps.get_data_parallel_group(),
                       stage_group=ps.get_pipeline_model_parallel_group())
    sampler = PromptSampler(len(train_set), cfg.data.prompts_per_step, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    # every rank holds a grader, but its worker pool starts on first use: on the engines' hosts only (rl_step.grade),
    # which share their node's data.reward_workers
    workers = reward_workers_per_host(cfg.data.reward_workers, slots, dist.get_rank()) if own else 0
    grader = RewardGrader(cfg.data.reward, num_workers=workers, timeout_s=cfg.data.reward_timeout_s)
    logger = MetricsLogger(run_dir, jsonl=cfg.logging.jsonl, tensorboard=cfg.logging.tensorboard,
                           progress_bar=cfg.logging.progress_bar, total_steps=cfg.trainer.total_steps, enabled=rank0)
    return RunContext(cfg=cfg, hf_config=hf_config, processor=processor, actor=actor, reference=reference,
                      engine=engine, colocation=colocation, grader=grader, algo=algo, train=train_set, val=val_set,
                      sampler=sampler, logger=logger,
                      blocked_ids=blocked_token_ids(processor.tokenizer, hf_config.text_config.vocab_size),
                      run_dir=run_dir, device=device, engine_slots=slots, resume_path=resume_path,
                      run_id=run_id, extra={"eval_sets": eval_sets})


def _build_engine(cfg: RunConfig, device: torch.device, slot: EngineSlot):
    """This host's rollout engine, on the slot's GPUs. The HF engine runs in the policy's dtype (the weight sync
    copies tensors of the same dtype), beside the policy or on its own GPU (rollout.colocate=false); SGLang starts at
    the slot's first GPU. With rollout.colocate=false, SGLang receives the weights by NCCL broadcast from this rank
    (`weight_broadcast.BroadcastWeightsEngine`): GPU-only: not run (no GPU was available)."""
    from mssr_megatron.config import ConfigError
    from mssr_megatron.rollout.factory import build_engine

    r = cfg.rollout
    if r.engine == "hf":
        if slot.gpu_ids:  # GPU-only: not run (no GPU was available)
            device = torch.device("cuda", slot.gpu_ids[0])
        return build_engine(cfg, cfg.model.hf_path, max_batch_size=r.hf_batch_size, device=device,
                            dtype=cfg.model.params_dtype)
    if r.engine == "vllm":
        if slot.gpu_ids[:1] != (0,):  # vLLM places its workers from the first visible GPU; it has no base GPU id
            raise ConfigError(f"rollout.engine=vllm cannot start an engine at GPU {slot.gpu_ids[0]} of its node: use "
                              "rollout.engines=single with rollout.colocate=true, or rollout.engine=sglang")
        return build_engine(cfg, cfg.model.hf_path)
    engine = build_engine(cfg, cfg.model.hf_path, base_gpu_id=slot.gpu_ids[0])  # GPU-only: not run
    if r.colocate:
        return engine
    from mssr_megatron.parallel import free_port
    from mssr_megatron.rollout.weight_broadcast import BroadcastWeightsEngine, DistributedWeightSender

    sender = DistributedWeightSender("127.0.0.1", free_port(), r.engine_tp_size)  # the engine runs on this node
    engine.connect(sender)
    return BroadcastWeightsEngine(engine, sender)


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (identity in a single process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]

