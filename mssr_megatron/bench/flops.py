"""Analytic model FLOPs of Qwen2.5-VL from its Hugging Face config: language model and vision tower separately.

Convention (the usual one for MFU): a matmul of [m, k] x [k, n] costs 2*m*k*n FLOPs; only matmuls are counted
(norms, rotary, softmax, activations, bias adds and the embedding lookup are left out, as torch's FlopCounterMode
leaves them out). A forward pass costs 1x; a training pass 3x (the backward computes the gradients of both a
matmul's input and its weight), except the vision patch embedding, whose input (the pixels) never needs a gradient:
2x there. With `model.train_vision=false` the vision tower runs forward only (1x).

Language model, per token and layer (h = hidden, nh/nkv = query/key-value heads, d = head dim, f = MLP width):
    projections  2*h*nh*d (q) + 2*2*h*nkv*d (k, v) + 2*nh*d*h (o) + 3*2*h*f (gate, up, down)
    attention    4*c*nh*d for a query that meets c keys (scores q.k and the value sum, every query head)
    output layer 2*h*V per position whose logits are computed (V = the model's vocabulary, not Megatron's padding)
A sequence of S tokens in one forward pass is counted with c = S for every query, i.e. the full S x S score and
value products that FlopCounterMode counts for these matmuls; a causal kernel that skips the masked half does about
half of this attention work (pass causal=True to count that instead). Tokens are the real (unpadded) tokens:
padding is overhead, not model work, and shows up as a lower MFU.

Vision tower, per image of grid (t, gh, gw) (P = t*gh*gw patches of C*T*p*p pixels, hidden hv, MLP width iv,
merge unit mu = spatial_merge_size**2):
    patch embedding  2*P*(C*T*p*p)*hv                (a Conv3d whose kernel equals its stride: one matmul)
    each block       P*(2*hv*3hv + 2*hv*hv + 3*2*hv*iv) + sum over attention segments of 4*n^2*hv
                     (full-attention blocks: one segment per frame, n = gh*gw; the others: the windows of
                     window_size pixels, as transformers tiles them)
    merger           (P/mu)*(2*(mu*hv)^2 + 2*mu*hv*out)   -> P/mu image tokens enter the language model

Generation with a KV cache (`generation_flops`): the prompt is one forward pass (its images through the vision
tower once); response token 0 comes from the prompt's last logits; token j >= 1 needs one more position that meets
p + j keys. Logits are counted only where a token is sampled.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

TRAIN_MULTIPLIER = 3  # forward + backward (input and weight gradients)


@dataclass(frozen=True)
class TextDims:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    @classmethod
    def from_hf(cls, hf_config) -> "TextDims":
        text = getattr(hf_config, "text_config", hf_config)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
                   head_dim, text.intermediate_size, text.vocab_size)

    def projection_flops(self) -> int:
        """Matmul FLOPs of one token through one decoder layer's projections and MLP."""
        h, d = self.hidden, self.head_dim
        return 2 * h * self.heads * d + 2 * 2 * h * self.kv_heads * d + 2 * self.heads * d * h + 3 * 2 * h * self.ffn

    def attention_flops(self, keys: int) -> int:
        """Score and value FLOPs of one query meeting `keys` keys in one layer (all query heads)."""
        return 4 * keys * self.heads * self.head_dim

    def logits_flops(self) -> int:
        return 2 * self.hidden * self.vocab


@dataclass(frozen=True)
class VisionDims:
    hidden: int
    depth: int
    ffn: int
    out_hidden: int
    patch_pixels: int  # C * T * p * p: one patch's input features
    patch_size: int
    merge: int
    window_size: int
    full_blocks: frozenset

    @classmethod
    def from_hf(cls, hf_config) -> "VisionDims":
        v = getattr(hf_config, "vision_config", hf_config)
        return cls(v.hidden_size, v.depth, v.intermediate_size, v.out_hidden_size,
                   v.in_channels * v.temporal_patch_size * v.patch_size ** 2, v.patch_size, v.spatial_merge_size,
                   v.window_size, frozenset(v.fullatt_block_indexes))


def _tiles(length: int, size: int) -> list[int]:
    """Lengths of consecutive tiles of `size` covering `length` (the last one may be shorter)."""
    return [min(size, length - start) for start in range(0, length, size)]


