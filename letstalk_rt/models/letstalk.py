"""The LetsTalk transformer (arXiv 2411.16748): the whole denoising network in one file.

    v = LetsTalkTransformer(config)(x, t, portrait, audio, memory, memory_mask, drop_portrait, drop_audio)
    x (B, T, C, h, w) noisy clip latents, t (B,) flow time in [0, 1]  ->  velocity (B, T, C, h, w)

The network knows nothing of the noise schedule: it maps (x_t, t, conditions) to a velocity, and the
sampler in `letstalk_rt.diffusion` owns the rest.

Data flow. Memory frames (the last K latents of the previous window), clip frames and the portrait are
patchified by one shared conv embedder into tokens of width D. Memory frames come first on the frame
axis, so a window holds F = K + T frame slots; every frame gets the fixed 2D sin-cos spatial embedding
and the fixed 1D sin-cos temporal embedding of its slot. Masked memory positions are replaced by a
learned mask token (a patch that is partly masked is blended by the fraction kept), and a learned
"memory frame" embedding marks memory tokens. Each block, in order:

  1. temporal softmax self-attention over the F frames at each spatial position, residual through the
     attention's zero-initialised output linear (so a fresh block starts as the identity);
  2. cross-attention to the conditions that are fused "direct": audio -- each clip frame's tokens attend
     to that frame's M audio tokens (memory frames have no audio and skip it) -- and portrait -- every
     frame's tokens attend to the portrait tokens (a separate cross-attention, kept apart from the
     audio one because the two have different widths and are dropped independently for guidance);
  3. spatial ReLU linear attention within each frame (Sana LiteLA, fp32), adaLN-Zero modulated by the
     timestep, over the frame's tokens concatenated with its "symbiotic" condition tokens (portrait
     tokens repeated per frame, and/or the frame's M audio tokens), which are split off again after;
  4. Mix-FFN (Sana GLUMBConv) over each h x w token grid, adaLN-Zero modulated. Symbiotic condition
     tokens go through it too and are carried to the next block: the condition is part of the sequence.

Fusion schemes (config.portrait_fusion / config.audio_fusion), so the paper's comparison can be rerun:
  direct     cross-attention in every block (step 2);
  symbiotic  tokens concatenated in the spatial attention (step 3) and updated by every block;
  siamese    a parallel stack of spatial blocks (linear attention + Mix-FFN, no temporal attention) over
             the condition tokens; after backbone block i, branch block i's output goes through a
             zero-initialised linear and is added to the backbone: the portrait branch (B, N, D) to every
             frame token-by-token, the audio branch (B, T, M, D) mean-pooled over its M tokens to each
             clip frame. The branch has config.siamese_depth (default: depth) blocks.
Audio tokens are projected to width D by one linear for symbiotic and siamese; direct cross-attention
reads them at their own width. A symbiotic audio token grid is M x 1 in the Mix-FFN, so its depthwise
conv mixes neighbouring audio tokens. Memory frames take part in portrait fusion (they show the same
person) but never in audio fusion.

Classifier-free guidance: rows with drop_portrait / drop_audio True replace the condition by a learned
null (a token grid for the portrait, M tokens for the audio, both zero-initialised) before any fusion,
so the output of such a row does not depend on that condition at all.

Parameter counts (latent 8x8x32, patch 1, 16 frames, 32 audio tokens of width 768; defaults symbiotic
portrait and direct audio; `LetsTalkTransformer(cfg).num_parameters()`):
    S 49.6M    B 183.3M    L 634.5M    XL 929.6M    cpu (cpu-128 preset: 8x8x16, 8 tokens of 128) 2.66M
The paper reports 312M for LetsTalk-B "including the audio projection". Our B is 183M without the audio
projection, which lives in `letstalk_rt.models.audio` (the paper's +-2 frame x 12 layer x 768 window
into 32 x 768 tokens is a few tens of M more). The rest of the gap is the block. Here a block is the
DESIGN.md one: a light temporal attention (4 D^2: no FFN, no adaLN of its own), the audio
cross-attention (4 D^2), and a Sana-style spatial block (linear attention 4 D^2, Mix-FFN at ratio 2.5
7.5 D^2, adaLN 6 D^2): 25.5 D^2 = 15.0M per block at D = 768. A Latte-style layer -- a full spatial
DiT block and a full temporal DiT block (18 D^2 each, MLP ratio 4) plus the cross-attention -- is
40 D^2 = 23.6M, 283M for 12 layers, which with the audio projection lands near 312M; that is our best
reading of the paper's count (no public code to confirm it). We keep the cheaper block: the product's
point is few-step real-time sampling, and FLOPs per frame are what its budget pays for.

Sections: embeddings, attention, blocks, the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from ..config import FUSIONS, TransformerConfig
from ..errors import ModelError

# --------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """Fixed sin-cos embedding of positions (L,) -> (L, dim): half sines, half cosines (DiT/MAE)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    angles = positions.to(torch.float64)[:, None] * omega[None]  # (L, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()  # (L, dim)


