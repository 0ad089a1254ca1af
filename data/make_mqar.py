"""
Write multi-query associative recall (MQAR, Arora et al. 2023, "Zoology", arXiv 2312.04927) as text lines in
the course's --input_files format: each line lists n_pairs key-value pairs, then asks for every key again, in
another order, each followed by its value:
    pairs: 17 203 5 311 88 190 queries: 88 190 17 203 5 311
A model that recalls predicts each answer (the value after a queried key) from the pairs; nothing else in the
line gives it away. Keys are the numbers 0..n_keys-1, values n_keys..2*n_keys-1: each one GPT-2 token (" 17"),
so an answer is one token. A line's keys are distinct; the same key has other values in other lines, so
nothing can be learned by heart. Then prepare and train (study.py --study=attention does this for you):
    python data/make_mqar.py --n_pairs=16                 # -> data/mqar_16.txt
    python data/prepare.py --source=data/mqar_16.txt --compact_vocab=True
    python train.py config/pico_tiny.py --input_files=mqar_16_compact --tinystories_weight=0.0
"""
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# -----------------------------------------------------------------------------
n_pairs = 16  # key-value pairs per line (each queried once)
n_lines = 4000  # lines to write
n_keys = 180  # keys 0..n_keys-1, values n_keys..2*n_keys-1 (GPT-2 has one token for each of ' 0' .. ' 361')
seed = 1337
out: str | None = None  # the file to write (None: data/mqar_<n_pairs>.txt)
exec(open(os.path.join(os.path.dirname(HERE), 'configurator.py')).read())
# -----------------------------------------------------------------------------
if not 1 <= n_pairs <= n_keys:
    sys.exit(f"make_mqar.py: error: n_pairs={n_pairs} must be between 1 and n_keys={n_keys} (a line's keys differ)")
if not 1 <= n_keys <= 181:
    sys.exit(f"make_mqar.py: error: n_keys={n_keys} must be between 1 and 181 (values up to 361 are one GPT-2 token)")
if n_lines < 1:
    sys.exit(f"make_mqar.py: error: n_lines={n_lines} must be >= 1")


def mqar_line(rng):
    keys = rng.sample(range(n_keys), n_pairs)
    value = {k: rng.randrange(n_keys, 2 * n_keys) for k in keys}
    queries = rng.sample(keys, n_pairs)
    return ' '.join(['pairs:', *(f"{k} {value[k]}" for k in keys), 'queries:', *(f"{q} {value[q]}" for q in queries)])


rng = random.Random(seed)
path = out or os.path.join(HERE, f'mqar_{n_pairs}.txt')
with open(path, 'w') as f:
    for _ in range(n_lines):
        f.write(mqar_line(rng) + '\n')
print(f"wrote {n_lines} lines of {n_pairs} key-value pairs to {path}")
