"""
Prepare a data folder for train.py, as nanoGPT's prepare scripts do: train.bin and val.bin hold GPT-2 token
ids as uint16, and meta.json names the tokenizer (and, with compact_vocab, the ids the data uses).
    python data/prepare.py                                        # the bundled TinyStories slice -> data/tinystories
    python data/prepare.py --source=data/3seqs.txt                # one sequence per line -> data/3seqs
    python data/prepare.py --source=tinystories_hub               # the whole TinyStories from the Hub
    python data/prepare.py --compact_vocab=True --out_dir=data/tinystories_compact
A source is a list of documents: stories separated by '<|endoftext|>' lines (TinyStories' own layout), or,
in a file without that marker, one sequence per line (the course's --input_files format). Each document is
followed by a separator token (<|endoftext|> or a newline), and a val_fraction of the documents, spread
evenly through the file, is held out for validation.
"""
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from load import cache_dir, gpt2_encoding, hub_download  # noqa: E402

# -----------------------------------------------------------------------------
source = 'tinystories'  # 'tinystories' (the bundled slice), 'tinystories_hub' (download the full dataset), or text file(s), comma-separated
format = 'auto'  # 'documents' (separated by <|endoftext|> lines), 'lines' (one sequence per line), or 'auto'
out_dir: str | None = None  # the data folder to write (None: data/<name of the source>)
val_fraction = 0.1  # share of the documents held out for validation
compact_vocab = False  # record the GPT-2 ids the data uses, so train.py can give the model only those (much faster)
exec(open(os.path.join(os.path.dirname(HERE), 'configurator.py')).read())
# -----------------------------------------------------------------------------


def die(msg):
    sys.exit(f"prepare.py: error: {msg}")


EOT = '<|endoftext|>'
if source == 'tinystories':
    files, name = [os.path.join(HERE, 'tinystories_slice.txt')], 'tinystories'
elif source == 'tinystories_hub':
    # TinyStories (Eldan & Li 2023) from the Hub's dataset files; its own split: train and valid
    folder = os.path.join(cache_dir(), 'hub', 'datasets--roneneldan--TinyStories')
    try:
        files = [hub_download('datasets/roneneldan/TinyStories', f, folder)
                 for f in ('TinyStories-train.txt', 'TinyStories-valid.txt')]
    except (OSError, ValueError) as e:
        die(e)
    name = 'tinystories_full'
else:
    files = [f.strip() for f in source.split(',') if f.strip()]
    name = os.path.splitext(os.path.basename(files[0]))[0] if files else ''
if not files:
    die("source is empty; give 'tinystories', 'tinystories_hub', or text files")
for f in files:
    if not os.path.isfile(f):
        die(f"source file {f!r} not found")
    if os.path.getsize(f) == 0:
        die(f"source file {f!r} is empty")
if format not in ('auto', 'documents', 'lines'):
    die(f"format={format!r} must be 'auto', 'documents' or 'lines'")
if not 0 < val_fraction < 1:
    die(f"val_fraction={val_fraction} must be between 0 and 1")
out_dir = out_dir or os.path.join(HERE, name + ('_compact' if compact_vocab else ''))

try:
    enc = gpt2_encoding()
except ConnectionError as e:
    die(e)


def documents(path, layout):
    """The documents of a text file, one at a time (a 2 GB file never sits in memory whole)."""
    doc = []
    with open(path, encoding='utf-8') as f:
        for line in f:
            if layout == 'lines':
                if line.strip():
                    yield line.rstrip('\n')
            elif line.strip() == EOT:
                if doc:
                    yield ''.join(doc).strip('\n')
                doc = []
            else:
                doc.append(line)
    if doc and ''.join(doc).strip():
        yield ''.join(doc).strip('\n')


os.makedirs(out_dir, exist_ok=True)
used = np.zeros(enc.n_vocab, dtype=bool)  # which GPT-2 ids occur, for compact_vocab
counts = {'train': 0, 'val': 0}
n_docs = {'train': 0, 'val': 0}
outs = {s: open(os.path.join(out_dir, f'{s}.bin.tmp'), 'wb') for s in ('train', 'val')}
layouts = []
for k, path in enumerate(files):
    with open(path, encoding='utf-8') as f:
        head = f.read(1 << 20)
    layout = format if format != 'auto' else 'documents' if EOT in head else 'lines'
    layouts.append(layout)
    sep = enc.eot_token if layout == 'documents' else enc.encode('\n')[0]
    # TinyStories from the Hub comes split already; otherwise every document i goes to val when
    # floor(i * val_fraction) steps up at i, which spreads the val documents evenly through the file
    fixed_split = 'val' if source == 'tinystories_hub' and k == 1 else 'train' if source == 'tinystories_hub' else None
    batch, i = [], 0

    def flush(batch):
        for split, text in batch:
            ids = np.array(enc.encode_ordinary(text) + [sep], dtype=np.uint16)
            used[ids] = True
            outs[split].write(ids.tobytes())
            counts[split] += len(ids)
            n_docs[split] += 1

    for doc in documents(path, layout):
        split = fixed_split or ('val' if int((i + 1) * val_fraction) > int(i * val_fraction) else 'train')
        batch.append((split, doc))
        i += 1
        if len(batch) == 10000:
            flush(batch)
            batch = []
            print(f"\r{path}: {i} documents, {counts['train'] + counts['val']} tokens", end='', file=sys.stderr)
    flush(batch)
    print(f"\r{path}: {i} documents ({layout}), {counts['train'] + counts['val']} tokens so far", file=sys.stderr)
for s, f in outs.items():
    f.close()
for s in outs:
    if counts[s] == 0:
        die(f"the {s} split is empty: {sum(n_docs.values())} documents are too few for val_fraction={val_fraction}")
    os.replace(os.path.join(out_dir, f'{s}.bin.tmp'), os.path.join(out_dir, f'{s}.bin'))

id_map = np.flatnonzero(used).tolist() if compact_vocab else None
meta = dict(tokenizer='gpt2', id_map=id_map, vocab_size=len(id_map) if compact_vocab else enc.n_vocab,
            source=source, layout=layouts, train_tokens=counts['train'], val_tokens=counts['val'],
            train_documents=n_docs['train'], val_documents=n_docs['val'])
with open(os.path.join(out_dir, 'meta.json'), 'w') as f:
    json.dump(meta, f)
print(f"wrote {out_dir}: train {counts['train']:,} tokens ({n_docs['train']} documents), val {counts['val']:,} "
      f"tokens ({n_docs['val']} documents), vocabulary {meta['vocab_size']:,}"
      f"{' (compacted from 50,257)' if compact_vocab else ''}")
