"""
Train a model: the course's Transformer, LSTM or k-gram MLP from scratch, or fine-tune GPT-2.
    python train.py config/pico_tiny.py                                     # prepares its bundled data the first time
    python train.py config/pico_tiny.py --init_from=resume --max_iters=2000 # continue
    python train.py --dataset=shakespeare_char                              # nanoGPT's habit: data/shakespeare_char
    torchrun --standalone --nproc_per_node=2 train.py config/pico_tiny.py   # data parallel
Settings are the globals below; a config file and --key=value override them (configurator.py).
"""
import csv
import hashlib
import math
import os
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, replace

import numpy as np
import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

import fast_cpu
from load import (Tokenizer, append_to, build_model, claim_folder, find_data_folder, load_checkpoint, memory_bytes,
                  merged_vocab, output_file, pick_device, read_data_folder, refuse_link, save_checkpoint)
from model import GPT, GPTConfig, check_config
from plot import plot_runs, read_log

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'  # checkpoint, log.csv and loss.png go here
eval_interval = 250  # iterations between evaluations (and checkpoints)
log_interval = 10  # iterations between log lines
eval_iters = 50  # batches per split for each loss estimate
eval_only = False  # evaluate once and exit
always_save_checkpoint = True  # save at every evaluation, not only when val loss improves
init_from = 'scratch'  # 'scratch' or 'resume' (continue out_dir/ckpt.pt exactly where it stopped)
overwrite = False  # init_from='scratch' into an out_dir that holds a run: refused unless True
# data
dataset = 'tinystories'  # a data folder (a path, or NAME for data/NAME; nanoGPT's folders work too), or '' for none
input_files: tuple | list | str = ()  # more data folders (data/prepare.py --source=my.txt), mixed in as the course does
tinystories_weight = 1.0  # probability that a training sequence comes from dataset; the rest come from input_files
train_tokens: int | None = None  # train on only the first train_tokens tokens of each train split (overfitting studies)
batch_size = 16  # sequences per micro-batch
block_size = 128  # tokens per sequence
gradient_accumulation_steps = 1  # micro-batches per optimizer step (divided among processes under torchrun)
# model
model_type = 'transformer'  # 'transformer', 'lstm', 'kgram_mlp', or 'gpt2' (fine-tune pretrained weights)
n_layer = 4  # transformer: blocks
n_head = 4  # transformer: attention heads
n_embd = 128  # transformer: width
dropout = 0.0  # transformer / gpt2: dropout rate
bias = False  # transformer: biases in Linears and norms
norm = 'rmsnorm'  # transformer: 'rmsnorm' (the course's) or 'layernorm' (GPT-2's)
activation = 'gelu'  # transformer: the MLP's GELU, 'gelu' (exact: nanoGPT's, faster on CPUs) or 'gelu_tanh' (GPT-2's)
norm_position = 'pre'  # transformer: 'pre' (GPT-2) or 'post' (the 2017 Transformer)
pos_emb = 'learned'  # transformer: 'learned', 'rope' or 'none' (NoPE)
attention = 'softmax'  # transformer: 'softmax', 'linear', 'gla' (gated linear attention), 'deltanet', 'gated_deltanet'
chunk_size = 16  # transformer with the linear family (linear, gla, deltanet, gated_deltanet): chunk length of the chunked form
short_conv = 0  # transformer, the linear family: kernel of a causal convolution on q, k, v (0: none; the paper's: 4)
embed_size = 128  # lstm, kgram_mlp: embedding width
hidden_size = 256  # lstm: hidden state width
kgram_k = 3  # kgram_mlp: tokens of context
num_inner_mlp_layers = 1  # kgram_mlp: (Linear -> SiLU) layers
pretrained = 'gpt2'  # gpt2: the weights to fine-tune (a GPT-2 name, Hub repo id or folder, as in sample.py)
# optimizer: AdamW with linear warmup and cosine decay (nanoGPT's)
learning_rate = 1e-3  # peak learning rate
max_iters = 2000  # optimizer steps in all
weight_decay = 0.1  # on matrices and embeddings only
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0  # clip gradients to this norm (0: off)
decay_lr = True  # cosine decay after warmup
warmup_iters = 100  # linear warmup steps
lr_decay_iters: int | None = None  # the decay ends here (None: max_iters)
min_lr = 1e-4  # learning rate at the end of the decay
# samples printed at each evaluation (greedy, top-p 0.95 and top-p 1.0, as the course's starter prints)
prompt = 'Once upon a'  # the prompt of those samples
sample_tokens = 30  # tokens per sample
# system
device = 'auto'  # 'cpu', 'cuda', 'cuda:1', 'mps'; 'auto' picks cuda > mps > cpu
dtype = 'auto'  # 'float32', 'bfloat16' or 'float16' (GPU) autocast; 'auto': bfloat16 where the GPU or CPU runs it natively
compile = False  # torch.compile the model (PyTorch 2; on CPU it needs a C++ compiler)
seed = 1337  # every iteration's randomness follows from (seed, iteration): a resumed run repeats an uninterrupted one
_config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str, tuple, list, type(None)))]
_defaults = {k: globals()[k] for k in _config_keys}
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in _config_keys}  # everything above, stored in the checkpoint
# -----------------------------------------------------------------------------


