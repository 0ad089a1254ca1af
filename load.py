"""
Bytes into and out of models, beside model.py (which knows nothing of them): downloads from the Hub,
checkpoints, the tokenizer, and load_model(init_from), the model every script starts from.
The two weight readers GPT.from_pretrained needs, load_safetensors and safe_torch_load, are model.py's, so
that model.py alone still loads a local folder; everything here uses them.
"""

import hashlib
import os
import re
import sys
import tempfile
import time
from dataclasses import fields

import torch
import torch.nn as nn

from model import GPT, GPTConfig, KGramMLPSeqModel, LSTMSeqModel, safe_torch_load

# -----------------------------------------------------------------------------
# The Hub

GPT2_NAMES = {n: f'openai-community/{n}' for n in ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')}
HF_ENDPOINT = 'https://huggingface.co'


def cache_dir():
    """Where downloads go: $XDG_CACHE_HOME/gpt-lab, else ~/.cache/gpt-lab."""
    return os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'gpt-lab')


def hub_snapshot(name):
    """A local folder with the repo's config.json and weights, downloaded once from the Hub (or
    $HF_ENDPOINT). A second call finds the files in the cache and touches no network."""
    repo = GPT2_NAMES.get(name, name)
    if not re.fullmatch(r'[\w.-]+/[\w.-]+', repo) or '..' in repo:
        raise ValueError(f"init_from={name!r} is not a GPT-2 name ({', '.join(GPT2_NAMES)}), a Hub repo id "
                         f"(org/name), an existing folder, or a .pt checkpoint")
    folder = os.path.join(cache_dir(), 'hub', repo.replace('/', '--'))
    hub_download(repo, 'config.json', folder)
    if not any(os.path.exists(os.path.join(folder, f)) for f in ('model.safetensors', 'pytorch_model.bin')):
        try:
            hub_download(repo, 'model.safetensors', folder)
        except FileNotFoundError:  # older repos have only the PyTorch pickle
            hub_download(repo, 'pytorch_model.bin', folder)
    return folder


def hub_download(repo, filename, folder):
    """Download {endpoint}/{repo}/resolve/main/{filename} into folder, unless it is there already.
    Bytes go to a .part file; an interrupted transfer resumes with an HTTP Range request (within this call,
    or in the next run), and the file is renamed into place only after its size (and sha256, when the
    server's headers give it) check out."""
    import requests  # only downloads need it
    path = os.path.join(folder, filename)
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    endpoint = os.environ.get('HF_ENDPOINT', HF_ENDPOINT).rstrip('/')
    url = f"{endpoint}/{repo}/resolve/main/{filename}"
    headers = {'Authorization': f"Bearer {os.environ['HF_TOKEN']}"} if os.environ.get('HF_TOKEN') else {}
    part = path + '.part'
    stalls = 0
    while True:
        have = os.path.getsize(part) if os.path.exists(part) else 0
        try:
            r = requests.get(url, stream=True, timeout=30,
                             headers={**headers, 'Range': f'bytes={have}-'} if have else headers)
        except requests.RequestException as e:
            raise ConnectionError(f"cannot reach {endpoint} to download {repo}/{filename} ({type(e).__name__}); "
                                  f"offline? put config.json and model.safetensors in a folder and use "
                                  f"--init_from=path/to/folder") from None
        with r:
            if r.status_code in (401, 403, 404):
                hint = 'private or gated? set HF_TOKEN' if r.status_code != 404 else 'check the repo id'
                raise FileNotFoundError(f"{repo}: file {filename} not found on {endpoint} "
                                        f"(HTTP {r.status_code}; {hint})")
            if r.status_code == 416:  # our .part is already as long as the file (or longer): start over
                os.remove(part)
                continue
            if r.status_code not in (200, 206):
                raise ConnectionError(f"{repo}/{filename}: {endpoint} answered HTTP {r.status_code}")
            if r.status_code == 200:
                have = 0  # the server sent the whole file, not the range asked for
            size, sha256 = _hub_file_info(r, have)
            t0, t_print, done = time.time(), 0.0, have
            try:
                with open(part, 'ab' if have else 'wb') as f:
                    for chunk in r.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
                        done += len(chunk)
                        if time.time() - t_print > 0.5 and (size or done) > 1e6:  # quiet for small files
                            t_print = time.time()
                            mbs = (done - have) / 1e6 / max(t_print - t0, 1e-6)
                            total = f"/{size / 1e6:.1f}" if size else ""
                            print(f"\rdownloading {repo}/{filename}: {done / 1e6:.1f}{total} MB, {mbs:.1f} MB/s",
                                  end='', file=sys.stderr, flush=True)
            except requests.RequestException:
                pass  # the connection dropped mid-file: the loop below resumes from what we have
        got = os.path.getsize(part)
        if t_print:
            print(f"\rdownloading {repo}/{filename}: {got / 1e6:.1f} MB, {(got - have) / 1e6 / max(time.time() - t0, 1e-6):.1f}"
                  f" MB/s{'' if size is None or got >= size else ' (connection lost, resuming)'}", file=sys.stderr)
        if size is not None and got < size:
            stalls = stalls + 1 if got == have else 0
            if stalls >= 3:
                raise ConnectionError(f"{repo}/{filename}: the download keeps stopping at {got} of {size} bytes; "
                                      f"run again to resume it")
            continue
        if size is not None and got != size:
            os.remove(part)
            raise ValueError(f"{repo}/{filename}: downloaded {got} bytes but the server announced {size}; "
                             f"removed it, run again to download it afresh")
        if sha256 is not None and _sha256(part) != sha256:
            os.remove(part)
            raise ValueError(f"{repo}/{filename}: sha256 of the download does not match the server's; removed it, "
                             f"run again to download it afresh")
        os.replace(part, path)
        return path


