"""
Probe a model's token embedding matrix (wte) for common and rare words: their token ids and BPE pieces,
the norm of their vectors and where it falls in the whole vocabulary, cosine similarities within and
between the groups, and each word's nearest neighbours.
    python probe_embeddings.py --init_from=gpt2 --out_json=probe.json --plot=probe.png
GPT-2's BPE makes " dog" (mid-sentence, with its leading space) and "dog" (start of text) different
tokens, and splits rare words into several pieces, so every word is probed in both forms.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

from load import check_output, load_model
from model import GPT

# -----------------------------------------------------------------------------
init_from = 'gpt2'  # 'resume', a .pt file, a GPT-2 name, a Hub repo id, or a local folder (as in sample.py)
out_dir = 'out'  # where init_from='resume' finds ckpt.pt
words_common: str | tuple | list = 'dog,city,book,love,science'  # comma-separated words
words_rare: str | tuple | list = 'xqzt,blorpt,thraldor,uvuvwevwe,zzzzz'  # comma-separated rare or made-up words
subtoken: str | None = None  # vector of a word of several pieces: 'first' piece or 'mean' (None: 'first', 'mean' for characters)
form = 'space'  # which form the cosine matrices compare: 'space' (" dog", mid-sentence) or 'start' ("dog")
neighbours = 5  # nearest vocabulary tokens (by cosine) to list for each word
out_json: str | None = None  # write every number to this JSON file
plot: str | None = None  # write a figure to this PNG file (needs matplotlib)
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------


def die(msg):
    sys.exit(f"probe_embeddings.py: error: {msg}")


def word_list(name, value):
    words = [w.strip() for w in value.split(',')] if isinstance(value, str) else [str(w).strip() for w in value]
    words = [w for w in words if w]
    if not words:
        die(f"{name} is empty; give comma-separated words, e.g. --{name}=dog,city")
    return words


groups = {'common': word_list('words_common', words_common), 'rare': word_list('words_rare', words_rare)}
if subtoken not in (None, 'first', 'mean'):
    die(f"subtoken={subtoken!r} must be 'first' or 'mean'")
if form not in ('space', 'start'):
    die(f"form={form!r} must be 'space' or 'start'")
if neighbours < 0:
    die(f"neighbours={neighbours} must be >= 0")
try:
    for name, path in (('out_json', out_json), ('plot', plot)):
        if path:
            check_output(path, name)
except ValueError as e:
    die(e)
if plot:
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        die("plot needs matplotlib, which is not installed: pip install matplotlib")

try:
    model, tokenizer, _ = load_model(init_from, out_dir)
except (OSError, ValueError) as e:
    die(e)
if not isinstance(model, GPT):
    die(f"init_from={init_from!r} is a {type(model).__name__}; the probe reads a GPT's token embeddings (wte)")
subtoken = subtoken or ('mean' if tokenizer.chars is not None else 'first')  # a character word's first piece is ' '
# the base id of each wte row: all of GPT-2's ids, the ids a compacted vocabulary kept, or a character's id.
# Rows past the tokenizer's vocabulary (nanoGPT pads 50257 to 50304) are never used: leave them out.
row_ids = tokenizer.row_ids()
wte = model.transformer.wte.weight.detach().float()[:len(row_ids)]
norms = wte.norm(dim=1)
unit = F.normalize(wte, dim=1)


def spearman(a, b):
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties broken by order; the norms
    are real numbers, so there are none to speak of)."""
    ra = torch.empty_like(a).scatter_(0, a.argsort(), torch.arange(len(a), dtype=a.dtype))
    rb = torch.empty_like(b).scatter_(0, b.argsort(), torch.arange(len(b), dtype=b.dtype))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm())).item()


