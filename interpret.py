"""
Look inside a model: every head's attention pattern for a prompt, and a sparse autoencoder's features.
    python interpret.py --init_from=gpt2 --prompt="The cat sat on the mat because it was tired."
    python interpret.py --init_from=resume --out_dir=out-pico-tiny --sae=True --sae_html=features.html
Attention maps: one figure of layers x heads, each the (T x T) causal matrix that mixes the values (softmax's
probabilities; for the linear family (linear, GLA, DeltaNet, Gated DeltaNet), their equivalent weights, see
attention_weights).
Sparse autoencoder (Bricken et al. 2023, "Towards Monosemanticity", transformer-circuits.pub): a wide ReLU
layer trained to rebuild one layer's activations from few active features, x_hat = W_dec relu(W_enc (x - b_dec)
+ b_enc) + b_dec, with an L1 penalty on the features and unit-norm decoder columns.
"""
import html
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import fast_cpu
from load import check_output, find_data_folder, load_model, pick_device, read_data_folder
from model import GPT, CausalSelfAttention, LSTMSeqModel, apply_rope, delta_rule_chunked, gated_scores

# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume', a .pt file, a GPT-2 name, a Hub repo id, or a local folder (as in sample.py)
out_dir = 'out'  # where init_from='resume' finds ckpt.pt
prompt = 'Once upon a time, there was a little girl named Lily. She loved to play with her ball.'  # for the maps
attention_png: str | None = 'attention.png'  # every head's pattern for the prompt (a bare name: in the run's folder; None: skip)
sae = False  # train a sparse autoencoder on one layer's activations
sae_layer = -1  # the block whose output (residual stream) it reads; -1: the last (an LSTM: its hidden state)
sae_data = 'tinystories'  # its tokens: a data folder (a path, or NAME for data/NAME; bundled ones prepare themselves), or a text file
sae_tokens = 200000  # activations to train on
sae_eval_tokens = 20000  # held-out activations for the metrics and the feature pages
sae_features = 1024  # dictionary size
sae_l1 = 1.0  # weight of the L1 penalty (activations scaled to mean norm sqrt(width)): sparsity vs reconstruction
sae_lr = 1e-3  # Adam learning rate
sae_batch = 1024  # activations per step
sae_epochs = 10  # passes over the sae_tokens activations
top_features = 24  # features shown in the HTML page (those with the most activation on held-out text)
examples_per_feature = 8  # top-activating tokens shown per feature, each with its context
sae_html = 'features.html'  # the page of top features (a bare name: in the run's folder)
out_json: str | None = None  # write the SAE's metrics here (a bare name: in the run's folder)
seed = 1337
device = 'auto'  # 'cpu', 'cuda', 'mps'; 'auto' picks cuda > mps > cpu
dtype = 'float32'  # the weights: 'float32', 'bfloat16', 'float16', or 'int8' (CPU: fast_cpu.quantize_int8)
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------


def die(msg):
    sys.exit(f"interpret.py: error: {msg}")


# outputs go with the model they describe: a bare file name into the run's folder (out_dir for 'resume', a
# checkpoint's folder), and for a Hub model into the current folder
run_name = out_dir if init_from == 'resume' else init_from
run_dir = out_dir if init_from == 'resume' else os.path.dirname(init_from) if init_from.endswith('.pt') else '.'
attention_png, sae_html, out_json = (p if p is None or os.path.dirname(p) else os.path.join(run_dir, p)
                                     for p in (attention_png, sae_html, out_json))
try:  # every setting, and that the outputs can be written, before the work
    device = pick_device(device)
    fast_cpu.check_dtype(dtype, device)
    for name, path in (('attention_png', attention_png), ('out_json', out_json), ('sae_html', sae and sae_html)):
        if path:
            check_output(path, name)
except ValueError as e:
    die(e)
for name in ('sae_tokens', 'sae_eval_tokens', 'sae_features', 'sae_batch', 'sae_epochs', 'top_features',
             'examples_per_feature'):
    if globals()[name] < 1:
        die(f"{name}={globals()[name]} must be >= 1")
if not sae_lr > 0 or not sae_l1 >= 0:
    die(f"sae_lr={sae_lr} must be > 0 and sae_l1={sae_l1} >= 0")
if attention_png:
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        die("attention maps need matplotlib, which is not installed: pip install matplotlib (or --attention_png=None)")
sae_folder = None
if sae and not os.path.isfile(sae_data):
    try:
        sae_folder = find_data_folder(sae_data)
    except FileNotFoundError as e:
        die(f"sae_data: {e} (or give a text file)")
torch.manual_seed(seed)
try:
    model, tokenizer, _ = load_model(init_from, out_dir)
    prompt_ids = tokenizer.encode(prompt)
