"""
Every architecture of the lab, in the order the course teaches: config, norms, RoPE, attention (softmax, then
the linear family), MLP, Block, GPT with its generation loop and sampling, the course's TransformerModel,
LSTMSeqModel and KGramMLPSeqModel, and GPT-2's Hub layout for from_pretrained. torch and the standard library
only: downloads, checkpoints and tokenizers live in load.py (from_pretrained imports it only to download, so
this file alone loads GPT-2 from a local folder), fast CPU kernels in fast_cpu.py.
"""

import json
import math
import mmap
import os
import pickle
import re
import warnings
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# The configuration


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context the model sees (GPT-2: n_positions)
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed (nanoGPT)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, as GPT-2; False is a bit better and faster
    norm_eps: float = 1e-5  # GPT-2's layer_norm_epsilon
    activation: str = 'gelu_tanh'  # GPT-2 uses the tanh approximation of GELU; nanoGPT's own models use 'gelu'
    norm: str = 'layernorm'  # 'layernorm' (GPT-2) or 'rmsnorm' (the course's Transformer, Llama)
    norm_position: str = 'pre'  # 'pre' (GPT-2: normalize each sub-layer's input) or 'post' (the 2017 Transformer)
    pos_emb: str = 'learned'  # 'learned' (GPT-2), 'rope' (rotary) or 'none' (NoPE: causal masking alone)
    attention: str = 'softmax'  # 'softmax', 'linear' (elu+1 feature map), 'gla' (gated linear attention),
    # 'deltanet' (the delta rule) or 'gated_deltanet' (the delta rule with a forget gate)
    rope_base: float = 10000.0  # RoPE's base wavelength
    chunk_size: int = 16  # the linear family: chunk length of the chunkwise-parallel form (16 trains GLA fastest here)
    short_conv: int = 0  # the linear family: kernel size of a causal depthwise convolution on q, k, v (0: none)


ATTENTION_KINDS = ('softmax', 'linear', 'gla', 'deltanet', 'gated_deltanet')
HALF_KEYS = ('gla', 'deltanet', 'gated_deltanet')  # kinds whose keys are half the head size (see LinearAttention)


def key_size(config):
    """Size of a head's queries and keys: the head size, or half of it for the kinds in HALF_KEYS."""
    return config.n_embd // config.n_head // (2 if config.attention in HALF_KEYS else 1)


# GPT-2 took the tanh approximation because erf was slow on 2018 accelerators; on today's CPUs PyTorch's exact
# (erf) GELU is the faster one: forward + backward 1.8x (AVX512) to 2.1x (AVX2) quicker at a block's MLP width
ACTIVATIONS = {'gelu_tanh': lambda x: F.gelu(x, approximate='tanh'), 'gelu': F.gelu}


def check_config(config):
    """One-line errors for option values a model cannot be built with. The types first: a config.json or a
    checkpoint's model_args may say n_layer=3.0 or "3", which would fail deep inside torch."""
    for f in fields(GPTConfig):
        v = getattr(config, f.name)
        want = {int: 'a whole number', float: 'a number', bool: 'True or False', str: 'a string'}[f.type]
        if not (type(v) is f.type or f.type is float and type(v) is int) or f.type is float and not math.isfinite(v):
            raise ValueError(f"{f.name}={v!r:.40} must be {want}")
    for name, ok in (('n_layer', config.n_layer >= 1), ('n_head', config.n_head >= 1), ('n_embd', config.n_embd >= 1),
                     ('vocab_size', config.vocab_size >= 1), ('block_size', config.block_size >= 1),
                     ('chunk_size', config.chunk_size >= 1), ('short_conv', config.short_conv >= 0),
                     ('dropout', 0 <= config.dropout < 1),
                     ('norm_eps', config.norm_eps > 0), ('rope_base', config.rope_base > 0)):
        if not ok:
            raise ValueError(f"{name}={getattr(config, name)} is out of range (sizes >= 1, short_conv >= 0, "
                             f"0 <= dropout < 1, norm_eps > 0, rope_base > 0)")
    allowed = {'activation': tuple(ACTIVATIONS), 'norm': ('layernorm', 'rmsnorm'), 'norm_position': ('pre', 'post'),
               'pos_emb': ('learned', 'rope', 'none'), 'attention': ATTENTION_KINDS}
    for name, values in allowed.items():
        if getattr(config, name) not in values:
            raise ValueError(f"{name}={getattr(config, name)!r} is not one of: {', '.join(values)}")
    if config.n_embd % config.n_head:
        raise ValueError(f"n_embd={config.n_embd} must be a multiple of n_head={config.n_head}")
    head = config.n_embd // config.n_head
    if config.attention in HALF_KEYS and head % (4 if config.pos_emb == 'rope' else 2):
        raise ValueError(f"attention={config.attention!r} halves the head size ({head}) for keys; it must be even "
                         f"(a multiple of 4 with pos_emb='rope')")
    if config.short_conv and config.attention == 'softmax':
        raise ValueError(f"short_conv={config.short_conv} is an option of the linear family (linear, gla, deltanet, "
                         f"gated_deltanet); softmax attention has none: leave it 0")
    if config.pos_emb == 'rope' and head % 2:
        raise ValueError(f"pos_emb='rope' rotates pairs of dimensions: the head size ({head}) must be even")


# -----------------------------------------------------------------------------
# Norms and positions


