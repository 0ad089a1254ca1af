"""
Every model of the lab in one file, read top to bottom:
1) GPT-2 (Radford et al. 2019) in nanoGPT's layout: config, norms, attention, MLP, block, GPT; the course's
   TransformerModel is the same code with RMSNorm.
2) The Pico-LLM baselines: LSTMSeqModel and KGramMLPSeqModel.
3) Loading: Hub downloads, safetensors, checkpoints, the tokenizer, and load_model() used by every script.
4) Sampling: temperature, top-k, nucleus_sampling (top-p), written once for every model.
"""

import hashlib
import json
import math
import mmap
import os
import pickle
import re
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# 1) GPT-2


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
    attention: str = 'softmax'  # 'softmax', 'linear' (elu+1 feature map) or 'gla' (gated linear attention)
    rope_base: float = 10000.0  # RoPE's base wavelength
    chunk_size: int = 16  # linear / gla: chunk length of the chunkwise-parallel form (16 trains GLA fastest here)


ACTIVATIONS = {'gelu_tanh': lambda x: F.gelu(x, approximate='tanh'), 'gelu': F.gelu}


class RMSNorm(nn.Module):
    """Root-mean-square normalization (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * weight. Unlike
    LayerNorm it neither subtracts the mean nor adds a bias, which is cheaper and works as well."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # in float32 even when x is half precision: squares of large activations overflow float16
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(config):
    if config.norm == 'rmsnorm':
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def _onednn_linear_works(dtype):
    """True if PyTorch's oneDNN matmul is present and agrees with F.linear in this dtype (checked at import)."""
    try:
        x, w, b = torch.linspace(-1, 1, 24).view(3, 8), torch.linspace(-2, 1, 40).view(5, 8), torch.ones(5)
        x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
        y = torch.ops.mkldnn._linear_pointwise(x, w, b, 'none', [], '')
        return torch.allclose(y.float(), F.linear(x, w, b).float(), atol=0.05)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


ONEDNN_DTYPES = {dt for dt in (torch.float32, torch.bfloat16) if _onednn_linear_works(dt)}


def one_row_matmul(x, weight):
    """x (in,) times weight (out, in) transposed, written as a multiply-and-sum: torch.compile turns it into
    one pass over the weight (see GPT.compile_decode)."""
    return (weight * x).sum(-1)


class Linear(nn.Linear):
    """nn.Linear with the fastest CPU inference kernel for each dtype and shape. Measured on a 2-core AMD
    EPYC (README, bench.py), decoding reads the weights at:
    - float32 and bfloat16: ~30 GB/s through oneDNN's matmul, ~17 GB/s through F.linear (MKL); oneDNN is
      also 2x faster on many rows (prefill);
    - float16: ~41 GB/s through F.linear's one-row kernel, but its many-row kernel is 8x slower than
      upcasting to float32 for oneDNN;
    - one row of any dtype after GPT.compile_decode(): ~43 GB/s through a compiled one_row_matmul.
    Training (gradients on), torch.compile and GPUs take plain F.linear."""
    one_row = None  # the compiled one_row_matmul, set by GPT.compile_decode()

    def forward(self, x):
        if x.device.type != 'cpu' or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        if x.numel() == x.size(-1) and self.one_row is not None:
            y = self.one_row(x.reshape(-1), self.weight).view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        if x.dtype == torch.float16 and x.numel() > x.size(-1) and torch.float32 in ONEDNN_DTYPES:
            bias = None if self.bias is None else self.bias.float()
            return torch.ops.mkldnn._linear_pointwise(x.float(), self.weight.float(), bias, 'none', [], '').half()
        if x.dtype in ONEDNN_DTYPES:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, 'none', [], '')
        return F.linear(x, self.weight, self.bias)


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