def die(msg):
    sys.exit(f"train.py: error: {msg}")


# -- check the settings before anything is written -----------------------------
if model_type not in ('transformer', 'lstm', 'kgram_mlp', 'gpt2'):
    die(f"model_type={model_type!r} is not one of: transformer, lstm, kgram_mlp, gpt2")
if model_type == 'gpt2' and (norm_position, pos_emb, attention) != ('pre', 'learned', 'softmax'):
    die("norm_position, pos_emb and attention are options of model_type='transformer' (for a GPT-2-shaped one add "
        "--norm=layernorm --bias=True); fine-tuning keeps the pretrained model's architecture")
if init_from not in ('scratch', 'resume'):
    die(f"init_from={init_from!r} must be 'scratch' or 'resume' (fine-tune GPT-2 with model_type='gpt2')")
for name in ('batch_size', 'block_size', 'gradient_accumulation_steps', 'max_iters', 'eval_interval', 'log_interval',
             'eval_iters', 'embed_size', 'hidden_size', 'kgram_k', 'num_inner_mlp_layers'):
    if globals()[name] < 1:
        die(f"{name}={globals()[name]} must be >= 1")
if train_tokens is not None and train_tokens < 1:
    die(f"train_tokens={train_tokens} must be >= 1 (None: the whole train split)")
for name, ok, allowed in (('tinystories_weight', 0 <= tinystories_weight <= 1, 'between 0 and 1'),
                          ('learning_rate', learning_rate > 0, '> 0'), ('min_lr', min_lr >= 0, '>= 0'),
                          ('weight_decay', weight_decay >= 0, '>= 0'), ('beta1', 0 <= beta1 < 1, 'in [0, 1)'),
                          ('beta2', 0 <= beta2 < 1, 'in [0, 1)'), ('grad_clip', grad_clip >= 0, '>= 0 (0: off)'),
                          ('warmup_iters', warmup_iters >= 0, '>= 0'), ('sample_tokens', sample_tokens >= 0, '>= 0'),
                          ('lr_decay_iters', lr_decay_iters is None or lr_decay_iters >= 1, '>= 1 or None')):
    if not ok:  # (NaN fails every comparison, so it is refused too)
        die(f"{name}={globals()[name]} must be {allowed}")
input_files = [f.strip() for f in input_files.split(',') if f.strip()] if isinstance(input_files, str) else \
    [str(f) for f in input_files]  # --input_files=a,b (or --input_files a b) as plot.py and prepare.py read lists
# the Transformer's architecture (the vocabulary comes from the data); values a model cannot have stop here
gpt_config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias, dropout=dropout,
                       activation=activation, norm=norm, norm_position=norm_position, pos_emb=pos_emb,
                       attention=attention, chunk_size=chunk_size, short_conv=short_conv)
if model_type == 'transformer':
    try:
        check_config(gpt_config)
    except ValueError as e:
        die(e)