except (OSError, ValueError) as e:
    die(e)
try:
    fast_cpu.cast(model.eval(), dtype, device)
except ValueError as e:
    die(e)

# -- attention maps ----------------------------------------------------------------------------------------


def attention_weights(attn, x, rope=None):
    """The (B, n_head, T, T) causal matrix by which an attention layer mixes its values for input x:
    - softmax attention: its probabilities, softmax(q k^T / sqrt(d)) under the causal mask;
    - linear attention: phi(q_t) . phi(k_s), rotated by RoPE, over the normalizer phi(q_t) . sum_s phi(k_s)
      (not rotated; RoFormer eq. 19): rows sum to 1 without RoPE;
    - GLA: q_t . (decay * k_s), which multiplies v before the head norm and output gate; it has signs;
    - DeltaNet, Gated DeltaNet: the matrix W with o = W v that the delta rule's unrolled form gives
      (delta_rule_chunked with one chunk: the decayed scores times the UT transform times b); it has signs."""
    if isinstance(attn, CausalSelfAttention):
        q, k, _ = attn.qkv(x, rope)
        future = torch.full((q.size(2), q.size(2)), float('-inf'), device=x.device).triu(1)  # the causal mask
        return ((q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1)) + future).softmax(dim=-1)
    q, k, _ = attn.qkv(x)
    rq, rk = (q, k) if rope is None else (apply_rope(q, *rope), apply_rope(k, *rope))
    if attn.delta:  # the output is linear in the values: the outputs for identity values are the weights
        eye = torch.eye(q.size(2), dtype=q.dtype, device=q.device).expand(*q.shape[:2], -1, -1)
        return delta_rule_chunked(rq, rk, eye, attn.beta(x), attn.log_decay(x) if attn.gated else None, q.size(2))[0]
    if attn.gated:
        return gated_scores(rq, rk, attn.log_decay(x).cumsum(dim=2))
    return (rq @ rk.transpose(-1, -2)).tril() / (q @ k.transpose(-1, -2)).tril().sum(dim=-1, keepdim=True)


if attention_png:
    if not isinstance(model, GPT):
        print(f"no attention maps: a {type(model).__name__} has no attention", file=sys.stderr)
    else:
        idx = torch.tensor([prompt_ids[:model.config.block_size]], device=device)
        inputs = []  # what each block's attention receives: (x, start_pos, rope)
        hooks = [b.attn.register_forward_pre_hook(lambda m, args: inputs.append(args)) for b in model.transformer.h]
        with torch.no_grad():
            model(idx)
            maps = [attention_weights(b.attn, args[0], args[2])[0].float().cpu()
                    for b, args in zip(model.transformer.h, inputs)]
        for h in hooks:
            h.remove()
        labels = [tokenizer.decode([i]).replace('\n', '\\n') for i in idx[0].tolist()]
        L, H, T = len(maps), maps[0].size(0), len(labels)
        # a slide's figure: panels of at least 2.4 inches, token labels of 7-10 points, one scale for every head
        # with its colorbar (GLA's weights have signs, having no softmax nor positive feature map: red +, blue -)
        size, font = max(2.4, 0.13 * T), max(7, min(10, 180 / T))
        fig, axes = plt.subplots(L, H, figsize=(1.5 + size * H, 1.0 + size * L), squeeze=False)
        top = max(max(w.abs().max().item() for w in maps), 1e-9)
        signed = min(w.min().item() for w in maps) < 0
        style = dict(cmap='RdBu_r', vmin=-top, vmax=top) if signed else dict(cmap='viridis', vmin=0, vmax=top)
        for layer in range(L):
            for head in range(H):
                ax = axes[layer][head]
                image = ax.imshow(maps[layer][head].numpy(), **style)
                ax.set_xticks(range(T), labels if layer == L - 1 else [], rotation=90, fontsize=font)
                ax.set_yticks(range(T), labels if head == 0 else [], fontsize=font)
                if layer == 0:
                    ax.set_title(f"head {head}", fontsize=11)
                if head == 0:
                    ax.set_ylabel(f"layer {model.layer_ids[layer]}", fontsize=11)
        kind = model.config.attention
        fig.colorbar(image, ax=axes, shrink=0.6, label='weight' + (' (signed: + red, - blue)' if signed else ''))
        fig.suptitle(f"{run_name}: {kind} attention" + (" (equivalent causal weights)" if kind != 'softmax' else "") +
                     "; rows: query token, columns: key token", fontsize=12)
        fig.savefig(attention_png, dpi=100, bbox_inches='tight')
        plt.close(fig)
        print(f"wrote {attention_png}: {L} layers x {H} heads, {T} tokens", file=sys.stderr)

