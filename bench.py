"""
Benchmarks: our code against a reference, on the same weights, in one process, alternating runs.
    python bench.py --bench=decode      # GPT-2 124M decoding: ours (float32, half, compiled) vs transformers and CTranslate2
    python bench.py --bench=decode --engines_list=float32,ctranslate2-float32 --new_tokens=100
    python bench.py --bench=decode --greedy=True --prompt_len=1   # as llama-bench's generation test: no sampling, no prompt
    python bench.py --bench=train       # training steps/s of our GPT vs a plain nanoGPT-equivalent model
    python bench.py --bench=attention   # softmax, linear, GLA, DeltaNet, Gated DeltaNet: decode cost at positions 100-4000, training speed
Figures go in README.md with the machine they were measured on.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn
from torch.nn import functional as F

import fast_cpu
from load import DATA, GPT2_BPE_FILES
from model import ATTENTION_KINDS, GPT, GPTConfig, TransformerModel

# -----------------------------------------------------------------------------
bench = 'decode'  # 'decode' (vs transformers, CTranslate2), 'train' (vs nanoGPT's math) or 'attention' (kinds)
engines_list: str | tuple = 'transformers,ctranslate2-float32,ctranslate2-int8,llama.cpp-F16,llama.cpp-Q8_0,float32,float32+compile,float16,bfloat16,bfloat16+compile,int8,int8+compile'  # what to compare
isolate = True  # each engine in a process of its own, engine after engine, repeats rounds (a loaded engine slows others)
llama_cpp = '~/.cache/llama-bench/llama_cpp_python-0.3.36/vendor/llama.cpp'  # llama.cpp's sources with build/bin/llama-bench (bash ../shared/tools/build-llama-bench)
llama_isa = 'native build'  # how the table describes that build, e.g. 'AVX2 build' for one made without AVX-512 (README "Speed")
weights: str | None = None  # (set for its own processes) the folder of the random GPT-2 weights every engine loads
json_out: str | None = None  # (set for its own processes) where a process writes its figures
new_tokens: tuple | int = (100, 500)  # decode lengths to measure
prompt_len = 16  # tokens in the (random) prompt
prefill_len = 512  # prompt length for the time-to-first-token measurement
batch_size = 8  # rows decoded together for the batch measurement
accuracy_prompts = 20  # prompts for the half-precision accuracy check
top_k: int | None = 200  # sampling as sample.py does it (temperature 1.0)
greedy = False  # argmax instead of sampling: llama-bench's generation test samples nothing and has no prompt, so
# --greedy=True --prompt_len=1 races it like for like (our sampling costs ~0.35 ms a token right after a step)
repeats = 5  # runs of each side (models take turns); the median is reported
threads = 2  # torch.set_num_threads
seed = 1337
# bench='train': nanoGPT's CPU example (shakespeare_char: 65 characters, 4 layers, 128 wide, batch 12 x 64)
train_vocab = 65  # vocabulary size
train_steps = 30  # optimizer steps per timed run (a sixth of them at the full vocabulary)
train_sizes = 'char,full_vocab'  # nanoGPT's shakespeare_char size, and pico_tiny's model with GPT-2's vocabulary
train_compile = False  # also time our models under torch.compile (train.py's compile=True; compiling is not timed)
train_rounds = 5  # processes, one after another, each timing every model; ratios are medians over them (where a
# process's allocator puts the weights moves one model's figure by up to 10%, even against its own copy)
# bench='attention': a GPT-2 124M-shaped model of each attention kind
positions: tuple | int = (100, 1000, 4000)  # decode cost per token measured at these positions
decode_tokens = 32  # tokens decoded (and timed) at each position
attention_kinds = 'softmax,linear,gla,deltanet,gated_deltanet'  # the kinds compared (the first is the training ratios' reference)
attention_dtype = 'float32'  # the decoding models' weights (fast_cpu.DTYPES: 'int8' quantizes them)
attention_compile = False  # the decoding models with fast_cpu.compile_decode (the compiled one-token step)
attention_train = True  # also time training at block_size 1,024 (study.py --study=attention skips it)
attention_n_layer = 12  # the decoding models' depth and width (GPT-2 124M's; heads of 64; smaller for quick checks)
attention_n_embd = 768
short_conv = 0  # the linear family's short convolution (model.GPTConfig.short_conv; softmax has none)
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
    the models take turns, repeats times. models: name -> module, or (module, step) where step(x, y) returns
    (logits, loss) in place of module(x, y)."""
    models = {k: m if isinstance(m, tuple) else (m, m) for k, m in models.items()}
    # ours with train.py's fused AdamW; nanoGPT's math with nanoGPT's optimizer on CPU (foreach: fused only on CUDA)
    optims = {k: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=isinstance(m, GPT)) for k, (m, _) in models.items()}

    def run(name):
        for x, y in batches:
            _, loss = models[name][1](x, y)
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
    if weights is None:
        hf = GPT2LMHeadModel(GPT2Config()).eval()
        folder = tempfile.mkdtemp()
        hf.save_pretrained(folder)
        for ours, _, theirs in GPT2_BPE_FILES:  # the tokenizer files CTranslate2's and llama.cpp's converters want
            shutil.copy(os.path.join(DATA, ours), os.path.join(folder, theirs))
    else:
        folder = weights
        hf = GPT2LMHeadModel.from_pretrained(folder).eval()

    kept_eager = set()  # '+compile' engines whose compiled step lost to eager here, so they run eager

    def our_engine(spec):
        """'float16' or 'bfloat16+compile': our GPT in that dtype, as sample.py runs it on a CPU
        (fast_cpu.optimize, with compile_decode when asked)."""
        name, _, extra = spec.partition('+')
        model = fast_cpu.cast(GPT.from_pretrained(folder).eval(), name, 'cpu')
        if extra == 'compile':
            if not fast_cpu.compile_decode(model, probe=False):  # no C++ compiler here
                return None
            if not fast_cpu.probe_compiled(model):  # as sample.py --compile=True: eager where compiling loses
                kept_eager.add(spec)

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
        import ctranslate2  # (optional, bench-only: pip install ctranslate2; its absence skips the engine)
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

    def llama_engine(quant):
        """llama.cpp's llama-bench on the same weights converted to GGUF by llama.cpp's own converter: decode
        tokens/s (tg: generation from an empty context) and prompt processing (pp) for the first-token time."""
        root = os.path.expanduser(llama_cpp)
        binary = os.path.join(root, 'build', 'bin', 'llama-bench')
        if not os.path.isfile(binary):
            print(f"skipping llama.cpp-{quant}: no {binary} (bash ../shared/tools/build-llama-bench builds it)")
            return None
        gguf = os.path.join(folder, f'gpt2-{quant.lower()}.gguf')
        if not os.path.exists(gguf):
            with tempfile.TemporaryDirectory() as tmp:  # its converter wants GPT-2's old n_ctx key in config.json
                for f in os.listdir(folder):
                    if f != 'config.json' and os.path.isfile(os.path.join(folder, f)):
                        os.symlink(os.path.join(folder, f), os.path.join(tmp, f))
                with open(os.path.join(folder, 'config.json')) as f:
                    config = json.load(f)
                with open(os.path.join(tmp, 'config.json'), 'w') as f:
                    json.dump({**config, 'n_ctx': config.get('n_positions', 1024)}, f)
                subprocess.run([sys.executable, os.path.join(root, 'convert_hf_to_gguf.py'), tmp, '--outtype',
                                quant.lower(), '--outfile', gguf], check=True, capture_output=True)

        def figures():
            def run(*args):
                """llama-bench's JSON rows, or none when it fails (a build can use an instruction this CPU
                faults on: the native build's prompt test, AMX on or off, on a Xeon VM): that figure reads n/a and the other engines go on."""
                out = subprocess.run([binary, '-m', gguf, '-t', str(threads), '-r', '2', '-o', 'json', *args],
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    why = f"signal {-out.returncode}" if out.returncode < 0 else f"exit status {out.returncode}"
                    print(f"  llama.cpp-{quant}: llama-bench {' '.join(args)} failed ({why}): "
                          f"{(out.stderr.strip().splitlines() or [''])[-1]}")
                    return []
                return json.loads(out.stdout)
            figs = {f'b1-{r["n_gen"]}': r['avg_ts'] for r in run('-p', '0', '-n', ','.join(map(str, new_tokens)))}
            prompt_rows = run('-p', str(prefill_len), '-n', '0')
            if prompt_rows:
                figs['ttft'] = 1000 * prefill_len / prompt_rows[0]['avg_ts']
            return figs
        return figures

    specs = [e.strip() for e in (engines_list.split(',') if isinstance(engines_list, str) else engines_list)]
    sampling = 'greedy' if greedy else f'top_k={top_k}'
    titles = {**{f'b1-{n}': f"batch 1, {prompt_len}-token prompt, {n} new tokens (tok/s)" for n in new_tokens},
              'ttft': f"time to first token, {prefill_len}-token prompt (ms)",
              'b8': f"batch {batch_size}, {prompt_len}-token prompt, 100 new tokens (tok/s)"}
    capability = torch.backends.cpu.get_cpu_capability()
    # an imitation of a smaller CPU (README "Speed"): ATen's, oneDNN's and inductor's ISA lowered by these
    # three variables (fast_cpu's own kernels have no AVX-512 path); llama.cpp is built for the real CPU
    imitated = [f'{k}={os.environ[k]}' for k in ('ATEN_CPU_CAPABILITY', 'ONEDNN_MAX_CPU_ISA', 'TORCHINDUCTOR_CPP_MARCH')
                if os.environ.get(k)]
    capability = f"{capability} ({'imitated: ' + ' '.join(imitated) if imitated else 'native'})"
    if isolate and json_out is None:
        # one process per engine and round: this process only starts them, and checks accuracy at the end
        figures = {spec: {} for spec in specs}
        print(f"GPT-2 124M (random weights), {sampling}, {threads} threads, torch {torch.__version__}, {capability}, "
              f"one process per engine, median of {repeats} rounds")
        llama = {spec: llama_engine(spec.removeprefix('llama.cpp-')) for spec in specs if spec.startswith('llama.cpp-')}
        for r in range(repeats):
            for spec in specs:
                if spec in llama:
                    figs = llama[spec]() if llama[spec] else {}
                else:
                    with tempfile.NamedTemporaryFile(suffix='.json') as f:
                        proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--bench=decode',
                                               f'--engines_list={spec}', '--repeats=1', '--accuracy_prompts=0',
                                               f'--weights={folder}', f'--json_out={f.name}', f'--threads={threads}',
                                               f'--new_tokens={",".join(map(str, new_tokens))}', f'--top_k={top_k}',
                                               f'--greedy={greedy}', f'--prompt_len={prompt_len}', f'--prefill_len={prefill_len}',
                                               f'--batch_size={batch_size}', f'--seed={seed}'],
                                              capture_output=True, text=True)
                        figs = json.load(open(f.name)).get(spec, {}) if proc.returncode == 0 else {}
                    if proc.returncode != 0 or not figs:
                        print(f"  {spec}: {(proc.stdout + proc.stderr).strip().splitlines()[-1:]}")
                for key, value in figs.items():
                    figures[spec].setdefault(key, []).append(value)
            print(f"  round {r + 1} of {repeats} done", file=sys.stderr)
        for key, title in titles.items():
            print(title)
            for spec in specs:
                values = figures[spec].get(key)
                isa = llama_isa if spec.startswith('llama.cpp-') else capability
                note = ", compile_decode's probe kept eager" if figures[spec].get('kept eager') else ''
                print(f"  {spec:<22} " + (f"{statistics.median(values):8.1f}" if values else "     n/a") + f"   {isa}{note}")
        median = {spec: {k: statistics.median(v) for k, v in f.items()} for spec, f in figures.items()}
        for ours, theirs in (('int8', 'ctranslate2-int8'), ('int8+compile', 'ctranslate2-int8'),
                             ('int8', 'llama.cpp-Q8_0'), ('int8+compile', 'llama.cpp-Q8_0'), ('float16', 'llama.cpp-F16'),
                             ('float16+compile', 'llama.cpp-F16'), ('float32', 'ctranslate2-float32')):
            if median.get(ours) and median.get(theirs):
                print(f"{ours} / {theirs}: " + ", ".join(f"{n} tokens {median[ours][f'b1-{n}'] / median[theirs][f'b1-{n}']:.2f}x"
                                                         for n in new_tokens if f'b1-{n}' in median[theirs]))
        engines = {spec: our_engine(spec) for spec in specs if spec.partition('+')[0] in fast_cpu.DTYPES}
        engines = {k: v for k, v in engines.items() if v is not None}
    else:
        engines, load_and_unload = {}, {}
        for spec in specs:
            if spec == 'transformers':
                engines[spec] = hf_engine()
            elif spec.startswith('ctranslate2-'):
                try:
                    engines[spec] = ct2_engine(spec.removeprefix('ctranslate2-'))
                except ImportError:
                    print(f"skipping {spec}: ctranslate2 is not installed (pip install ctranslate2)")
            elif spec.partition('+')[0] in fast_cpu.DTYPES:
                engine = our_engine(spec)
                if engine is not None:
                    engines[spec] = engine
            elif not spec.startswith('llama.cpp-'):
                sys.exit(f"bench.py: error: engine {spec!r} is not one of: transformers, ctranslate2-float32, "
                         f"ctranslate2-int8, llama.cpp-F16, llama.cpp-Q8_0, float32, bfloat16, float16, int8 (+compile)")
        print(f"GPT-2 124M (random weights), {sampling}, {threads} threads, torch {torch.__version__}, {capability}, "
              f"median of {repeats} alternating runs in one process")
        figures = {k: {} for k in engines}

        def compare(key, n_tokens, idx, n):
            """Tokens per second (or the time to the first token when n == 1) of every engine, alternating."""
            times = {k: [] for k in engines}
            for _ in range(repeats):
                for k, (gen, _) in engines.items():
                    load, unload = load_and_unload.get(k, (lambda: None, lambda: None))
                    load()
                    gen(idx, min(n, 4), greedy)  # warm up
                    times[k].append(timed(lambda: gen(idx, n, greedy)))
                    unload()
            print(titles[key])
            for k in engines:
                t = statistics.median(times[k])
                figures[k][key] = t * 1000 if n == 1 else n_tokens / t
                print(f"  {k:<22} {figures[k][key]:8.1f}")
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, 50257, (1, prompt_len), generator=g)
        for n in new_tokens:
            compare(f'b1-{n}', n, prompt, n)
        compare('ttft', 1, torch.randint(0, 50257, (1, prefill_len), generator=g), 1)
        compare('b8', 100 * batch_size, torch.randint(0, 50257, (batch_size, prompt_len), generator=g), 100)
        for k in kept_eager & figures.keys():
            figures[k]['kept eager'] = 1
        if json_out:
            with open(json_out, 'w') as f:
                json.dump(figures, f)
    # half precision and int8 against float32: last-position logits, and 100-token greedy continuations
    g = torch.Generator().manual_seed(seed + 1)
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
elif bench == 'train' and train_rounds > 1 and json_out is None:
    rounds = []  # each: {title: {'ref': name, 'tokens/s': {name: figure}}}
    for r in range(train_rounds):
        with tempfile.NamedTemporaryFile(suffix='.json') as f:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--bench=train', '--train_rounds=1',
                                   f'--json_out={f.name}', f'--train_sizes={train_sizes}', f'--repeats={repeats}',
                                   f'--train_steps={train_steps}', f'--train_vocab={train_vocab}',
                                   f'--threads={threads}', f'--seed={seed}', f'--train_compile={train_compile}'],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"bench.py: error: training round {r + 1} failed: {(proc.stdout + proc.stderr).strip()[-300:]}")
            rounds.append(json.load(open(f.name)))
        print(f"  round {r + 1} of {train_rounds} done", file=sys.stderr)
    for title, first in rounds[0].items():
        print(f"{title}, median of {train_rounds} processes (ratio: median of the processes' ratios, and their range)")
        for name in first['tokens/s']:
            tps = [res[title]['tokens/s'][name] for res in rounds]
            ratios = [res[title]['tokens/s'][name] / res[title]['tokens/s'][first['ref']] for res in rounds]
            print(f"  {name:<52} {statistics.median(tps):9,.0f} tokens/s   {statistics.median(ratios):.2f}x "
                  f"({min(ratios):.2f}-{max(ratios):.2f})")
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

    def plain_loss(model):
        """The loss as it was computed before ChunkedCrossEntropy: every position's logits, then F.cross_entropy."""
        return model, lambda x, y: (None, F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten()))

    def autocast(model):
        """model's step as train.py takes it with dtype='bfloat16', what 'auto' picks on a CPU with bfloat16 instructions
        (our models' attention in float32, as train.py has it)."""
        if isinstance(model, GPT):
            fast_cpu.attention_in_float32(model)

        def step(x, y):
            with torch.autocast('cpu', torch.bfloat16):
                return model(x, y)
        return model, step

    def compiled(model):
        """model's step as train.py takes it with compile=True; the warm-up pass compiles it."""
        return model, torch.compile(model)

    train_figures = {}  # title: {'ref': name, 'tokens/s': {name: figure}}, for json_out

    def report(title, models, batches, ref):
        times = training_times(models, batches)
        B, T = batches[0][0].shape
        title = (f"{title}: batch {B} x {T}, {threads} threads, torch {torch.__version__}, "
                 f"{torch.backends.cpu.get_cpu_capability()}, median of {repeats} runs of {len(batches)} steps")
        tps = {name: B * T * len(batches) / statistics.median(times[name]) for name in models}
        print(title)
        for name in models:
            print(f"  {name:<52} {tps[name]:9,.0f} tokens/s   {tps[name] / tps[ref]:.2f}x")
        train_figures[title] = {'ref': ref, 'tokens/s': tps}

    def char_gpt(**kw):
        torch.manual_seed(seed)
        return GPT(GPTConfig(block_size=64, vocab_size=train_vocab, n_layer=4, n_head=4, n_embd=128, bias=False, **kw))

    # bfloat16 rows only where train.py's dtype='auto' would pick bfloat16 (emulated bfloat16 is ~10x slower)
    native_bf16 = fast_cpu.bfloat16_matmul_is_faster()
    if 'char' in train_sizes:  # nanoGPT's CPU example: shakespeare_char, 4 layers x 128, batch 12 x 64
        def transformer():
            torch.manual_seed(seed)
            return TransformerModel(vocab_size=train_vocab, d_model=128, n_heads=4, n_blocks=4, block_size=64)
        torch.manual_seed(seed)
        models = {'nanoGPT math': RefGPT(train_vocab, 64, 128, 4, 4),
                  'nanoGPT math, bfloat16 autocast': autocast(RefGPT(train_vocab, 64, 128, 4, 4)),
                  'ours (GPT)': char_gpt(activation='gelu'),
                  'ours (GPT, loss as before)': plain_loss(char_gpt(activation='gelu')),
                  'ours (GPT), bfloat16 autocast': autocast(char_gpt(activation='gelu')),
                  'ours (TransformerModel, RMSNorm)': transformer(),
                  'ours (TransformerModel, RMSNorm), bfloat16 autocast': autocast(transformer())}
        if train_compile:
            models['ours (GPT), torch.compile'] = compiled(char_gpt(activation='gelu'))
            models['ours (TransformerModel), torch.compile'] = compiled(transformer())
        models = {k: m for k, m in models.items() if native_bf16 or 'bfloat16' not in k}
        batches = [(torch.randint(0, train_vocab, (12, 64)), torch.randint(0, train_vocab, (12, 64)))
                   for _ in range(train_steps)]
        report(f"nanoGPT's CPU size, vocabulary {train_vocab}", models, batches, 'nanoGPT math')
    if 'full_vocab' in train_sizes:  # config/pico_tiny.py's model with GPT-2's whole vocabulary, as the course has it
        def pico():
            torch.manual_seed(seed)
            return GPT(GPTConfig(block_size=128, vocab_size=50257, n_layer=4, n_head=4, n_embd=128, bias=False,
                                 norm='rmsnorm', activation='gelu'))  # train.py's transformer
        models = {'loss as before (all logits)': plain_loss(pico()), 'chunked loss, float32': pico(),
                  'chunked loss, bfloat16 autocast': autocast(pico())}
        models = {k: m for k, m in models.items() if native_bf16 or 'bfloat16' not in k}
        batches = [(torch.randint(0, 50257, (16, 128)), torch.randint(0, 50257, (16, 128)))
                   for _ in range(max(1, train_steps // 6))]
        report("pico_tiny's model (4 x 128, RMSNorm) with GPT-2's 50,257-token vocabulary", models, batches,
               'loss as before (all logits)')
    if json_out:
        with open(json_out, 'w') as f:
            json.dump(train_figures, f)
elif bench == 'attention':
    kinds = [k.strip() for k in attention_kinds.split(',')]
    if any(k not in ATTENTION_KINDS for k in kinds):
        sys.exit(f"bench.py: error: attention_kinds={attention_kinds!r}: each must be one of {', '.join(ATTENTION_KINDS)}")
    positions = (positions,) if isinstance(positions, int) else tuple(positions)
    conv = {k: 0 if k == 'softmax' else short_conv for k in kinds}  # (the linear family's option only)
    # decoding: softmax reads a KV cache that grows with the position; the linear family carries a fixed-size state
    models = {k: fast_cpu.cast(GPT(GPTConfig(block_size=max(positions) + decode_tokens + 1, vocab_size=50257,
                                             n_layer=attention_n_layer, n_embd=attention_n_embd,
                                             n_head=max(1, attention_n_embd // 64), attention=k,
                                             short_conv=conv[k])).eval(),
                            attention_dtype, 'cpu') for k in kinds}
    if attention_compile and not all(fast_cpu.compile_decode(m, probe=False) for m in models.values()):
        sys.exit("bench.py: error: attention_compile=True needs torch.compile (a C++ compiler)")
    print(f"decode cost per token by position: {attention_n_layer} x {attention_n_embd}"
          f"{' (GPT-2 124M shape)' if (attention_n_layer, attention_n_embd) == (12, 768) else ''}, "
          f"{attention_dtype} weights{f', short_conv={short_conv}' if short_conv else ''}"
          f"{', compiled step' if attention_compile else ''}, batch 1, "
          f"top_k={top_k}, {threads} threads, {torch.backends.cpu.get_cpu_capability()}, median of {repeats}")
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
    figures = dict(machine=torch.backends.cpu.get_cpu_capability(), threads=threads, decode_tokens=decode_tokens,
                   shape=f"{attention_n_layer} x {attention_n_embd}",
                   decode_tok_s={str(p): r for p, r in rows.items()})
    # training throughput at block_size 1024, config/pico_tiny.py's width (forward + backward + AdamW)
    B, T = 2, 1024
    batch = (torch.randint(0, 6722, (B, T), generator=g), torch.randint(0, 6722, (B, T), generator=g))
    train_models = {k: GPT(GPTConfig(block_size=T, vocab_size=6722, n_layer=4, n_head=4, n_embd=128, bias=False,
                                     norm='rmsnorm', attention=k, short_conv=conv[k]))
                    for k in kinds}
    if attention_train:
        times = training_times(train_models, [batch] * 3)
        tps = {k: 3 * B * T / statistics.median(times[k]) for k in kinds}
        print(f"training, block_size {T}, batch {B}, 4 layers x 128, vocabulary 6722: " +
              ", ".join(f"{k} {tps[k]:,.0f} tokens/s ({tps[k] / tps[kinds[0]]:.2f}x)" for k in kinds))
        figures['train_tok_s'] = tps
    if json_out:
        with open(json_out, 'w') as f:
            json.dump(figures, f)
else:
    sys.exit(f"bench.py: error: bench={bench!r} is not one of: decode, train, attention")
