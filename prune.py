"""
Prune a model's layers at inference time and measure what each selection costs: blocks kept, parameters,
loss and perplexity on a text, decode speed, samples from the same seed, and how repetitive they are.
    python prune.py --init_from=gpt2 --configs="all;even;first_half" --out_json=prune.json --plot=prune.png
    python prune.py --init_from=gpt2 --sweep=True         # loss increase when each single block is dropped
    python prune.py --init_from=gpt2 --logit_lens=True    # loss read from the residual stream after each block
"""
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import fast_cpu
from load import check_output, load_model, pick_device, read_prompt
from model import GPT, check_sampling_args, parse_active_layers
from study import distinct_n, repeat_4gram

HERE = os.path.dirname(os.path.abspath(__file__))
# -----------------------------------------------------------------------------
init_from = 'gpt2'  # 'resume', a .pt file, a GPT-2 name, a Hub repo id, or a local folder (as in sample.py)
out_dir = 'out'  # where init_from='resume' finds ckpt.pt
start = "one ring to rule them all,"  # the prompt of the samples, or "FILE:prompt.txt"
configs = 'all;even;first_half'  # active_layers selections to compare, separated by ';' (see sample.py)
eval_text = os.path.join(HERE, 'data', 'tinyshakespeare.txt')  # text the loss is measured on
eval_stride: int | None = None  # tokens each evaluation window advances, < block_size (None: block_size // 2)
eval_tokens: int | None = 4096  # score only the first eval_tokens tokens of eval_text (None: all; GPT-2 124M: ~10 s)
max_new_tokens = 100  # tokens per sample
num_samples = 3  # samples per config, generated as one batch
temperature = 0.8  # as in sample.py
top_k: int | None = 200  # as in sample.py
top_p: float | None = None  # as in sample.py
seed = 1337  # the same seed for every config, so the samples differ only by the layers
sweep = False  # also drop each single block in turn and report the loss increase (layer importance)
logit_lens = False  # also report the loss read from the residual stream after every block
out_json: str | None = None  # write every number and sample to this JSON file
plot: str | None = None  # write a figure to this PNG file (needs matplotlib)
device = 'auto'  # 'cpu', 'cuda', 'mps', ...; 'auto' picks cuda > mps > cpu
dtype = 'float32'  # the weights: 'float32', 'bfloat16', 'float16', or 'int8' (CPU: fast_cpu.quantize_int8)
exec(open(os.path.join(HERE, 'configurator.py')).read())
# -----------------------------------------------------------------------------


def die(msg):
    sys.exit(f"prune.py: error: {msg}")


