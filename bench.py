"""
Benchmarks: our code against a reference, on the same weights, in one process, alternating runs.
    python bench.py                      # batch-1 decode of GPT-2 124M (random weights) vs transformers
    python bench.py --new_tokens=100,500 --top_k=200 --repeats=3
Figures go in README.md with the machine they were measured on.
"""
import os
import statistics
import sys
import tempfile
import time

import torch

from model import GPT

# -----------------------------------------------------------------------------
bench = 'decode'  # what to measure: 'decode' (tokens/s of generate, ours vs transformers)
new_tokens: tuple | int = (100, 500)  # decode lengths to measure
prompt_len = 16  # tokens in the (random) prompt
batch_size = 1  # rows decoded together
top_k: int | None = 200  # sampling as sample.py does it (temperature 1.0)
repeats = 3  # runs of each side per length; the median is reported
threads = 2  # torch.set_num_threads
seed = 1337
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


if bench == 'decode':
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        sys.exit("bench.py: error: the decode benchmark compares against transformers: pip install transformers")
    # the same random GPT-2 124M weights on both sides: transformers writes them, we load them from the folder
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    folder = tempfile.mkdtemp()
    hf.save_pretrained(folder)
    ours = GPT.from_pretrained(folder).eval()
    idx = torch.randint(0, 50257, (batch_size, prompt_len))
    print(f"GPT-2 124M, batch {batch_size}, prompt {prompt_len} tokens, top_k={top_k}, {threads} threads, "
          f"torch {torch.__version__}, median of {repeats}")
    for n in new_tokens:
        def run_ours():
            ours.generate(idx, n, temperature=1.0, top_k=top_k)

        def run_hf():
            with torch.no_grad():
                hf.generate(idx, max_new_tokens=n, min_new_tokens=n, do_sample=True, top_k=top_k or 0,
                            top_p=1.0, temperature=1.0, pad_token_id=0)
        run_ours(), run_hf()  # warm up
        t_ours, t_hf = [], []
        for _ in range(repeats):  # alternate, so a slow phase of the machine hits both sides
            t_ours.append(timed(run_ours))
            t_hf.append(timed(run_hf))
        tps_ours = n * batch_size / statistics.median(t_ours)
        tps_hf = n * batch_size / statistics.median(t_hf)
        print(f"{n:5d} new tokens: ours {tps_ours:6.1f} tok/s   transformers {tps_hf:6.1f} tok/s   "
              f"ratio {tps_ours / tps_hf:.2f}x")
else:
    sys.exit(f"bench.py: error: bench={bench!r} is not one of: decode")