def _hub_file_info(r, offset):
    """(total size, sha256 or None) of a file from the response headers. The Hub answers a resolve URL of a
    large (LFS) file with a redirect whose X-Linked-Size / X-Linked-Etag give the size and the sha256."""
    hdrs = [h.headers for h in r.history] + [r.headers]
    size = sha = None
    for h in hdrs:
        if size is None and h.get('X-Linked-Size'):
            size = int(h['X-Linked-Size'])
        for key in ('X-Linked-Etag', 'ETag'):
            tag = h.get(key, '').removeprefix('W/').strip('"')
            if sha is None and re.fullmatch(r'[0-9a-f]{64}', tag):
                sha = tag
    if size is None and r.headers.get('Content-Range'):  # bytes 100-999/1000
        size = int(r.headers['Content-Range'].rsplit('/', 1)[1])
    if size is None and r.headers.get('Content-Length') and 'Content-Encoding' not in r.headers:
        size = offset + int(r.headers['Content-Length'])
    return size, sha


def _sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


# -----------------------------------------------------------------------------
# Checkpoints

MODEL_TYPES = {'gpt': GPT, 'transformer': GPT, 'gpt2': GPT, 'lstm': LSTMSeqModel, 'kgram_mlp': KGramMLPSeqModel}


def build_model(model_type, model_args):
    """A fresh model of a type in MODEL_TYPES from its constructor arguments (as a checkpoint stores them)."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not one of: {', '.join(MODEL_TYPES)}")
    cls = MODEL_TYPES[model_type]
    if cls is GPT:
        known = {f.name for f in fields(GPTConfig)}
        unknown = sorted(set(model_args) - known)
        if unknown:
            raise ValueError(f"model_args has fields this model.py does not know: {', '.join(unknown)}")
        return GPT(GPTConfig(**model_args))
    return cls(**model_args)


def load_checkpoint(path):
    """A model from a checkpoint written by our train.py (any model_type) or by nanoGPT's (keys model,
    model_args, config). Returns (model, checkpoint dict)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or 'model' not in ckpt or 'model_args' not in ckpt:
        raise ValueError(f"{path} is not a training checkpoint (it needs the keys 'model' and 'model_args')")
    model_type = ckpt.get('model_type', 'gpt')
    args = dict(ckpt['model_args'])
    if MODEL_TYPES.get(model_type) is GPT:
        # nanoGPT's checkpoints predate our architecture fields: they were trained with the exact GELU
        args.setdefault('activation', 'gelu')
    try:
        model = build_model(model_type, args)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    # torch.compile prefixes every key with _orig_mod.; old nanoGPT models also saved their causal mask
    sd = {k.removeprefix('_orig_mod.'): v for k, v in ckpt['model'].items()}
    sd = {k: v for k, v in sd.items() if not k.endswith('.attn.bias') or k in model.state_dict()}
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise ValueError(f"{path}: weights do not match model_args: {lines[1] if len(lines) > 1 else lines[0]}") from None
    if 'layer_ids' in ckpt:
        model.layer_ids = list(ckpt['layer_ids'])
    return model, ckpt


def save_checkpoint(ckpt, path):
    """Write a checkpoint atomically: a temporary file, then a rename, so a crash never leaves half a file."""
    tmp = path + '.tmp'
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# The tokenizer

GPT2_BPE_FILES = {'vocab.bpe': 'gpt2-vocab.bpe', 'encoder.json': 'gpt2-encoder.json'}  # tiktoken's name: ours in data/