# every word in both forms: ids, pieces, the vector's norm and percentile, nearest neighbours
rows, vectors = [], {}
for group, words in groups.items():
    for word in words:
        for f, text in (('space', ' ' + word), ('start', word)):
            ids, pieces = tokenizer.split(text)
            row = dict(word=word, group=group, form=f, ids=ids, pieces=pieces, n_pieces=len(ids),
                       norm=None, norm_percentile=None, neighbours=[])
            rows.append(row)
            model_ids = tokenizer.to_model_ids(ids)
            if model_ids is None:  # a compacted vocabulary lacks one of the pieces
                vectors[(group, word, f)] = None
                continue
            v = wte[model_ids[0]] if subtoken == 'first' else wte[model_ids].mean(dim=0)
            cos = unit @ F.normalize(v, dim=0)
            cos[model_ids] = -2.0  # a word's own pieces are not its neighbours
            top = torch.topk(cos, min(neighbours, len(cos)))
            row.update(norm=v.norm().item(), norm_percentile=100.0 * (norms <= v.norm()).float().mean().item(),
                       neighbours=[dict(id=row_ids[i], piece=tokenizer.piece(row_ids[i]), cosine=c)
                                   for c, i in zip(top.values.tolist(), top.indices.tolist())])
            vectors[(group, word, f)] = v


def cosine_matrix(a, b):
    """Cosines between the vectors of keys a and b (words in the vocabulary)."""
    def unit(keys):
        return F.normalize(torch.stack([vectors[k] for k in keys]), dim=1) if keys else torch.zeros(0, wte.size(1))
    return unit(a) @ unit(b).T


def mean_off_diagonal(m):
    off = m[~torch.eye(m.size(0), dtype=torch.bool)]
    return off.mean().item() if len(off) else None


# words whose pieces a (compacted or character) vocabulary lacks are left out of the cosines, and listed
present = {g: [w for w in words if vectors[(g, w, form)] is not None] for g, words in groups.items()}
missing = [w for g, words in groups.items() for w in words if w not in present[g]]
keys = {g: [(g, w, form) for w in words] for g, words in present.items()}
cos_common = cosine_matrix(keys['common'], keys['common'])
cos_rare = cosine_matrix(keys['rare'], keys['rare'])
cos_between = cosine_matrix(keys['common'], keys['rare'])
vocab = dict(n_vocab=len(norms), norm_mean=norms.mean().item(), norm_std=norms.std().item(),
             norm_min=norms.min().item(), norm_max=norms.max().item(),
             spearman_id_norm=spearman(torch.tensor(row_ids, dtype=torch.float64), norms.double()))

# -- the table ------------------------------------------------------------------
print(f"token embeddings of {init_from}: {wte.size(0)} x {wte.size(1)}, vector of a split word = {subtoken} piece"
      f"{'s' if subtoken == 'mean' else ''}")
ww = max(len('word'), *(len(r['word']) for r in rows))
wi = max(len('ids'), *(len(str(r['ids'])) for r in rows))
wp = max(len('pieces'), *(len(str(r['pieces'])) for r in rows))
print(f"{'word':<{ww}}  {'group':<6} {'form':<5} {'ids':<{wi}}  {'pieces':<{wp}}  {'n':>2} {'norm':>6} {'pct':>5}  "
      f"nearest (cosine)")
for r in rows:
    near = ', '.join(f"{n['piece']!r} {n['cosine']:.2f}" for n in r['neighbours'][:3])
    numbers = f"{r['norm']:6.3f} {r['norm_percentile']:5.1f}" if r['norm'] is not None else "   not in vocabulary"
    print(f"{r['word']:<{ww}}  {r['group']:<6} {r['form']:<5} {str(r['ids']):<{wi}}  {str(r['pieces']):<{wp}}  "
          f"{r['n_pieces']:>2} {numbers}  {near}")


def show(name, m, row_words, col_words):
    print(f"\ncosine similarity, {name} ({form} form):")
    w = max([6] + [len(w) for w in row_words + col_words]) + 1  # columns as wide as the longest word
    print(' ' * w + ''.join(f"{c:>{w}}" for c in col_words))
    for word, row in zip(row_words, m.tolist()):
        print(f"{word:<{w}}" + ''.join(f"{c:{w}.3f}" for c in row))


def fmt(x):
    return 'n/a' if x is None else f"{x:.3f}"


mean_between = cos_between.mean().item() if cos_between.numel() else None
if missing:
    print(f"\nnot in this model's vocabulary, left out of the cosines: {', '.join(missing)}")
