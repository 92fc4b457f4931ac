"""`mssr bench` at the smoke shape: the Qwen2.5-VL-3B shape at prompt 1024 / response 1024 on a GPU (GPU-only: not
run (no GPU was available)), the tiny shape at short lengths with --cpu.

The bench model is the shape's config with random weights and the tiny tokenizer (its special-token ids replace
the published ones; the embedding keeps the full vocabulary, rows beyond the tokenizer are never sampled). Random
weights would end a response at a random early token, so the end-of-turn embedding rows are zeroed (logit 0) and the
final norm gain is raised until the logits spread with a standard deviation of about 5: then an end token has a
negligible chance at every step and each response runs to the full length. Prompts are the synthetic task's, padded
with filler words to the bench prompt length.
"""

from __future__ import annotations

import json
import math
import os

import torch

from mssr_megatron.smoke import SmokeOptions
from mssr_megatron.smoke.model_checks import random_hf_model, smoke_hf_config
from mssr_megatron.smoke.run_checks import BENCH_CPU, BENCH_GPU, TINY_CONFIG, _run_overrides, tiny_assets

LOGIT_STD = 5.0
FILLER = " shapes"


def bench_model_dir(opts: SmokeOptions, out_dir: str) -> str:
    """Write the bench model (see the module docstring) to out_dir, once."""
    from mssr_megatron.models.processor import save_processor
    from mssr_megatron.models.special_tokens import (EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN, VIDEO_TOKEN,
                                                     VISION_END_TOKEN, VISION_START_TOKEN)
    from mssr_megatron.models.tiny_hf import build_tiny_processor, save_published
    from mssr_megatron.models.tiny_tokenizer import train_tokenizer

    if os.path.isfile(os.path.join(out_dir, "model.safetensors")):
        return out_dir
    tokenizer = train_tokenizer(None, vocab_size=320)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN, VIDEO_TOKEN,
                                                           VISION_START_TOKEN, VISION_END_TOKEN)}
    cfg = smoke_hf_config(opts)
    cfg.image_token_id, cfg.video_token_id = ids[IMAGE_TOKEN], ids[VIDEO_TOKEN]
    cfg.vision_start_token_id, cfg.vision_end_token_id = ids[VISION_START_TOKEN], ids[VISION_END_TOKEN]
    for c in (cfg, cfg.text_config):
        c.bos_token_id, c.eos_token_id, c.pad_token_id = None, ids[EOS_TOKEN], ids[PAD_TOKEN]
    dtype = torch.float32 if opts.cpu else torch.bfloat16
    model = random_hf_model(cfg, dtype, opts.device)
    text = cfg.text_config
    ends = [ids[EOS_TOKEN], tokenizer.eos_token_id]
    with torch.no_grad():
        model.get_input_embeddings().weight[ends] = 0
        model.get_output_embeddings().weight[ends] = 0  # the same tensor when tied
        model.model.language_model.norm.weight.fill_(LOGIT_STD / (text.initializer_range * math.sqrt(text.hidden_size)))
    save_published(model, out_dir)
    save_processor(build_tiny_processor(tokenizer), out_dir)
    del model
    if opts.device.type == "cuda":  # hand the 3B copy back before the benchmark builds its own models
        torch.cuda.empty_cache()
    return out_dir