class RMSNorm(nn.Module):
    """Root-mean-square normalization (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * weight. Unlike
    LayerNorm it neither subtracts the mean nor adds a bias, which is cheaper and works as well."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # PyTorch's fused form of the docstring's formula (one pass forward, 1.2x the written-out form forward +
        # backward); it computes in float32 when x is half precision, as squares of large activations overflow float16.
        # The weight goes to x's dtype (bfloat16 x under autocast): mixed dtypes take a slower unfused path, and warn
        return F.rms_norm(x, (x.size(-1),), self.weight.to(x.dtype), self.eps)


def make_norm(config):
    return RMSNorm(config.n_embd, eps=config.norm_eps) if config.norm == 'rmsnorm' else \
        nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_tables(head_dim, n_pos, base):
    """cos and sin of RoPE's angles (Su et al. 2021, arXiv 2104.09864, eq. 34): position m turns the pair
    (x_i, x_{i+d/2}) by m * base^(-2i/d) (half-split pairs, equivalent to the paper's adjacent ones)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(n_pos, dtype=torch.float64), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i+d/2}) of x (B, H, T, d) by its position's angle (cos, sin: (T, d/2)), so
    that q_m . k_n depends on m and n only through m - n: attention sees relative positions."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def at_least_float32(x):
    """x in float32 if it is in half precision, else as it is (float64 stays float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def heads(x, n_head):
    """(B, T, n_head * d) -> (B, n_head, T, d)"""
    return x.view(x.size(0), x.size(1), n_head, -1).transpose(1, 2)


# -----------------------------------------------------------------------------
# Attention, softmax: Vaswani et al. 2017


class CausalSelfAttention(nn.Module):
    """Multi-head causal softmax attention, with llama3's key/value cache: allocated once per generation, each
    new token's keys and values written in place."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        # query, key, value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.cache = None  # (keys, values), each (B, n_head, max_len, head_size), while generating
        self.compute_dtype = None  # the attention product's dtype (None: the activations'); see fast_cpu.py
        self.one_query_attention = None  # a kernel for one query in inference (None: SDPA's); see fast_cpu.py

    def qkv(self, x, rope=None):
        """Queries, keys, values (B, n_head, T, head_size) of x, with RoPE applied to q and k."""
        q, k, v = (heads(t, self.n_head) for t in self.c_attn(x).split(x.size(-1), dim=2))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.compute_dtype is not None:
            q, k, v = q.to(self.compute_dtype), k.to(self.compute_dtype), v.to(self.compute_dtype)
        return q, k, v

    def setup_cache(self, batch_size, max_len):
        w = self.c_proj.weight
        # keys and values are kept in the dtype c_attn makes them in, before a compute_dtype casts them: exact,
        # and with half-precision weights each token reads half the bytes of a float32 cache (int8 weights
        # make float32 activations)
        dtype = w.dtype if w.is_floating_point() else self.compute_dtype or torch.float32
        # (one spare position: a slice of the whole cache would be contiguous, a case torch.compile would
        # compile a second time in fast_cpu.compile_decode)
        self.cache = None if batch_size is None else tuple(w.new_empty(
            batch_size, self.n_head, max_len + 1, w.size(0) // self.n_head, dtype=dtype) for _ in range(2))

    def forward(self, x, start_pos=None, rope=None):
        B, T, C = x.size()
        q, k, v = self.qkv(x, rope)
        if start_pos is not None:  # generation: one prefill (start_pos 0), then one token at a time
            assert start_pos == 0 or T == 1, "the cache takes one prefill, then one token at a time"
            k_cache, v_cache = self.cache
            k_cache[:, :, start_pos:start_pos + T] = k
            v_cache[:, :, start_pos:start_pos + T] = v
            k, v = k_cache[:, :, :start_pos + T], v_cache[:, :, :start_pos + T]
        # a single new token may see every cached position, so it needs no mask
        # a compute_dtype holds under autocast too, which would otherwise cast q, k, v back to half precision
        with torch.autocast(x.device.type, enabled=False) if self.compute_dtype is not None else nullcontext():
            if T == 1 and self.one_query_attention is not None and not self.training:
                y = self.one_query_attention(q, k, v)  # (it reads a half-precision cache as it is)
            else:
                y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), is_causal=T > 1,
                                                   dropout_p=self.dropout if self.training else 0.0)
        y = y.to(x.dtype).transpose(1, 2).reshape(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


# -----------------------------------------------------------------------------
# Attention, the linear family: a fixed-size state instead of a cache


def linear_attention_recurrent(q, k, v, log_decay=None, state=None):
    """Causal linear attention, one token at a time. With S_t (dk x dv) the state after token t:
        S_t = diag(a_t) S_{t-1} + k_t v_t^T,    o_t = S_t^T q_t
    a_t = exp(log_decay_t) is GLA's data-dependent forget gate (Yang et al. 2023, arXiv 2312.06635, eq. 2);
    without it (a_t = 1) this is Katharopoulos et al. 2020 (arXiv 2006.16236), eq. 5-6. Generation carries
    the state, a fixed size however long the text. q, k: (B, H, T, dk); v: (B, H, T, dv); log_decay: like
    q, or None. Returns (o, state)."""
    B, H, T, dk = q.shape
    if state is None:
        state = q.new_zeros(B, H, dk, v.size(-1))
    out = []
    for t in range(T):
        if log_decay is not None:
            state = log_decay[:, :, t, :, None].exp() * state
        state = state + k[:, :, t, :, None] * v[:, :, t, None, :]
        out.append((q[:, :, t, None, :] @ state).squeeze(-2))
    return torch.stack(out, dim=2), state


def gated_scores(q, k, L):
    """A[t, s] = sum_i q_ti k_si exp(L_ti - L_si) for s <= t, else 0: causal attention scores under GLA's
    decay, with L the running sum of log_decay over the sequence (or chunk). The decays exp(L_t - L_s) <= 1
    are formed directly, which is stable for any gate. q, k, L: (..., T, dk); returns (..., T, T)."""
    T = q.size(-2)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    decay = (L.unsqueeze(-2) - L.unsqueeze(-3)).masked_fill(~causal[:, :, None], float('-inf')).exp()
    return torch.einsum('...td,...sd,...tsd->...ts', q, k, decay)


def linear_attention_chunked(q, k, v, log_decay=None, chunk_size=64, state=None):
    """The same outputs as linear_attention_recurrent, chunkwise-parallel (for training and prefill; GLA,
    section 4.2). Unrolled over a chunk that starts from state S_0, with L_t the sum of log_decay over the
    chunk up to t:
        o_t = (q_t * exp(L_t))^T S_0  +  sum_{s <= t} [sum_i q_ti k_si exp(L_ti - L_si)] v_s
    The first term carries the state from chunk to chunk (a loop over chunks, not tokens); the second is a
    causal attention inside the chunk. Memory is O(T * chunk_size * dk), with no T x T matrix."""
    B, H, T, dk = q.shape
    dv = v.size(-1)
    C = chunk_size
    pad = (-T) % C  # zeros at the end change no earlier output and leave the final state as it is
    ld = q.new_zeros(B, H, T, dk) if log_decay is None else log_decay
    q, k, v, ld = (F.pad(t, (0, 0, 0, pad)).view(B, H, -1, C, t.size(-1)) for t in (q, k, v, ld))
    L = ld.cumsum(dim=3)  # (B, H, n_chunks, C, dk)
    if log_decay is None:  # no decay: the chunk's attention is plain causal q k^T
        A = (q @ k.transpose(-1, -2)).tril()
    else:
        A = gated_scores(q, k, L)
    o_intra = A @ v
    q_in = q * L.exp()  # how much of the entering state each position still sees
    k_out = k * (L[..., -1:, :] - L).exp()  # how much of each token is left at the chunk's end
    keep = L[..., -1, :].exp()  # how much of the state survives the whole chunk
    S = q.new_zeros(B, H, dk, dv) if state is None else state
    o_inter = []
    for j in range(q.size(2)):
        o_inter.append(q_in[:, :, j] @ S)
        S = keep[:, :, j, :, None] * S + k_out[:, :, j].transpose(-1, -2) @ v[:, :, j]
    o = o_intra + torch.stack(o_inter, dim=2)
    return o.reshape(B, H, -1, dv)[:, :, :T], S


def delta_rule_recurrent(q, k, v, beta, log_decay=None, state=None):
    """The (gated) delta rule, one token at a time. With S_t (dk x dv) the state after token t:
        S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,    o_t = S_t^T q_t
    Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, arXiv 2412.06464, section 3.1, the gated delta rule, in our
    orientation: their S is our S^T). k_t^T S_{t-1} is what the state recalls for key k_t; the update replaces
    the fraction b_t of it by v_t (S_{t-1} + b_t k_t (v_t - S_{t-1}^T k_t)^T) instead of adding v_t on top, as
    linear attention does: with unit-norm keys, writing a key twice overwrites, it does not blur. a_t = 1 is
    DeltaNet (Schlag et al. 2021, arXiv 2102.11174; Yang et al. 2024, arXiv 2406.06484); a_t < 1 forgets the
    whole state a little, as Mamba-2 does. q, k: (B, H, T, dk), unit norm; v: (B, H, T, dv); beta and
    log_decay = log a: (B, H, T, 1), or log_decay None. Returns (o, state)."""
    B, H, T, dk = q.shape
    if state is None:
        state = q.new_zeros(B, H, dk, v.size(-1))
    out = []
    for t in range(T):
        k_t, b_t = k[:, :, t, :, None], beta[:, :, t, :, None]  # (B, H, dk, 1), (B, H, 1, 1)
        state = state - b_t * k_t @ (k_t.transpose(-1, -2) @ state)  # (I - b_t k_t k_t^T) S_{t-1}
        if log_decay is not None:
            state = log_decay[:, :, t, :, None].exp() * state
        state = state + b_t * k_t * v[:, :, t, None, :]
        out.append((q[:, :, t, None, :] @ state).squeeze(-2))
    return torch.stack(out, dim=2), state


def delta_rule_chunked(q, k, v, beta, log_decay=None, chunk_size=64, state=None):
    """The same outputs and final state as delta_rule_recurrent, chunkwise-parallel for training and prefill
    (Gated DeltaNet, section 3.3; DeltaNet's WY / UT-transform form, Yang et al. 2024, arXiv 2406.06484). In a
    chunk that starts from S_0, with g_t = a_1...a_t (L = log g, summed over the chunk), unrolling the rule gives
        S_t = g_t S_0 + sum_{i <= t} (g_t / g_i) k_i w_i^T,
        w_t = b_t (v_t - g_t S_0^T k_t - sum_{i < t} (g_t / g_i) (k_t . k_i) w_i)
    so the rows w of the chunk solve one lower-triangular system (I + A) w = b * (v - g k S_0) with
    A_ti = b_t (g_t / g_i) (k_t . k_i), i < t. Its inverse T = (I + A)^{-1} is the UT transform: with
    u = T (b * v) and W = T (b * g * k), w = u - W S_0, computed for all chunks at once. Then
        o_t = sum_{i <= t} (g_t / g_i) (q_t . k_i) w_i + g_t S_0^T q_t,    S_C = g_C S_0 + sum_i (g_C / g_i) k_i w_i^T
    and only this step, S_0 -> S_C, loops over the chunks. Ratios g_t / g_i = exp(L_t - L_i) <= 1 are formed
    directly, stable for any decay."""
    B, H, T, dk = q.shape
    dv = v.size(-1)
    C = chunk_size
    pad = (-T) % C  # padded positions have b = 0 and k = 0: they neither write nor erase, nor change later outputs
    ld = q.new_zeros(B, H, T, 1) if log_decay is None else log_decay
    q, k, v, beta, ld = (F.pad(t, (0, 0, 0, pad)).view(B, H, -1, C, t.size(-1)) for t in (q, k, v, beta, ld))
    L = ld.cumsum(dim=3)  # (B, H, n_chunks, C, 1)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    ratio = (L - L.transpose(-1, -2)).masked_fill(~causal, float('-inf')).exp()  # g_t / g_i for i <= t, else 0
    A = (beta * (k @ k.transpose(-1, -2)) * ratio).tril(-1)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    T_inv = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)
    u, W = T_inv @ (beta * v), T_inv @ (beta * L.exp() * k)
    M = (q @ k.transpose(-1, -2)) * ratio  # causal scores under the decay
    o_intra = M @ u  # what the chunk's own tokens give, from an empty state
    q_in = q * L.exp() - M @ W  # how the entering state S_0 reaches each output
    k_out = k * (L[..., -1:, :] - L).exp()  # how much of each token's write is left at the chunk's end
    keep = L[..., -1:, :].exp()  # g_C: how much of the state survives the whole chunk
    S = q.new_zeros(B, H, dk, dv) if state is None else state
    o_inter = []
    for j in range(q.size(2)):
        o_inter.append(q_in[:, :, j] @ S)
        S = keep[:, :, j] * S + k_out[:, :, j].transpose(-1, -2) @ (u[:, :, j] - W[:, :, j] @ S)
    o = o_intra + torch.stack(o_inter, dim=2)
    return o.reshape(B, H, -1, dv)[:, :, :T], S


class LinearAttention(nn.Module):
    """Causal attention without the softmax: a recurrence with a fixed-size state. Training and prefill run
    the chunked form; generation continues token by token from the state.
    - 'linear' (Katharopoulos et al. 2020): softmax(q k^T) v becomes phi(q) phi(k)^T v with phi = elu + 1,
      divided by the normalizer phi(q_t) . sum_s phi(k_s) (eq. 6);
    - 'gla' (Yang et al. 2023): a data-dependent forget gate per key dimension from a rank-16 projection
      (eq. 4, temperature 16), keys of half the head size (softmax attention's parameter count), then a
      per-head RMSNorm and a SiLU output gate (section 4.4);
    - 'gated_deltanet' (Yang, Kautz & Hatamizadeh 2024): the delta rule (delta_rule_recurrent) with
      q = l2norm(silu(x W_q)), k = l2norm(silu(x W_k)), v = silu(x W_v) (the paper's figure 1; its short
      convolution before the SiLU with short_conv=4), a write strength b = sigmoid(x W_b) and a forget gate a
      per head, keys of half the head size and GLA's head norm and output gate; 'deltanet' is the same with a = 1.
    short_conv, for every kind of the family, is off by default; study.py's attention study turns it on."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.chunk_size, self.kind = config.n_head, config.chunk_size, config.attention
        self.short_conv = config.short_conv
        self.delta = self.kind in ('deltanet', 'gated_deltanet')  # the delta rule's state update
        self.gated = self.kind in ('gla', 'gated_deltanet')  # a forget gate
        head_size = config.n_embd // config.n_head
        self.dk = key_size(config)  # key (and query) size per head
        self.c_attn = nn.Linear(config.n_embd, 2 * self.n_head * self.dk + config.n_embd, bias=config.bias)
        if config.short_conv:  # one filter of short_conv taps per channel of q, k and v (see short_convolution)
            width = 2 * self.n_head * self.dk + config.n_embd
            self.conv_weight = nn.Parameter(nn.Conv1d(width, width, config.short_conv, groups=width).weight.detach())
        if self.kind == 'gla':
            self.gate_proj = nn.Sequential(nn.Linear(config.n_embd, 16, bias=False),
                                           nn.Linear(16, self.n_head * self.dk))  # low-rank forget gate
        if self.delta:
            self.beta_proj = nn.Linear(config.n_embd, self.n_head, bias=False)  # b_t, one per head
        if self.kind == 'gated_deltanet':
            # a_t = exp(-exp(A_log) * softplus(x W_a + dt_bias)): Mamba-2's discretized decay (Dao & Gu 2024,
            # arXiv 2405.21060), exp(-A dt) with a step dt = softplus(.) > 0 and a rate A = exp(A_log) > 0, which
            # the Gated DeltaNet paper takes for a_t (as its released code does). Initialized as there: A
            # uniform in [1, 16], dt log-uniform in [0.001, 0.1] (dt_bias = softplus^-1(dt)), so that heads start
            # with memories from ~10 to ~1,000 tokens long
            self.decay_proj = nn.Linear(config.n_embd, self.n_head, bias=False)
            self.A_log = nn.Parameter(torch.empty(self.n_head).uniform_(1, 16).log())
            dt = torch.exp(torch.empty(self.n_head).uniform_(math.log(1e-3), math.log(1e-1)))
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        if self.kind != 'linear':
            self.out_gate = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
            self.head_norm = RMSNorm(head_size, eps=config.norm_eps)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # {name: (B, n_head, dk, dv)} while generating, left by the prefill for the next token (and 'conv': the
        # short convolution's last inputs)
        self.state = None

    def short_convolution(self, u, start_pos):
        """The short convolution of Gated DeltaNet (figure 1; H3 and Mamba before it): channel c's output at t
        is sum_j w[c, j] u[t - K + 1 + j, c] over the K = short_conv latest inputs, zeros before the text. It
        hands each position its neighbours' keys and values, which recall needs (Zoology, arXiv 2312.04927,
        section 4) and which a state alone cannot give. While generating, the last K - 1 inputs are carried."""
        K = self.conv_weight.size(-1)
        past = u.new_zeros(u.size(0), K - 1, u.size(2)) if start_pos is None or start_pos == 0 else self.state['conv']
        u = torch.cat([past, u], dim=1)
        if start_pos is not None:
            self.state['conv'] = u[:, u.size(1) - (K - 1):]
        return F.conv1d(u.transpose(1, 2), self.conv_weight.to(u.dtype), groups=u.size(2)).transpose(1, 2)

    def qkv(self, x, start_pos=None):
        """Queries, keys (B, n_head, T, dk) and values (B, n_head, T, head_size): for 'linear' phi(q), phi(k),
        positive so that the normalizer is; for 'gla' q scaled by 1/sqrt(dk), as softmax attention's scores;
        for the delta rule unit-norm q and k (its write k_t k_t^T is a projection only for |k_t| = 1; the head
        norm after it makes a scale of q irrelevant). With short_conv, convolved over time first."""
        sizes = [self.n_head * self.dk, self.n_head * self.dk, x.size(-1)]
        u = self.c_attn(x)
        if self.short_conv:
            u = self.short_convolution(u, start_pos)
        q, k, v = (heads(t, self.n_head) for t in u.split(sizes, dim=2))
        if self.delta:
            return F.normalize(F.silu(q), dim=-1), F.normalize(F.silu(k), dim=-1), F.silu(v)
        if self.gated:
            return q * self.dk ** -0.5, k, v
        return F.elu(q) + 1, F.elu(k) + 1, v

    def log_decay(self, x):
        """log a_t: GLA's forget gate a = sigmoid(x W_1 W_2)^(1/16) (rank 16, temperature 16), (B, n_head, T, dk);
        Gated DeltaNet's a = exp(-exp(A_log) softplus(x W_a + dt_bias)), one per head, (B, n_head, T, 1)."""
        if self.kind == 'gla':
            return heads(F.logsigmoid(self.gate_proj(x)) / 16, self.n_head)
        dt = F.softplus(at_least_float32(self.decay_proj(x)) + self.dt_bias)
        return heads(-self.A_log.exp() * dt, self.n_head)

    def beta(self, x):
        """The delta rule's write strength b_t = sigmoid(x W_b) in (0, 1), per head: (B, n_head, T, 1)."""
        return heads(torch.sigmoid(at_least_float32(self.beta_proj(x))), self.n_head)

    def setup_cache(self, batch_size, max_len):
        self.state = None  # the prefill starts it

    def attend(self, name, q, k, v, log_decay, start_pos, beta=None):
        """o_t = S_t^T q_t for every position: chunked, or recurrent from the state self.state[name]; the
        delta rule when beta is given."""
        # the state sums every token so far: in half precision its rounding errors pile up (and linear
        # attention's normalizer overflows float16), so it is kept in float32
        q, k, v, log_decay, beta = (None if t is None else at_least_float32(t) for t in (q, k, v, log_decay, beta))
        if beta is not None:
            # the delta rule's triangular solve and its erase-then-write steps cancel large terms: in float32
            # even under autocast (which would run its matmuls in bfloat16)
            with torch.autocast(q.device.type, enabled=False):
                if start_pos is None or start_pos == 0:
                    o, state = delta_rule_chunked(q, k, v, beta, log_decay, self.chunk_size)
                else:
                    assert q.size(2) == 1, "the state takes one prefill, then one token at a time"
                    o, state = delta_rule_recurrent(q, k, v, beta, log_decay, self.state[name])
        elif start_pos is None or start_pos == 0:
            o, state = linear_attention_chunked(q, k, v, log_decay, self.chunk_size)
        else:
            assert q.size(2) == 1, "the state takes one prefill, then one token at a time"
            o, state = linear_attention_recurrent(q, k, v, log_decay, self.state[name])
        if start_pos is not None:
            self.state[name] = state
        return o

    def forward(self, x, start_pos=None, rope=None):
        B, T, C = x.size()
        if start_pos == 0:
            self.state = {}  # a prefill starts the state afresh
        q, k, v = self.qkv(x, start_pos)
        # (a rotation keeps the delta rule's keys unit-norm)
        rq, rk = (q, k) if rope is None else (apply_rope(q, *rope), apply_rope(k, *rope))
        if self.kind == 'linear':
            # RoPE (RoFormer eq. 19) rotates the features of the numerator only: the normalizer stays positive
            numerator = self.attend('numerator', rq, rk, v, None, start_pos)
            normalizer = self.attend('normalizer', q, k, torch.ones_like(v[..., :1]), None, start_pos)
            y = (numerator / normalizer).to(x.dtype)
        else:
            log_decay = self.log_decay(x) if self.gated else None
            o = self.attend('S', rq, rk, v, log_decay, start_pos, self.beta(x) if self.delta else None)
            y = self.head_norm(o).to(x.dtype) * heads(F.silu(self.out_gate(x)), self.n_head)
        y = y.transpose(1, 2).reshape(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


def make_attention(config):
    return CausalSelfAttention(config) if config.attention == 'softmax' else LinearAttention(config)


# -----------------------------------------------------------------------------
# MLP, Block, GPT


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = ACTIVATIONS[config.activation]
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """A transformer block: attention then MLP, each added back to the residual stream. GPT-2 normalizes each
    sub-layer's input ('pre', Xiong et al. 2020, arXiv 2002.04745); the original Transformer normalizes each
    sum ('post', Vaswani et al. 2017, arXiv 1706.03762), which needs warmup to train stably."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = make_attention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)
        self.post_norm = config.norm_position == 'post'

    def forward(self, x, start_pos=None, rope=None):
        if self.post_norm:
            x = self.ln_1(x + self.attn(x, start_pos, rope))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), start_pos, rope)
        return x + self.mlp(self.ln_2(x))


def logits_and_loss(logits, targets):
    """(logits, mean cross-entropy of the next tokens, or None without targets); targets of -1 are ignored."""
    return logits, None if targets is None else F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                                                targets.reshape(-1), ignore_index=-1)


class ChunkedCrossEntropy(torch.autograd.Function):
    """F.cross_entropy(x @ weight.T, targets, ignore_index=-1) without the (rows, vocab) logits ever existing
    whole (GPT-2's vocabulary: 411 MB for a 16 x 128 batch, written and read ~8 times by the plain form). Rows
    go in chunks of ~32 MB of logits, and each chunk's gradient, softmax - onehot(target), is taken while its
    logits are at hand: backward only scales it. Under autocast the matmuls run in bfloat16 (weight cast once,
    not per matmul), softmax's sums in float32."""
    rows = 2 ** 23  # logits per chunk

    @staticmethod
    def forward(ctx, x, weight, targets, grad):
        dev = x.device.type
        w = weight.to(torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else weight
        xw = x.to(w.dtype)
        gx, gw = (torch.empty_like(x), torch.zeros_like(weight, dtype=torch.float32)) if grad else (None, None)
        loss, rows = x.new_zeros((), dtype=torch.float32), max(1, ChunkedCrossEntropy.rows // weight.size(0))
        for i in range(0, x.size(0), rows):
            z = xw[i:i + rows] @ w.t()
            t = targets[i:i + rows]
            keep, t = t != -1, t.clamp(min=0)
            p = torch.softmax(z, dim=1)  # one fused pass per row while it is in cache
            # log-sum-exp = max z + log sum exp(z - max z) = max z - log max p, as max p = 1 / sum exp(z - max z):
            # never underflows, unlike log p[target]
            lse = z.amax(dim=1).float() - p.amax(dim=1).float().log()
            loss += ((lse - z.gather(1, t[:, None])[:, 0].float()) * keep).sum()
            if grad:  # d loss / d logits = softmax - onehot(target), on the rows that count
                p[torch.arange(len(t), device=t.device), t] -= 1
                p[torch.where(~keep)[0]] = 0
                gx[i:i + rows] = p @ w
                gw += p.t() @ xw[i:i + rows]
        ctx.n = (targets != -1).sum()
        if grad:
            ctx.save_for_backward(gx, gw.to(weight.dtype))
        return loss / ctx.n

    @staticmethod
    def backward(ctx, g):
        gx, gw = ctx.saved_tensors
        return gx * (g / ctx.n), gw * (g / ctx.n), None, None


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        check_config(config)
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            # GPT-2 added a final norm because pre-norm leaves the residual stream unnormalized; post-norm
            # blocks end with one already
            ln_f=make_norm(config) if config.norm_position == 'pre' else nn.Identity(),
        ))
        if config.pos_emb == 'learned':
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        if config.pos_emb == 'rope':
            cos, sin = rope_tables(key_size(config), config.block_size, config.rope_base)
            # computed in float64 for exact angles at long positions, kept in float32 (MPS has no float64)
            self.register_buffer('rope_cos', cos.float(), persistent=False)
            self.register_buffer('rope_sin', sin.float(), persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying (Press & Wolf 2017): the unembedding is the token embedding, as in GPT-2
        self.transformer.wte.weight = self.lm_head.weight
        self.layer_ids = list(range(config.n_layer))  # which original blocks the model runs (see prune_layers)
        self.block_size = config.block_size  # the longest context: generation conditions on the last block_size tokens
        for m in self.modules():  # GPT-2's init: weights N(0, 0.02), biases 0
            if isinstance(m, (nn.Linear, nn.Embedding)):
                torch.nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        for pn, p in self.named_parameters():  # and the projections into the residual stream / sqrt(2 * n_layer)
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def embed(self, idx, start_pos=None):
        """Token embeddings of idx (B, T) at positions start_pos, start_pos + 1, ..., plus learned position
        embeddings; and RoPE's (cos, sin) for those positions, applied inside attention (else None)."""
        T = idx.size(1)
        t0 = start_pos or 0
        assert t0 + T <= self.config.block_size, \
            f"cannot forward a sequence of length {t0 + T}, block_size is only {self.config.block_size}"
        x = self.transformer.wte(idx)
        if self.config.pos_emb == 'learned':
            x = x + self.transformer.wpe(torch.arange(t0, t0 + T, dtype=torch.long, device=idx.device))
        rope = (self.rope_cos[t0:t0 + T], self.rope_sin[t0:t0 + T]) if self.config.pos_emb == 'rope' else None
        return self.transformer.drop(x), rope

    def forward(self, idx, targets=None, start_pos=None):
        """idx: (B, T) token ids. Returns (logits, loss): with targets, (None, the mean cross-entropy); without,
        (logits for every position, None); with start_pos (generation with the cache, tokens at positions
        start_pos...), the last position's logits only."""
        x, rope = self.embed(idx, start_pos)
        for block in self.transformer.h:
            x = block(x, start_pos, rope)
        x = self.transformer.ln_f(x)
        if targets is not None:  # the loss alone: training and evaluation never need all the logits at once
            w = self.lm_head.weight
            grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
            return None, ChunkedCrossEntropy.apply(x.flatten(0, 1), w, targets.flatten(), grad)
        if start_pos is not None:
            x = x[:, [-1], :]  # generation needs only the next token: skip the unembedding of the prompt
        return self.lm_head(x), None

    def residual_stream(self, idx):
        """The residual stream entering the first block and leaving each block, n_layer + 1 tensors (B, T, C):
        read through ln_f and lm_head, each gives the prediction formed by that depth (the logit lens)."""
        x, rope = self.embed(idx)
        xs = [x]
        for block in self.transformer.h:
            xs.append(block(xs[-1], None, rope))
        return xs

    def prune_layers(self, active_layers):
        """Keep only the blocks that active_layers selects (see parse_active_layers), in that order. The
        other blocks are removed from the module, so their memory and compute are gone; self.layer_ids
        records which of the original blocks remain."""
        keep = parse_active_layers(active_layers, len(self.transformer.h))
        self.transformer.h = nn.ModuleList([self.transformer.h[i] for i in keep])
        self.layer_ids = [self.layer_ids[i] for i in keep]
        self.config = replace(self.config, n_layer=len(keep))  # a copy: the caller's config stays as it was
        return self

    # -- generation -----------------------------------------------------------

    def setup_cache(self, batch_size, max_len):
        """Make each attention layer ready for a generation of batch_size rows and max_len tokens: a key/value
        cache allocated once (softmax), an empty state (linear, gla). batch_size None frees them."""
        for block in self.transformer.h:
            block.attn.setup_cache(batch_size, max_len)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None):
        """Continue each row of idx (B, T) by max_new_tokens tokens (see sample_next_token for the sampling)."""
        out = idx.new_empty(idx.size(0), idx.size(1) + max_new_tokens)
        out[:, :idx.size(1)] = idx
        for i, next_id in enumerate(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p)):
            out[:, idx.size(1) + i] = next_id[:, 0]
        return out

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None):
        """Like generate, but yields each new (B, 1) column of tokens when sampled. The one generation loop of every
        model here (each provides setup_cache, forward(x, start_pos=...), block_size): a prefill of the prompt, then
        a token per step. Like nanoGPT it conditions on the last block_size tokens: once the cache is full, every
        position would shift by one (GPT-2's are absolute), so it is refilled from them, as a no-cache loop does."""
        check_sampling_args(temperature, top_k, top_p, max_new_tokens)
        B, T = idx.size()
        block_size = self.block_size or T + max_new_tokens  # None: no limit (the recurrent Pico models)
        tokens = idx.new_empty(B, T + max_new_tokens)  # everything so far, for refills past block_size
        tokens[:, :T] = idx
        self.setup_cache(B, min(block_size, T + max_new_tokens))
        try:
            x, pos = idx[:, -block_size:], 0
            for i in range(max_new_tokens):
                logits, _ = self(x, start_pos=pos)
                pos += x.size(1)
                next_id = sample_next_token(logits[:, -1, :], temperature, top_k, top_p)
                tokens[:, T + i] = next_id[:, 0]
                yield next_id
                if pos == block_size:  # cache full: start again from the last block_size tokens
                    x, pos = tokens[:, max(0, T + i + 1 - block_size):T + i + 1], 0
                else:
                    x = next_id
        finally:
            self.setup_cache(None, None)

    @classmethod
    def from_pretrained(cls, name, active_layers=None):
        """GPT-2 from a local folder (config.json and model.safetensors, or pytorch_model.bin) or the Hub ('gpt2',
        'gpt2-medium', 'gpt2-large', 'gpt2-xl', or an 'org/name' repo of GPT-2 architecture): the architecture from
        config.json, and only the blocks that active_layers selects (prune_layers)."""
        folder = name
        if not os.path.isdir(name):
            from load import hub_snapshot  # only a download needs load.py (and requests)
            folder = hub_snapshot(name)
        config = gpt_config_from_hf(folder)
        if os.path.exists(os.path.join(folder, 'model.safetensors')):
            sd = load_safetensors(os.path.join(folder, 'model.safetensors'))
        elif os.path.exists(os.path.join(folder, 'pytorch_model.bin')):
            sd = safe_torch_load(os.path.join(folder, 'pytorch_model.bin'))
        else:
            raise FileNotFoundError(f"{folder} has config.json but no model.safetensors or pytorch_model.bin")
        sd = gpt2_from_hf_names(sd)
        with torch.device('meta'):  # shapes without memory (and no random init: every weight is loaded below)
            model = cls(check_shapes(config, sd, folder))
        check_shapes(model, sd, folder)
        if active_layers is not None:
            model.prune_layers(active_layers)  # before any memory is taken: the blocks left out never take any
        model.to_empty(device='cpu')
        model.transformer.wte.weight = model.lm_head.weight  # to_empty unties shared parameters
        model.load_state_dict({k: v for k, v in sd.items() if not k.startswith('transformer.h.')}, strict=False)
        for block, i in zip(model.transformer.h, model.layer_ids):  # each kept block: the file's block it was
            block.load_state_dict({k.removeprefix(f'transformer.h.{i}.'): v for k, v in sd.items()
                                   if k.startswith(f'transformer.h.{i}.')})
        return model