if not sae:
    sys.exit(0)

# -- the activations the SAE reads -------------------------------------------------------------------------
if isinstance(model, GPT):
    n_layers = len(model.transformer.h)
    if not -n_layers <= sae_layer < n_layers:
        die(f"sae_layer={sae_layer} is out of range: this model has {n_layers} blocks (0-{n_layers - 1}, or -1)")
    layer = sae_layer % n_layers
    context_len = model.config.block_size
    where = f"the residual stream after block {model.layer_ids[layer]}"
elif isinstance(model, LSTMSeqModel):
    context_len = 256
    where = "the LSTM's hidden state"
else:
    die(f"the SAE reads a Transformer's residual stream or an LSTM's hidden state, not a {type(model).__name__}")


@torch.no_grad()
def activations(idx):
    """The activations the SAE works on, (B, T, width), for token ids idx (B, T)."""
    if isinstance(model, GPT):
        return model.residual_stream(idx)[layer + 1]
    return model.lstm(model.embedding(idx))[0]


@torch.no_grad()
def loss_with(idx, replace=None):
    """The next-token loss of idx, with the activations replaced by replace(activations) if given."""
    h = activations(idx)
    if replace is not None:
        h = replace(h)
    if isinstance(model, GPT):
        rope = model.embed(idx)[1]
        for block in model.transformer.h[layer + 1:]:  # the rest of the model, from that layer on
            h = block(h, None, rope)
        logits = model.lm_head(model.transformer.ln_f(h))
    else:
        logits = model.linear(h)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), idx[:, 1:].reshape(-1)).item()


# tokens: a data folder's train.bin (its ids mapped into the model's vocabulary) or a text file
if sae_folder:
    try:
        vocab, splits = read_data_folder(sae_folder, check=False)  # only the ids it reads are checked, below
        table = tokenizer.table(vocab)
    except (OSError, ValueError) as e:
        die(f"sae_data {sae_folder}: {e}")
    raw = torch.from_numpy(splits['train'][:sae_tokens + sae_eval_tokens + context_len].astype(np.int64))
    ids = table[raw.clamp(max=len(table) - 1)]
    if raw.numel() and raw.max() >= len(table) or (ids < 0).any():
        die(f"{sae_data} has tokens this model's vocabulary ({tokenizer.describe()}) lacks; use the data it was "
            f"trained on")
    ids = ids.tolist()
else:
    with open(sae_data, encoding='utf-8') as f:
        try:
            ids = tokenizer.encode(f.read())
        except ValueError as e:
            die(e)
need = sae_tokens + sae_eval_tokens
if len(ids) < need // 2:
    die(f"{sae_data} has {len(ids)} tokens; the SAE needs about sae_tokens + sae_eval_tokens = {need}")
n_windows = len(ids) // context_len
if n_windows < 2:
    die(f"{sae_data} has {len(ids)} tokens: the SAE needs at least two windows of {context_len} tokens "
        f"(one to train on, one held out)")
