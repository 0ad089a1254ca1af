"""
Benchmarks: our code against a reference, on the same weights, in one process, alternating runs.
    python bench.py --bench=decode      # GPT-2 124M decoding: ours (float32, half, compiled) vs transformers and CTranslate2
    python bench.py --bench=decode --engines_list=float32,ctranslate2-float32 --new_tokens=100
    python bench.py --bench=train       # training steps/s of our GPT vs a plain nanoGPT-equivalent model
    python bench.py --bench=attention   # softmax vs linear vs GLA: decode cost at positions 100-4000, training speed
Figures go in README.md with the machine they were measured on.
"""
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn
from torch.nn import functional as F

import fast_cpu
from load import DATA, GPT2_BPE_FILES
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
bench = 'decode'  # 'decode' (vs transformers, CTranslate2), 'train' (vs nanoGPT's math) or 'attention' (kinds)
engines_list: str | tuple = 'transformers,ctranslate2-float32,ctranslate2-int8,float32,float32+compile,float16,bfloat16,bfloat16+compile'  # what to compare
new_tokens: tuple | int = (100, 500)  # decode lengths to measure
prompt_len = 16  # tokens in the (random) prompt
prefill_len = 512  # prompt length for the time-to-first-token measurement
batch_size = 8  # rows decoded together for the batch measurement
accuracy_prompts = 20  # prompts for the half-precision accuracy check
top_k: int | None = 200  # sampling as sample.py does it (temperature 1.0)
repeats = 3  # runs of each side per length; the median is reported
threads = 2  # torch.set_num_threads
seed = 1337
# bench='train': nanoGPT's CPU example (shakespeare_char: 65 characters, 4 layers, 128 wide, batch 12 x 64)
train_vocab = 65  # vocabulary size
train_steps = 30  # optimizer steps per timed run
# bench='attention': a GPT-2 124M-shaped model of each attention kind
positions: tuple | int = (100, 1000, 4000)  # decode cost per token measured at these positions
decode_tokens = 32  # tokens decoded (and timed) at each position
attention_kinds = 'softmax,linear,gla'  # the kinds compared
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


def training_times(models, batches):
    """Seconds per pass over batches (forward, backward, AdamW) for each model, after one warm-up pass;
    the models take turns, repeats times."""
    optims = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}

    def run(name):
        for x, y in batches:
            _, loss = models[name](x, y)
            loss.backward()
            optims[name].step()
            optims[name].zero_grad(set_to_none=True)
    for name in models:
        run(name)  # warm up
    times = {k: [] for k in models}
    for _ in range(repeats):
        for name in models:
            times[name].append(timed(lambda: run(name)))
    return times