def check_shapes(model_or_config, weights, where):
    """Refuse (one line) a config whose sizes its weights ({name: tensor}) lack, before anything is allocated: a
    GPTConfig's n_layer against the file's blocks (building 10**5 blocks takes minutes even without memory), then
    a model built on the meta device (shapes, no memory) tensor by tensor. Returns model_or_config."""
    m = model_or_config
    if isinstance(m, GPTConfig):
        n = len({k.split('.')[2] for k in weights if k.startswith('transformer.h.')})
        if n != m.n_layer:
            raise ValueError(f"{where}: the config says n_layer={m.n_layer} but the weights hold {n} blocks")
        return m
    for name, t in m.state_dict().items():
        if name not in weights or tuple(weights[name].shape) != tuple(t.shape):
            got = 'missing' if name not in weights else f"of shape {tuple(weights[name].shape)}"
            raise ValueError(f"{where}: the weights do not fit the config: {name} is {got}, the config makes it "
                             f"{tuple(t.shape)}")
    return m


def parse_active_layers(active_layers, n_layer):
    """Which blocks to run, as indices into 0..n_layer-1, from: None or 'all', 'even' (0,2,4,...), 'odd', 'first_half'
    (drop the last n//2 blocks), 'last_half' (drop the first n//2), '0,2,4', '0-5' (inclusive; pieces combine:
    '0-3,8'), or a list/tuple of ints (--active_layers=0,2,4 reaches a script as a tuple), run in that order."""
    allowed = ("allowed: None, 'all', 'even', 'odd', 'first_half', 'last_half', '0,2,4', '0-5', "
               "or a list of block indices")
    if active_layers is None or active_layers == 'all':
        return list(range(n_layer))
    named = {'even': list(range(0, n_layer, 2)), 'odd': list(range(1, n_layer, 2)),
             'first_half': list(range(n_layer - n_layer // 2)), 'last_half': list(range(n_layer // 2, n_layer))}
    if isinstance(active_layers, str) and active_layers.strip() in named:
        keep = named[active_layers.strip()]
    elif isinstance(active_layers, str):
        keep = []
        for piece in active_layers.replace(' ', '').split(','):
            m = re.fullmatch(r'(\d+)(?:-(\d+))?', piece)
            if not m:
                raise ValueError(f"active_layers={active_layers!r}: cannot read {piece!r}; {allowed}")
            lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
            if hi < lo:
                raise ValueError(f"active_layers={active_layers!r}: range {piece!r} runs backwards; {allowed}")
            keep += list(range(lo, min(hi, max(lo, n_layer)) + 1))  # (past the end: refused below, not listed)
    elif isinstance(active_layers, int) and not isinstance(active_layers, bool):
        keep = [active_layers]
    elif isinstance(active_layers, (list, tuple)) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in active_layers):
        keep = list(active_layers)
    else:
        raise ValueError(f"active_layers={active_layers!r} is not a layer selection; {allowed}")
    if not keep:
        raise ValueError(f"active_layers={active_layers!r} selects no block of this {n_layer}-block model; {allowed}")
    bad = [i for i in keep if not 0 <= i < n_layer]
    if bad:
        raise ValueError(f"active_layers={active_layers!r}: block {bad[0]} is out of range, this model has "
                         f"{n_layer} blocks (0-{n_layer - 1}); {allowed}")
    dup = sorted({i for i in keep if keep.count(i) > 1})
    if dup:
        raise ValueError(f"active_layers={active_layers!r}: block {dup[0]} is listed twice; {allowed}")
    return keep


# -----------------------------------------------------------------------------
# Sampling: written once, used by every model and script


def check_sampling_args(temperature=1.0, top_k=None, top_p=None, max_new_tokens=0):
    """One-line errors for sampling settings outside their range."""
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy argmax)")
    if top_k is not None and not top_k >= 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None for no top-k)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or None for no nucleus sampling)")
    if not 0 <= max_new_tokens <= 10**6:  # (a million tokens take hours already; more would not fit in memory)
        raise ValueError(f"max_new_tokens={max_new_tokens} must be in [0, 1,000,000]")


