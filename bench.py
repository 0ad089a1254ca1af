"""
Benchmarks: our code against a reference, on the same weights, in one process, alternating runs.
    python bench.py --bench=decode      # batch-1 decode of GPT-2 124M (random weights) vs transformers
    python bench.py --bench=train       # training steps/s of our GPT vs a plain nanoGPT-equivalent model
Figures go in README.md with the machine they were measured on.
"""
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn
from torch.nn import functional as F

from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
bench = 'decode'  # 'decode' (tokens/s of generate vs transformers) or 'train' (training tokens/s vs nanoGPT's math)
new_tokens: tuple | int = (100, 500)  # decode lengths to measure
prompt_len = 16  # tokens in the (random) prompt
batch_size = 1  # rows decoded together
top_k: int | None = 200  # sampling as sample.py does it (temperature 1.0)
repeats = 3  # runs of each side per length; the median is reported
threads = 2  # torch.set_num_threads
seed = 1337
# bench='train': nanoGPT's CPU example (shakespeare_char: 65 characters, 4 layers, 128 wide, batch 12 x 64)
train_vocab = 65  # vocabulary size
train_steps = 30  # optimizer steps per timed run
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------
torch.set_num_threads(threads)
torch.manual_seed(seed)
if isinstance(new_tokens, int):
    new_tokens = (new_tokens,)


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if bench == 'decode':
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        sys.exit("bench.py: error: the decode benchmark compares against transformers: pip install transformers")
    # the same random GPT-2 124M weights on both sides: transformers writes them, we load them from the folder
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    folder = tempfile.mkdtemp()
    hf.save_pretrained(folder)
    ours = GPT.from_pretrained(folder).eval()
    idx = torch.randint(0, 50257, (batch_size, prompt_len))
    print(f"GPT-2 124M, batch {batch_size}, prompt {prompt_len} tokens, top_k={top_k}, {threads} threads, "
          f"torch {torch.__version__}, median of {repeats}")
    for n in new_tokens:
        def run_ours():
            ours.generate(idx, n, temperature=1.0, top_k=top_k)

        def run_hf():
            with torch.no_grad():
                hf.generate(idx, max_new_tokens=n, min_new_tokens=n, do_sample=True, top_k=top_k or 0,
                            top_p=1.0, temperature=1.0, pad_token_id=0)
        run_ours(), run_hf()  # warm up
        t_ours, t_hf = [], []
        for _ in range(repeats):  # alternate, so a slow phase of the machine hits both sides
            t_ours.append(timed(run_ours))
            t_hf.append(timed(run_hf))
        tps_ours = n * batch_size / statistics.median(t_ours)
        tps_hf = n * batch_size / statistics.median(t_hf)
        print(f"{n:5d} new tokens: ours {tps_ours:6.1f} tok/s   transformers {tps_hf:6.1f} tok/s   "
              f"ratio {tps_ours / tps_hf:.2f}x")
elif bench == 'train':
    class RefBlock(nn.Module):
        """nanoGPT's block, written plainly: pre-norm LayerNorm (no bias), causal SDPA attention, GELU MLP."""

        def __init__(self, C, H):
            super().__init__()
            self.H = H
            self.ln_1, self.ln_2 = nn.LayerNorm(C, bias=False), nn.LayerNorm(C, bias=False)
            self.c_attn, self.attn_proj = nn.Linear(C, 3 * C, bias=False), nn.Linear(C, C, bias=False)
            self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C, bias=False), nn.Linear(4 * C, C, bias=False)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = (t.view(B, T, self.H, C // self.H).transpose(1, 2)
                       for t in self.c_attn(self.ln_1(x)).split(C, dim=2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
            x = x + self.attn_proj(y)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))

    class RefGPT(nn.Module):
        def __init__(self, V, T, C, H, L):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
            self.h = nn.ModuleList([RefBlock(C, H) for _ in range(L)])
            self.ln_f = nn.LayerNorm(C, bias=False)
            self.lm_head = nn.Linear(C, V, bias=False)
            self.wte.weight = self.lm_head.weight

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
            for block in self.h:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    B, T, C, H, L = 12, 64, 128, 4, 4
    models = {'nanoGPT math': RefGPT(train_vocab, T, C, H, L),
              'ours (GPT)': GPT(GPTConfig(block_size=T, vocab_size=train_vocab, n_layer=L, n_head=H, n_embd=C,
                                          bias=False, activation='gelu')),
              'ours (Transformer, RMSNorm)': GPT(GPTConfig(block_size=T, vocab_size=train_vocab, n_layer=L, n_head=H,
                                                           n_embd=C, bias=False, norm='rmsnorm'))}
    optims = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    batches = [(torch.randint(0, train_vocab, (B, T)), torch.randint(0, train_vocab, (B, T))) for _ in range(train_steps)]

    def run(name):
        m, opt = models[name], optims[name]
        for x, y in batches:
            _, loss = m(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for name in models:
        run(name)  # warm up
    times = {k: [] for k in models}
    for _ in range(repeats):
        for name in models:
            times[name].append(timed(lambda: run(name)))
    print(f"training step (forward + backward + AdamW), batch {B} x {T}, {L} layers x {C}, vocab {train_vocab}, "
          f"{threads} threads, torch {torch.__version__}, median of {repeats} runs of {train_steps} steps")
    ref_tps = B * T * train_steps / statistics.median(times['nanoGPT math'])
    for name in models:
        tps = B * T * train_steps / statistics.median(times[name])
        print(f"  {name:<28} {tps:9,.0f} tokens/s   {tps / ref_tps:.2f}x")
else:
    sys.exit(f"bench.py: error: bench={bench!r} is not one of: decode, train")