def window_lengths(vision: VisionDims, grid: Sequence[int]) -> list[int]:
    """Patches per attention window of one image/video grid (t, gh, gw), as transformers' window tiling: windows of
    (window_size // merge // patch_size)^2 merged tokens over the merged grid, each merged token = merge^2 patches."""
    t, gh, gw = (int(x) for x in grid)
    size = max(vision.window_size // vision.merge // vision.patch_size, 1)
    rows, cols = _tiles(gh // vision.merge, size), _tiles(gw // vision.merge, size)
    mu = vision.merge ** 2
    return [r * c * mu for _ in range(t) for r in rows for c in cols]


def vision_forward_flops(hf_config, grids: Iterable[Sequence[int]]) -> dict[str, int]:
    """Forward FLOPs of the vision tower over images with the given grids [(t, gh, gw), ...], by part, plus
    `image_tokens` (merged tokens handed to the language model)."""
    v = VisionDims.from_hf(hf_config)
    out = dict.fromkeys(("patch_embed", "projections", "attention", "merger", "image_tokens"), 0)
    mu = v.merge ** 2
    per_patch = 2 * v.hidden * 3 * v.hidden + 2 * v.hidden * v.hidden + 3 * 2 * v.hidden * v.ffn
    for grid in grids:
        t, gh, gw = (int(x) for x in grid)
        patches = t * gh * gw
        out["patch_embed"] += 2 * patches * v.patch_pixels * v.hidden
        out["projections"] += v.depth * patches * per_patch
        windows = window_lengths(v, grid)
        for block in range(v.depth):
            segments = [gh * gw] * t if block in v.full_blocks else windows
            out["attention"] += sum(4 * n * n * v.hidden for n in segments)
        out["merger"] += (patches // mu) * (2 * (mu * v.hidden) ** 2 + 2 * mu * v.hidden * v.out_hidden)
        out["image_tokens"] += patches // mu
    out["total"] = out["patch_embed"] + out["projections"] + out["attention"] + out["merger"]
    return out


def language_forward_flops(hf_config, seq_lens: Iterable[int], causal: bool = False) -> dict[str, int]:
    """Forward FLOPs of the language model over sequences of the given lengths (logits at every position), by
    part. causal=False counts the full S x S attention products (see the module docstring)."""
    t = TextDims.from_hf(hf_config)
    out = dict.fromkeys(("projections", "attention", "logits", "tokens"), 0)
    for s in seq_lens:
        s = int(s)
        out["projections"] += t.layers * s * t.projection_flops()
        keys = s * (s + 1) // 2 if causal else s * s  # summed over the s queries
        out["attention"] += t.layers * t.attention_flops(1) * keys
        out["logits"] += s * t.logits_flops()
        out["tokens"] += s
    out["total"] = out["projections"] + out["attention"] + out["logits"]
    return out


def generation_flops(hf_config, prompt_lens: Sequence[int], response_lens: Sequence[int],
                     grids: Iterable[Sequence[int]] = ()) -> dict[str, int]:
    """FLOPs of KV-cached generation: prompt forward (full p x p attention, logits at its last position only),
    then one position per further response token; vision tower once per prompt image."""
    t = TextDims.from_hf(hf_config)
    prefill = decode = 0
    for p, n in zip(prompt_lens, response_lens):
        p, n = int(p), int(n)
        prefill += t.layers * (p * t.projection_flops() + t.attention_flops(1) * p * p)
        prefill += t.logits_flops() if n else 0
        for j in range(1, n):  # token j is computed from position p + j - 1, which meets p + j keys
            decode += t.layers * (t.projection_flops() + t.attention_flops(p + j)) + t.logits_flops()
    vision = vision_forward_flops(hf_config, grids)["total"]
    return {"prefill": prefill, "decode": decode, "vision": vision, "total": prefill + decode + vision}


def forward_flops(hf_config, seq_lens: Iterable[int], grids: Iterable[Sequence[int]] = ()) -> dict[str, int]:
    """{"language", "vision", "patch_embed", "total"}: forward FLOPs of whole sequences with their images."""
    lang = language_forward_flops(hf_config, seq_lens)["total"]
    vis = vision_forward_flops(hf_config, grids)
    return {"language": lang, "vision": vis["total"], "patch_embed": vis["patch_embed"],
            "total": lang + vis["total"]}


def training_flops(forward: dict[str, int], train_vision: bool = True) -> dict[str, int]:
    """Training FLOPs (forward + backward) from `forward_flops`: 3x, the patch embedding 2x (no pixel gradient),
    the vision tower 1x when it is frozen (nothing upstream of it needs a gradient)."""
    lang = TRAIN_MULTIPLIER * forward["language"]
    if train_vision:
        vision = TRAIN_MULTIPLIER * forward["vision"] - forward["patch_embed"]
    else:
        vision = forward["vision"]
    return {"language": lang, "vision": vision, "total": lang + vision}


def per_token_summary(hf_config, seq_len: int, grid: Sequence[int] | None = None) -> dict[str, float]:
    """Headline numbers: language forward FLOPs per token at sequence length seq_len (and their matmul-weight part,
    2 x the non-embedding matmul parameters), vision forward FLOPs per image token for one image of `grid`."""
    t = TextDims.from_hf(hf_config)
    lang = language_forward_flops(hf_config, [seq_len])
    out = {"seq_len": seq_len, "language_forward_per_token": lang["total"] / max(seq_len, 1),
           "language_weights_per_token": t.layers * t.projection_flops() + t.logits_flops(),
           "language_attention_per_token": lang["attention"] / max(seq_len, 1)}
    if grid is not None:
        vis = vision_forward_flops(hf_config, [grid])
        out["image_grid_thw"] = list(int(x) for x in grid)
        out["vision_forward_per_image_token"] = vis["total"] / max(vis["image_tokens"], 1)
        out["image_tokens_per_image"] = vis["image_tokens"]
    return out