def top_p_filter(probs, p):
    """Zero every probability outside the nucleus and renormalise, along the last dim. The nucleus, as the
    course defines top-p: sort by probability p(1) >= p(2) >= ... and keep the smallest k with
    p(1)+...+p(k-1) < p <= p(1)+...+p(k). Ties are ordered by token id (a stable sort)."""
    if p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # p(1)+...+p(i-1) for each i
    keep_sorted = mass_before < p
    keep_sorted[..., 0] = True  # the most likely token always (p=1e-300 is 0 in float32, and 0 < 0 is False)
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    probs = probs * keep
    return probs / probs.sum(dim=-1, keepdim=True)


def nucleus_sampling(logits, p):
    """Top-p sampling (Holtzman et al. 2019): sample from the smallest set of tokens whose probability mass
    reaches p. logits (..., V) -> sampled ids (..., 1)."""
    probs = F.softmax(logits.float(), dim=-1)
    probs = top_p_filter(probs, p)
    return torch.multinomial(probs.view(-1, probs.size(-1)), 1).view(*probs.shape[:-1], 1)


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None):
    """Next token ids (B, 1) from logits (B, V): temperature 0 is greedy argmax; otherwise the logits are
    cut to the top_k largest, divided by temperature, cut to the top_p nucleus, and sampled. Logits that are
    NaN or infinite (NaN weights) stop it with a one-line ValueError, not a traceback or text from garbage."""
    logits, ids = logits.float(), None  # (exact for half-precision logits; a CPU argmax of 50257 is 3x faster)
    if temperature == 0:
        choice = torch.argmax(logits, dim=-1, keepdim=True)
        check_finite(logits.gather(-1, choice))  # (argmax takes a NaN for the largest: one NaN or inf shows here)
        return choice
    if top_k is not None and top_k < logits.size(-1):
        # sample among the k largest directly: topk returns them sorted, so softmax and top-p work on k values
        logits, ids = torch.topk(logits, top_k, dim=-1)
    best = logits.amax(dim=-1, keepdim=True)  # (NaN if any logit is)
    check_finite(best)
    # the largest logit subtracted before dividing: a tiny temperature (1e-40) then gives -inf, not inf - inf
    logits = (logits - best) / temperature
    if top_p is not None and top_p < 1.0:
        choice = nucleus_sampling(logits, top_p)
    else:
        choice = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
    return choice if ids is None else torch.gather(ids, -1, choice)