ckpt_path, log_path = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'log.csv')
if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    die(f"out_dir {out_dir!r} is a file; give a folder for the checkpoint and logs")
if init_from == 'resume' and not os.path.exists(ckpt_path):
    die(f"init_from='resume' but {ckpt_path} does not exist")
if int(os.environ.get('RANK', 0)) == 0:  # (under torchrun, rank 0 writes out_dir for all)
    try:  # claimed before it is looked at: two runs started together would both find it empty
        os.makedirs(out_dir, exist_ok=True)
        claim_folder(out_dir, 'train.py')
    except OSError as e:
        die(f"cannot write into out_dir {out_dir!r} ({e.strerror})")
    except ValueError as e:
        die(e)
found = [f for f in ('ckpt.pt', 'log.csv') if os.path.lexists(os.path.join(out_dir, f))]  # (a dangling link too)
if init_from == 'scratch' and not overwrite and found:
    # nanoGPT would train over it: one forgotten --init_from=resume and the run is gone
    die(f"out_dir {out_dir!r} holds a run already ({found[0]}); --init_from=resume continues it, --overwrite=True "
        f"starts afresh over it, or give another --out_dir")
try:  # what the run will write, refused now rather than at its first save
    for f in ('ckpt.pt', 'log.csv', 'loss.png'):
        refuse_link(os.path.join(out_dir, f))
except ValueError as e:
    die(e)
try:
    device = pick_device(device)
except ValueError as e:
    die(e)

