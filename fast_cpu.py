"""
Fast CPU inference for a loaded model, in one call: fast_cpu.optimize(model). model.py stays plain PyTorch;
this file swaps in the kernels that measured fastest on CPUs (bench.py, README "Speed") and leaves training,
torch.compile and GPUs on the ordinary path (training only asks bfloat16_matmul_is_faster() and
attention_in_float32()).
    model = load_model(...)[0].eval().to(dtype)
    fast_cpu.optimize(model)                 # kernel choice by dtype and shape; attention in float32
    fast_cpu.optimize(model, compile=True)   # also compile the one-token decoding step (needs a C++ compiler)
"""
import functools
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


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


def _int8pack_works():
    """True if PyTorch has its CPU int8-weight matmul (_weight_int8pack_mm, torch >= 2.3 on x86 and ARM)."""
    try:
        torch.ops.aten._weight_int8pack_mm(torch.ones(1, 32, dtype=torch.bfloat16), torch.ones(8, 32, dtype=torch.int8),
                                           torch.ones(8, dtype=torch.bfloat16))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


INT8PACK = _int8pack_works()


@functools.cache  # measured once per process: train.py and every int8 prefill ask the same question
def bfloat16_matmul_is_faster():
    """True if this CPU multiplies bfloat16 matrices at least 1.5x faster than float32, measured on the shape of
    a training loss's output layer (256 rows x 128 -> 8,192). CPUs with AVX512-BF16 or AMX do (oneDNN, ~2.5x on
    a 2-core AMD EPYC); AVX2 ones emulate bfloat16 and are slower. About 0.1 s, once."""
    g = torch.Generator().manual_seed(0)  # (not the global generator: a probe must not change a seeded run)

    def best(dtype):
        x, w = torch.randn(256, 128, generator=g).to(dtype), torch.randn(8192, 128, generator=g).to(dtype)
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            x @ w.t()
            times.append(time.perf_counter() - t0)
        return min(times[1:])
    return best(torch.float32) > 1.5 * best(torch.bfloat16)


def one_row_matmul(x, weight, scale=None, bias=None):
    """x (in,) times weight (out, in) transposed, written as a multiply-and-sum: torch.compile turns it into
    one pass over the weight (see compile_decode). scale (out,), int8 weights' per-channel scales, and bias
    (out,) are applied in the same pass (two small kernels fewer per call)."""
    y = (weight * x).sum(-1)
    if scale is not None:
        y = y * scale
    return y if bias is None else y + bias


class CPULinear(nn.Linear):
    """nn.Linear with the fastest CPU inference kernel for each dtype and shape; optimize() turns a model's
    nn.Linears into these (same parameters, same state dict). Measured on a 2-core AMD EPYC (README,
    bench.py), decoding reads the weights at:
    - float32 and bfloat16: ~30 GB/s through oneDNN's matmul, ~17 GB/s through F.linear (MKL); oneDNN is
      also 2x faster on many rows (prefill);
    - float16: ~41 GB/s through F.linear's one-row kernel, but its many-row kernel is 8x slower than
      upcasting to float32 for oneDNN;
    - one row of any dtype inside compile_decode()'s step: a compiled one_row_matmul.
    Training (gradients on), other torch.compile uses and GPUs take plain F.linear."""

    def forward(self, x):
        if x.device.type != 'cpu' or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        if torch.compiler.is_compiling():
            if x.numel() == x.size(-1):  # compile_decode's step
                return one_row_matmul(x.reshape(-1), self.weight, None, self.bias).view(*x.shape[:-1], -1)
            return F.linear(x, self.weight, self.bias)
        if x.dtype == torch.float16 and x.numel() > x.size(-1) and torch.float32 in ONEDNN_DTYPES:
            bias = None if self.bias is None else self.bias.float()
            return torch.ops.mkldnn._linear_pointwise(x.float(), self.weight.float(), bias, 'none', [], '').half()
        if x.dtype in ONEDNN_DTYPES:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, 'none', [], '')
        return F.linear(x, self.weight, self.bias)