def linear_attention_recurrent(q, k, v, log_decay=None, state=None):
    """Causal linear attention, one token at a time. With S_t (dk x dv) the state after token t:
        S_t = diag(a_t) S_{t-1} + k_t v_t^T,    o_t = S_t^T q_t
    a_t = exp(log_decay_t) is GLA's data-dependent forget gate (Yang et al. 2023, arXiv 2312.06635, eq. 2);
    without it (a_t = 1) this is Katharopoulos et al. 2020 (arXiv 2006.16236), eq. 5-6. Generation calls it
    with one token and carries the state, a fixed size (B, H, dk, dv) however long the text: no KV cache.
    q, k: (B, H, T, dk); v: (B, H, T, dv); log_decay: (B, H, T, dk) or None. Returns (o, state)."""
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
    causal attention inside the chunk whose decays exp(L_t - L_s) <= 1 are formed directly, which is
    stable for any gate. Memory is O(T * chunk_size * dk), with no T x T matrix."""
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


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, one module for every kind (config.attention):
    - 'softmax': Vaswani et al. 2017, with a key/value cache for generation;
    - 'linear': Katharopoulos et al. 2020, softmax(q k^T) replaced by phi(q) phi(k)^T with phi = elu + 1,
      normalized by phi(q) . sum_s phi(k_s) (eq. 6), with a fixed-size state for generation;
    - 'gla': gated linear attention, Yang et al. 2023: a data-dependent forget gate per key dimension from a
      rank-16 projection (eq. 4, temperature 16), key size half the head size (which keeps the parameter
      count of softmax attention), per-head RMSNorm and a SiLU output gate (section 4.4)."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.kind, self.chunk_size = config.attention, config.chunk_size
        head_size = config.n_embd // config.n_head
        self.dk = head_size // 2 if self.kind == 'gla' else head_size  # key (and query) size per head
        # query, key, value projections for all heads, in one matmul
        self.c_attn = Linear(config.n_embd, 2 * self.n_head * self.dk + config.n_embd, bias=config.bias)
        if self.kind == 'gla':
            self.gate_proj = nn.Sequential(Linear(config.n_embd, 16, bias=False),
                                           Linear(16, self.n_head * self.dk))  # low-rank forget gate
            self.out_gate = Linear(config.n_embd, config.n_embd, bias=config.bias)
            self.head_norm = RMSNorm(head_size, eps=config.norm_eps)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache = None  # softmax: (2, B, n_head, max_len, head_size), allocated by GPT.setup_cache
        self.state = None  # linear, gla: (B, n_head, dk, dv), left by the prefill for the next token

    def heads(self, x):
        """(B, T, n_head * d) -> (B, n_head, T, d)"""
        return x.view(x.size(0), x.size(1), self.n_head, -1).transpose(1, 2)

    def qkv(self, x, rope=None):
        """Queries, keys, values (B, n_head, T, d) of x, with RoPE applied. For 'linear', phi(q), phi(k) and
        v with what the normalizer needs: a column of ones beside v, whose output is phi(q_t) . sum_s phi(k_s);
        with RoPE (RoFormer eq. 19: rotate phi(q), phi(k) in the numerator only, so that the normalizer stays
        positive) n_head more heads carry the unrotated features with values of ones instead."""
        q, k, v = self.c_attn(x).split([self.n_head * self.dk, self.n_head * self.dk, self.n_embd], dim=2)
        q, k, v = self.heads(q), self.heads(k), self.heads(v)
        if self.kind == 'linear':
            q, k = F.elu(q) + 1, F.elu(k) + 1  # a positive feature map, so the normalizer is > 0
            if rope is None:
                return q, k, torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
            return (torch.cat([apply_rope(q, *rope), q], dim=1), torch.cat([apply_rope(k, *rope), k], dim=1),
                    torch.cat([v, torch.ones_like(v)], dim=1))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.kind == 'gla':
            q = q * self.dk ** -0.5
        return q, k, v

    def normalize(self, o):
        """Linear attention's output from what qkv's values produced: numerator over normalizer."""
        if o.size(1) > self.n_head:  # RoPE: the normalizer heads follow the numerator heads
            return o[:, :self.n_head] / o[:, self.n_head:]
        return o[..., :-1] / o[..., -1:]

    def forward(self, x, start_pos=None, rope=None):
        B, T, C = x.size()
        q, k, v = self.qkv(x, rope)
        if self.kind == 'softmax':
            y = self.softmax_attention(q, k, v, start_pos, x)
        else:
            log_decay = self.log_decay(x) if self.kind == 'gla' else None
            if q.dtype in (torch.float16, torch.bfloat16):
                # the state sums every token so far: in half precision its rounding errors pile up (and
                # linear attention's normalizer overflows float16), so it is kept in float32
                q, k, v = q.float(), k.float(), v.float()
                log_decay = None if log_decay is None else log_decay.float()
            if start_pos is None or start_pos == 0:  # training, or the prefill of generation
                y, state = linear_attention_chunked(q, k, v, log_decay, self.chunk_size)
            else:  # generation: one token, continuing from the state the previous call left
                assert T == 1, "the state takes one prefill, then one token at a time"
                y, state = linear_attention_recurrent(q, k, v, log_decay, self.state)
            if start_pos is not None:
                self.state = state
            y = self.normalize(y) if self.kind == 'linear' else self.head_norm(y)
            y = y.to(x.dtype)
            if self.kind == 'gla':
                y = y * self.heads(F.silu(self.out_gate(x)))
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))

    def softmax_attention(self, q, k, v, start_pos, x):
        T = q.size(2)
        if start_pos is not None:
            # generation: write this step's keys and values into the cache in place (no torch.cat per token),
            # then attend over every position so far. Only the prefill (start_pos=0) has T > 1.
            assert start_pos == 0 or T == 1, "the cache takes one prefill, then one token at a time"
            self.kv_cache[0, :, :, start_pos:start_pos + T] = k
            self.kv_cache[1, :, :, start_pos:start_pos + T] = v
            k = self.kv_cache[0, :, :, :start_pos + T]
            v = self.kv_cache[1, :, :, :start_pos + T]
        if x.device.type == 'cpu' and q.dtype != torch.float32:
            # PyTorch's CPU attention is 8-13x slower in half precision than in float32 (bench.py), and less
            # accurate: attend in float32 (the cache is float32 already, see GPT.setup_cache)
            q, k, v = q.float(), k.float(), v.float()
        # a single new token may see every cached position, so it needs no mask
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=T > 1)
        return y.to(x.dtype)

    def weights(self, x, rope=None):
        """The (B, n_head, T, T) causal matrix by which each position mixes the values: softmax's attention
        probabilities; for 'linear', phi(q_t) . phi(k_s) (rotated by RoPE) over the normalizer; for 'gla',
        q_t . (decay * k_s), which multiplies v before the head norm and output gate. For looking at only."""
        q, k, v = self.qkv(x, rope)
        if self.kind == 'softmax':
            T = q.size(2)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
            return scores.masked_fill(~causal, float('-inf')).softmax(dim=-1)
        if self.kind == 'linear':
            w = (q @ k.transpose(-1, -2)).tril()
            numerator, normalizer = (w[:, :self.n_head], w[:, self.n_head:]) if w.size(1) > self.n_head else (w, w)
            return numerator / normalizer.sum(dim=-1, keepdim=True)
        return gated_scores(q, k, self.log_decay(x).cumsum(dim=2))

    def log_decay(self, x):
        """GLA's forget gate a = sigmoid(x W_1 W_2)^(1/16) (rank-16, temperature 16), in log space:
        (B, n_head, T, dk)."""
        return self.heads(F.logsigmoid(self.gate_proj(x)) / 16)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = ACTIVATIONS[config.activation]
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
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
        self.attn = CausalSelfAttention(config)
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
    if targets is None:
        return logits, None
    return logits, F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)


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
            cos, sin = rope_tables(config.n_embd // config.n_head // (2 if config.attention == 'gla' else 1),
                                   config.block_size, config.rope_base)
            # computed in float64 for exact angles at long positions, kept in float32 (MPS has no float64)
            self.register_buffer('rope_cos', cos.float(), persistent=False)
            self.register_buffer('rope_sin', sin.float(), persistent=False)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying (Press & Wolf 2017): the unembedding is the token embedding, as in GPT-2
        self.transformer.wte.weight = self.lm_head.weight
        self.layer_ids = list(range(config.n_layer))  # which original blocks the model runs (see prune_layers)
        self.apply(self._init_weights)
        # GPT-2 scales the init of the projections into the residual stream by 1/sqrt(2 * n_layer)
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count; the position embeddings are left out by default (the token embeddings are
        the output layer too, so they count)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and 'wpe' in self.transformer:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    @property
    def block_size(self):
        """The longest context: generation conditions on at most the last block_size tokens."""
        return self.config.block_size

    def embed(self, idx, start_pos=None):
        """Token embeddings of idx (B, T), plus learned position embeddings ('learned'), for tokens that sit
        at positions start_pos, start_pos + 1, ... Returns (x, rope): RoPE's (cos, sin) for those positions
        are applied inside attention ('rope'); NoPE ('none') adds no position information at all."""
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
        """idx: (B, T) token ids. Returns (logits, loss) as nanoGPT does: with targets, logits for every
        position and the mean cross-entropy; without, logits for every position; with start_pos (generation
        with the cache, tokens at positions start_pos...), logits for the last position only."""
        x, rope = self.embed(idx, start_pos)
        for block in self.transformer.h:
            x = block(x, start_pos, rope)
        x = self.transformer.ln_f(x)
        if start_pos is not None:
            x = x[:, [-1], :]  # generation needs only the next token: skip the unembedding of the prompt
        return logits_and_loss(self.lm_head(x), targets)

    def residual_stream(self, idx):
        """The residual stream entering the first block and leaving each block: n_layer + 1 tensors
        (B, T, n_embd). Read through ln_f and lm_head, each gives the prediction formed up to that depth
        (the logit lens, nostalgebraist 2020)."""
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
        """Allocate each attention layer's key/value cache once for a whole generation (None frees it). On
        CPU it is float32 even for half-precision weights: attention runs in float32 there (it is faster)."""
        p = self.lm_head.weight
        dtype = torch.float32 if p.device.type == 'cpu' else p.dtype
        for block in self.transformer.h:
            attn = block.attn
            attn.state = None  # linear, gla: the prefill sets it
            attn.kv_cache = None if batch_size is None or attn.kind != 'softmax' else torch.empty(
                2, batch_size, attn.n_head, max_len, attn.n_embd // attn.n_head, dtype=dtype, device=p.device)

    def compile_decode(self):
        """Compile the one-row matmuls of token-by-token decoding on CPU with torch.compile (it needs a C++
        compiler): a compiled multiply-and-sum streams the weights at ~43 GB/s where the library kernels
        reach 20-30 (bench.py), for 1.3x (float32) to 1.5x (bfloat16) faster decoding. Prefill, batches and
        training are unaffected. Call it after moving the model to its device and dtype. Returns False,
        with a one-line note on stderr, if compiling is not possible here."""
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        if self.lm_head.weight.device.type != 'cpu':
            return False
        # one compiled kernel per weight shape and dtype: raise dynamo's limit of 8 for models with more
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        fn = torch.compile(one_row_matmul, dynamic=False)
        try:  # compile every shape now, so a missing compiler shows here and not in the middle of a sample
            with torch.no_grad():
                for w in {(m.weight.shape, m.weight.dtype): m.weight for m in linears}.values():
                    fn(torch.zeros(w.size(1), dtype=w.dtype), w)
        except Exception as e:  # no C++ compiler, or no inductor for this platform
            print(f"compile_decode: torch.compile is not available here ({type(e).__name__}); decoding runs "
                  f"uncompiled", file=sys.stderr)
            return False
        for m in linears:
            m.one_row = fn
        return True

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None):
        """Continue each row of idx (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens).
        temperature 0 is greedy decoding; top_k and top_p restrict the sampling (see sample_next_token)."""
        out = idx.new_empty(idx.size(0), idx.size(1) + max_new_tokens)
        out[:, :idx.size(1)] = idx
        for i, next_id in enumerate(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p)):
            out[:, idx.size(1) + i] = next_id[:, 0]
        return out

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None):
        """Like generate, but yields each new (B, 1) column of tokens as soon as it is sampled.

        This is the one generation loop of every model in this file: a model provides setup_cache,
        forward(x, start_pos=...) returning the last position's logits, and block_size.
        One prefill of the prompt fills the key/value cache, then each step feeds one token. Like nanoGPT,
        the model conditions on at most the last block_size tokens: once the cache is full, every position
        would shift by one (GPT-2's position embeddings are absolute), so the cache is refilled from the last
        block_size tokens, which is exactly what a no-cache loop computes."""
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

    # -- pretrained weights ----------------------------------------------------

    @classmethod
    def from_pretrained(cls, name, active_layers=None):
        """GPT-2 weights from the Hub or a local folder.
        name: 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' (openai-community/...), any Hub repo id
        'org/name' of GPT-2 architecture, or a folder with config.json and model.safetensors (or
        pytorch_model.bin). The architecture comes from config.json. Only the blocks that active_layers
        selects are built and loaded."""
        folder = name if os.path.isdir(name) else hub_snapshot(GPT2_NAMES.get(name, name))
        config = gpt_config_from_hf(folder)
        sd = read_hf_weights(folder)
        keep = parse_active_layers(active_layers, config.n_layer)
        layer_ids = list(range(config.n_layer))
        config.n_layer = len(keep)
        with torch.device('meta'):  # skip the random init: every weight is overwritten below
            model = cls(config)
        model.to_empty(device='cpu')
        model.transformer.wte.weight = model.lm_head.weight  # to_empty unties shared parameters
        model.layer_ids = [layer_ids[i] for i in keep]
        # rename the Hub's keys to ours; GPT-2 stored its Linears as Conv1D, i.e. (in, out): transpose them
        ours = {}
        for k, v in sd.items():
            k = k.removeprefix('transformer.')
            if k.endswith(('.attn.bias', '.attn.masked_bias')) or k == 'lm_head.weight':
                continue  # causal-mask buffers of old checkpoints; the head is tied to wte
            m = re.fullmatch(r'h\.(\d+)\.(.*)', k)
            if m:
                if int(m[1]) not in keep:
                    continue
                k = f'h.{keep.index(int(m[1]))}.{m[2]}'
                if k.endswith(('c_attn.weight', 'c_proj.weight', 'c_fc.weight')):
                    v = v.t()
            ours['transformer.' + k] = v
        ours['lm_head.weight'] = ours.get('transformer.wte.weight')
        missing = [k for k in model.state_dict() if k not in ours or ours[k] is None]
        if missing:
            raise ValueError(f"{folder}: the weights lack {missing[0]} (and {len(missing) - 1} more); "
                             f"is this a GPT-2 checkpoint?")
        try:
            model.load_state_dict(ours)
        except RuntimeError as e:
            raise ValueError(f"{folder}: weights do not match config.json: {str(e).splitlines()[-1].strip()}")
        return model


def check_config(config):
    """One-line errors for option values a model cannot be built with."""
    allowed = {'activation': tuple(ACTIVATIONS), 'norm': ('layernorm', 'rmsnorm'), 'norm_position': ('pre', 'post'),
               'pos_emb': ('learned', 'rope', 'none'), 'attention': ('softmax', 'linear', 'gla')}
    for name, values in allowed.items():
        if getattr(config, name) not in values:
            raise ValueError(f"{name}={getattr(config, name)!r} is not one of: {', '.join(values)}")
    if config.n_embd % config.n_head:
        raise ValueError(f"n_embd={config.n_embd} must be a multiple of n_head={config.n_head}")
    head = config.n_embd // config.n_head
    if config.attention == 'gla' and head % (4 if config.pos_emb == 'rope' else 2):
        raise ValueError(f"attention='gla' halves the head size ({head}) for keys; it must be even "
                         f"(a multiple of 4 with pos_emb='rope')")
    if config.pos_emb == 'rope' and head % 2:
        raise ValueError(f"pos_emb='rope' rotates pairs of dimensions: the head size ({head}) must be even")
    if config.chunk_size < 1:
        raise ValueError(f"chunk_size={config.chunk_size} must be >= 1")


def parse_active_layers(active_layers, n_layer):
    """Which blocks to run, as a list of indices into 0..n_layer-1, from any of these forms:
    None or 'all' (every block), 'even' (0,2,4,...), 'odd' (1,3,5,...), 'first_half' (drop the last n//2
    blocks), 'last_half' (drop the first n//2), '0,2,4', '0-5' (inclusive; pieces combine: '0-3,8'),
    or a list/tuple of ints (--active_layers=0,2,4 reaches a script as a tuple). Blocks run in the order given."""
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
            keep += list(range(lo, hi + 1))
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


class TransformerModel(GPT):
    """The course's causal decoder-only Transformer: GPT's code (one attention and block code path) with
    RMSNorm and no biases, under the course's argument names."""

    def __init__(self, vocab_size=50257, d_model=1024, n_heads=2, n_blocks=4, block_size=1024, dropout=0.0):
        super().__init__(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_blocks, n_head=n_heads,
                                   n_embd=d_model, dropout=dropout, bias=False, norm='rmsnorm'))


# -----------------------------------------------------------------------------
# 2) The Pico-LLM baselines. Like GPT they take (B, T) token ids, return (logits, loss), and generate
# through GPT's one generation loop (see GPT.generate_stream for what a model provides).


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
    """The course's k-gram MLP, a neural n-gram model (Bengio et al. 2003): each next token is predicted
    from the embeddings of the last k tokens alone, concatenated and fed through (Linear -> SiLU) x
    num_inner_layers -> Linear. Positions before the start are padded with token 0, as the course does."""
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
# 3) Loading: the Hub, safetensors, checkpoints, the tokenizer

GPT2_NAMES = {n: f'openai-community/{n}' for n in ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')}
HF_ENDPOINT = 'https://huggingface.co'


def cache_dir():
    """Where downloads go: $XDG_CACHE_HOME/gpt-lab, else ~/.cache/gpt-lab."""
    return os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'gpt-lab')


def hub_snapshot(repo):
    """A local folder with the repo's config.json and weights, downloaded once from the Hub (or
    $HF_ENDPOINT). A second call finds the files in the cache and touches no network."""
    if not re.fullmatch(r'[\w.-]+/[\w.-]+', repo) or '..' in repo:
        raise ValueError(f"init_from={repo!r} is not a GPT-2 name ({', '.join(GPT2_NAMES)}), a Hub repo id "
                         f"(org/name), an existing folder, or a .pt checkpoint")
    folder = os.path.join(cache_dir(), 'hub', repo.replace('/', '--'))
    hub_download(repo, 'config.json', folder)
    if not any(os.path.exists(os.path.join(folder, f)) for f in ('model.safetensors', 'pytorch_model.bin')):
        try:
            hub_download(repo, 'model.safetensors', folder)
        except FileNotFoundError:  # older repos have only the PyTorch pickle
            hub_download(repo, 'pytorch_model.bin', folder)
    return folder


def hub_download(repo, filename, folder):
    """Download {endpoint}/{repo}/resolve/main/{filename} into folder, unless it is there already.
    Bytes go to a .part file; an interrupted transfer resumes with an HTTP Range request (within this call,
    or in the next run), and the file is renamed into place only after its size (and sha256, when the
    server's headers give it) check out."""
    import requests  # only downloads need it
    path = os.path.join(folder, filename)
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    endpoint = os.environ.get('HF_ENDPOINT', HF_ENDPOINT).rstrip('/')
    url = f"{endpoint}/{repo}/resolve/main/{filename}"
    headers = {'Authorization': f"Bearer {os.environ['HF_TOKEN']}"} if os.environ.get('HF_TOKEN') else {}
    part = path + '.part'
    stalls = 0
    while True:
        have = os.path.getsize(part) if os.path.exists(part) else 0
        try:
            r = requests.get(url, stream=True, timeout=30,
                             headers={**headers, 'Range': f'bytes={have}-'} if have else headers)
        except requests.RequestException as e:
            raise ConnectionError(f"cannot reach {endpoint} to download {repo}/{filename} ({type(e).__name__}); "
                                  f"offline? put config.json and model.safetensors in a folder and use "
                                  f"--init_from=path/to/folder") from None
        with r:
            if r.status_code in (401, 403, 404):
                hint = 'private or gated? set HF_TOKEN' if r.status_code != 404 else 'check the repo id'
                raise FileNotFoundError(f"{repo}: file {filename} not found on {endpoint} "
                                        f"(HTTP {r.status_code}; {hint})")
            if r.status_code == 416:  # our .part is already as long as the file (or longer): start over
                os.remove(part)
                continue
            if r.status_code not in (200, 206):
                raise ConnectionError(f"{repo}/{filename}: {endpoint} answered HTTP {r.status_code}")
            if r.status_code == 200:
                have = 0  # the server sent the whole file, not the range asked for
            size, sha256 = _hub_file_info(r, have)
            t0, t_print, done = time.time(), 0.0, have
            try:
                with open(part, 'ab' if have else 'wb') as f:
                    for chunk in r.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
                        done += len(chunk)
                        if time.time() - t_print > 0.5 and (size or done) > 1e6:  # quiet for small files
                            t_print = time.time()
                            mbs = (done - have) / 1e6 / max(t_print - t0, 1e-6)
                            total = f"/{size / 1e6:.1f}" if size else ""
                            print(f"\rdownloading {repo}/{filename}: {done / 1e6:.1f}{total} MB, {mbs:.1f} MB/s",
                                  end='', file=sys.stderr, flush=True)
            except requests.RequestException:
                pass  # the connection dropped mid-file: the loop below resumes from what we have
        got = os.path.getsize(part)
        if t_print:
            print(f"\rdownloading {repo}/{filename}: {got / 1e6:.1f} MB, {(got - have) / 1e6 / max(time.time() - t0, 1e-6):.1f}"
                  f" MB/s{'' if size is None or got >= size else ' (connection lost, resuming)'}", file=sys.stderr)
        if size is not None and got < size:
            stalls = stalls + 1 if got == have else 0
            if stalls >= 3:
                raise ConnectionError(f"{repo}/{filename}: the download keeps stopping at {got} of {size} bytes; "
                                      f"run again to resume it")
            continue
        if size is not None and got != size:
            os.remove(part)
            raise ValueError(f"{repo}/{filename}: downloaded {got} bytes but the server announced {size}; "
                             f"removed it, run again to download it afresh")
        if sha256 is not None and _sha256(part) != sha256:
            os.remove(part)
            raise ValueError(f"{repo}/{filename}: sha256 of the download does not match the server's; removed it, "
                             f"run again to download it afresh")
        os.replace(part, path)
        return path


def _hub_file_info(r, offset):
    """(total size, sha256 or None) of a file from the response headers. The Hub answers a resolve URL of a
    large (LFS) file with a redirect whose X-Linked-Size / X-Linked-Etag give the size and the sha256."""
    hdrs = [h.headers for h in r.history] + [r.headers]
    size = sha = None
    for h in hdrs:
        if size is None and h.get('X-Linked-Size'):
            size = int(h['X-Linked-Size'])
        for key in ('X-Linked-Etag', 'ETag'):
            tag = h.get(key, '').removeprefix('W/').strip('"')
            if sha is None and re.fullmatch(r'[0-9a-f]{64}', tag):
                sha = tag
    if size is None and r.headers.get('Content-Range'):  # bytes 100-999/1000
        size = int(r.headers['Content-Range'].rsplit('/', 1)[1])
    if size is None and r.headers.get('Content-Length') and 'Content-Encoding' not in r.headers:
        size = offset + int(r.headers['Content-Length'])
    return size, sha


def _sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def gpt_config_from_hf(folder):
    """GPTConfig from a Hub-style config.json of GPT-2 architecture."""
    path = os.path.join(folder, 'config.json')
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder} has no config.json; a model folder needs config.json and "
                                f"model.safetensors (or pytorch_model.bin)")
    try:
        with open(path) as f:
            hf = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if hf.get('model_type', 'gpt2') != 'gpt2':
        raise ValueError(f"{path}: model_type is {hf.get('model_type')!r}; only GPT-2 architecture (gpt2) loads here")
    act = {'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu': 'gelu'}
    unsupported = [f"{k}={hf[k]!r}" for k, ok in [
        ('n_inner', lambda v: v in (None, 4 * hf.get('n_embd', 768))),
        ('activation_function', lambda v: v in act),
        ('scale_attn_weights', lambda v: v is True),
        ('scale_attn_by_inverse_layer_idx', lambda v: v is False),
        ('tie_word_embeddings', lambda v: v is True),
    ] if k in hf and not ok(hf[k])]
    if unsupported:
        raise ValueError(f"{path}: {', '.join(unsupported)} is not GPT-2's architecture as model.py builds it")
    try:
        return GPTConfig(block_size=hf['n_positions'], vocab_size=hf['vocab_size'], n_layer=hf['n_layer'],
                         n_head=hf['n_head'], n_embd=hf['n_embd'], bias=True, dropout=0.0,
                         norm_eps=hf.get('layer_norm_epsilon', 1e-5),
                         activation=act[hf.get('activation_function', 'gelu_new')])
    except KeyError as e:
        raise ValueError(f"{path} lacks {e.args[0]}, which a GPT-2 config.json has") from None