def check_finite(best_logits):
    if not torch.isfinite(best_logits).all():
        raise ValueError("the model's logits are NaN or infinite, so there is nothing to sample from: its weights "
                         "are probably NaN or infinite (a diverged run, or a corrupt file); use another checkpoint")


# -----------------------------------------------------------------------------
# The course's models. Like GPT they take (B, T) token ids, return (logits, loss), and generate through
# GPT's one generation loop (see GPT.generate_stream for what a model provides).


class TransformerModel(GPT):
    """The course's causal decoder-only Transformer: GPT's code (one attention and block code path) with
    RMSNorm, exact GELU and no biases, under the course's argument names."""

    def __init__(self, vocab_size=50257, d_model=1024, n_heads=2, n_blocks=4, block_size=1024, dropout=0.0):
        super().__init__(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_blocks, n_head=n_heads,
                                   n_embd=d_model, dropout=dropout, bias=False, norm='rmsnorm',
                                   activation='gelu'))


class LSTMSeqModel(nn.Module):
    """The course's recurrent baseline: embedding -> LSTM (Hochreiter & Schmidhuber 1997) -> linear.
    Generation carries the LSTM's state (h, c) from token to token, so every new token costs the same."""
    block_size = None  # no context limit: the state summarizes everything so far

    def __init__(self, vocab_size, embed_size=1024, hidden_size=1024):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.lstm = nn.LSTM(embed_size, hidden_size, batch_first=True)
        self.linear = nn.Linear(hidden_size, vocab_size)
        self.state = None  # (h, c) while generating

    def forward(self, idx, targets=None, start_pos=None):
        x = self.embedding(idx)
        if start_pos is None:
            out, _ = self.lstm(x)
        else:  # generation: continue from the state left by the previous call
            out, self.state = self.lstm(x, self.state if start_pos > 0 else None)
            out = out[:, [-1], :]
        return logits_and_loss(self.linear(out), targets)

    def setup_cache(self, batch_size, max_len):
        self.state = None

    generate = GPT.generate
    generate_stream = GPT.generate_stream


