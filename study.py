"""
The course's studies that need many samples or many training runs, each ending in a JSON file and a figure:
    python study.py --study=top_p --out_dir=out-pico-tiny       # sample one model at every temperature x p
    python study.py --study=overfitting                         # train on 5K..320K tokens: train/val gap, copying
    python study.py --study=sweep --runs="learning_rate=1e-3;learning_rate=3e-3;learning_rate=1e-2"
    python study.py --study=attention     # softmax, linear, GLA, DeltaNet, Gated DeltaNet: loss, recall, decode cost
top_p writes top_p.json and top_p.png into the run's folder; overfitting and sweep train with train.py (one
process per run, from the config file base) into study_dir and write their JSON and figure there.
Measures, per sample (the prompt left out) and averaged: distinct-n (Li et al. 2016, arXiv 1510.03055), the
share of tokens inside a repeated 4-gram, self-perplexity (the model's own perplexity of what it sampled:
Holtzman et al. 2020, arXiv 1904.09751, show that low p gives text far likelier than human text, high p text
far less likely), and for a training run the share of the sample's 8-grams found verbatim in its training set.
attention trains each attention kind on TinyStories (val loss, tokens/s) and on multi-query associative recall
(data/make_mqar.py; the share of answers the model gets right, teacher-forced) at each number of key-value
pairs, and times decoding at several positions (bench.py --bench=attention); attention.json and attention.png.
"""
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
# -----------------------------------------------------------------------------
study = 'top_p'  # 'top_p', 'overfitting', 'sweep' or 'attention'
# top_p: one trained model sampled at every temperature x p
init_from = 'resume'  # 'resume', a .pt file, a GPT-2 name, a Hub repo id, or a local folder (as in sample.py)
out_dir = 'out-pico-tiny'  # where init_from='resume' finds ckpt.pt; top_p.json and top_p.png go there too
top_ps: tuple | float = (0.1, 0.3, 0.5, 0.8, 0.9, 0.95, 1.0)  # the p values of nucleus sampling, comma-separated
temperatures: tuple | float = (0.7, 1.0, 1.3)  # the temperatures, comma-separated
# every study's samples
start = 'Once upon a time'  # the prompt, or "FILE:prompt.txt"
num_samples = 10  # samples per setting (from the same seed)
max_new_tokens = 100  # tokens per sample
temperature = 1.0  # overfitting, sweep: the samples' temperature
top_p = 0.95  # overfitting, sweep: the samples' p
# overfitting and sweep: train.py runs
base = 'config/pico_tiny.py'  # the config file every run starts from ('' for none; config/x.py is this repo's, ./x.py or /path/x.py yours)
overrides = ''  # train.py settings for every run, space-separated, e.g. 'max_iters=200 eval_interval=50'
train_tokens: tuple | int = (5000, 20000, 80000, 320000)  # overfitting: the training-set sizes (train.py's train_tokens)
runs = 'learning_rate=1e-3;learning_rate=3e-3;learning_rate=1e-2'  # sweep: ';' between runs, ' ' between settings
study_dir = 'out-study'  # overfitting, sweep, attention: the runs (one folder each), JSON and figure go here
# attention: every kind at the same width, depth and steps (base, overrides, then these)
attention_kinds = 'softmax,linear,gla,deltanet,gated_deltanet'  # the kinds compared
stories_overrides = 'max_iters=100 eval_interval=100'  # TinyStories runs (base's dataset)
recall_pairs: tuple | int = (2, 4)  # associative recall: key-value pairs per line, one set of runs each
recall_keys = 40  # recall: distinct keys (and values) of data/make_mqar.py
recall_lines = 20000  # recall: training lines per number of pairs (4,000 were learned by heart within 2,000 steps)
# RoPE: with learned positions softmax recalled 41% after 3,000 steps, with RoPE 72% after 2,000 (4,000 lines, 4 pairs)
recall_overrides = ('n_layer=2 n_embd=64 block_size=64 batch_size=32 max_iters=1000 eval_interval=1000 '
                    'learning_rate=1e-2 warmup_iters=100 pos_emb=rope')  # recall runs