def read_hf_weights(folder):
    """The state dict in model.safetensors (preferred) or pytorch_model.bin."""
    path = os.path.join(folder, 'model.safetensors')
    if os.path.exists(path):
        return load_safetensors(path)
    path = os.path.join(folder, 'pytorch_model.bin')
    if os.path.exists(path):
        return safe_torch_load(path)
    raise FileNotFoundError(f"{folder} has config.json but no model.safetensors or pytorch_model.bin")


SAFETENSORS_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
                      'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8,
                      'U8': torch.uint8, 'BOOL': torch.bool}


def load_safetensors(path):
    """Read a .safetensors file without the safetensors package. The format: an 8-byte little-endian
    header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}}, then the raw
    tensor bytes. The file is memory-mapped (copy-on-write) and every tensor is a view into it: nothing
    is copied until the model takes its weights."""
    corrupt = f"{path} is truncated or corrupt"
    with open(path, 'rb') as f:
        size = os.fstat(f.fileno()).st_size
        n = int.from_bytes(f.read(8), 'little')
        if size < 8 or n > size - 8:
            raise ValueError(f"{corrupt} (header says {n} bytes, file has {size}); delete it and download again")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise ValueError(f"{corrupt} (its JSON header does not parse); delete it and download again") from None
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    tensors = {}
    for name, info in header.items():
        if name == '__metadata__':
            continue
        try:
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES[info['dtype']], info['shape'], info['data_offsets']
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{corrupt} (bad header entry for {name})") from None
        count = math.prod(shape)
        if 8 + n + end > size or end - begin != count * dtype.itemsize:
            raise ValueError(f"{corrupt} ({name} runs past the end of the file); delete it and download again")
        t = torch.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + begin) if count else torch.empty(0, dtype=dtype)
        tensors[name] = t.view(shape)
    return tensors