def padded_prompts(src: str, dst: str, model_dir: str, prompt_tokens: int, count: int) -> list[int]:
    """Copy the first `count` records of the jsonl `src` to `dst` with problems padded by filler words so that each
    prompt has about `prompt_tokens` tokens (chat template and image tokens included); returns the lengths."""
    from mssr_megatron.config import DataConfig
    from mssr_megatron.data.prompts import count_prompt_tokens, prompt_text
    from mssr_megatron.data.records import read_records
    from mssr_megatron.models.processor import load_processor

    processor, data = load_processor(model_dir), DataConfig()
    records = read_records(src, data, "train", apply_val_size=False).records[:count]
    with open(src) as fh:
        rows = [json.loads(line) for line in fh][:count]

    def length(record, problem: str) -> int:
        record.problem = problem
        return count_prompt_tokens(prompt_text(record, data.prompt_template, processor), list(record.sizes), processor)

    lengths = []
    for record, row in zip(records, rows):
        base = length(record, row["problem"])
        per_filler = (length(record, row["problem"] + FILLER * 10) - base) / 10
        repeats = max(0, int((prompt_tokens - base) / per_filler))
        row["problem"] += FILLER * repeats
        row["images"] = [os.path.join(os.path.dirname(os.path.abspath(src)), p) for p in row["images"]]
        lengths.append(length(record, row["problem"]))
    with open(dst, "w") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    return lengths


def check_bench(opts: SmokeOptions) -> dict:
    """`mssr bench` (1 timed RL step, then each phase once) on the bench model; the key figure is the step's MFU."""
    from mssr_megatron.cli import main

    shape = BENCH_CPU if opts.cpu else BENCH_GPU
    root = os.path.join(opts.run_dir, "assets", "bench")
    model_dir = bench_model_dir(opts, os.path.join(root, "model"))
    paths = dict(tiny_assets(opts), model=model_dir, train=os.path.join(root, "train.jsonl"))
    prompt_lengths = padded_prompts(tiny_assets(opts)["train"], paths["train"], model_dir, shape["prompt"],
                                    shape["prompts"])
    out = os.path.join(opts.run_dir, "bench", "bench.json")
    overrides = _run_overrides(paths, os.path.join(opts.run_dir, "bench"), opts.device.type) + [
        "data.val_path=null", f"model.params_dtype={'float32' if opts.cpu else 'bfloat16'}",
        f"rollout.max_new_tokens={shape['response']}", f"data.max_prompt_tokens={shape['prompt'] + 64}",
        f"data.prompts_per_step={shape['prompts']}", f"optimizer.mini_batch_size={shape['prompts']}",
        f"parallel.micro_batch_size={shape['micro_batch']}", f"rollout.hf_batch_size={shape['prompts']}",
        # no reference model (no KL loss; SPO forgetting rule instead of the KL window): with the frozen vision tower,
        # the policy, its optimizer and the engine fit an 80 GB H100
        "algorithm.use_kl_loss=false", "algorithm.baseline.rho_rule=spo",
        f"model.train_vision={'true' if opts.cpu else 'false'}", "logging.jsonl=false"]
    rc = main(["bench", os.path.join(opts.repo, TINY_CONFIG), *overrides, "--out", out, "--warmup", "0",
               "--repeats", "1", "--no-hf-compare"])
    if rc != 0:
        raise AssertionError(f"mssr bench exited with {rc}")
    with open(out) as fh:
        result = json.load(fh)
    step, gen = result["step_breakdown"], result["phases"]["generation"]
    responses = result["phases"]["generation"].get("tokens", 0) / shape["prompts"]
    text = result["config"]["text"]
    figure = (f"MFU {step['mfu']:.1%} per RL step ({step['tokens_per_s']:.0f} tokens/s, peak "
              f"{result['peak']['label']}); update MFU {result['phases']['update'].get('mfu', float('nan')):.1%}; "
              f"generation {gen.get('tokens_per_s', float('nan')):.0f} tokens/s; hidden {text['hidden_size']} x "
              f"{text['num_hidden_layers']} layers, prompt ~{int(sum(prompt_lengths) / len(prompt_lengths))} / "
              f"response ~{responses:.0f} tokens")
    if not (math.isfinite(step["mfu"]) and step["mfu"] > 0):
        raise AssertionError(f"the benchmark reports no MFU: {figure}")
    return dict(figure=figure, mfu=step["mfu"], tokens_per_s=step["tokens_per_s"], prompt_lengths=prompt_lengths,
                mean_response_tokens=responses, bench_json=out)