class KGramMLPSeqModel(nn.Module):
    """The course's k-gram MLP, a neural n-gram model (Bengio et al. 2003): the next token from the embeddings of
    the last k tokens alone, concatenated, through (Linear -> SiLU) x num_inner_layers -> Linear (token 0 before
    the start, as the course pads)."""
    block_size = None  # no context limit to slide: only the last k tokens are ever read

    def __init__(self, vocab_size, k=3, embed_size=1024, num_inner_layers=1):
        super().__init__()
        self.k = k
        self.embedding = nn.Embedding(vocab_size, embed_size)
        layers, width = [], k * embed_size
        for _ in range(num_inner_layers):
            layers += [nn.Linear(width, embed_size), nn.SiLU()]
            width = embed_size
        layers.append(nn.Linear(width, vocab_size))
        self.net = nn.Sequential(*layers)
        self.recent = None  # the last k-1 tokens while generating

    def forward(self, idx, targets=None, start_pos=None):
        if start_pos is not None:  # generation: the new tokens' windows reach back into earlier calls
            if start_pos > 0:
                idx = torch.cat([self.recent, idx], dim=1)
            self.recent = idx[:, -(self.k - 1):] if self.k > 1 else idx[:, :0]
        # every position's window of k tokens at once, with tensor ops: pad k-1 zeros on the left, then
        # unfold (B, T + k - 1) into (B, T, k) overlapping windows
        windows = F.pad(idx, (self.k - 1, 0), value=0).unfold(1, self.k, 1)
        x = self.embedding(windows).flatten(2)  # (B, T, k * embed_size)
        if start_pos is not None:
            x = x[:, [-1], :]
        return logits_and_loss(self.net(x), targets)

    def setup_cache(self, batch_size, max_len):
        self.recent = None

    generate = GPT.generate
    generate_stream = GPT.generate_stream