# -- processes and devices: one process, or one per GPU/CPU under torchrun (nanoGPT's DDP set-up) ----------
ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    rank, local_rank, world_size = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    if gradient_accumulation_steps % world_size:  # every process takes the same number of micro-batches
        rounded = -(-gradient_accumulation_steps // world_size) * world_size
        if rank == 0:
            print(f"gradient_accumulation_steps={gradient_accumulation_steps} rounded up to {rounded}, a multiple of the "
                  f"{world_size} processes: {rounded // world_size} micro-batch(es) each per step", file=sys.stderr)
        gradient_accumulation_steps = rounded
    gradient_accumulation_steps //= world_size
else:
    rank, world_size = 0, 1
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else 'mps' if device == 'mps' else 'cpu'
if dtype == 'auto':
    native = torch.cuda.is_bf16_supported() if device_type == 'cuda' else \
        device_type == 'cpu' and model_type in ('transformer', 'gpt2') and fast_cpu.bfloat16_matmul_is_faster()
    if ddp and device_type == 'cpu':  # a timing: every process must train alike, so bfloat16 only if all agree
        flag = torch.tensor(int(native))
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        native = bool(flag)
    dtype = 'bfloat16' if native else 'float32'
ptdtypes = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
if dtype not in ptdtypes:
    die(f"dtype={dtype!r} is not one of {', '.join(ptdtypes)}, auto")
if device_type == 'cpu' and dtype == 'float16':
    die("dtype='float16' trains on a GPU only (CPUs have no fast float16 matmul); on CPU use bfloat16 or float32")
# mixed precision: matmuls in half precision, weights, norms, softmax and the optimizer in float32. On a CPU with
# bfloat16 instructions (AVX512-BF16, AMX) the matmuls run 2x faster (bench.py --bench=train, README)
ctx = nullcontext() if dtype == 'float32' or device_type == 'mps' else torch.autocast(device_type, ptdtypes[dtype])
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

# -- data: every source is a data folder: train.bin / val.bin and what their ids mean (load.read_data_folder) ----
if input_files and tinystories_weight == 0:
    dataset = ''  # the course's --tinystories_weight 0.0: the input files alone, not a source of weight 0
sources = ([dataset] if dataset else []) + input_files
if not sources:
    die("no data: set dataset or input_files")
try:
    sources = [find_data_folder(src) for src in sources]  # NAME finds data/NAME; the bundled ones prepare themselves
    vocabs, splits = zip(*[read_data_folder(src, check=master) for src in sources])  # (one reading suffices)
    # the model's vocabulary: GPT-2's, the union of the sources' compacted ones (model id i is GPT-2 id id_map[i]),
    # or their characters; tables[s] maps source s's ids to the model's
    tokenizer = merged_vocab(vocabs, full_gpt2=model_type == 'gpt2')
    if model_type == 'gpt2' and tokenizer.chars is not None:
        raise ValueError("GPT-2 fine-tuning needs data of GPT-2's BPE ids, not characters")
    tables = dict(zip(sources, (tokenizer.table(v) for v in vocabs)))
except (OSError, ValueError) as e:
    die(e)
data = dict(zip(sources, splits))
for src in sources:
    if train_tokens is not None:  # a smaller training set; val stays whole, so the gap measures overfitting
        data[src]['train'] = data[src]['train'].head(train_tokens)
    for split, arr in data[src].items():
        if len(arr) <= block_size + 1:
            die(f"block_size={block_size} is longer than the {split} split of {src} ({len(arr)} tokens); "
                f"lower block_size or give more data")
vocab_size = tokenizer.n_vocab
# which source a training row comes from: dataset with probability tinystories_weight, the rest from the
# input_files in proportion to their size (as if their sequences were pooled, as the course pools them)
weights = torch.tensor([float(len(data[s]['train'])) for s in sources])
if dataset:
    rest = weights[1:].sum()
    weights = torch.cat([torch.tensor([tinystories_weight if input_files else 1.0]),
                         (1 - tinystories_weight) * weights[1:] / rest if input_files else weights[1:]])
weights = weights / weights.sum()


def seed_of(*key):
    """A seed that depends only on (seed, *key). Python's hash() would not do: it differs between processes."""
    return int.from_bytes(hashlib.sha256(repr((seed,) + key).encode()).digest()[:8], 'little') >> 2


def generator(*key):
    """A random generator that depends only on (seed, *key): the batches and dropout masks of an iteration
    are the same whenever it runs, which makes a resumed run repeat an uninterrupted one exactly."""
    return torch.Generator().manual_seed(seed_of(*key))


def get_batch(split, g, src=None):
    """(x, y): batch_size random windows of block_size tokens and the tokens that follow them."""
    rows = []
    for _ in range(batch_size):
        s = sources[torch.multinomial(weights, 1, generator=g).item()] if src is None else src
        i = torch.randint(len(data[s][split]) - block_size - 1, (1,), generator=g).item()
        try:
            window = data[s][split][i:i + block_size + 1]
        except ValueError as e:  # the data file shrank under this run: keep what was trained, then stop
            die(f"{e}; {save_before_dying()}remake the data folder, then --init_from=resume")
        rows.append(tables[s][torch.from_numpy(window.astype(np.int64))])
    xy = torch.stack(rows)
    x, y = xy[:, :-1], xy[:, 1:]
    if device_type == 'cuda':
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# -- model ----------------------------------------------------------------------
if model_type == 'transformer':
    model_args = asdict(replace(gpt_config, vocab_size=vocab_size))  # every field: a checkpoint rebuilds this model
elif model_type == 'lstm':
    model_args = dict(vocab_size=vocab_size, embed_size=embed_size, hidden_size=hidden_size)
elif model_type == 'kgram_mlp':
    model_args = dict(vocab_size=vocab_size, k=kgram_k, embed_size=embed_size, num_inner_layers=num_inner_mlp_layers)
# parameters with their gradients and AdamW's two moments (16 bytes each), and a batch's logits: refuse a model
# that cannot fit in memory before building it (Linux would let it start, then kill it)
size = {'transformer': 12 * n_layer * n_embd ** 2 + (vocab_size + block_size) * n_embd,
        'lstm': 4 * (embed_size + hidden_size + 2) * hidden_size + vocab_size * (embed_size + hidden_size + 1),
        'kgram_mlp': (kgram_k + num_inner_mlp_layers) * embed_size ** 2 + 2 * vocab_size * embed_size,
        'gpt2': 0}[model_type]
need = 16 * size + 12 * batch_size * block_size * vocab_size
if memory_bytes() and need > 0.8 * memory_bytes() and init_from == 'scratch':
    die(f"this model ({size / 1e6:,.0f}M parameters) and batch need about {need / 1e9:,.0f} GB to train, and this "
        f"machine has {memory_bytes() / 1e9:.0f} GB; make it smaller")
checkpoint = None
torch.manual_seed(seed)  # the initial weights (the same on every process)
if init_from == 'resume':
    try:
        model, checkpoint = load_checkpoint(ckpt_path)
    except (OSError, ValueError) as e:
        die(e)
    missing = [k for k, ok in (('optimizer', isinstance(checkpoint.get('optimizer'), dict)),
                               ('iter_num', type(checkpoint.get('iter_num')) is int and checkpoint['iter_num'] >= 0),
                               ('best_val_loss', 'best_val_loss' in checkpoint)) if not ok]
    if missing:  # (a checkpoint for sampling only, as export tools and pruning write them)
        die(f"{ckpt_path} cannot be resumed: it has no {missing[0]} (it holds weights for sampling, not a training "
            f"run's state); train from it with a new run instead")
    if model_type == 'gpt2':  # the architecture is the pretrained one; the run's settings are its context and dropout
        model_args = dict(checkpoint['model_args'], block_size=block_size, dropout=dropout)
    # the settings must describe the model being resumed: name every field that differs
    mine = dict(model_type=model_type, **model_args, vocabulary=tokenizer.spec())
    theirs = dict(model_type=checkpoint.get('model_type'), **checkpoint['model_args'],
                  vocabulary=checkpoint.get('tokenizer') or dict(name='gpt2', id_map=None))
    diff = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    if diff:
        try:
            theirs['vocabulary'] = Tokenizer.from_spec(theirs['vocabulary']).describe()
        except ValueError as e:
            die(f"{ckpt_path}: {e}")
        shown = ', '.join(f"vocabulary ({theirs[k]}; the data's: {tokenizer.describe()})"
                          if k == 'vocabulary' else f"{k}={theirs.get(k)!r} (settings: {mine.get(k)!r})" for k in diff)
        die(f"{ckpt_path} was trained with another architecture or vocabulary: {shown}; resume with the settings "
            f"(config file) it was trained with")
if model_type == 'gpt2' and init_from == 'scratch':
    try:
        model = GPT.from_pretrained(pretrained)
    except (OSError, ValueError) as e:
        die(e)
    if block_size > model.config.block_size:
        die(f"block_size={block_size} is longer than {pretrained}'s {model.config.block_size} positions")
    # the same weights in a model fit for this run: the run's dropout, and a shorter context if block_size
    # is smaller (nanoGPT's crop_block_size keeps the first block_size position embeddings)
    sd = model.state_dict()
    sd['transformer.wpe.weight'] = sd['transformer.wpe.weight'][:block_size]
    model_args = asdict(replace(model.config, block_size=block_size, dropout=dropout))
    model = build_model('gpt2', model_args)
    model.load_state_dict(sd)
elif init_from == 'scratch':
    model = build_model(model_type, model_args)
model.to(device)
fast_cpu.optimize(model)  # evaluation and samples on CPU take the fast inference kernels; training is unchanged
if device_type == 'cpu' and dtype == 'bfloat16':  # PyTorch's CPU bfloat16 attention backward: 2x slower, small heads
    fast_cpu.attention_in_float32(model)
n_params = sum(p.numel() for p in model.parameters())

# AdamW (Loshchilov & Hutter 2019); weight decay on matrices and embeddings, not on biases and norm gains
params = [p for p in model.parameters() if p.requires_grad]
groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
          {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
try:  # fused: one kernel over all the parameters, not a dozen per tensor (on CPU 8x faster, since torch 2.4)
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), fused=device_type in ('cuda', 'cpu'))
except RuntimeError:
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2))
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16' and device_type == 'cuda')
iter_num, best_val_loss, tokens_seen, time_offset = 0, float('inf'), 0, 0.0
loss_sum, iters_since_log = 0.0, 0  # the training losses since the last log line
if checkpoint is not None:
    try:
        optimizer.load_state_dict(checkpoint['optimizer'])
        iter_num, best_val_loss = checkpoint['iter_num'], float(checkpoint['best_val_loss'])
        tokens_seen, time_offset = int(checkpoint.get('tokens_seen', 0)), float(checkpoint.get('time_s', 0.0))
        loss_sum, iters_since_log = checkpoint.get('log_state', [0.0, 0])
        loss_sum, iters_since_log = float(loss_sum), int(iters_since_log)
    except (ValueError, TypeError, KeyError, RuntimeError, IndexError) as e:
        die(f"{ckpt_path}: its optimizer state or counters do not fit this run ({str(e).splitlines()[0][:100]}); "
            f"it was not written by this train.py for this model")
    if master:
        print(f"resumed {ckpt_path} at iteration {iter_num} ({tokens_seen:,} tokens seen)")
