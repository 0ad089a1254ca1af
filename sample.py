"""
Sample from a trained model or from pretrained GPT-2 weights.
    python sample.py --init_from=gpt2 --start="one ring to rule them all," --num_samples=3 --max_new_tokens=100
    python sample.py --init_from=gpt2 --start="..." --active_layers=even   # run only blocks 0,2,4,...
"""
import codecs
import os
import sys
import time

import torch

import fast_cpu
from load import load_model, memory_bytes, pick_device, read_prompt
from model import GPT, check_sampling_args

# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (out_dir/ckpt.pt), a .pt file, gpt2 / gpt2-medium / gpt2-large / gpt2-xl, a Hub repo id, or a local folder
out_dir = 'out'  # where init_from='resume' finds ckpt.pt
start = "\n"  # the prompt, or "FILE:prompt.txt" to read it from a file; '<|endoftext|>' for an unconditional sample
num_samples = 10  # number of samples, generated together as one batch
max_new_tokens = 500  # tokens generated per sample
temperature = 0.8  # 1.0 = no change, < 1.0 = less random, > 1.0 = more random, 0 = greedy (argmax)
top_k: int | None = 200  # sample only among the top_k most likely tokens (None: all)
top_p: float | None = None  # nucleus sampling: only the smallest set of tokens whose probability reaches top_p (None: off)
active_layers: str | tuple | list | int | None = None  # blocks to run: None, 'even', 'odd', 'first_half', 'last_half', '0,2,4', '0-5'
seed = 1337  # random seed, so a run can be repeated
device = 'auto'  # 'cpu', 'cuda', 'cuda:1', 'mps', ...; 'auto' picks cuda > mps > cpu
dtype = 'auto'  # 'float32', 'bfloat16', 'float16' or 'int8' (CPU) weights; 'auto': bfloat16 on a GPU that has it, else float32
compile = False  # compile the decoding step (CPU: fast_cpu.compile_decode, AOTInductor; needs a C++ compiler; else torch.compile)
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())  # command line or config file
# -----------------------------------------------------------------------------


def die(msg):
    sys.exit(f"sample.py: error: {msg}")


# check every setting before loading anything, so a typo costs no download
try:
    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    device = pick_device(device)
    start = read_prompt(start)
except ValueError as e:
    die(e)
if num_samples < 1:
    die(f"num_samples={num_samples} must be >= 1")
if not 0 <= seed < 2**63:
    die(f"seed={seed} must be in [0, 2**63)")
if dtype == 'auto':
    dtype = 'bfloat16' if device.startswith('cuda') and torch.cuda.is_bf16_supported() else 'float32'
try:
    fast_cpu.check_dtype(dtype, device)
except ValueError as e:
    die(e if dtype in fast_cpu.DTYPES else f"{e}, or auto")

torch.manual_seed(seed)
try:
    model, tokenizer, checkpoint = load_model(init_from, out_dir, active_layers)
    start_ids = tokenizer.encode(start)
except (OSError, ValueError) as e:
    die(e)
fast_cpu.cast(model.eval(), dtype, device)  # (int8: weights per output channel, float32 activations)
if device == 'cpu' and compile and isinstance(model, GPT):
    try:
        fast_cpu.compile_decode(model)  # a CPU compiles GPT's one-token step only (prefill: library kernels)
    except ValueError as e:  # (its logits are NaN: see model.sample_next_token)
        die(e)
if compile and not (device == 'cpu' and isinstance(model, GPT)):
    model.compile()

if not start_ids:
    die("the prompt is empty; give --start=..." + ("" if tokenizer.chars else
                                                  " (or --start='<|endoftext|>' for no prompt)"))
# the key/value cache and activations of num_samples rows (float32 on CPU): refuse what cannot fit in memory
# rather than be killed by the kernel halfway
width = 2 * model.config.n_layer * model.config.n_embd + 16 * model.config.n_embd if isinstance(model, GPT) else 4096
need = num_samples * ((len(start_ids) + max_new_tokens) * width + 4 * tokenizer.n_vocab) * 4
if memory_bytes() and need > 0.8 * memory_bytes():
    die(f"{num_samples} samples of {len(start_ids) + max_new_tokens} tokens need about {need / 1e9:.0f} GB, and this "
        f"machine has {memory_bytes() / 1e9:.0f} GB; ask for fewer samples or tokens")
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, :].repeat(num_samples, 1)
if active_layers is not None:
    print(f"running blocks {model.layer_ids}", file=sys.stderr)

t0 = time.time()
try:  # (a ValueError here: the model's logits are NaN or infinite, see model.sample_next_token)
    if num_samples == 1:
        # one sample: print each token as it comes; a character split over two tokens waits for its second half
        utf8 = codecs.getincrementaldecoder('utf-8')(errors='replace')
        print(start, end='', flush=True)
        for next_id in model.generate_stream(x, max_new_tokens, temperature, top_k, top_p):
            print(utf8.decode(tokenizer.token_bytes(next_id.item())), end='', flush=True)
        print(utf8.decode(b'', final=True))
        print('---------------')
    else:
        for row in model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p).tolist():
            print(tokenizer.decode(row))
            print('---------------')
except ValueError as e:
    print(flush=True)
    die(e)
dt = time.time() - t0
print(f"{num_samples} x {max_new_tokens} tokens in {dt:.2f} s ({num_samples * max_new_tokens / dt:.1f} tokens/s)",
      file=sys.stderr)