# -----------------------------------------------------------------------------
# GPT-2 in the Hub's layout (transformers' GPT2LMHeadModel): config.json, weight names, weight files

HF_ACTIVATIONS = {'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu': 'gelu'}
CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')


def gpt_config_from_hf(folder):
    """GPTConfig from a Hub-style config.json of GPT-2 architecture."""
    path = os.path.join(folder, 'config.json')
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder} has no config.json; a model folder needs config.json and "
                                f"model.safetensors (or pytorch_model.bin)")
    try:
        with open(path, encoding='utf-8') as f:
            hf = json.load(f)
    except (ValueError, RecursionError) as e:  # (RecursionError: JSON nested thousands deep)
        raise ValueError(f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:80]}); if it was downloaded, delete "
                         f"it and run again") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path} is not a model config (a JSON object with n_layer, n_embd, ...)")
    if hf.get('model_type', 'gpt2') != 'gpt2':
        raise ValueError(f"{path}: model_type is {hf.get('model_type')!r}; only GPT-2 architecture (gpt2) loads here")
    n_inner = (None, 4 * hf['n_embd'] if type(hf.get('n_embd')) is int else None)  # (check_config checks n_embd)
    for k, ok in (('n_inner', n_inner), ('activation_function', tuple(HF_ACTIVATIONS)),
                  ('scale_attn_weights', (True,)), ('scale_attn_by_inverse_layer_idx', (False,)),
                  ('tie_word_embeddings', (True,))):
        if k in hf and hf[k] not in ok:
            raise ValueError(f"{path}: {k}={hf[k]!r} is not GPT-2's architecture as model.py builds it")
    try:
        config = GPTConfig(block_size=hf['n_positions'], vocab_size=hf['vocab_size'], n_layer=hf['n_layer'],
                           n_head=hf['n_head'], n_embd=hf['n_embd'], bias=True, dropout=0.0,
                           norm_eps=hf.get('layer_norm_epsilon', 1e-5),
                           activation=HF_ACTIVATIONS[hf.get('activation_function', 'gelu_new')])
        check_config(config)
    except KeyError as e:
        raise ValueError(f"{path} lacks {e.args[0]}, which a GPT-2 config.json has") from None
    except ValueError as e:
        names = dict(block_size='n_positions', norm_eps='layer_norm_epsilon')  # the file's names for them
        msg = re.sub(r'^(\w+)=', lambda m: names.get(m[1], m[1]) + '=', str(e))
        raise ValueError(f"{path}: {msg}") from None
    return config