raw_model = model
if compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)


def get_lr(it):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (nanoGPT's schedule)."""
    decay_end = lr_decay_iters or max_iters
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if not decay_lr:
        return learning_rate
    if it > decay_end:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_end - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters batches of each split, per source; the same batches at every evaluation,
    so the curves compare like with like."""
    model.eval()
    out = {}
    for split in ('train', 'val'):
        for s in sources:
            g = generator('eval', split, s)
            losses = [raw_model(*get_batch(split, g, s))[1].item() for _ in range(eval_iters)]
            out[split, s] = sum(losses) / len(losses)
        out[split] = sum(w * out[split, s] for w, s in zip(weights.tolist(), sources))  # the training mix
    model.train()
    return out


@torch.no_grad()
def samples():
    """The prompt continued greedily, with top-p 0.95 and with top-p 1.0."""
    raw_model.eval()
    try:
        idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
    except ValueError as e:
        return [f"(no sample: {e})"]
    if idx.numel() == 0:
        return ["(no sample: the prompt is empty)"]
    out = []
    for name, kw in (('greedy', dict(temperature=0)), ('top-p 0.95', dict(top_p=0.95)), ('top-p 1.0', dict(top_p=1.0))):
        g = raw_model.generate(idx, sample_tokens, top_k=None, **kw)[0].tolist()
        out.append(f"{name:>10}: {tokenizer.decode(g)!r}")
    raw_model.train()
    return out


def checkpoint_now():
    """Everything a resume needs to continue exactly, in out_dir/ckpt.pt (load.save_checkpoint: atomic, and
    never NaN weights over a good checkpoint); a failure stops the run with one line."""
    try:
        save_checkpoint(dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), model_type=model_type,
                             model_args=model_args, iter_num=iter_num, best_val_loss=best_val_loss, config=config,
                             tokenizer=tokenizer.spec(), data=[os.path.abspath(s) for s in sources],
                             tokens_seen=tokens_seen, time_s=elapsed(),
                             log_state=[float(loss_sum), iters_since_log]),  # the mean loss of the next log line
                        ckpt_path)
    except (OSError, ValueError) as e:
        die(e)


def elapsed():
    return time_offset + time.time() - t_start


# -- the log: one row per log line and per evaluation ----------------------------------------------------
columns = ['iter', 'tokens', 'time_s', 'train_loss', 'val_loss', 'lr', 'ms_per_iter', 'tokens_per_s']
if len(sources) > 1:
    columns += [f"val_loss_{os.path.basename(os.path.normpath(s))}" for s in sources]


def log_row(**row):
    try:
        with append_to(log_path) as f:
            csv.DictWriter(f, columns).writerow({k: row.get(k, '') for k in columns})
    except (OSError, ValueError) as e:
        die(f"cannot write {log_path} ({getattr(e, 'strerror', None) or e})")


def plot_losses():
    """out_dir/loss.png, with plot.py's figure (skipped without matplotlib, saying so once)."""
    global can_plot
    if not can_plot:
        return
    try:
        with output_file(os.path.join(out_dir, 'loss.png')) as tmp:
            plot_runs([(os.path.basename(os.path.normpath(out_dir)), read_log(out_dir))], tmp,
                      title=f"{model_type} in {out_dir}" + (f": {', '.join(changed)}" if changed else ''))
    except (OSError, ValueError) as e:  # (a figure is not worth the run: log.csv has every number)
        can_plot = False
        print(f"no more loss.png: cannot write {os.path.join(out_dir, 'loss.png')} "
              f"({getattr(e, 'strerror', None) or e}); log.csv has every number", file=sys.stderr)
    except ImportError:
        can_plot = False
        print("no loss.png: matplotlib is not installed (pip install matplotlib); log.csv has every number",
              file=sys.stderr)


can_plot = True
# what this run changed from train.py's defaults (the model, data and optimizer; not where and how it logs), for
# loss.png's title: a figure on a slide says which variant it shows
changed = [f"{k}={config[k]}" for k in _config_keys if config[k] != _defaults[k] and k not in (
    'out_dir', 'eval_interval', 'log_interval', 'eval_iters', 'eval_only', 'always_save_checkpoint', 'init_from',
    'overwrite', 'device', 'dtype', 'compile', 'prompt', 'sample_tokens')]


if master:
    rows = []
    if init_from == 'resume' and os.path.exists(log_path):
        # rows past the checkpoint belong to work this run will do again (its evaluation at iter_num too)
        with open(log_path, newline='') as f:
            rows = list(csv.DictReader(f))
        odd = next((i for i, r in enumerate(rows) if not (r.get('iter') or '').isdigit()), None)
        if odd is not None:
            die(f"{log_path}: row {odd + 2} has iter={rows[odd].get('iter')!r}, not an iteration number, so it is not "
                f"train.py's log; fix or move the file, then resume")
        rows = [r for r in rows if int(r['iter']) < iter_num or int(r['iter']) == iter_num and not r['val_loss']]
    try:  # the log as this run starts it (a new file renamed over the old one: a crash now loses no row)
        with output_file(log_path) as tmp, open(tmp, 'w', newline='') as f:
            w = csv.DictWriter(f, columns)
            w.writeheader()
            w.writerows({k: r.get(k, '') for k in columns} for r in rows)
    except OSError as e:
        die(f"cannot write into out_dir {out_dir!r} ({e.strerror})")
    print(f"{model_type}: {n_params / 1e6:.2f}M parameters, vocabulary: {tokenizer.describe()}; data {', '.join(sources)}; "
          f"{batch_size * block_size * gradient_accumulation_steps * world_size} tokens per iteration"
          f"{f' on {world_size} processes' if ddp else ''}; device {device}, {dtype}{' autocast' * (dtype != 'float32')}")

# Ctrl-C, and SIGTERM (a timeout, docker stop, a cluster's preemption, torchrun passing on Ctrl-C): finish the
# iteration under way, save, and exit; a checkpoint written mid-step would be torn
stop_requested, first_signal = False, 0.0


def request_stop(signum, frame):
    global stop_requested, first_signal
    if stop_requested and signum == signal.SIGINT and time.time() - first_signal > 1:
        raise KeyboardInterrupt  # a second Ctrl-C: stop now (not SIGTERM, which torchrun sends right after Ctrl-C)
    if not stop_requested:
        stop_requested, first_signal = True, time.time()
        if master:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this iteration (Ctrl-C again, a "
                  f"second later, to quit at once)", file=sys.stderr)


signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)