class Int8Linear(nn.Module):
    """A Linear whose weight is stored as int8, one float scale per output channel (symmetric: w ~= q * scale,
    q in [-127, 127]): a quarter of float32's bytes, and decoding reads every weight once per token. The
    activations stay float32 outside; the matmul runs PyTorch's int8-weight kernel on bfloat16 activations
    (_weight_int8pack_mm: its float32 path is ~20x slower) or, inside compile_decode's step, a compiled one-row
    multiply-and-sum. Many rows at once (a prefill, prune.py's scoring) instead dequantize the weight to
    bfloat16 for oneDNN's matmul where this CPU multiplies bfloat16 natively: 2.2-2.4x faster than
    _weight_int8pack_mm at 512 rows, 1.5x at 64 (a matrix-vector kernel at heart). Inference only:
    quantize_int8 makes these from a loaded model."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer('weight', (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer('scale', scale.to(torch.bfloat16))
        self.register_buffer('bias', None if linear.bias is None else linear.bias.detach().float())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        if torch.is_grad_enabled():
            raise RuntimeError("an int8 model is for inference only; train the float model it was quantized from")
        rows = x.reshape(-1, x.size(-1))
        if rows.size(0) == 1 and torch.compiler.is_compiling():  # compile_decode's step
            y = one_row_matmul(rows[0].float(), self.weight, self.scale, self.bias)
            return y.to(x.dtype).view(*x.shape[:-1], -1)
        if rows.size(0) >= 64 and bfloat16_matmul_is_faster():
            y = F.linear(rows.to(torch.bfloat16), self.weight.to(torch.bfloat16) * self.scale[:, None])
        elif INT8PACK:
            y = torch.ops.aten._weight_int8pack_mm(rows.to(torch.bfloat16), self.weight, self.scale)
        else:  # (correct but slow: the whole weight dequantized at every call)
            y = F.linear(rows, self.weight.to(rows.dtype) * self.scale.to(rows.dtype)[:, None])
        y = y.to(x.dtype).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def quantize_int8(model):
    """Quantize a loaded model's Linears to int8 weights (Int8Linear), in place, for CPU inference; returns it.
    GPT's output layer shares its weight with the token embedding: it gets an int8 copy, and the embedding
    stays as it was (a lookup reads one row per token). Call it before optimize()."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (nn.Linear, CPULinear):  # (not the Embedding: a tied lm_head gets its own int8 copy)
                setattr(parent, name, Int8Linear(child))
    return attention_in_float32(model)  # attention and its cache in float32, not the weights' int8


DTYPES = ('float32', 'bfloat16', 'float16', 'int8')  # what sample.py, prune.py and interpret.py take as dtype