def safe_torch_load(path):
    """torch.load that never runs code: weights_only=True allows tensors and plain data only."""
    try:
        with warnings.catch_warnings():  # old pickle protocols make torch warn; the load is safe all the same
            warnings.simplefilter('ignore')
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = re.search(r'Unsupported global: GLOBAL (\S+)', str(e))
        what = f"it would call {culprit[1]}" if culprit else "it holds Python objects that would run code"
        raise ValueError(f"{path}: refused to load, {what} when unpickled (would run code); only tensors and "
                         f"plain data load") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:  # (its existence is checked first)
        raise ValueError(f"{path} is truncated or corrupt ({str(e).splitlines()[0][:120]})") from None


MODEL_TYPES = {'gpt': GPT, 'transformer': GPT, 'gpt2': GPT, 'lstm': LSTMSeqModel, 'kgram_mlp': KGramMLPSeqModel}


def build_model(model_type, model_args):
    """A fresh model of a type in MODEL_TYPES from its constructor arguments (as a checkpoint stores them)."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not one of: {', '.join(MODEL_TYPES)}")
    cls = MODEL_TYPES[model_type]
    if cls is GPT:
        known = {f.name for f in fields(GPTConfig)}
        unknown = sorted(set(model_args) - known)
        if unknown:
            raise ValueError(f"model_args has fields this model.py does not know: {', '.join(unknown)}")
        return GPT(GPTConfig(**model_args))
    return cls(**model_args)


def load_checkpoint(path):
    """A model from a checkpoint written by our train.py (any model_type) or by nanoGPT's (keys model,
    model_args, config). Returns (model, checkpoint dict)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or 'model' not in ckpt or 'model_args' not in ckpt:
        raise ValueError(f"{path} is not a training checkpoint (it needs the keys 'model' and 'model_args')")
    model_type = ckpt.get('model_type', 'gpt')
    args = dict(ckpt['model_args'])
    if MODEL_TYPES.get(model_type) is GPT:
        # nanoGPT's checkpoints predate our architecture fields: they were trained with the exact GELU
        args.setdefault('activation', 'gelu')
    try:
        model = build_model(model_type, args)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    # torch.compile prefixes every key with _orig_mod.; old nanoGPT models also saved their causal mask
    sd = {k.removeprefix('_orig_mod.'): v for k, v in ckpt['model'].items()}
    sd = {k: v for k, v in sd.items() if not k.endswith('.attn.bias') or k in model.state_dict()}
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise ValueError(f"{path}: weights do not match model_args: {lines[1] if len(lines) > 1 else lines[0]}") from None
    if 'layer_ids' in ckpt:
        model.layer_ids = list(ckpt['layer_ids'])
    return model, ckpt