recall_jobs = 2  # recall runs trained at once, the cores shared out (2 threads do little for so small a model)
short_conv = 4  # the linear family's runs (stories and recall): train.py's short_conv, the paper's 4 (0: none)
positions: tuple | int = (100, 1000, 4000)  # decode cost per token at these positions (bench.py's attention bench)
decode_overrides = '--decode_tokens=16 --repeats=1'  # more bench.py settings for the decode timing
seed = 1337
device = 'cpu'  # 'cpu', 'cuda', 'mps' (also given to train.py)
# -----------------------------------------------------------------------------


def distinct_n(tokens, n):
    """Distinct-n (Li et al. 2016): distinct n-grams / all n-grams of one token sequence."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeat_4gram(tokens):
    """Share of tokens that lie inside a 4-gram occurring more than once in the sequence."""
    grams = [tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3)]
    counts = Counter(grams)
    inside = [False] * len(tokens)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            inside[i:i + 4] = [True] * 4
    return sum(inside) / len(tokens) if tokens else 0.0


def ngram_keys(ids, n):
    """One uint64 per n-gram of ids, so that millions of training n-grams fit in an array: the n-gram read as
    a number in base 1,000,003 (> any vocabulary) wraps modulo 2^64, a hash whose collisions are negligible."""
    ids = np.asarray(ids, dtype=np.uint64)
    keys = np.zeros(max(0, len(ids) - n + 1), dtype=np.uint64)
    for j in range(n):
        keys = keys * np.uint64(1_000_003) + ids[j:len(ids) - n + 1 + j]
    return keys


def copied_share(tokens, train_keys, n=8):
    """Share of the n-grams of tokens that occur verbatim in the training set (train_keys: its sorted
    ngram_keys): 0 for new text, 1 for text recited from the training set."""
    keys = ngram_keys(tokens, n)
    return float(np.isin(keys, train_keys).mean()) if len(keys) else 0.0


@torch.no_grad()
def sample_stats(model, prompt_ids, n, new_tokens, temperature, top_p, rng_seed, train_keys=None):
    """Sample n continuations of prompt_ids (one batch, the same seed for every setting) and measure them.
    Returns a dict of the averaged measures and the continuations' token ids."""
    torch.manual_seed(rng_seed)
    device = next(model.parameters()).device
    x = torch.tensor(prompt_ids, dtype=torch.long, device=device)[None].repeat(n, 1)
    out = model.generate(x, new_tokens, temperature=temperature, top_p=top_p)
    gen = out[:, len(prompt_ids):].tolist()
    # self-perplexity: the model's own loss (temperature 1, nothing cut) on each sampled token, given the context
    # generation gave it: all tokens before it, or the last block_size of them
    bs, P, L = model.block_size or out.size(1), len(prompt_ids), out.size(1)
    y = out[:, 1:bs + 1].clone()
    y[:, :P - 1] = -1  # the prompt is not the model's
    nll, count = 0.0, (y != -1).sum().item()
    if count:
        nll = model(out[:, :y.size(1)], y)[1].item() * count
    for t in range(max(bs + 1, P), L):  # past block_size: one window per token, as generation read it
        logits, _ = model(out[:, t - bs:t])
        nll += F.cross_entropy(logits[:, -1].float(), out[:, t], reduction='sum').item()
        count += n
    stats = dict(distinct_1=float(np.mean([distinct_n(g, 1) for g in gen])),
                 distinct_2=float(np.mean([distinct_n(g, 2) for g in gen])),
                 repeat_4gram=float(np.mean([repeat_4gram(g) for g in gen])),
                 self_perplexity=math.exp(nll / count))
    if train_keys is not None:
        stats['copied_8gram'] = float(np.mean([copied_share(g, train_keys) for g in gen]))
    return stats, out.tolist()


def mqar_answers(tokenizer, line):
    """(token ids of an MQAR line from data/make_mqar.py, the positions of its answers): the value that follows
    each key after 'queries:', found as the length of the line's encoding up to that value."""
    words = line.split()
    start = words.index('queries:')
    ids = tokenizer.encode(line)
    answers = [len(tokenizer.encode(' '.join(words[:i]))) for i in range(start + 2, len(words), 2)]
    return ids, answers