show('common words', cos_common, present['common'], present['common'])
show('rare words', cos_rare, present['rare'], present['rare'])
show('common x rare', cos_between, present['common'], present['rare'])
print(f"\nmean off-diagonal cosine: common {fmt(mean_off_diagonal(cos_common))}, rare "
      f"{fmt(mean_off_diagonal(cos_rare))}, between groups {fmt(mean_between)}")
print(f"vocabulary: {vocab['n_vocab']} rows, norm mean {vocab['norm_mean']:.3f}, std {vocab['norm_std']:.3f}, "
      f"range {vocab['norm_min']:.3f}-{vocab['norm_max']:.3f}; Spearman(token id, norm) = "
      f"{vocab['spearman_id_norm']:.3f}" + (" (ids follow BPE merge order, a proxy for frequency)" if tokenizer.chars is None
                                              else " (character ids are in sorted order)"))

if out_json:
    result = dict(init_from=init_from, subtoken=subtoken, words=rows,
                  cosine=dict(form=form, words_common=present['common'], words_rare=present['rare'], missing=missing,
                              common=cos_common.tolist(), rare=cos_rare.tolist(), between=cos_between.tolist(),
                              mean_offdiag_common=mean_off_diagonal(cos_common),
                              mean_offdiag_rare=mean_off_diagonal(cos_rare), mean_between=mean_between),
                  vocab=vocab)
    with open(out_json, 'w') as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {out_json}", file=sys.stderr)

if plot:
    fig, ax = plt.subplots(2, 2, figsize=(13, 10))
    chosen = [r for r in rows if r['form'] == form and r['norm'] is not None]
    ax[0, 0].hist(norms.numpy(), bins=100, color='0.7')
    for r in chosen:
        ax[0, 0].axvline(r['norm'], color='tab:blue' if r['group'] == 'common' else 'tab:red', lw=1)
        ax[0, 0].text(r['norm'], ax[0, 0].get_ylim()[1] * 0.95, r['word'], rotation=90, va='top', fontsize=8)
    ax[0, 0].set(title='norms of all vocabulary rows (blue: common, red: rare)', xlabel='L2 norm', ylabel='tokens')
    for a, m, name in ((ax[0, 1], cos_common, 'common'), (ax[1, 0], cos_rare, 'rare')):
        if not present[name]:
            a.text(0.5, 0.5, f"no {name} word is in this model's vocabulary", ha='center', va='center')
            a.set_axis_off()
            continue
        im = a.imshow(m.numpy(), vmin=-1, vmax=1, cmap='RdBu_r')
        a.set_xticks(range(len(present[name])), present[name], rotation=45)
        a.set_yticks(range(len(present[name])), present[name])
        for (i, j), c in zip([(i, j) for i in range(m.size(0)) for j in range(m.size(1))], m.flatten().tolist()):
            a.text(j, i, f"{c:.2f}", ha='center', va='center', fontsize=8, color='w' if abs(c) > 0.6 else 'k')
        a.set_title(f"cosine similarity, {name} words ({form} form)"
                    + (f"\nnot in the vocabulary: {', '.join(w for w in groups[name] if w not in present[name])}"
                       if len(present[name]) < len(groups[name]) else ''))
        fig.colorbar(im, ax=a)
    ax[1, 1].scatter(row_ids, norms.numpy(), s=1, alpha=0.3, color='0.5')
    for r in chosen:
        color = 'tab:blue' if r['group'] == 'common' else 'tab:red'
        ax[1, 1].scatter([r['ids'][0]], [r['norm']], s=25, color=color)
        ax[1, 1].annotate(r['word'], (r['ids'][0], r['norm']), xytext=(4, 4), textcoords='offset points', fontsize=8,
                          color=color)
    ax[1, 1].set(title=f"norm vs token id (Spearman {vocab['spearman_id_norm']:.2f})", xlabel='token id',
                 ylabel='L2 norm')
    fig.tight_layout()
    fig.savefig(plot, dpi=110)
    plt.close(fig)
    print(f"wrote {plot}", file=sys.stderr)