def load_model(init_from, out_dir='out', active_layers=None):
    """The model every script starts from. init_from: 'resume' (out_dir/ckpt.pt), a path to a .pt
    checkpoint, a GPT-2 name, a Hub repo id, or a local folder. Returns (model, tokenizer, checkpoint or
    None). Errors are one-line FileNotFoundError / ConnectionError / ValueError messages."""
    if init_from == 'resume':
        if not os.path.isdir(out_dir):
            raise FileNotFoundError(f"out_dir {out_dir!r} does not exist (init_from='resume' loads out_dir/ckpt.pt)")
        init_from = os.path.join(out_dir, 'ckpt.pt')
    if init_from.endswith('.pt') or os.path.isfile(init_from):
        model, ckpt = load_checkpoint(init_from)
        if active_layers is not None:
            if not isinstance(model, GPT):
                raise ValueError(f"active_layers selects transformer blocks; this is a {type(model).__name__}")
            model.prune_layers(active_layers)
        tok = ckpt.get('tokenizer') or {}
        if tok.get('name', 'gpt2') != 'gpt2':
            raise ValueError(f"{init_from}: tokenizer {tok['name']!r} is not supported (only gpt2)")
        tokenizer = Tokenizer(tok.get('id_map'))
        n_vocab = next(m for m in model.modules() if isinstance(m, nn.Embedding)).num_embeddings
        if n_vocab < tokenizer.n_vocab:
            raise ValueError(f"{init_from}: the model's vocabulary has {n_vocab} tokens and the checkpoint names no "
                             f"id map for it; only GPT-2's {tokenizer.n_vocab}-token vocabulary (or an id map) works")
        return model, tokenizer, ckpt
    # a path whose parent folder exists locally is a folder the user meant, not a Hub repo id
    parent = os.path.dirname(os.path.normpath(init_from))
    if not os.path.isdir(init_from) and (init_from.startswith(('.', '/', '~')) or parent and os.path.isdir(parent)):
        raise FileNotFoundError(f"model folder {init_from!r} does not exist")
    return GPT.from_pretrained(init_from, active_layers=active_layers), Tokenizer(), None


