"""
Fast CPU inference for a loaded model, in one call: fast_cpu.optimize(model). model.py stays plain PyTorch;
this file swaps in the kernels that measured fastest on CPUs (bench.py, README "Speed") and leaves training,
torch.compile and GPUs on the ordinary path.
    model = load_model(...)[0].eval().to(dtype)
    fast_cpu.optimize(model)                 # kernel choice by dtype and shape; attention in float32
    fast_cpu.optimize(model, compile=True)   # also compile the one-row matmuls of decoding (needs a C++ compiler)
"""
import sys

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


def one_row_matmul(x, weight):
    """x (in,) times weight (out, in) transposed, written as a multiply-and-sum: torch.compile turns it into
    one pass over the weight (see compile_decode)."""
    return (weight * x).sum(-1)


class CPULinear(nn.Linear):
    """nn.Linear with the fastest CPU inference kernel for each dtype and shape; optimize() turns a model's
    nn.Linears into these (same parameters, same state dict). Measured on a 2-core AMD EPYC (README,
    bench.py), decoding reads the weights at:
    - float32 and bfloat16: ~30 GB/s through oneDNN's matmul, ~17 GB/s through F.linear (MKL); oneDNN is
      also 2x faster on many rows (prefill);
    - float16: ~41 GB/s through F.linear's one-row kernel, but its many-row kernel is 8x slower than
      upcasting to float32 for oneDNN;
    - one row of any dtype after compile_decode(): ~43 GB/s through a compiled one_row_matmul.
    Training (gradients on), torch.compile and GPUs take plain F.linear."""
    one_row = None  # the compiled one_row_matmul, set by compile_decode()

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


def optimize(model, compile=False):
    """Make a loaded model fast for inference on the CPU, in place; returns it. Every nn.Linear becomes a
    CPULinear, and softmax attention computes (and caches keys and values) in float32 under half-precision
    weights: PyTorch's CPU attention is 8-13x slower in float16 / bfloat16 than in float32 (bench.py), and
    less accurate. compile=True also compiles the one-row matmuls of decoding (compile_decode). A model on
    another device is returned as it is. Call it after moving the model to its device and dtype."""
    p = next(model.parameters())
    if p.device.type != 'cpu':
        return model
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = CPULinear
        if hasattr(m, 'compute_dtype') and p.dtype in (torch.float16, torch.bfloat16):
            m.compute_dtype = torch.float32
    if compile:
        compile_decode(model)
    return model


def compile_decode(model):
    """Compile the one-row matmuls of token-by-token decoding on CPU with torch.compile (it needs a C++
    compiler): a compiled multiply-and-sum streams the weights at ~43 GB/s where the library kernels reach
    20-30 (bench.py), for 1.3x (float32) to 1.5x (bfloat16) faster decoding. Prefill, batches and training
    are unaffected. Returns False, with a one-line note on stderr, if compiling is not possible here."""
    linears = [m for m in model.modules() if isinstance(m, CPULinear)]
    # one compiled kernel per weight shape and dtype: raise dynamo's limit of 8 for models with more
    # (the setting is recompile_limit since torch 2.6, cache_size_limit before)
    dynamo_config = torch._dynamo.config
    limit = 'recompile_limit' if hasattr(dynamo_config, 'recompile_limit') else 'cache_size_limit'
    setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 64))
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