def check_dtype(dtype, device):
    """Raise ValueError (one line) for a dtype not in DTYPES, or int8 off the CPU. Scripts call it before loading
    anything, so that a typo costs no download."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype == 'int8' and device != 'cpu':
        raise ValueError(f"dtype='int8' is a CPU path (fast_cpu.quantize_int8); on {device} use bfloat16 or float16")


def cast(model, dtype, device):
    """The model's weights in dtype, one of DTYPES ('int8': quantize_int8, a CPU path), on device; then, on a
    CPU, optimize(). Raises ValueError as check_dtype does. Returns the model."""
    check_dtype(dtype, device)
    model.to(device=device, dtype=getattr(torch, 'float32' if dtype == 'int8' else dtype))
    if dtype == 'int8':
        quantize_int8(model)
    return optimize(model) if device == 'cpu' else model


def optimize(model, compile=False):
    """Make a loaded model fast for inference on the CPU, in place; returns it. Every nn.Linear becomes a
    CPULinear, and softmax attention computes (and caches keys and values) in float32 under half-precision
    weights: PyTorch's CPU attention is 8-13x slower in float16 / bfloat16 than in float32 (bench.py), and
    less accurate. compile=True also compiles the one-token decoding step (compile_decode). A model on
    another device is returned as it is. Call it after moving the model to its device and dtype."""
    p = next(model.parameters())
    if p.device.type != 'cpu':
        return model
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = CPULinear
    if p.dtype in (torch.float16, torch.bfloat16):
        attention_in_float32(model)
    if compile:
        compile_decode(model)
    return model


def attention_in_float32(model):
    """Make softmax attention compute (and cache keys and values) in float32, whatever the weights' dtype and
    even under autocast; in place, returns the model. On CPUs PyTorch's half-precision attention is slow:
    8-13x in decoding (optimize() calls this), and in training under bfloat16 autocast its flash-attention
    backward is 1.9-2.5x float32's time for small heads and short contexts (4 heads x 32 over 64-128
    positions: nanoGPT's CPU example, pico_tiny; 2-core AMD EPYC, torch 2.13), so train.py calls this there.
    (At GPT-2's 12 heads x 64 over 1024 positions bfloat16 is 0.8x float32's time: a few % of that step.)"""
    for m in model.modules():
        if hasattr(m, 'compute_dtype'):
            m.compute_dtype = torch.float32
    return model


def decode_seconds(model, tokens=6):
    """Seconds a greedy generation of tokens takes after a one-token prompt (the best of two), the measure by
    which compile_decode keeps or drops the compiled step on the machine it runs on."""
    best = float('inf')
    for _ in range(2):
        t0 = time.perf_counter()
        model.generate(torch.zeros(1, 1, dtype=torch.long), tokens, temperature=0)
        best = min(best, time.perf_counter() - t0)
    return best


def compile_decode(model, probe=True):
    """Compile token-by-token decoding on CPU with torch.compile (it needs a C++ compiler): each one-token step
    of a GPT (batch 1) runs as one compiled call, so the ~200 small eager kernels and dozens of dispatches a
    token become a handful of C++ loops, and every matmul of one row becomes a multiply-and-sum
    (one_row_matmul) that streams the weights once, int8 scales and biases in the same pass. Prefill, batches
    and gradients keep the model's own forward (one graph serves every position: no recompiling per prompt).
    It compiles before returning (GPT-2 124M: ~30 s the first time, 11-13 s once inductor has cached it).
    Returns False, with a one-line note on stderr, if compiling is not possible here, or (probe) if the
    compiled step decodes slower than the eager one on this CPU, timed alternately for a moment
    (decode_seconds): kernels that win on one ISA lose on another (README "Speed"), so the choice is measured
    where it runs, and compile=True is never slower than compile=False."""
    if 'forward' in vars(model):  # compiled already
        return True
    eager = model.forward
    # each model compiled in a process adds graphs of GPT.forward: raise dynamo's limit of 8 per function, past
    # which it would decode uncompiled without a word (recompile_limit since torch 2.6, cache_size_limit before)
    dynamo_config = torch._dynamo.config
    limit = 'recompile_limit' if hasattr(dynamo_config, 'recompile_limit') else 'cache_size_limit'
    setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 64))
    # dynamic=True: one graph for every position and cache length (the weights' shapes stay fixed). Inductor
    # inlines cheap elementwise work into its consumers; inside a one-row matmul that would recompute a
    # LayerNorm or GELU for every weight row (measured: blocks 1.8x slower), so small results are stored.
    step = torch.compile(eager, dynamic=True,
                         options={'realize_opcount_threshold': 0, 'realize_acc_reads_threshold': 0})

    def forward(idx, targets=None, start_pos=None):
        if start_pos and idx.shape == (1, 1) and targets is None and not torch.is_grad_enabled():
            return step(idx, start_pos=start_pos)
        return eager(idx, targets, start_pos)
    model.forward = forward
    try:  # compile now, so that a missing compiler shows here (greedy: no random numbers drawn)
        model.generate(torch.zeros(1, 1, dtype=torch.long), 3, temperature=0)
    except ValueError:  # (the model's own one-line error: its logits are NaN)
        del model.forward
        raise
    except Exception as e:  # no C++ compiler, or no inductor for this platform
        del model.forward
        print(f"compile_decode: torch.compile is not available here ({type(e).__name__}); decoding runs "
              f"uncompiled", file=sys.stderr)
        return False
    if probe:
        times = {'compiled': [], 'eager': []}
        for _ in range(2):  # alternately, so that a change of load falls on both
            times['compiled'].append(decode_seconds(model))
            model.forward = eager
            times['eager'].append(decode_seconds(model))
            model.forward = forward
        compiled, plain = min(times['compiled']), min(times['eager'])
        if compiled >= plain:
            del model.forward
            print(f"compile_decode: the compiled step is slower on this CPU ({torch.backends.cpu.get_cpu_capability()}"
                  f": {compiled * 1e3:.0f} vs {plain * 1e3:.0f} ms for a few tokens); decoding runs uncompiled",
                  file=sys.stderr)
            return False
    return True