GPT2_BPE_FILES = {'vocab.bpe': 'gpt2-vocab.bpe', 'encoder.json': 'gpt2-encoder.json'}  # tiktoken's name: ours in data/


def gpt2_encoding():
    """tiktoken's GPT-2 encoding. tiktoken downloads its two BPE files on first use; this repo ships them
    (data/gpt2-vocab.bpe, data/gpt2-encoder.json, from openai/gpt-2), so they seed tiktoken's cache and a
    fresh clone tokenizes offline. tiktoken checks their sha256 either way."""
    import tiktoken
    cache = os.environ.get('TIKTOKEN_CACHE_DIR') or os.environ.get('DATA_GYM_CACHE_DIR') or \
        os.path.join(tempfile.gettempdir(), 'data-gym-cache')
    base = 'https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/'
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
    try:
        for name, ours in GPT2_BPE_FILES.items():
            dst = os.path.join(cache, hashlib.sha1((base + name).encode()).hexdigest())  # tiktoken's cache key
            if not os.path.exists(dst) and os.path.exists(os.path.join(src, ours)):
                os.makedirs(cache, exist_ok=True)
                with open(os.path.join(src, ours), 'rb') as fi, open(dst + f'.{os.getpid()}.tmp', 'wb') as fo:
                    fo.write(fi.read())
                os.replace(dst + f'.{os.getpid()}.tmp', dst)
    except OSError:
        pass  # an unwritable cache: tiktoken downloads the files itself
    try:
        return tiktoken.get_encoding('gpt2')
    except Exception as e:  # tiktoken raises requests' errors, or ValueError on a hash mismatch
        raise ConnectionError(f"tiktoken could not fetch GPT-2's BPE files ({type(e).__name__}); connect once to "
                              f"the internet, or restore data/gpt2-vocab.bpe and data/gpt2-encoder.json from git"
                              ) from None