def windows(n_tokens, block_size, stride):
    """Evaluation windows (begin, end, n_scored), as transformers' perplexity guide slides them: the model
    reads tokens[begin:end] (at most block_size tokens) and predicts each next token inside the window; only
    the last n_scored predictions count. With stride < block_size every token after the first is scored
    exactly once, with at least block_size - stride tokens of context past the first window."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + block_size, n_tokens)
        out.append((begin, end, end - max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def evaluate(model, tokens, stride, lens=False, name=''):
    """Mean next-token loss (nats) over the text; with lens=True, a list of the losses read from the
    residual stream before the first block and after each block, through ln_f and lm_head. A progress line
    on stderr every few seconds."""
    total, count, t_print = None, 0, time.time()
    spans = windows(len(tokens), model.config.block_size, stride)
    for j, (begin, end, n) in enumerate(spans):
        if time.time() - t_print > 3:
            print(f"\r  {name}: scoring window {j + 1}/{len(spans)}", end='', file=sys.stderr, flush=True)
            t_print = time.time()
        x = tokens[None, begin:end]
        y = tokens[end - n:end]  # the scored targets, predicted from positions end-n-1 ... end-2
        if lens:
            logits = [model.lm_head(model.transformer.ln_f(h[:, -n - 1:-1]))[0] for h in model.residual_stream(x)]
        else:
            logits = [model(x)[0][0, -n - 1:-1]]
        sums = [F.cross_entropy(lg.float(), y, reduction='sum').item() for lg in logits]
        total = sums if total is None else [a + b for a, b in zip(total, sums)]
        count += n
    losses = [t / count for t in total]
    return losses if lens else losses[0]


# check every setting (and that the outputs can be written) before loading anything
try:
    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    device = pick_device(device)
    fast_cpu.check_dtype(dtype, device)
    start = read_prompt(start)
    for name, path in (('out_json', out_json), ('plot', plot)):
        if path:
            check_output(path, name)
except ValueError as e:
    die(e)
if num_samples < 1:
    die(f"num_samples={num_samples} must be >= 1")
if eval_tokens is not None and eval_tokens < 2:
    die(f"eval_tokens={eval_tokens} must be >= 2 (or None for the whole text)")
specs = [s.strip() for s in configs.split(';') if s.strip()]
if not specs:
    die("configs is empty; give active_layers selections separated by ';', e.g. --configs='all;even;first_half'")
if not os.path.isfile(eval_text):
    die(f"eval_text {eval_text!r} {'is a folder' if os.path.isdir(eval_text) else 'not found'}")
if plot:
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        die("plot needs matplotlib, which is not installed: pip install matplotlib")

try:
    model, tokenizer, _ = load_model(init_from, out_dir)
    with open(eval_text, encoding='utf-8') as f:
        tokens = torch.tensor(tokenizer.encode(f.read()), dtype=torch.long, device=device)
    prompt = torch.tensor(tokenizer.encode(start), dtype=torch.long, device=device)[None].repeat(num_samples, 1)
except UnicodeDecodeError:
    die(f"eval_text {eval_text!r} is not UTF-8 text")
except (OSError, ValueError) as e:
    die(e)
if not isinstance(model, GPT):
    die(f"prune.py prunes transformer blocks; init_from={init_from!r} is a {type(model).__name__}")
try:
    fast_cpu.cast(model.eval(), dtype, device)
except ValueError as e:
    die(e)
n_layer = len(model.transformer.h)
for spec in specs:  # every spec must name blocks of this model
    try:
        parse_active_layers(spec, n_layer)
    except ValueError as e:
        die(f"configs: {e}")
tokens = tokens[:eval_tokens] if eval_tokens else tokens
if len(tokens) < 2:
    die(f"eval_text {eval_text!r} has fewer than 2 tokens")
stride = eval_stride or max(1, model.config.block_size // 2)
if not 1 <= stride < model.config.block_size:
    die(f"eval_stride={eval_stride} must be in [1, block_size) = [1, {model.config.block_size}) so every token is scored")
if prompt.size(1) == 0:
    die("the prompt is empty; give --start=...")

full_blocks, full_ids, full_config = model.transformer.h, model.layer_ids, model.config


def select(spec):
    """The model with only the blocks spec selects (from the full model, each time; weights are shared)."""
    model.transformer.h, model.layer_ids, model.config = full_blocks, full_ids, full_config
    return model.prune_layers(spec)


print(f"{init_from}: {n_layer} blocks; loss on {os.path.basename(eval_text)} ({len(tokens)} tokens, windows of "
      f"{model.config.block_size}, stride {stride}); {num_samples} sample{'s' * (num_samples != 1)} x {max_new_tokens} "
      f"tokens, seed {seed}", file=sys.stderr)
model.generate(prompt[:1], 2)  # warm up (one-time kernel set-up), so the first config's speed is not understated
results = []
for spec in specs:
    m = select(spec)
    t0 = time.time()
    loss = evaluate(m, tokens, stride, name=spec)
    t_eval = time.time() - t0
    torch.manual_seed(seed)
    t0 = time.time()
    out = m.generate(prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    dt = time.time() - t0
    gen = [row[prompt.size(1):] for row in out.tolist()]
    # (int8 weights are buffers, fast_cpu.Int8Linear; the output layer's is the token embedding's, counted once)
    n_params = sum(p.numel() for p in m.parameters()) + sum(
        b.numel() for n, b in m.named_buffers() if n.endswith(('.weight', '.bias')) and not n.startswith('lm_head.'))
    results.append(dict(spec=spec, layers=list(m.layer_ids), params=n_params,
                        loss=loss, perplexity=math.exp(loss), tokens_per_s=num_samples * max_new_tokens / dt,
                        samples=[tokenizer.decode(row) for row in out.tolist()],
                        distinct_1=sum(distinct_n(g, 1) for g in gen) / len(gen),
                        distinct_2=sum(distinct_n(g, 2) for g in gen) / len(gen),
                        distinct_3=sum(distinct_n(g, 3) for g in gen) / len(gen),
                        repeat_4gram=sum(repeat_4gram(g) for g in gen) / len(gen)))
    print(f"\r  {spec}: loss {loss:.4f} ({t_eval:.1f} s), {results[-1]['tokens_per_s']:.1f} tok/s", file=sys.stderr)


def layers_str(ids):
    """0,2,4 or 0-5 for a run of consecutive blocks."""
    if len(ids) > 2 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]}"
    return ','.join(map(str, ids))


w = max(len('config'), *(len(r['spec']) for r in results))
wl = max(len('blocks'), *(len(layers_str(r['layers'])) for r in results))
print(f"{'config':<{w}}  {'blocks':<{wl}}  {'params':>8}  {'loss':>6}  {'ppl':>8}  {'tok/s':>6}  "
      f"{'dist-1':>6}  {'dist-2':>6}  {'dist-3':>6}  {'rep-4g':>6}")
for r in results:
    print(f"{r['spec']:<{w}}  {layers_str(r['layers']):<{wl}}  {r['params'] / 1e6:7.2f}M  {r['loss']:6.3f}  "
          f"{r['perplexity']:8.2f}  {r['tokens_per_s']:6.1f}  {r['distinct_1']:6.3f}  {r['distinct_2']:6.3f}  "
          f"{r['distinct_3']:6.3f}  {r['repeat_4gram']:6.3f}")
for i in range(num_samples):
    print(f"\n=== sample {i} (seed {seed}) ===")
    for r in results:
        print(f"--- {r['spec']}:\n{r['samples'][i]}")

sweep_rows = []
if sweep:
    base = results[0]['loss'] if results[0]['layers'] == list(range(n_layer)) else evaluate(select('all'), tokens, stride)
    print(f"\nlayer importance: loss without each single block (all blocks: {base:.4f})")
    print(f"{'dropped':>7}  {'loss':>7}  {'increase':>8}")
    for b in range(n_layer):
        loss = evaluate(select([i for i in range(n_layer) if i != b]), tokens, stride)
        sweep_rows.append(dict(dropped=b, loss=loss, increase=loss - base))
        print(f"{b:>7}  {loss:7.4f}  {loss - base:+8.4f}")

lens_rows = []
if logit_lens:
    losses = evaluate(select('all'), tokens, stride, lens=True)
    print("\nlogit lens: next-token loss read from the residual stream (through ln_f and lm_head)")
    print(f"{'after':>11}  {'loss':>7}  {'ppl':>10}")
    for depth, loss in enumerate(losses):
        lens_rows.append(dict(after_block=depth - 1, loss=loss, perplexity=math.exp(min(loss, 700))))
        name = 'embeddings' if depth == 0 else f"block {depth - 1}"
        print(f"{name:>11}  {loss:7.4f}  {math.exp(min(loss, 700)):10.2f}")

if out_json:
    with open(out_json, 'w') as f:
        json.dump(dict(init_from=init_from, eval_text=eval_text, eval_tokens_scored=len(tokens) - 1, stride=stride,
                       seed=seed, start=start, configs=results, sweep=sweep_rows, logit_lens=lens_rows), f, indent=1)
    print(f"wrote {out_json}", file=sys.stderr)

if plot:
    panels = 1 + bool(sweep_rows) + bool(lens_rows)
    fig, ax = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    ax = ax[0]
    ax[0].bar([r['spec'] for r in results], [r['perplexity'] for r in results], color='tab:blue')
    ax[0].set(title=f"perplexity on {os.path.basename(eval_text)}", ylabel='perplexity', yscale='log')
    for i, r in enumerate(results):
        ax[0].text(i, r['perplexity'], f"{r['perplexity']:.1f}", ha='center', va='bottom')
    k = 1
    if sweep_rows:
        ax[k].bar([r['dropped'] for r in sweep_rows], [r['increase'] for r in sweep_rows], color='tab:red')
        ax[k].set(title='loss increase when one block is dropped', xlabel='dropped block', ylabel='loss increase (nats)',
                  xticks=[r['dropped'] for r in sweep_rows])
        k += 1
    if lens_rows:
        ax[k].plot([r['after_block'] + 1 for r in lens_rows], [r['loss'] for r in lens_rows], marker='o')
        ax[k].set(title='logit lens: loss from the residual stream', xlabel='blocks applied', ylabel='loss (nats)',
                  xticks=[r['after_block'] + 1 for r in lens_rows])
    fig.tight_layout()
    fig.savefig(plot, dpi=110)
    plt.close(fig)
    print(f"wrote {plot}", file=sys.stderr)
