"""
Prepare a data folder for train.py, as nanoGPT's prepare scripts do: train.bin and val.bin hold uint16 token
ids, meta.json says what they are (GPT-2 ids, with compact_vocab the ones the data uses; or characters, which
also get nanoGPT's meta.pkl). train.py prepares the bundled folders by itself; this is for your own data.
    python data/prepare.py                                        # the bundled TinyStories slice -> data/tinystories
    python data/prepare.py --source=data/3seqs.txt                # one sequence per line -> data/3seqs
    python data/prepare.py --source=data/tinyshakespeare.txt --tokenizer=char --out_dir=data/shakespeare_char
    python data/prepare.py --source=tinystories_hub               # the whole TinyStories from the Hub
    python data/prepare.py --compact_vocab=True --out_dir=data/tinystories_compact
A source is a list of documents: stories separated by '<|endoftext|>' lines (TinyStories' own layout), or,
in a file without that marker, one sequence per line (the course's --input_files format). Each document is
followed by a separator token (<|endoftext|> or a newline), and a val_fraction of the documents, spread
evenly through the file, is held out for validation. With tokenizer='char' the text is taken as it is and its
last val_fraction is held out (nanoGPT's shakespeare_char).
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from load import cache_dir, hub_download, prepare_data  # noqa: E402

# -----------------------------------------------------------------------------
source = 'tinystories'  # 'tinystories' (the bundled slice), 'tinystories_hub' (download the full dataset), or text file(s), comma-separated
format = 'auto'  # 'documents' (separated by <|endoftext|> lines), 'lines' (one sequence per line), or 'auto'
tokenizer = 'gpt2'  # 'gpt2' (GPT-2's BPE) or 'char' (one token per character, as nanoGPT's shakespeare_char)
out_dir: str | None = None  # the data folder to write (None: data/<name of the source>)
val_fraction = 0.1  # share of the documents (of the text, for 'char') held out for validation
compact_vocab = False  # record the GPT-2 ids the data uses, so train.py can give the model only those (much faster)
exec(open(os.path.join(os.path.dirname(HERE), 'configurator.py')).read())
# -----------------------------------------------------------------------------


def die(msg):
    sys.exit(f"prepare.py: error: {msg}")


fixed_splits = None
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
    name, fixed_splits = 'tinystories_full', ['train', 'val']
else:
    files = [f.strip() for f in source.split(',') if f.strip()]
    name = os.path.splitext(os.path.basename(files[0]))[0] if files else ''
if not files:
    die("source is empty; give 'tinystories', 'tinystories_hub', or text files")
for f in files:
    if not os.path.isfile(f):
        die(f"source file {f!r} {'is a folder' if os.path.isdir(f) else 'not found'}")
    if os.path.getsize(f) == 0:
        die(f"source file {f!r} is empty")
if format not in ('auto', 'documents', 'lines'):
    die(f"format={format!r} must be 'auto', 'documents' or 'lines'")
if tokenizer not in ('gpt2', 'char'):
    die(f"tokenizer={tokenizer!r} must be 'gpt2' (GPT-2's BPE) or 'char' (characters)")
if tokenizer == 'char' and compact_vocab:
    die("compact_vocab is for GPT-2's BPE; a character vocabulary holds only the text's characters already")
if not 0 < val_fraction < 1:
    die(f"val_fraction={val_fraction} must be between 0 and 1")
out_dir = out_dir or os.path.join(HERE, name + ('_compact' if compact_vocab else '_char' if tokenizer == 'char' else ''))

try:
    vocab, counts, n_docs = prepare_data(files, out_dir, tokenizer, compact_vocab, format, val_fraction, fixed_splits,
                                         source=source)
except (OSError, ValueError, UnicodeDecodeError, ConnectionError) as e:
    die(e)
print(f"wrote {out_dir}: train {counts['train']:,} tokens ({n_docs['train']} documents), val {counts['val']:,} "
      f"tokens ({n_docs['val']} documents), vocabulary {vocab['vocab_size']:,}"
      f"{' (compacted from 50,257)' if compact_vocab else ' characters' if tokenizer == 'char' else ''}")