def gpt2_from_hf_names(sd):
    """Our names for the tensors of a Hub GPT-2 (with or without save_pretrained's 'transformer.' prefix).
    GPT-2 stored its Linears as Conv1D, i.e. (in, out): they are transposed into nn.Linear's (out, in)."""
    ours = {}
    for k, v in sd.items():
        k = k.removeprefix('transformer.')
        if k.endswith(('.attn.bias', '.attn.masked_bias')) or k == 'lm_head.weight':
            continue  # causal-mask buffers of old checkpoints; the head is tied to wte
        ours['transformer.' + k] = v.t() if k.endswith(CONV1D) else v
    if 'transformer.wte.weight' in ours:
        ours['lm_head.weight'] = ours['transformer.wte.weight']
    return ours


SAFETENSORS_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
                      'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8,
                      'U8': torch.uint8, 'BOOL': torch.bool}


def load_safetensors(path):
    """Read a .safetensors file without the safetensors package: an 8-byte little-endian header length N, N bytes
    of JSON {name: {dtype, shape, data_offsets: [begin, end]}}, then the tensors' bytes. Each entry is checked
    against the file, which is memory-mapped (copy-on-write): nothing is copied until the model takes it."""
    corrupt = f"{path} is truncated or corrupt"
    with open(path, 'rb') as f:
        size = os.fstat(f.fileno()).st_size
        n = int.from_bytes(f.read(8), 'little')
        if size < 8 or n > size - 8:
            raise ValueError(f"{corrupt} (header says {n} bytes, file has {size}); delete it and download again")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):  # (RecursionError: JSON nested thousands deep)
            raise ValueError(f"{corrupt} (its JSON header does not parse); delete it and download again") from None
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    tensors = {}
    for name, info in (header.items() if isinstance(header, dict) else [('(the header)', None)]):
        if name == '__metadata__':
            continue
        try:
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES[info['dtype']], list(info['shape']), info['data_offsets']
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{corrupt} (bad header entry for {name})") from None
        # whole non-negative numbers only, inside the data part: a negative offset would read the header (and a
        # dimension past 2**62, even of an empty tensor, no tensor can have)
        if not all(type(i) is int and 0 <= i < 1 << 62 for i in shape + [begin, end]) or end > size - 8 - n or \
                end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{corrupt} (its header's entry for {name} does not fit the file); delete it and "
                             f"download again")
        count = math.prod(shape)
        try:
            tensors[name] = (torch.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + begin) if count else
                             torch.empty(0, dtype=dtype)).view(shape)
        except RuntimeError:  # (an empty tensor whose other dimensions multiply past what torch can index)
            raise ValueError(f"{corrupt} (its header's shape for {name}, {shape}, is no tensor's)") from None
    return tensors


def safe_torch_load(path):
    """torch.load that never runs code: weights_only=True allows tensors and plain data only. Nor can a small
    file claim much memory: torch.save stores its zip entries uncompressed, so a compressed one (which could
    inflate a few MB into GBs) is refused before loading, and so is a tensor that views more elements than its
    storage holds (a stride-0 expansion, which the model would copy into full-size weights)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                packed = [i.filename for i in z.infolist() if i.compress_type != zipfile.ZIP_STORED]
            if packed:
                raise ValueError(f"{path}: refused to load, its entry {packed[0]} is compressed, which torch.save "
                                 f"never does (a small file could inflate to any size); save it with torch.save")
        with warnings.catch_warnings():  # old pickle protocols make torch warn; the load is safe all the same
            warnings.simplefilter('ignore')
            obj = torch.load(path, map_location='cpu', weights_only=True)
    # (a pickle that would run code, or bytes that are no pickle at all: on those the weights-only unpickler
    # stops with UnpicklingError, or an IndexError or KeyError from its stack and memo)
    except (pickle.UnpicklingError, IndexError, KeyError) as e:
        culprit = re.search(r'(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)', str(e))
        what = f"it would call {culprit[1]} when unpickled (would run code)" if culprit else \
            "it is not tensors and plain data (corrupt, or a pickle of Python objects, which could run code)"
        raise ValueError(f"{path}: refused to load, {what}; only tensors and plain data load") from None
    except ValueError as e:
        if str(e).startswith(f"{path}: refused"):
            raise
        raise ValueError(f"{path} is truncated or corrupt ({(str(e).splitlines() or [type(e).__name__])[0][:120]})"
                         ) from None
    # (lengths of 2**63 and more, nesting thousands deep, sizes past memory)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, OverflowError, RecursionError, MemoryError) as e:
        what = 'a directory' if os.path.isdir(path) else 'truncated or corrupt'
        raise ValueError(f"{path} is {what} ({(str(e).splitlines() or [type(e).__name__])[0][:120]})") from None
    for x in tensors_in(obj):
        if x.numel() and (x.untyped_storage().nbytes() < x.numel() * x.element_size() or
                          any(st == 0 and n > 1 for n, st in zip(x.shape, x.stride()))):
            raise ValueError(f"{path}: refused to load, a tensor of shape {tuple(x.shape)} views only "
                             f"{x.untyped_storage().nbytes():,} bytes of storage (an expanded tensor, not weights)")
    return obj


def tensors_in(obj):
    """Every tensor inside obj's dicts, lists and tuples (a loaded checkpoint), looked at without recursion (a
    pickle can nest thousands deep)."""
    todo = [obj]
    while todo:
        x = todo.pop()
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, dict):
            todo += x.values()
        elif isinstance(x, (list, tuple)):
            todo += x