def sincos_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2D sin-cos embedding of a grid x grid token map -> (grid*grid, dim), row-major tokens.

    Half the channels encode the row, half the column (DiT's get_2d_sincos_pos_embed)."""
    coords = torch.arange(grid, dtype=torch.float64)  # (g,)
    rows = repeat(coords, "i -> (i j)", j=grid)  # (g*g,)
    cols = repeat(coords, "j -> (i j)", i=grid)  # (g*g,)
    return torch.cat([sincos_1d(dim // 2, rows), sincos_1d(dim // 2, cols)], dim=1)  # (g*g, dim)


class TimestepEmbedder(nn.Module):
    """Flow time t in [0, 1] -> (B, D): sin-cos of t*1000 (DiT's frequencies), then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)  # (F/2,)
        args = (t.float() * 1000)[:, None] * freqs[None]  # (B, F/2)
        emb = torch.cat([args.cos(), args.sin()], dim=1)  # (B, F)
        return self.mlp(emb)  # (B, D)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift, with shift/scale broadcast from (B, 1, 1, D)."""
    return x * (1 + scale) + shift  # (B, S, L, D)


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Softmax multi-head attention (`softmax_attention`).

    Self-attention when `context` is None; cross-attention to `context` otherwise, whose width may
    differ (`context_dim`, e.g. audio tokens). `proj` is the output linear (zeroed for the temporal
    attention by `initialize_weights`).
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        ctx = x if context is None else context  # (B, S, Dc)
        q = rearrange(self.q(x), "b l (h d) -> b h l d", h=self.num_heads)  # (B, H, L, d)
        k, v = rearrange(self.kv(ctx), "b s (two h d) -> two b h s d", two=2, h=self.num_heads)  # (B, H, S, d) each
        out = softmax_attention(q, k, v)  # (B, H, L, d)
        return self.proj(rearrange(out, "b h l d -> b l (h d)"))  # (B, L, D)


def softmax_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v for q (..., L, d), k and v (..., S, d): F.scaled_dot_product_attention,
    written out on the CPU.

    The model's softmax attentions are short (the temporal attention's 6 frames, 8 audio tokens, the
    audio encoder's 16 mel frames), and for those torch's fused CPU kernel costs far more than the plain
    products: 1.04 vs 0.31 ms for the temporal attention of one 4-frame window on 2 cores, ~4 ms of each
    cpu-128 step. CUDA keeps the fused kernels. The softmax runs in fp32 whatever the inputs' dtype.
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v)  # (..., L, d)
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (..., L, S)
    return torch.matmul(scores.float().softmax(dim=-1).to(v.dtype), v)  # (..., L, d)


def relu_linear_attention(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-15) -> Tensor:
    """out_i = sum_j relu(q_i).relu(k_j) v_j / (sum_j relu(q_i).relu(k_j) + eps), in fp32.

    q, k, v: (B, H, L, d). Cost is linear in L: the (d, d+1) summary sum_j relu(k_j) [v_j, 1] is built
    once, the appended ones column yielding the normaliser (Sana LiteLA). Under autocast the sums stay
    fp32: in bf16 they lose the small terms and in fp16 they overflow. A token whose kernel is zero
    against every key gets 0 (0 / eps).
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k = F.relu(q.float()), F.relu(k.float())  # (B, H, L, d)
        v1 = F.pad(v.float(), (0, 1), value=1.0)  # (B, H, L, d+1): the ones column counts the kernel mass
        kv = torch.einsum("b h l d, b h l e -> b h d e", k, v1)  # (B, H, d, d+1)
        out = torch.einsum("b h l d, b h d e -> b h l e", q, kv)  # (B, H, L, d+1)
        return out[..., :-1] / (out[..., -1:] + eps)  # (B, H, L, d)


class LinearAttention(nn.Module):
    """Multi-head ReLU linear self-attention (Sana LiteLA): qkv without bias, heads of `head_dim`."""

    def __init__(self, dim: int, head_dim: int = 32, eps: float = 1e-15) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.eps = eps
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv(x)  # (B, L, 3D)
        q, k, v = rearrange(qkv, "b l (three h d) -> three b h l d", three=3, d=self.head_dim)  # (B, H, L, d) each
        out = relu_linear_attention(q, k, v, self.eps)  # (B, H, L, d) fp32
        if qkv.dtype == torch.float16:
            out = out.clamp(-65504, 65504)  # (B, H, L, d): fp16's range; inf would poison the residual
        out = out.to(qkv.dtype)  # (B, H, L, d)
        return self.proj(rearrange(out, "b h l d -> b l (h d)"))  # (B, L, D)


class MixFFN(nn.Module):
    """Sana GLUMBConv over a token grid: 1x1 conv to 2*hidden + SiLU, 3x3 depthwise conv, GLU with a
    SiLU gate, 1x1 conv back to D. The depthwise conv gives the spatial attention's tokens the local
    neighbourhood that linear attention (which has no position bias) does not.

    The weights are Sana's convs (checkpoints keep their names and shapes), but the 1x1 convs run as linears
    over the token axis, and the depthwise conv over a channels-last view of their output, so the tokens are
    never transposed. On the 2-core EPYC without AVX-512 at 1 torch thread (where a batch under 16 sends a 1x1
    conv to torch's im2col path) a window's 128 -> 640 conv took 2.2-2.7 ms against 1.8-2.4 as a linear, and the
    depthwise conv 1.0-1.2 ms over NCHW against 0.6 channels-last (docs/benchmarks.md, thirty-ninth session)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.inverted_conv = nn.Conv2d(dim, 2 * hidden, 1)
        self.depth_conv = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.point_conv = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        y = F.silu(F.linear(x, self.inverted_conv.weight.flatten(1), self.inverted_conv.bias))  # (B, S, L, 2*hid)
        y = y.flatten(0, 1).unflatten(1, grid).permute(0, 3, 1, 2)  # (B*S, 2*hid, gh, gw) channels-last, no copy
        y = self.depth_conv(y).permute(0, 2, 3, 1)  # (B*S, gh, gw, 2*hid)
        y, gate = y.chunk(2, dim=-1)  # (B*S, gh, gw, hid) each
        y = F.linear(y * F.silu(gate), self.point_conv.weight.flatten(1))  # (B*S, gh, gw, D)
        return y.reshape(x.shape)  # (B, S, L, D)


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


class SpatialBlock(nn.Module):
    """adaLN-Zero linear self-attention over concatenated token groups, then adaLN-Zero Mix-FFN per grid.

    groups[i]: (B, S, L_i, D) -- S sequences per batch row (frames), L_i tokens forming the grid
    grids[i] (gh, gw). Sequence s of the attention is the concatenation of every group's sequence s on
    the token axis; the result is split back into the groups. Used for the backbone's steps 3-4 and, on
    its own, as the block of a siamese branch.
    """

    def __init__(self, dim: int, head_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = LinearAttention(dim, head_dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MixFFN(dim, int(mlp_ratio * dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, groups: list[Tensor], grids: list[tuple[int, int]], c: Tensor) -> list[Tensor]:
        b = c.shape[0]
        mod = rearrange(self.adaLN_modulation(c), "b d -> b 1 1 d")  # (B, 1, 1, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)  # (B, 1, 1, D) each
        lengths = [g.shape[2] for g in groups]
        h = groups[0] if len(groups) == 1 else torch.cat(groups, dim=2)  # (B, S, L, D), L = sum L_i
        a = rearrange(modulate(self.norm1(h), shift_msa, scale_msa), "b s l d -> (b s) l d")  # (B*S, L, D)
        a = rearrange(self.attn(a), "(b s) l d -> b s l d", b=b)  # (B, S, L, D)
        parts = list((h + gate_msa * a).split(lengths, dim=2))  # [(B, S, L_i, D)]
        # Mix-FFN: groups on the same grid share one conv call (stacked on the sequence axis).
        for grid in dict.fromkeys(grids):
            idx = [i for i, g in enumerate(grids) if g == grid]
            y = torch.cat([parts[i] for i in idx], dim=1)  # (B, sum S_i, L_i, D)
            y = y + gate_mlp * self.mlp(modulate(self.norm2(y), shift_mlp, scale_mlp), grid)  # (B, sum S_i, L_i, D)
            for i, yi in zip(idx, y.split([parts[i].shape[1] for i in idx], dim=1)):
                parts[i] = yi  # (B, S_i, L_i, D)
        return parts


class LetsTalkBlock(nn.Module):
    """Temporal attention, direct cross-attentions, spatial linear attention + Mix-FFN (module docstring)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        d = config.hidden_size
        g = config.latent_size // config.patch_size
        self.grid = (g, g)
        self.audio_grid = (config.num_audio_tokens, 1)
        self.norm_temporal = nn.LayerNorm(d, eps=1e-6)
        self.temporal_attn = Attention(d, config.num_heads)
        self.audio_attn: Attention | None = None
        self.portrait_attn: Attention | None = None
        if config.audio_fusion == "direct":
            self.norm_audio = nn.LayerNorm(d, eps=1e-6)
            self.audio_attn = Attention(d, config.num_heads, context_dim=config.audio_token_dim)
        if config.portrait_fusion == "direct":
            self.norm_portrait = nn.LayerNorm(d, eps=1e-6)
            self.portrait_attn = Attention(d, config.num_heads)
        self.spatial = SpatialBlock(d, config.linear_head_dim, config.mlp_ratio)

    def forward(
        self,
        x: Tensor,
        c: Tensor,
        num_memory: int,
        audio_kv: Tensor | None = None,
        portrait_kv: Tensor | None = None,
        portrait_tok: Tensor | None = None,
        audio_tok: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x (B, F, N, D) frame tokens, memory first; c (B, D); audio_kv (B, T, M, Da) / portrait_kv
        (B, N, D) for direct fusion; portrait_tok (B, F, N, D) / audio_tok (B, T, M, D) carried symbiotic
        tokens. Returns (x, portrait_tok, audio_tok) updated."""
        b, f = x.shape[:2]
        k = num_memory
        # 1. temporal self-attention at each spatial position, over memory + clip frames
        # contiguous: a linear over the transposed view runs as a batched product with the weight repeated per
        # position (~2x the time of one product on the CPU)
        h = rearrange(self.norm_temporal(x), "b f n d -> (b n) f d").contiguous()  # (B*N, F, D)
        x = x + rearrange(self.temporal_attn(h), "(b n) f d -> b f n d", b=b)  # (B, F, N, D)
        # 2. direct fusion: per-frame audio cross-attention (clip frames only), portrait cross-attention
        if self.audio_attn is not None and audio_kv is not None:
            q = rearrange(self.norm_audio(x[:, k:]), "b t n d -> (b t) n d")  # (B*T, N, D)
            ctx = rearrange(audio_kv, "b t m e -> (b t) m e")  # (B*T, M, Da)
            a = rearrange(self.audio_attn(q, ctx), "(b t) n d -> b t n d", b=b)  # (B, T, N, D)
            x = torch.cat([x[:, :k], x[:, k:] + a], dim=1)  # (B, F, N, D): memory frames unchanged
        if self.portrait_attn is not None and portrait_kv is not None:
            q = rearrange(self.norm_portrait(x), "b f n d -> b (f n) d")  # (B, F*N, D)
            p = self.portrait_attn(q, portrait_kv)  # (B, F*N, D)
            x = x + rearrange(p, "b (f n) d -> b f n d", f=f)  # (B, F, N, D)
        # 3-4. spatial linear attention with symbiotic tokens, Mix-FFN
        ptoks = [] if portrait_tok is None else [portrait_tok]  # [(B, F, N, D)]
        if audio_tok is None:
            x, *ptoks = self.spatial([x, *ptoks], [self.grid] * (1 + len(ptoks)), c)  # (B, F, N, D) each
            return x, (ptoks[0] if ptoks else None), None
        # audio symbiotic: memory frames have no audio tokens, so they are sequences of their own
        clip = self.spatial([x[:, k:], *[p[:, k:] for p in ptoks], audio_tok],
                            [self.grid] * (1 + len(ptoks)) + [self.audio_grid], c)  # [(B, T, ., D)]
        mem = self.spatial([x[:, :k], *[p[:, :k] for p in ptoks]], [self.grid] * (1 + len(ptoks)), c) if k else None
        if mem is not None:
            x = torch.cat([mem[0], clip[0]], dim=1)  # (B, F, N, D)
            ptoks = [torch.cat([pm, pc], dim=1) for pm, pc in zip(mem[1:], clip[1:-1])]  # [(B, F, N, D)]
        else:
            x, ptoks = clip[0], clip[1:-1]  # (B, T, N, D), [(B, T, N, D)]
        return x, (ptoks[0] if ptoks else None), clip[-1]


class SiameseBranch(nn.Module):
    """A parallel stack of SpatialBlocks over one condition's tokens (B, S, L, D) on grid `grid`.

    `step(i, h, c)` runs block i and returns (the branch's new tokens, the guide for the backbone):
    gates[i] -- a zero-initialised linear -- of block i's output, mean-pooled over the L tokens first
    when `pool` (audio: one guide per frame) and token-by-token otherwise (portrait: same grid as a frame).
    """

    def __init__(self, config: TransformerConfig, depth: int, grid: tuple[int, int], pool: bool) -> None:
        super().__init__()
        d = config.hidden_size
        self.grid, self.pool = grid, pool
        self.blocks = nn.ModuleList([SpatialBlock(d, config.linear_head_dim, config.mlp_ratio) for _ in range(depth)])
        self.gates = nn.ModuleList([nn.Linear(d, d) for _ in range(depth)])

    def __len__(self) -> int:
        return len(self.blocks)

    def step(self, i: int, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        (h,) = self.blocks[i]([h], [self.grid], c)  # (B, S, L, D)
        pooled = h.mean(dim=2, keepdim=True) if self.pool else h  # (B, S, 1 or L, D)
        return h, self.gates[i](pooled)  # (B, S, L, D), (B, S, 1 or L, D)


class FinalLayer(nn.Module):
    """adaLN (shift, scale from t) + linear to patch_size^2 * C values per token; zero-initialised."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = rearrange(self.adaLN_modulation(c), "b d -> b 1 1 d").chunk(2, dim=-1)  # (B, 1, 1, D) each
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, T, N, p*p*C)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class LetsTalkTransformer(nn.Module):
    """The LetsTalk diffusion transformer; see the module docstring for the structure."""

    pos_spatial: Tensor  # (N, D) fixed 2D sin-cos, a non-persistent buffer (recomputed, not saved)
    pos_temporal: Tensor  # (K + num_frames, D) fixed 1D sin-cos over the frame slots, memory first

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        for name in ("portrait_fusion", "audio_fusion"):
            if getattr(config, name) not in FUSIONS:
                raise ModelError(f"transformer.{name}={getattr(config, name)!r}; choose one of {FUSIONS}")
        if config.latent_size % config.patch_size:
            raise ModelError(f"latent_size {config.latent_size} is not divisible by patch_size {config.patch_size}")
        if config.hidden_size % config.num_heads or config.hidden_size % config.linear_head_dim:
            raise ModelError(f"hidden_size {config.hidden_size} must be divisible by num_heads {config.num_heads} "
                             f"and linear_head_dim {config.linear_head_dim}")
        siamese_depth = config.depth if config.siamese_depth is None else config.siamese_depth
        if not 1 <= siamese_depth <= config.depth:
            raise ModelError(f"transformer.siamese_depth={config.siamese_depth} must be in 1..depth={config.depth} "
                             "(or None for depth)")
        self.config = config
        d, p, c = config.hidden_size, config.patch_size, config.latent_channels
        g = config.latent_size // p
        n, m = g * g, config.num_audio_tokens
        k, frames = config.num_memory, config.num_frames

        # embeddings: one patch embedder for clip frames, memory frames and the portrait
        self.x_embedder = nn.Conv2d(c, d, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(d)
        self.register_buffer("pos_spatial", sincos_2d(d, g), persistent=False)  # (N, D)
        self.register_buffer("pos_temporal", sincos_1d(d, torch.arange(k + frames)), persistent=False)  # (K+Tmax, D)
        self.mask_token = nn.Parameter(torch.zeros(d))  # replaces masked memory positions
        self.memory_embed = nn.Parameter(torch.zeros(d))  # marks memory-frame tokens
        self.portrait_embed = nn.Parameter(torch.zeros(d))  # marks portrait tokens (they share the embedder)
        self.null_portrait = nn.Parameter(torch.zeros(n, d))  # portrait tokens of a dropped (CFG) row
        self.null_audio = nn.Parameter(torch.zeros(m, config.audio_token_dim))  # audio tokens of a dropped row
        # audio tokens at model width, for the fusions that put them in the token stream
        self.audio_embedder = nn.Linear(config.audio_token_dim, d) if config.audio_fusion != "direct" else None

        self.blocks = nn.ModuleList([LetsTalkBlock(config) for _ in range(config.depth)])
        self.portrait_branch: SiameseBranch | None = None
        if config.portrait_fusion == "siamese":
            self.portrait_branch = SiameseBranch(config, siamese_depth, (g, g), pool=False)
        self.audio_branch: SiameseBranch | None = None
        if config.audio_fusion == "siamese":
            self.audio_branch = SiameseBranch(config, siamese_depth, (m, 1), pool=True)
        self.final_layer = FinalLayer(d, p, c)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """All initialisation in one place (DiT's scheme).

        Linears: xavier-uniform, bias 0; convs: PyTorch's default; the patch embedder like a linear.
        Zero: every adaLN modulation (so the gates start at 0 and spatial blocks are the identity), the
        temporal attention's output linear, the siamese gates, the final layer (the untrained network
        predicts exactly 0) and the null conditions. Learned tokens (mask, memory, portrait): N(0, 0.02).
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                m.reset_parameters()
        w = self.x_embedder.weight  # (D, C, p, p): initialised as the (D, C*p*p) linear it is
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.x_embedder.bias is not None:
            nn.init.zeros_(self.x_embedder.bias)
        for lin in self.t_embedder.mlp.modules():
            if isinstance(lin, nn.Linear):
                nn.init.normal_(lin.weight, std=0.02)
        for token in (self.mask_token, self.memory_embed, self.portrait_embed):
            nn.init.normal_(token, std=0.02)
        nn.init.zeros_(self.null_portrait)
        nn.init.zeros_(self.null_audio)
        zeroed: list[nn.Module] = [self.final_layer.linear]
        for m in self.modules():
            if isinstance(m, (SpatialBlock, FinalLayer)):
                zeroed.append(m.adaLN_modulation)
            elif isinstance(m, LetsTalkBlock):
                zeroed.append(m.temporal_attn.proj)
            elif isinstance(m, SiameseBranch):
                zeroed.append(m.gates)
        for module in zeroed:
            for param in module.parameters():
                nn.init.zeros_(param)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ---------------------------------------------------------------------------------- helpers

    def embed(self, frames: Tensor) -> Tensor:
        """Latent frames (B, F, C, h, w) -> tokens (B, F, N, D), without position embeddings."""
        b = frames.shape[0]
        y = self.x_embedder(rearrange(frames, "b f c h w -> (b f) c h w"))  # (B*F, D, g, g)
        return rearrange(y, "(b f) d gh gw -> b f (gh gw) d", b=b)  # (B, F, N, D)

    def unpatchify(self, y: Tensor) -> Tensor:
        """(B, T, N, p*p*C) -> (B, T, C, h, w)."""
        p, g = self.config.patch_size, self.config.latent_size // self.config.patch_size
        return rearrange(y, "b t (gh gw) (p1 p2 c) -> b t c (gh p1) (gw p2)", gh=g, p1=p, p2=p)  # (B, T, C, h, w)

    def _check(self, x: Tensor, t: Tensor, portrait: Tensor, audio: Tensor, memory: Tensor | None,
               memory_mask: Tensor | None, drop_portrait: Tensor | None, drop_audio: Tensor | None) -> None:
        cfg = self.config
        lat = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        if x.dim() != 5 or tuple(x.shape[2:]) != lat or not 1 <= x.shape[1] <= cfg.num_frames:
            raise ModelError(f"x: expected (B, T, {', '.join(map(str, lat))}) with 1 <= T <= num_frames="
                             f"{cfg.num_frames}, got {tuple(x.shape)}")
        b, T = x.shape[:2]
        expected: list[tuple[str, Tensor | None, tuple[int, ...]]] = [
            ("t", t, (b,)),
            ("portrait", portrait, (b, *lat)),
            ("audio", audio, (b, T, cfg.num_audio_tokens, cfg.audio_token_dim)),
            ("memory", memory, (b, cfg.num_memory, *lat)),
            ("memory_mask", memory_mask, (b, cfg.num_memory, cfg.latent_size, cfg.latent_size)),
            ("drop_portrait", drop_portrait, (b,)),
            ("drop_audio", drop_audio, (b,)),
        ]
        for name, value, shape in expected:
            if value is not None and tuple(value.shape) != shape:
                raise ModelError(f"{name}: expected shape {shape} for x of shape {tuple(x.shape)}, "
                                 f"got {tuple(value.shape)}")
        if memory is None and memory_mask is not None:
            raise ModelError("memory_mask was given without memory; pass both, or neither for no memory")

    # ---------------------------------------------------------------------------------- forward

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        portrait: Tensor,
        audio: Tensor,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        drop_portrait: Tensor | None = None,
        drop_audio: Tensor | None = None,
    ) -> Tensor:
        """Predicted velocity (B, T, C, h, w) of the clip; shapes as in the module docstring.

        t may also be a 0-d tensor (one time for the whole batch). memory None = no memory (all slots
        masked); memory_mask None with memory = all kept. drop_* (B,) bool: True rows use the null condition.
        """
        cfg = self.config
        if t.dim() == 0:
            t = t.expand(x.shape[0])  # (B,)
        self._check(x, t, portrait, audio, memory, memory_mask, drop_portrait, drop_audio)
        b, T = x.shape[:2]
        k, p = cfg.num_memory, cfg.patch_size
        c = self.t_embedder(t)  # (B, D)

        # frame tokens: memory first, masked memory positions -> mask token
        if memory is None:
            memory = x.new_zeros((b, k, *x.shape[2:]))  # (B, K, C, h, w)
            memory_mask = x.new_zeros((b, k, *x.shape[3:]))  # (B, K, h, w): all masked
        elif memory_mask is None:
            memory_mask = x.new_ones((b, k, *x.shape[3:]))  # (B, K, h, w): all kept
        tok = self.embed(torch.cat([memory.to(x.dtype), x], dim=1))  # (B, F, N, D)
        if k:
            keep = F.avg_pool2d(rearrange(memory_mask.to(tok.dtype), "b k h w -> (b k) 1 h w"), p)  # (B*K, 1, g, g)
            keep = rearrange(keep, "(b k) 1 gh gw -> b k (gh gw) 1", b=b)  # (B, K, N, 1): fraction kept per patch
            mem = tok[:, :k] * keep + self.mask_token * (1 - keep) + self.memory_embed  # (B, K, N, D)
            tok = torch.cat([mem, tok[:, k:]], dim=1)  # (B, F, N, D)
        tok = tok + self.pos_spatial[None, None] + self.pos_temporal[: k + T, None]  # (B, F, N, D)

        # portrait tokens (null grid on dropped rows), with spatial position and type embeddings
        por = self.embed(portrait[:, None].to(x.dtype))[:, 0]  # (B, N, D)
        if drop_portrait is not None:
            por = torch.where(drop_portrait.bool()[:, None, None], self.null_portrait.to(por.dtype), por)  # (B, N, D)
        por = por + self.pos_spatial + self.portrait_embed  # (B, N, D)

        # audio tokens (null tokens on dropped rows)
        aud = audio  # (B, T, M, Da)
        if drop_audio is not None:
            null = self.null_audio.to(aud.dtype)  # (M, Da)
            aud = torch.where(drop_audio.bool()[:, None, None, None], null, aud)  # (B, T, M, Da)
        aud_tok = self.audio_embedder(aud) if self.audio_embedder is not None else None  # (B, T, M, D)

        audio_kv = aud if cfg.audio_fusion == "direct" else None  # (B, T, M, Da)
        portrait_kv = por if cfg.portrait_fusion == "direct" else None  # (B, N, D)
        portrait_tok = None
        if cfg.portrait_fusion == "symbiotic":
            portrait_tok = repeat(por, "b n d -> b f n d", f=k + T)  # (B, F, N, D): one copy per frame
        audio_tok = aud_tok if cfg.audio_fusion == "symbiotic" else None  # (B, T, M, D)
        por_side = por[:, None]  # (B, 1, N, D): siamese portrait branch state
        aud_side = aud_tok  # (B, T, M, D): siamese audio branch state
        for i, block in enumerate(self.blocks):
            tok, portrait_tok, audio_tok = block(
                tok, c, k, audio_kv, portrait_kv, portrait_tok, audio_tok)  # (B, F, N, D), carried tokens
            if self.portrait_branch is not None and i < len(self.portrait_branch):
                por_side, guide = self.portrait_branch.step(i, por_side, c)  # (B, 1, N, D) each
                tok = tok + guide  # (B, F, N, D): the same guide for every frame
            if self.audio_branch is not None and aud_side is not None and i < len(self.audio_branch):
                aud_side, guide = self.audio_branch.step(i, aud_side, c)  # (B, T, M, D), (B, T, 1, D)
                tok = torch.cat([tok[:, :k], tok[:, k:] + guide], dim=1)  # (B, F, N, D): clip frames only

        out = self.final_layer(tok[:, k:], c)  # (B, T, N, p*p*C)
        return self.unpatchify(out)  # (B, T, C, h, w)