@torch.no_grad()
def recall_accuracy(model, rows, batch_size=64):
    """Associative recall, teacher-forced: the share of answer tokens that are the model's argmax given
    everything before them (the line's own tokens, not the model's earlier guesses). rows: (ids, answer
    positions) pairs, as mqar_answers gives them."""
    device = next(model.parameters()).device
    right = total = 0
    by_length = {}
    for ids, answers in rows:
        by_length.setdefault(len(ids), []).append((ids, answers))
    for same in by_length.values():
        for i in range(0, len(same), batch_size):
            batch = same[i:i + batch_size]
            logits, _ = model(torch.tensor([ids for ids, _ in batch], device=device))
            guess = logits.argmax(dim=-1)
            for row, (ids, answers) in enumerate(batch):
                right += sum(int(guess[row, p - 1]) == ids[p] for p in answers)
                total += len(answers)
    return right / total


def as_tuple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


if __name__ == '__main__':
    exec(open(os.path.join(HERE, 'configurator.py')).read())
    from load import check_output, load_model, output_file, pick_device, read_data_folder, read_prompt, refuse_link
    from model import check_sampling_args

    def die(msg):
        sys.exit(f"study.py: error: {msg}")

    def need_matplotlib():
        try:
            import matplotlib
            matplotlib.use('Agg')
            import matplotlib.pyplot as plt
            return plt
        except ImportError:
            die("study.py draws figures with matplotlib, which is not installed: pip install matplotlib")

    def load(init, folder):
        """(model, tokenizer, checkpoint), in eval mode on device, or a one-line error."""
        try:
            model, tokenizer, ckpt = load_model(init, folder)
        except (OSError, ValueError) as e:
            die(e)
        return model.eval().to(device), tokenizer, ckpt

    def encode_prompt(tokenizer):
        try:
            ids = tokenizer.encode(read_prompt(start))
        except (OSError, ValueError) as e:
            die(e)
        if not ids:
            die("the prompt is empty; give --start=...")
        return ids

    def train_run(run_dir, settings, threads=None):
        """Train one run with train.py in a process of its own (its output goes to run_dir/train.out), on
        threads CPU threads if given; returns its last evaluation's numbers from log.csv."""
        os.makedirs(run_dir, exist_ok=True)
        cmd = [sys.executable, os.path.join(HERE, 'train.py'), *([base] if base else []),
               *(f'--{s}' for s in overrides.split() + settings), f'--out_dir={run_dir}', '--overwrite=True',
               f'--device={device}', f'--seed={seed}']
        t0 = time.time()
        refuse_link(os.path.join(run_dir, 'train.out'))  # (written as the run goes, to watch; never through a link)
        with open(os.path.join(run_dir, 'train.out'), 'w') as log:
            env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.PIPE, text=True, env=env)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(('overriding', 'note'))]
            die(f"the run {' '.join(settings) or '(base)'} failed: {lines[-1] if lines else proc.returncode}")
        from plot import read_log
        evals = [r for r in read_log(run_dir) if r['val_loss']]
        last = evals[-1]
        print(f"  {run_dir}: train {float(last['train_loss']):.3f}, val {float(last['val_loss']):.3f} "
              f"({time.time() - t0:.0f} s)")
        return dict(iters=int(last['iter']), tokens_seen=int(last['tokens']), time_s=float(last['time_s']),
                    train_loss=float(last['train_loss']), val_loss=float(last['val_loss']))

    def training_keys(ckpt, tokenizer):
        """The sorted 8-gram keys of what a run trained on (the first train_tokens of each data folder train.py
        read, as the checkpoint records them, in model ids)."""
        keys = []
        for folder in ckpt['data']:
            vocab, splits = read_data_folder(folder, check=False)
            n = ckpt['config']['train_tokens']
            ids = tokenizer.table(vocab)[torch.from_numpy(splits['train'][:n].astype(np.int64))]
            keys.append(ngram_keys(ids.numpy(), 8))
        return np.unique(np.concatenate(keys))

    # -- check the settings before any work ----------------------------------------
    if study not in ('top_p', 'overfitting', 'sweep', 'attention'):
        die(f"study={study!r} is not one of: top_p, overfitting, sweep, attention")
    top_ps, temperatures, train_tokens = as_tuple(top_ps), as_tuple(temperatures), as_tuple(train_tokens)
    recall_pairs, positions = as_tuple(recall_pairs), as_tuple(positions)
    kinds = [k.strip() for k in attention_kinds.split(',') if k.strip()]
    from model import ATTENTION_KINDS
    if study == 'attention' and (not kinds or any(k not in ATTENTION_KINDS for k in kinds)):
        die(f"attention_kinds={attention_kinds!r}: give some of {', '.join(ATTENTION_KINDS)}, comma-separated")
    if not isinstance(recall_jobs, int) or recall_jobs < 1:
        die(f"recall_jobs={recall_jobs} must be a whole number >= 1 (recall runs trained at once)")
    if not isinstance(short_conv, int) or short_conv < 0 or not isinstance(recall_lines, int) or recall_lines < 1:
        die(f"short_conv={short_conv} must be a whole number >= 0 (0: none) and recall_lines={recall_lines} >= 1")
    if any(not isinstance(n, int) or not 1 <= n <= recall_keys for n in recall_pairs):
        die(f"recall_pairs={recall_pairs} must be whole numbers from 1 to recall_keys={recall_keys}")
    try:
        device = pick_device(device)
        for t in temperatures:
            for p in top_ps:
                check_sampling_args(t, None, p, max_new_tokens)
        check_sampling_args(temperature, None, top_p, max_new_tokens)
    except ValueError as e:
        die(e)
    if num_samples < 1:
        die(f"num_samples={num_samples} must be >= 1")
    # a config file is run: a bare relative name is this repo's own (never one the current folder happens to hold);
    # a file of the user's is named as a path, ./my.py or /abs/my.py
    given = base
    if base and not (os.path.isabs(base) or base.startswith(('./', '../', '.' + os.sep, '..' + os.sep))):
        base = os.path.join(HERE, base)
    if base and not os.path.isfile(base):
        die(f"base config file {given!r} not found" + (f" in this repo ({base}); a file of yours is named as a "
                                                       f"path: ./{given}" if base != given else ''))
    if any(not isinstance(n, int) or n < 1 for n in train_tokens):
        die(f"train_tokens={train_tokens} must be whole numbers >= 1, comma-separated")
    run_sets = [r.split() for r in runs.split(';') if r.strip()]
    if study == 'sweep' and not run_sets:
        die("runs is empty; give train.py settings per run, e.g. --runs='learning_rate=1e-3;learning_rate=3e-3'")
    for s in overrides.split() + stories_overrides.split() + recall_overrides.split() + [s for r in run_sets for s in r]:
        if '=' not in s or s.startswith('-'):
            die(f"{s!r} in overrides or runs is not key=value (e.g. learning_rate=1e-3, no leading --)")
    plt = need_matplotlib()
    report_dir = (out_dir if init_from == 'resume' else '.') if study == 'top_p' else study_dir
    try:
        os.makedirs(report_dir, exist_ok=True)
        json_path, png_path = (os.path.join(report_dir, f'{study}.{ext}') for ext in ('json', 'png'))
        for path in (json_path, png_path):
            check_output(path, 'out_dir' if study == 'top_p' else 'study_dir')
    except (OSError, ValueError) as e:
        die(e)

    if study == 'top_p':
        # -- top_p: how the text changes with p (and temperature), one model, the same seed everywhere --------
        model, tokenizer, ckpt = load(init_from, out_dir)
        prompt_ids = encode_prompt(tokenizer)
        val_loss = (ckpt or {}).get('best_val_loss')  # the model's loss on real text, for comparison
        rows = []
        for t in temperatures:
            for p in top_ps:
                stats, seqs = sample_stats(model, prompt_ids, num_samples, max_new_tokens, t, p, seed)
                rows.append(dict(temperature=t, top_p=p, **stats, samples=[tokenizer.decode(s) for s in seqs]))
        print(f"{'temp':>5} {'p':>5} {'dist-1':>7} {'dist-2':>7} {'rep-4':>7} {'self-ppl':>9}  first sample")
        for r in rows:
            text = r['samples'][0][len(read_prompt(start)):].replace('\n', ' ')
            print(f"{r['temperature']:5.2f} {r['top_p']:5.2f} {r['distinct_1']:7.3f} {r['distinct_2']:7.3f} "
                  f"{r['repeat_4gram']:7.3f} {r['self_perplexity']:9.2f}  {text[:90]}")
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        for t in temperatures:
            mine = [r for r in rows if r['temperature'] == t]
            for ax, key in zip(axes, ('distinct_2', 'repeat_4gram', 'self_perplexity')):
                ax.plot([r['top_p'] for r in mine], [r[key] for r in mine], 'o-', label=f"temperature {t:g}")
        for ax, label in zip(axes, ('distinct-2 (higher: more varied)', 'share of tokens in a repeated 4-gram',
                                    'self-perplexity (the model\'s own)')):
            ax.set(xlabel='top-p', title=label)
            ax.grid(alpha=0.3)
        axes[2].set_yscale('log')
        if isinstance(val_loss, float) and math.isfinite(val_loss):  # Holtzman et al.'s point: real text lies between
            axes[2].axhline(math.exp(val_loss), color='gray', ls='--', label=f'on val text ({math.exp(val_loss):.1f})')
            axes[2].legend(fontsize=9)
        axes[0].legend(fontsize=9)
        fig.suptitle(f"{init_from if init_from != 'resume' else out_dir}: {num_samples} samples x {max_new_tokens} "
                     f"tokens per setting, prompt {read_prompt(start)!r}", fontsize=10)
        result = dict(study='top_p', model=init_from if init_from != 'resume' else out_dir, val_loss=val_loss,
                      start=start, num_samples=num_samples, max_new_tokens=max_new_tokens, seed=seed, rows=rows)

    elif study == 'overfitting':
        # -- overfitting: the same model and iterations on less and less data ---------------------------------
        rows = []
        print(f"training {len(train_tokens)} runs into {study_dir} (train.py {base} {overrides})")
        for n in train_tokens:
            run_dir = os.path.join(study_dir, f'tokens-{n}')
            numbers = train_run(run_dir, [f'train_tokens={n}'])
            model, tokenizer, ckpt = load('resume', run_dir)
            stats, seqs = sample_stats(model, encode_prompt(tokenizer), num_samples, max_new_tokens, temperature,
                                       top_p, seed, training_keys(ckpt, tokenizer))
            rows.append(dict(train_tokens=n, **numbers, gap=numbers['val_loss'] - numbers['train_loss'], **stats,
                             samples=[tokenizer.decode(s) for s in seqs]))
        print(f"{'train tokens':>12} {'epochs':>7} {'train':>7} {'val':>7} {'gap':>6} {'dist-2':>7} {'rep-4':>7} "
              f"{'copied-8':>8}")
        for r in rows:
            print(f"{r['train_tokens']:>12,} {r['tokens_seen'] / r['train_tokens']:7.1f} {r['train_loss']:7.3f} "
                  f"{r['val_loss']:7.3f} {r['gap']:6.3f} {r['distinct_2']:7.3f} {r['repeat_4gram']:7.3f} "
                  f"{r['copied_8gram']:8.3f}")
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        x = [r['train_tokens'] for r in rows]
        axes[0].plot(x, [r['train_loss'] for r in rows], 'o-', label='train loss')
        axes[0].plot(x, [r['val_loss'] for r in rows], 'o-', label='val loss')
        axes[0].fill_between(x, [r['train_loss'] for r in rows], [r['val_loss'] for r in rows], alpha=0.15,
                             label='gap (val - train)')
        axes[0].set(xscale='log', xlabel='training-set size (tokens)', ylabel='loss (nats per token)',
                    title='final losses')
        gaps = [r['gap'] for r in rows]
        for key, label in (('copied_8gram', "sample 8-grams found in the training set"),
                           ('distinct_2', 'distinct-2'), ('repeat_4gram', 'tokens in a repeated 4-gram')):
            axes[1].plot(gaps, [r[key] for r in rows], 'o-', label=label)
        for i, r in enumerate(rows):  # each point named by its size, above it, neighbours at two heights
            axes[1].annotate(f"{r['train_tokens']:,} tokens", (r['gap'], r['copied_8gram']), fontsize=8,
                             textcoords='offset points', xytext=(-10, 8 + 12 * (i % 2)))
        axes[1].set(xlabel='train/val gap (nats)', ylim=(0, 1.05),
                    title=f'samples (temperature {temperature:g}, top-p {top_p:g}) against the gap')
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=9)
        what = ' '.join([os.path.basename(base), overrides]).strip()
        fig.suptitle(f"overfitting: {what}, {rows[0]['iters']} iterations "
                     f"({rows[0]['tokens_seen']:,} tokens seen) on each training-set size", fontsize=10)
        result = dict(study='overfitting', base=base, overrides=overrides, start=start, temperature=temperature,
                      top_p=top_p, num_samples=num_samples, max_new_tokens=max_new_tokens, seed=seed, rows=rows)

    elif study == 'attention':
        # -- attention: what each kind learns, what it recalls, what a token costs -----------------------------
        def script(name, *args):
            proc = subprocess.run([sys.executable, os.path.join(HERE, name), *args], capture_output=True, text=True)
            if proc.returncode != 0:
                die(f"{name} {' '.join(args)} failed: {(proc.stderr.strip().splitlines() or [proc.returncode])[-1]}")
        stories, recall = {}, {}
        print(f"training {len(kinds)} kinds on TinyStories and on recall at {recall_pairs} pairs into {study_dir}")
        def conv(kind):  # the short convolution: the linear family's, not softmax attention's
            return [] if kind == 'softmax' else [f'short_conv={short_conv}']
        for kind in kinds:
            numbers = train_run(os.path.join(study_dir, f'stories-{kind}'),
                                stories_overrides.split() + [f'attention={kind}'] + conv(kind))
            stories[kind] = dict(**numbers, tokens_per_s=numbers['tokens_seen'] / numbers['time_s'])
        for n in recall_pairs:
            text, test = (os.path.join(study_dir, f'mqar-{n}{part}.txt') for part in ('', '-test'))
            script(os.path.join('data', 'make_mqar.py'), f'--n_pairs={n}', f'--n_keys={recall_keys}', f'--out={text}',
                   f'--seed={seed}', f'--n_lines={recall_lines}')
            script(os.path.join('data', 'make_mqar.py'), f'--n_pairs={n}', f'--n_keys={recall_keys}', f'--out={test}',
                   f'--seed={seed + 1}', '--n_lines=200')  # other lines than training's: recall, not memory
            folder = os.path.join(study_dir, f'mqar-{n}')
            script(os.path.join('data', 'prepare.py'), f'--source={text}', '--compact_vocab=True', f'--out_dir={folder}')
            run_dirs = [os.path.join(study_dir, f'recall-{n}-{kind}') for kind in kinds]
            threads = max(1, (os.cpu_count() or 1) // recall_jobs) if device == 'cpu' else None
            failed = []  # a failed run ends the study: the runs not started yet never start

            def recall_run(run_dir, kind):
                if failed:
                    return None
                try:
                    return train_run(run_dir, recall_overrides.split() + [f'attention={kind}', f'input_files={folder}',
                                                                          'tinystories_weight=0.0'] + conv(kind), threads)
                except SystemExit:
                    failed.append(run_dir)
                    raise
            with ThreadPoolExecutor(recall_jobs) as pool:  # each thread waits on one train.py process
                done = list(pool.map(recall_run, run_dirs, kinds))
            for kind, run_dir, numbers in zip(kinds, run_dirs, done):
                model, tokenizer, _ = load('resume', run_dir)
                with open(test) as f:
                    rows = [mqar_answers(tokenizer, line.strip()) for line in f if line.strip()]
                if len(rows[0][0]) > model.block_size:
                    die(f"a recall line of {n} pairs is {len(rows[0][0])} tokens, longer than the recall runs' "
                        f"block_size={model.block_size}: raise block_size in recall_overrides, or give fewer pairs")
                recall.setdefault(kind, {})[n] = dict(**numbers, accuracy=recall_accuracy(model, rows))
                print(f"    recall at {n} pairs: {recall[kind][n]['accuracy']:.3f}")
        bench_json = os.path.join(study_dir, 'decode.json')
        script('bench.py', '--bench=attention', f'--attention_kinds={",".join(kinds)}', '--attention_train=False',
               f'--positions={",".join(map(str, positions))}', f'--json_out={bench_json}', f'--short_conv={short_conv}',
               *decode_overrides.split())
        with open(bench_json) as f:
            decode = json.load(f)
        ms = {k: [1000 / decode['decode_tok_s'][str(p)][k] for p in positions] for k in kinds}
        print(f"{'attention':<16} {'val loss':>8} {'tokens/s':>9} " + ' '.join(f"{f'recall@{n}':>9}" for n in recall_pairs) +
              ' ' + ' '.join(f"{f'ms@{p}':>8}" for p in positions))
        for k in kinds:
            print(f"{k:<16} {stories[k]['val_loss']:8.3f} {stories[k]['tokens_per_s']:9,.0f} " +
                  ' '.join(f"{recall[k][n]['accuracy']:9.3f}" for n in recall_pairs) + ' ' +
                  ' '.join(f"{t:8.1f}" for t in ms[k]))
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
        names = {'softmax': 'softmax', 'linear': 'linear', 'gla': 'GLA', 'deltanet': 'DeltaNet',
                 'gated_deltanet': 'Gated DeltaNet'}
        bars = axes[0].bar([names[k] for k in kinds], [stories[k]['val_loss'] for k in kinds],
                           color=[f'C{i}' for i in range(len(kinds))])
        for bar, k in zip(bars, kinds):
            axes[0].annotate(f"{stories[k]['val_loss']:.2f}\n{stories[k]['tokens_per_s']:,.0f} tok/s",
                             (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha='center', va='bottom', fontsize=8)
        low = min(stories[k]['val_loss'] for k in kinds)
        axes[0].set(ylim=(low - 0.5, max(stories[k]['val_loss'] for k in kinds) + 0.3), ylabel='val loss (nats per token)',
                    title=f"TinyStories: val loss, training tokens/s")
        axes[0].tick_params(axis='x', labelsize=8)
        for i, k in enumerate(kinds):
            axes[1].plot(recall_pairs, [recall[k][n]['accuracy'] for n in recall_pairs], 'o-', color=f'C{i}', label=names[k])
            axes[2].plot(positions, ms[k], 'o-', color=f'C{i}', label=names[k])
        axes[1].axhline(1 / recall_keys, color='gray', ls='--', label='chance')
        axes[1].set(xlabel='key-value pairs per line', ylabel='answers right (teacher-forced)', ylim=(0, 1.05),
                    title='associative recall (MQAR)', xticks=recall_pairs)
        axes[2].set(xlabel='position in the text', ylabel='ms per generated token', ylim=(0, None),
                    title=f"decode cost ({decode.get('shape', 'bench.py')}, {decode['machine']}, {decode['threads']} threads)")
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=8)
        fig.suptitle(f"attention kinds at the same width, depth and steps ({os.path.basename(base) or 'no base'} "
                     f"{overrides} {stories_overrides};\nrecall: {recall_overrides}; linear family: short_conv="
                     f"{short_conv})".replace('  ', ' '), fontsize=9)
        result = dict(study='attention', base=base, overrides=overrides, stories_overrides=stories_overrides,
                      recall_overrides=recall_overrides, recall_keys=recall_keys, recall_lines=recall_lines,
                      short_conv=short_conv, seed=seed, kinds=kinds,
                      stories=stories, recall={k: {str(n): r for n, r in v.items()} for k, v in recall.items()},
                      decode=dict(decode, ms_per_token={k: dict(zip(map(str, positions), ms[k])) for k in kinds}))

    else:
        # -- sweep: one run per set of settings, overlaid ------------------------------------------------------
        from plot import plot_runs, read_log
        rows, logs = [], []
        print(f"training {len(run_sets)} runs into {study_dir} (train.py {base} {overrides})")
        for settings in run_sets:
            name = '_'.join(s.replace('=', '-') for s in settings) or 'base'
            run_dir = os.path.join(study_dir, ''.join(c if c.isalnum() or c in '-_.' else '_' for c in name))
            numbers = train_run(run_dir, settings)
            model, tokenizer, _ = load('resume', run_dir)
            stats, seqs = sample_stats(model, encode_prompt(tokenizer), num_samples, max_new_tokens, temperature,
                                       top_p, seed)
            rows.append(dict(settings=' '.join(settings), run=run_dir, **numbers, **stats,
                             samples=[tokenizer.decode(s) for s in seqs]))
            logs.append((' '.join(settings) or 'base', read_log(run_dir)))
        print(f"{'settings':<36} {'train':>7} {'val':>7} {'time_s':>7} {'dist-2':>7} {'self-ppl':>9}")
        for r in rows:
            print(f"{r['settings'][:36]:<36} {r['train_loss']:7.3f} {r['val_loss']:7.3f} {r['time_s']:7.1f} "
                  f"{r['distinct_2']:7.3f} {r['self_perplexity']:9.2f}")
        with output_file(png_path) as tmp:
            plot_runs(logs, tmp, title=f"sweep: {' '.join([os.path.basename(base), overrides]).strip()}")
        fig = None
        result = dict(study='sweep', base=base, overrides=overrides, rows=rows)

    if fig is not None:
        fig.tight_layout()
        with output_file(png_path) as tmp:
            fig.savefig(tmp, dpi=110)
        plt.close(fig)
    with output_file(json_path) as tmp, open(tmp, 'w') as f:
        json.dump(result, f, indent=1)
    print(f"wrote {json_path} and {png_path}", file=sys.stderr)
