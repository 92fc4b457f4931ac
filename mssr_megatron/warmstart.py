"""`mssr make-tiny`: the embedded default's model and data, built locally and cached.

1. Synthetic visual-reasoning data (counting coloured shapes on a 3x3 grid, exact answers), train/val jsonl + PNGs.
2. A tiny random Qwen2.5-VL with a locally trained tokenizer and processor (models/tiny_hf.py, tiny_tokenizer.py).
3. A short supervised warm start on the training split (loss on the answer tokens `\\boxed{d}<|im_end|>` only),
   stopped as soon as greedy validation accuracy enters the "partial" band [target_low, target_high]: RL needs a
   policy that solves some but not all problems. The band is narrow and comes quickly (PLATFORM_NOTES: ~24% at
   step 100, ~42% at 200-300, then a jump to ~75%), so it is checked every `eval_every` steps.
4. A tiny synthetic benchmark suite in each benchmark's own file layout (eval/tiny_suite.py): eval_suite.yaml and
   eval_data/, for `mssr eval --model runs/tiny/model --suite runs/tiny/eval_suite.yaml`.
Everything lands in `out_dir` (model/, data/, eval_data/, eval_suite.yaml, make_tiny.json); a second call with the
same settings does nothing (beyond writing the eval suite if an older make-tiny did not).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass

import torch

from mssr_megatron.eval.tiny_suite import write_tiny_suite

log = logging.getLogger("mssr")


@dataclass
class TinySetup:
    out_dir: str = "runs/tiny"
    """Where model/, data/ and make_tiny.json go."""
    seed: int = 0
    """Seed of the data, the initial weights and the warm start."""
    n_train: int = 4000
    """Training prompts."""
    n_val: int = 500
    """Validation prompts (500+ for claims of a few points)."""
    sft_lr: float = 2e-3
    """Warm-start learning rate (AdamW)."""
    sft_batch: int = 32
    """Warm-start batch size."""
    max_sft_steps: int = 800
    """Give up on reaching the band after this many steps (the model is kept as it is then)."""
    eval_every: int = 25
    """Greedy validation every this many warm-start steps."""
    eval_prompts: int = 200
    """Validation prompts used for the stopping check."""
    target_low: float = 0.40
    """Stop once greedy validation accuracy reaches this ..."""
    target_high: float = 0.70
    """... unless it already passed this (then the best checkpoint inside the band, if any, is kept)."""


def make_tiny(setup: TinySetup) -> dict:
    """Build (or reuse) the tiny model, data and eval suite; returns the manifest written to make_tiny.json
    (its "eval_suite" is the suite YAML's path)."""
    manifest_path = os.path.join(setup.out_dir, "make_tiny.json")
    settings = dataclasses.asdict(setup)
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("settings") == settings and os.path.isdir(manifest["model_dir"]):
            log.info("make-tiny: reusing %s", setup.out_dir)
            if not os.path.isfile(manifest.get("eval_suite") or ""):  # made before make-tiny wrote the eval suite
                manifest["eval_suite"] = write_tiny_suite(setup.out_dir, seed=setup.seed)
                _write_manifest(manifest_path, manifest)
            return manifest
    from mssr_megatron.data.synthetic import floor_accuracy, generate_dataset
    from mssr_megatron.models.tiny_hf import build_tiny_model_dir

    data_dir = os.path.join(setup.out_dir, "data")
    train_path, val_path = generate_dataset(data_dir, setup.n_train, setup.n_val, seed=setup.seed)
    init_dir = build_tiny_model_dir(os.path.join(setup.out_dir, "model-init"), seed=setup.seed)
    model_dir = os.path.join(setup.out_dir, "model")
    history = supervised_warm_start(init_dir, train_path, val_path, model_dir, setup)
    with open(val_path) as f:
        floor = floor_accuracy(json.loads(line) for line in f)
    manifest = {"settings": settings, "model_dir": model_dir, "train_path": train_path, "val_path": val_path,
                "val_floor_accuracy": floor, "warm_start": history,
                "eval_suite": write_tiny_suite(setup.out_dir, seed=setup.seed)}
    _write_manifest(manifest_path, manifest)
    return manifest


def _write_manifest(path: str, manifest: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, path)


def _examples(path: str):
    from mssr_megatron.data.images import decode_image

    base = os.path.dirname(path)
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            yield decode_image(os.path.join(base, row["images"][0])), row["problem"], row["answer"]


def supervised_warm_start(init_dir: str, train_path: str, val_path: str, out_dir: str, setup: TinySetup) -> list:
    """Train answer tokens only until greedy validation accuracy enters the band; save the chosen weights."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mssr_megatron.config import DataConfig
    from mssr_megatron.data.prompts import fill_template, prompt_messages
    from mssr_megatron.models.processor import load_processor

    processor = load_processor(init_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(init_dir, dtype=torch.float32)
    template = DataConfig().prompt_template
    train = list(_examples(train_path))
    val = list(_examples(val_path))[: setup.eval_prompts]

    def encode(batch, with_answer: bool):
        texts = [processor.apply_chat_template(prompt_messages(fill_template(template, q), 1), tokenize=False,
                                               add_generation_prompt=True) for _, q, _ in batch]
        if with_answer:
            texts = [t + f"\\boxed{{{a}}}<|im_end|>" for t, (_, _, a) in zip(texts, batch)]
        processor.tokenizer.padding_side = "right" if with_answer else "left"
        return processor(text=texts, images=[[img] for img, _, _ in batch], return_tensors="pt", padding=True)

    def accuracy() -> float:
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(val), 50):
                batch = val[i : i + 50]
                inputs = encode(batch, with_answer=False)
                out = model.generate(**inputs, max_new_tokens=8, do_sample=False, top_k=None, top_p=None)
                texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
                correct += sum(t.strip().startswith(f"\\boxed{{{a}}}") for t, (_, _, a) in zip(texts, batch))
        model.train()
        return correct / len(val)

    gen = torch.Generator().manual_seed(setup.seed)
    torch.manual_seed(setup.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=setup.sft_lr)
    prompt_lengths = {}
    history, best = [], None
    model.train()
    for step in range(1, setup.max_sft_steps + 1):
        idx = torch.randint(0, len(train), (setup.sft_batch,), generator=gen).tolist()
        batch = [train[i] for i in idx]
        inputs = encode(batch, with_answer=True)
        labels = inputs["input_ids"].clone()
        for row, (_, q, _) in enumerate(batch):  # loss on the answer only: mask the prompt and the padding
            n = prompt_lengths.setdefault(q, len(encode([batch[row]], with_answer=False)["input_ids"][0]))
            labels[row, :n] = -100
        labels[inputs["attention_mask"] == 0] = -100
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % setup.eval_every == 0:
            acc = accuracy()
            history.append({"step": step, "loss": loss.item(), "val_greedy_accuracy": acc})
            log.info("make-tiny warm start: step %d loss %.3f greedy val accuracy %.3f", step, loss.item(), acc)
            if setup.target_low <= acc <= setup.target_high:
                best = step
                break
            if acc > setup.target_high:
                break
    _save(model, processor, init_dir, out_dir)
    history.append({"stopped_at": step, "in_band": best is not None})
    return history


def _save(model, processor, init_dir: str, out_dir: str) -> None:
    """Published-name weights plus the init dir's tokenizer/processor files, written atomically."""
    from mssr_megatron.models.tiny_hf import save_published

    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(init_dir, tmp)
    save_published(model, tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