def stop_now():
    """Whether to stop at this iteration: under torchrun every process must agree, or one would wait forever in
    a collective the others left (the signal reaches them at different moments)."""
    if not ddp:
        return stop_requested
    flag = torch.tensor([float(stop_requested)], device=device)
    with peers():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


@contextmanager
def peers():
    """Around a collective under torchrun. When another process is gone (killed, out of memory), no collective can
    complete: rank 0 saves the run as of its last whole step (a failed backward has changed no weight) and every
    process leaves with one line, instead of a gloo traceback and nothing saved."""
    try:
        yield
    except RuntimeError as e:  # (gloo's 'Connection closed by peer' and the like; NCCL's watchdog aborts instead)
        lost = isinstance(e, getattr(torch.distributed, 'DistError', ())) or 'peer' in str(e).lower()
        if not ddp or not lost or isinstance(e, torch.OutOfMemoryError):
            raise
        die(f"another process of this torchrun run is gone ({(str(e).splitlines() or ['?'])[0][:80]}); "
            f"{save_before_dying()}--init_from=resume continues")


def save_before_dying():
    """Rank 0 saves what this run trained (the weights as of its last whole step) when it must stop on an error;
    returns what to say of it."""
    if not (master and iter_num > start_iter):
        return ''
    checkpoint_now()
    return f"saved {ckpt_path} at iteration {iter_num}; "