class Tokenizer:
    """GPT-2's BPE. A model trained on a compacted vocabulary (data/prepare.py --compact_vocab=True) knows
    only the GPT-2 ids of its training data: its token i is GPT-2's token id_map[i]."""

    def __init__(self, id_map=None):
        self.enc = gpt2_encoding()
        self.id_map = None if id_map is None else list(id_map)
        self.n_vocab = self.enc.n_vocab if id_map is None else len(self.id_map)
        self.from_gpt2 = None if id_map is None else {g: i for i, g in enumerate(self.id_map)}

    def encode(self, text):
        ids = self.enc.encode(text, allowed_special={'<|endoftext|>'})
        if self.from_gpt2 is None:
            return ids
        missing = [i for i in ids if i not in self.from_gpt2]
        if missing:
            raise ValueError(f"{self.enc.decode([missing[0]])!r} is not in this model's {self.n_vocab}-token "
                             f"vocabulary (compacted to the tokens of its training data)")
        return [self.from_gpt2[i] for i in ids]

    def to_model_ids(self, gpt2_ids):
        """The model's ids of these GPT-2 ids, or None if the vocabulary lacks any of them."""
        if self.from_gpt2 is None:
            return list(gpt2_ids)
        ids = [self.from_gpt2.get(i) for i in gpt2_ids]
        return None if None in ids else ids

    def to_gpt2(self, ids):
        return list(ids) if self.id_map is None else [self.id_map[i] for i in ids]

    def decode(self, ids):
        return self.enc.decode(self.to_gpt2(ids))

    def token_bytes(self, i):
        return self.enc.decode_single_token_bytes(self.to_gpt2([i])[0])