def gpt2_encoding():
    """tiktoken's GPT-2 encoding. tiktoken downloads its two BPE files on first use; this repo ships them
    (data/gpt2-vocab.bpe, data/gpt2-encoder.json, from openai/gpt-2), so they seed tiktoken's cache and a
    fresh clone tokenizes offline. tiktoken checks their sha256 either way."""
    import tiktoken
    cache = os.environ.get('TIKTOKEN_CACHE_DIR') or os.environ.get('DATA_GYM_CACHE_DIR') or \
        os.path.join(tempfile.gettempdir(), 'data-gym-cache')
    base = 'https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/'
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
    try:
        for name, ours in GPT2_BPE_FILES.items():
            dst = os.path.join(cache, hashlib.sha1((base + name).encode()).hexdigest())  # tiktoken's cache key
            if not os.path.exists(dst) and os.path.exists(os.path.join(src, ours)):
                os.makedirs(cache, exist_ok=True)
                with open(os.path.join(src, ours), 'rb') as fi, open(dst + f'.{os.getpid()}.tmp', 'wb') as fo:
                    fo.write(fi.read())
                os.replace(dst + f'.{os.getpid()}.tmp', dst)
    except OSError:
        pass  # an unwritable cache: tiktoken downloads the files itself
    try:
        return tiktoken.get_encoding('gpt2')
    except Exception as e:  # tiktoken raises requests' errors, or ValueError on a hash mismatch
        raise ConnectionError(f"tiktoken could not fetch GPT-2's BPE files ({type(e).__name__}); connect once to "
                              f"the internet, or restore data/gpt2-vocab.bpe and data/gpt2-encoder.json from git"
                              ) from None


class Tokenizer:
    """GPT-2's BPE. A model trained on a compacted vocabulary (data/prepare.py --compact_vocab=True) knows
    only the GPT-2 ids of its training data: its token i is GPT-2's token id_map[i], and gpt2_to_model, a
    table of GPT-2's 50,257 ids, holds each one's model id (-1 where the vocabulary lacks it)."""

    def __init__(self, id_map=None):
        self.enc = gpt2_encoding()
        self.id_map = None if id_map is None else list(id_map)
        self.n_vocab = self.enc.n_vocab if id_map is None else len(self.id_map)
        self.gpt2_to_model = torch.arange(self.enc.n_vocab) if id_map is None else \
            torch.full((self.enc.n_vocab,), -1).index_put_((torch.tensor(self.id_map, dtype=torch.long),),
                                                           torch.arange(len(self.id_map)))

    def to_model_ids(self, gpt2_ids):
        """The model's ids of these GPT-2 ids, or None if the vocabulary lacks any of them."""
        ids = self.gpt2_to_model[torch.as_tensor(gpt2_ids, dtype=torch.long)].tolist()
        return None if -1 in ids else ids

    def encode(self, text):
        gpt2_ids = self.enc.encode(text, allowed_special={'<|endoftext|>'})
        ids = self.to_model_ids(gpt2_ids)
        if ids is None:
            missing = next(i for i in gpt2_ids if self.gpt2_to_model[i] < 0)
            raise ValueError(f"{self.enc.decode([missing])!r} is not in this model's {self.n_vocab}-token "
                             f"vocabulary (compacted to the tokens of its training data)")
        return ids

    def to_gpt2(self, ids):
        return list(ids) if self.id_map is None else [self.id_map[i] for i in ids]

    def decode(self, ids):
        return self.enc.decode(self.to_gpt2(ids))

    def token_bytes(self, i):
        return self.enc.decode_single_token_bytes(self.to_gpt2([i])[0])


# -----------------------------------------------------------------------------
# The model every script starts from


def load_model(init_from, out_dir='out', active_layers=None):
    """init_from: 'resume' (out_dir/ckpt.pt), a path to a .pt checkpoint, a GPT-2 name, a Hub repo id, or a
    local folder. Returns (model, tokenizer, checkpoint or None). Errors are one-line FileNotFoundError /
    ConnectionError / ValueError messages."""
    if init_from == 'resume':
        if not os.path.isdir(out_dir):
            raise FileNotFoundError(f"out_dir {out_dir!r} does not exist (init_from='resume' loads out_dir/ckpt.pt)")
        init_from = os.path.join(out_dir, 'ckpt.pt')
    if init_from.endswith('.pt') or os.path.isfile(init_from):
        model, ckpt = load_checkpoint(init_from)
        if active_layers is not None:
            if not isinstance(model, GPT):
                raise ValueError(f"active_layers selects transformer blocks; this is a {type(model).__name__}")
            model.prune_layers(active_layers)
        tok = ckpt.get('tokenizer') or {}
        if tok.get('name', 'gpt2') != 'gpt2':
            raise ValueError(f"{init_from}: tokenizer {tok['name']!r} is not supported (only gpt2)")
        tokenizer = Tokenizer(tok.get('id_map'))
        n_vocab = next(m for m in model.modules() if isinstance(m, nn.Embedding)).num_embeddings
        if n_vocab < tokenizer.n_vocab:
            raise ValueError(f"{init_from}: the model's vocabulary has {n_vocab} tokens and the checkpoint names no "
                             f"id map for it; only GPT-2's {tokenizer.n_vocab}-token vocabulary (or an id map) works")
        return model, tokenizer, ckpt
    # a path whose parent folder exists locally is a folder the user meant, not a Hub repo id
    parent = os.path.dirname(os.path.normpath(init_from))
    if not os.path.isdir(init_from) and (init_from.startswith(('.', '/', '~')) or parent and os.path.isdir(parent)):
        raise FileNotFoundError(f"model folder {init_from!r} does not exist")
    return GPT.from_pretrained(init_from, active_layers=active_layers), Tokenizer(), None