# -- the training loop (nanoGPT's) ------------------------------------------------------------------------
checkpoint = None  # free its memory
start_iter = iter_num
t_start = t_last = time.time()
tokens_per_iter = batch_size * block_size * gradient_accumulation_steps * world_size
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr
    stop = stop_now()
    if iter_num % eval_interval == 0 or iter_num == max_iters or stop:
        if master and (iter_num % eval_interval == 0 or iter_num == max_iters):
            losses = estimate_loss()
            if not (math.isfinite(losses['train']) and math.isfinite(losses['val'])):
                die(f"the loss became {losses['val']} at iteration {iter_num} (learning rate {lr:.2e}); "
                    f"{ckpt_path} keeps the last good state; lower learning_rate or raise warmup_iters")
            per_source = ''.join(f", {os.path.basename(os.path.normpath(s))} val {losses['val', s]:.4f}"
                                 for s in sources) if len(sources) > 1 else ''
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{per_source}")
            for line in samples():
                print(line)
            log_row(iter=iter_num, tokens=tokens_seen, time_s=f"{elapsed():.2f}", train_loss=f"{losses['train']:.6f}",
                    val_loss=f"{losses['val']:.6f}", lr=f"{lr:.6g}",
                    **{f"val_loss_{os.path.basename(os.path.normpath(s))}": f"{losses['val', s]:.6f}"
                       for s in sources if len(sources) > 1})
            best_val_loss = min(best_val_loss, losses['val'])
            if (always_save_checkpoint or losses['val'] <= best_val_loss) and iter_num > start_iter and not eval_only:
                checkpoint_now()  # (not at the iteration the run started from: nothing has changed yet)
            plot_losses()
        if master and stop and iter_num > start_iter:
            checkpoint_now()
            print(f"saved {ckpt_path} at iteration {iter_num}", file=sys.stderr)
        if eval_only or iter_num >= max_iters or stop:
            break
    # one optimizer step over gradient_accumulation_steps micro-batches (on every process)
    for micro_step in range(gradient_accumulation_steps):
        step = rank * gradient_accumulation_steps + micro_step  # the same micro-batches on any number of processes
        x, y = get_batch('train', generator('train', iter_num, step))
        torch.manual_seed(seed_of('dropout', iter_num, step))
        if ddp:  # average the gradients across processes only after the last micro-batch
            model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
        # (under torchrun DDP's forward broadcasts buffers such as RoPE's tables, and the last micro-batch's
        # backward averages the gradients of all processes)
        with peers():
            with ctx:
                _, loss = model(x, y)
                loss = loss / gradient_accumulation_steps
            loss_sum += loss.detach()
            scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    iters_since_log += 1
    tokens_seen += tokens_per_iter
    if iter_num % log_interval == 0:
        if ddp:  # the mean loss over every process's micro-batches
            with peers():
                torch.distributed.all_reduce(loss_sum)
            loss_sum /= world_size
        lossf = float(loss_sum / iters_since_log)
        if not math.isfinite(lossf):
            die(f"the loss became {lossf} at iteration {iter_num} (learning rate {lr:.2e}); {ckpt_path} keeps the "
                f"last good state; lower learning_rate or raise warmup_iters")
        dt = (time.time() - t_last) / iters_since_log
        if master:
            print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
                  f"{tokens_per_iter / dt:,.0f} tokens/s")
            log_row(iter=iter_num, tokens=tokens_seen, time_s=f"{elapsed():.2f}", train_loss=f"{lossf:.6f}",
                    lr=f"{lr:.6g}", ms_per_iter=f"{dt * 1000:.2f}", tokens_per_s=f"{tokens_per_iter / dt:.1f}")
        t_last, iters_since_log, loss_sum = time.time(), 0, 0.0

if ddp:
    with peers():
        torch.distributed.barrier()  # leave together: a process that tears down gloo while another still talks aborts
    destroy_process_group()