if bench == 'decode':
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        sys.exit("bench.py: error: the decode benchmark compares against transformers: pip install transformers")
    # the same random GPT-2 124M weights everywhere: transformers writes them, every engine loads them
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    folder = tempfile.mkdtemp()
    hf.save_pretrained(folder)
    dtypes = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}

    def our_engine(spec):
        """'float16' or 'bfloat16+compile': our GPT in that dtype, as sample.py runs it on a CPU
        (fast_cpu.optimize, with compile_decode when asked)."""
        name, _, extra = spec.partition('+')
        model = fast_cpu.optimize(GPT.from_pretrained(folder).eval().to(dtypes[name]))
        if extra == 'compile' and not fast_cpu.compile_decode(model):
            return None

        def generate(idx, n, greedy=False):
            return model.generate(idx, n, temperature=0 if greedy else 1.0, top_k=top_k)

        def last_logits(idx):
            with torch.no_grad():
                return model(idx)[0][:, -1].float()
        return generate, last_logits

    def hf_engine():
        def generate(idx, n, greedy=False):
            with torch.no_grad():
                return hf.generate(idx, max_new_tokens=n, min_new_tokens=n, do_sample=not greedy, top_k=top_k or 0,
                                   top_p=1.0, temperature=1.0, pad_token_id=0)
        return generate, None

    def ct2_engine(compute_type):
        """CTranslate2 (bench-only): its converter wants GPT-2's tokenizer files beside the model, which
        data/ ships (load.GPT2_BPE_FILES names them)."""
        import ctranslate2
        for ours, _, theirs in GPT2_BPE_FILES:
            shutil.copy(os.path.join(DATA, ours), os.path.join(folder, theirs))
        out = os.path.join(folder, f'ct2-{compute_type}')
        if not os.path.exists(out):
            ctranslate2.converters.TransformersConverter(folder).convert(out, quantization=compute_type)
        with open(os.path.join(folder, 'vocab.json')) as f:
            itos = {i: s for s, i in json.load(f).items()}
        gen = {}

        def load():
            gen['g'] = ctranslate2.Generator(out, device='cpu', compute_type=compute_type, intra_threads=threads)

        def generate(idx, n, greedy=False):
            prompts = [[itos[i] for i in row] for row in idx.tolist()]
            return gen['g'].generate_batch(prompts, max_length=n, min_length=n, include_prompt_in_result=False,
                                           sampling_topk=1 if greedy else top_k or 0)
        # a Generator that has run slows the PyTorch work of the other engines in this process by ~30% until
        # it is deleted (measured here: our float16 decode 104 -> 72 tok/s, back to 100 after del), while a
        # user runs one engine alone: so each timed run loads one before the timer and deletes it after
        load_and_unload[f'ctranslate2-{compute_type}'] = (load, gen.clear)
        return generate, None

    engines, load_and_unload = {}, {}
    for spec in [e.strip() for e in (engines_list.split(',') if isinstance(engines_list, str) else engines_list)]:
        if spec == 'transformers':
            engines[spec] = hf_engine()
        elif spec.startswith('ctranslate2-'):
            try:
                engines[spec] = ct2_engine(spec.removeprefix('ctranslate2-'))
            except ImportError:
                print(f"skipping {spec}: ctranslate2 is not installed (pip install ctranslate2)")
        elif spec.partition('+')[0] in dtypes:
            engine = our_engine(spec)
            if engine is not None:
                engines[spec] = engine
        else:
            sys.exit(f"bench.py: error: engine {spec!r} is not one of: transformers, ctranslate2-float32, "
                     f"ctranslate2-int8, float32, bfloat16, float16 (+compile)")
    print(f"GPT-2 124M (random weights), top_k={top_k}, {threads} threads, torch {torch.__version__}, "
          f"median of {repeats} alternating runs")

    def compare(title, n_tokens, idx, n):
        """Tokens per second (or the time to the first token when n == 1) of every engine, alternating."""
        times = {k: [] for k in engines}
        for _ in range(repeats):
            for k, (gen, _) in engines.items():
                load, unload = load_and_unload.get(k, (lambda: None, lambda: None))
                load()
                gen(idx, min(n, 4))  # warm up
                times[k].append(timed(lambda: gen(idx, n)))
                unload()
        print(title)
        for k in engines:
            t = statistics.median(times[k])
            print(f"  {k:<22} {t * 1000:8.1f} ms" if n == 1 else f"  {k:<22} {n_tokens / t:8.1f} tok/s")
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 50257, (1, prompt_len), generator=g)
    for n in new_tokens:
        compare(f"batch 1, {prompt_len}-token prompt, {n} new tokens:", n, prompt, n)
    compare(f"time to first token, {prefill_len}-token prompt:", 1,
            torch.randint(0, 50257, (1, prefill_len), generator=g), 1)
    compare(f"batch {batch_size}, {prompt_len}-token prompt, 100 new tokens:", 100 * batch_size,
            torch.randint(0, 50257, (batch_size, prompt_len), generator=g), 100)
    # half precision against float32: last-position logits, and 100-token greedy continuations of 20 prompts
    if 'float32' in engines and accuracy_prompts:
        prompts = [torch.randint(0, 50257, (1, prompt_len), generator=g) for _ in range(accuracy_prompts)]
        ref_logits = [engines['float32'][1](p) for p in prompts]
        ref_text = [engines['float32'][0](p, 100, greedy=True) for p in prompts]
        print(f"against float32, {accuracy_prompts} prompts:")
        for k, (gen, last_logits) in engines.items():
            if last_logits is None or k == 'float32':
                continue
            err = max(((last_logits(p) - r).norm() / r.norm()).item() for p, r in zip(prompts, ref_logits))
            same = sum(torch.equal(gen(p, 100, greedy=True), r) for p, r in zip(prompts, ref_text))
            print(f"  {k:<22} logits rel. L2 error (max) {err:.4f}; 100-token greedy continuation equal to "
                  f"float32's for {same}/{len(prompts)} prompts")
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
    batches = [(torch.randint(0, train_vocab, (B, T)), torch.randint(0, train_vocab, (B, T))) for _ in range(train_steps)]
    times = training_times(models, batches)
    print(f"training step (forward + backward + AdamW), batch {B} x {T}, {L} layers x {C}, vocab {train_vocab}, "
          f"{threads} threads, torch {torch.__version__}, median of {repeats} runs of {train_steps} steps")
    ref_tps = B * T * train_steps / statistics.median(times['nanoGPT math'])
    for name in models:
        tps = B * T * train_steps / statistics.median(times[name])
        print(f"  {name:<28} {tps:9,.0f} tokens/s   {tps / ref_tps:.2f}x")