# -----------------------------------------------------------------------------
# 4) Sampling: written once, used by every model and script


def check_sampling_args(temperature=1.0, top_k=None, top_p=None, max_new_tokens=0):
    """One-line errors for sampling settings outside their range."""
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy argmax)")
    if top_k is not None and not top_k >= 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None for no top-k)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or None for no nucleus sampling)")
    if not max_new_tokens >= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")


def top_p_filter(probs, p):
    """Zero every probability outside the nucleus and renormalise, along the last dim. The nucleus, as the
    course defines top-p: sort by probability p(1) >= p(2) >= ... and keep the smallest k with
    p(1)+...+p(k-1) < p <= p(1)+...+p(k). Ties are ordered by token id (a stable sort)."""
    if p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # p(1)+...+p(i-1) for each i
    keep_sorted = mass_before < p
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
    divided by temperature, cut to the top_k largest, cut to the top_p nucleus, and sampled."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    logits = logits.float() / temperature
    ids = None
    if top_k is not None and top_k < logits.size(-1):
        # sample among the k largest directly: topk returns them sorted, so softmax and top-p work on k values
        logits, ids = torch.topk(logits, top_k, dim=-1)
    if top_p is not None and top_p < 1.0:
        choice = nucleus_sampling(logits, top_p)
    else:
        choice = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
    return choice if ids is None else torch.gather(ids, -1, choice)