windows = torch.tensor(ids[:n_windows * context_len], device=device).view(n_windows, context_len)
n_eval = max(1, min(n_windows // 2, math.ceil(sae_eval_tokens / context_len)))
train_windows, eval_windows = windows[:-n_eval][:math.ceil(sae_tokens / context_len)], windows[-n_eval:]
t0 = time.time()
acts = torch.cat([activations(w[None])[0] for w in train_windows]).float()
eval_acts = torch.cat([activations(w[None])[0] for w in eval_windows]).float()
width = acts.size(1)
print(f"SAE on {where}: {len(acts)} training and {len(eval_acts)} held-out activations of width {width} "
      f"({time.time() - t0:.1f} s); {sae_features} features, l1 {sae_l1}", file=sys.stderr)

# -- the sparse autoencoder -----------------------------------------------------------------------------
scale = acts.norm(dim=1).mean() / math.sqrt(width)  # so that sae_l1 means the same at every layer and width
x_all = acts / scale
W_enc = torch.nn.Parameter(torch.randn(width, sae_features, device=device) / math.sqrt(width))
W_dec = torch.nn.Parameter(W_enc.detach().T.clone())  # tied at init, as Anthropic's
b_enc = torch.nn.Parameter(torch.zeros(sae_features, device=device))
b_dec = torch.nn.Parameter(x_all.mean(dim=0).clone())  # centred on the data


def normalize_decoder():
    with torch.no_grad():
        W_dec.div_(W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))


def encode(x):
    return F.relu((x - b_dec) @ W_enc + b_enc)


def decode(f):
    return f @ W_dec + b_dec


normalize_decoder()
opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=sae_lr)
steps = sae_epochs * math.ceil(len(x_all) / sae_batch)
g = torch.Generator(device='cpu').manual_seed(seed)
t0 = time.time()
for step in range(steps):
    x = x_all[torch.randint(len(x_all), (sae_batch,), generator=g).to(device)]
    f = encode(x)
    mse = (decode(f) - x).pow(2).sum(dim=1).mean()
    l1 = f.sum(dim=1).mean()  # decoder columns have unit norm, so this is Anthropic's sum |f_i| ||W_dec,i||
    loss = mse + sae_l1 * l1
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    normalize_decoder()
    if step % max(1, steps // 10) == 0 or step == steps - 1:
        print(f"sae step {step + 1}/{steps}: reconstruction {mse.item():.4f}, L1 {l1.item():.2f}, "
              f"L0 {(f > 0).float().sum(dim=1).mean().item():.1f}, {time.time() - t0:.1f} s", file=sys.stderr)

# -- metrics on held-out activations ---------------------------------------------------------------------
with torch.no_grad():
    xe = eval_acts / scale
    fe = encode(xe)
    xe_hat = decode(fe)
    variance_explained = 1 - (xe - xe_hat).pow(2).sum().item() / (xe - xe.mean(dim=0)).pow(2).sum().item()
    l0 = (fe > 0).float().sum(dim=1).mean().item()
    fires = (fe > 0).float().mean(dim=0)  # share of held-out tokens on which each feature is active
    dead = (fires == 0).float().mean().item()
    base = sum(loss_with(w[None]) for w in eval_windows) / len(eval_windows)
    spliced = sum(loss_with(w[None], lambda h: decode(encode(h.float() / scale)) * scale) for w in eval_windows) / len(eval_windows)
    ablated = sum(loss_with(w[None], lambda h: torch.zeros_like(h) + acts.mean(dim=0)) for w in eval_windows) / len(eval_windows)
metrics = dict(where=where, features=sae_features, l1=sae_l1, train_activations=len(acts),
               eval_activations=len(eval_acts), variance_explained=variance_explained, mean_l0=l0,
               dead_feature_share=dead, loss=base, loss_with_sae=spliced, loss_increase=spliced - base,
               loss_mean_ablation=ablated)
print(f"held out: variance explained {variance_explained:.3f}, mean L0 {l0:.1f} of {sae_features}, dead features "
      f"{100 * dead:.1f}%; next-token loss {base:.4f} -> {spliced:.4f} with the SAE's reconstruction "
      f"(+{spliced - base:.4f}; replacing the activations by their mean: {ablated:.4f})")
if out_json:
    with open(out_json, 'w') as f:
        json.dump(metrics, f, indent=1)

# -- the page of top features -------------------------------------------------------------------------------
eval_tokens = eval_windows.reshape(-1).tolist()
ranked = torch.argsort(fe.sum(dim=0), descending=True)[:top_features].tolist()
pieces = [tokenizer.decode([t]) for t in eval_tokens]
parts = [f"<h1>Sparse autoencoder features</h1><p>{html.escape(str(init_from))}, {html.escape(where)}: "
         f"{sae_features} features trained on {len(acts):,} activations; on {len(eval_acts):,} held-out tokens "
         f"the reconstruction explains {100 * variance_explained:.1f}% of the variance with {l0:.1f} active "
         f"features per token on average, {100 * dead:.1f}% of the features never fire, and the next-token loss "
         f"rises from {base:.3f} to {spliced:.3f} when the reconstruction replaces the activations.</p>"]
for feat in ranked:
    a = fe[:, feat]
    top = torch.argsort(a, descending=True)[:examples_per_feature].tolist()
    parts.append(f"<h2>feature {feat}</h2><p>active on {100 * fires[feat].item():.2f}% of tokens, "
                 f"max {a.max().item():.2f}</p><ol>")
    for i in top:
        lo, hi = max(0, i - 12), min(len(pieces), i + 4)
        spans = []
        for j in range(lo, hi):
            alpha = min(1.0, a[j].item() / max(a.max().item(), 1e-9))
            style = f"background: rgba(255, 140, 0, {alpha:.2f})" + ("; border-bottom: 2px solid black" if j == i else "")
            spans.append(f"<span style='{style}'>{html.escape(pieces[j]).replace(chr(10), '&#x21b5;')}</span>")
        parts.append(f"<li><code>{a[i].item():.2f}</code> {''.join(spans)}</li>")
    parts.append("</ol>")
page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>SAE features</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto} li{margin:.3em 0;white-space:pre-wrap}"
        "span{font-family:monospace}</style></head><body>" + '\n'.join(parts) + "</body></html>")
with open(sae_html, 'w', encoding='utf-8') as f:
    f.write(page)
print(f"wrote {sae_html}: the {len(ranked)} features with the most activation", file=sys.stderr)