elif bench == 'attention':
    kinds = [k.strip() for k in attention_kinds.split(',')]
    positions = (positions,) if isinstance(positions, int) else tuple(positions)
    # decoding: softmax reads a KV cache that grows with the position; linear and GLA carry a fixed-size state
    models = {k: fast_cpu.optimize(GPT(GPTConfig(block_size=max(positions) + decode_tokens + 1, vocab_size=50257,
                                                 attention=k)).eval()) for k in kinds}
    print(f"decode cost per token by position: GPT-2 124M shape (12 x 768), batch 1, top_k={top_k}, {threads} threads, "
          f"median of {repeats}")
    g = torch.Generator().manual_seed(seed)
    rows = {}
    for p in positions:
        prompt = torch.randint(0, 50257, (1, p), generator=g)
        times = {k: [] for k in kinds}
        for _ in range(repeats):
            for k in kinds:
                stream = models[k].generate_stream(prompt, decode_tokens + 1, top_k=top_k)
                next(stream)  # the prefill, not timed
                times[k].append(timed(lambda: [None for _ in stream]))
        rows[p] = {k: decode_tokens / statistics.median(times[k]) for k in kinds}
        print(f"  position {p:5d}: " + "   ".join(f"{k} {rows[p][k]:6.1f} tok/s" for k in kinds))
    first, last = positions[0], positions[-1]
    print("  time per token at position %d relative to %d: " % (last, first) +
          ", ".join(f"{k} {rows[first][k] / rows[last][k]:.2f}x" for k in kinds))
    # training throughput at block_size 1024, config/pico_tiny.py's width (forward + backward + AdamW)
    B, T = 2, 1024
    batch = (torch.randint(0, 6722, (B, T), generator=g), torch.randint(0, 6722, (B, T), generator=g))
    train_models = {k: GPT(GPTConfig(block_size=T, vocab_size=6722, n_layer=4, n_head=4, n_embd=128, bias=False,
                                     norm='rmsnorm', attention=k)) for k in kinds}
    times = training_times(train_models, [batch] * 3)
    tps = {k: 3 * B * T / statistics.median(times[k]) for k in kinds}
    print(f"training, block_size {T}, batch {B}, 4 layers x 128, vocabulary 6722: " +
          ", ".join(f"{k} {tps[k]:,.0f} tokens/s ({tps[k] / tps[kinds[0]]:.2f}x)" for k in kinds))
else:
    sys.exit(f"bench.py: error: bench={bench!r} is not one of: decode, train, attention")
