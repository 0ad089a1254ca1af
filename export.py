"""
Export a model in the Hub's layout, as transformers' GPT2LMHeadModel saves it: config.json, model.safetensors
and, for GPT-2's vocabulary, its tokenizer files. transformers, the Hub and llama.cpp's converter open the folder
(llama2.c's export.py is the precedent).
    python export.py --init_from=resume --out_dir=out-shakespeare-char              # -> out-shakespeare-char/hf
    python export.py --init_from=path/to/nanogpt/ckpt.pt --folder=my-gpt --active_layers=even
    python -c "from transformers import GPT2LMHeadModel as M; print(M.from_pretrained('my-gpt'))"
What GPT-2's layout can express: LayerNorm, pre-norm, learned positions, softmax attention, GPT-2's full
vocabulary or a character vocabulary (no tokenizer files then); a model without biases gets zero biases. Other
variants (RoPE, RMSNorm, linear or gated attention, LSTM, k-gram MLP, compacted vocabularies) are refused.
"""
import os
import sys

import torch

from load import check_output, hub_snapshot, load_model, save_hf_folder
from model import GPT

# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (out_dir/ckpt.pt), a .pt file (ours or nanoGPT's), a GPT-2 name, a Hub repo id, or a folder
out_dir = 'out'  # where init_from='resume' finds ckpt.pt
active_layers: str | tuple | list | int | None = None  # export only these blocks (as in sample.py)
folder: str | None = None  # the folder to write (None: out_dir/hf for 'resume', else export-<name of init_from>)
dtype = 'float32'  # the weights' dtype in the file: 'float32', 'float16' or 'bfloat16'
overwrite = False  # a folder that holds a model already: refused unless True (then its old files are removed)
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------


def die(msg):
    sys.exit(f"export.py: error: {msg}")


dtypes = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}
if dtype not in dtypes:
    die(f"dtype={dtype!r} is not one of {', '.join(dtypes)}")
if folder is None:
    name = os.path.splitext(os.path.basename(os.path.normpath(init_from)))[0].replace('/', '-')
    folder = os.path.join(out_dir, 'hf') if init_from == 'resume' else f"export-{name}"
if os.path.isfile(folder):
    die(f"folder {folder!r} is a file; give a folder to write the export into")
try:
    check_output(os.path.join(folder, 'config.json'), 'folder') if os.path.isdir(folder) else None
    model, tokenizer, _ = load_model(init_from, out_dir, active_layers)
    model = model.eval().to(dtypes[dtype])
    # a model from a Hub-layout folder keeps that folder's tokenizer files (a GPT-2 of another language has its own)
    source = None if init_from == 'resume' or init_from.endswith('.pt') or os.path.isfile(init_from) else \
        init_from if os.path.isdir(init_from) else hub_snapshot(init_from)
    files = save_hf_folder(model, tokenizer, folder, tokenizer_from=source, overwrite=overwrite)
except (OSError, ValueError) as e:
    die(e)

# read the folder back as any user would, and compare: the export is only done when it computes the same
idx = torch.randint(0, min(tokenizer.n_vocab, model.config.vocab_size), (1, min(16, model.config.block_size)),
                    generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    ours, again = model(idx)[0].float(), GPT.from_pretrained(folder).eval().to(dtypes[dtype])(idx)[0].float()
err = ((ours - again).norm() / ours.norm()).item()
if not err < 1e-6:
    die(f"the export in {folder} does not compute what the model does (relative difference {err:.2e})")
layers = '' if active_layers is None else f", blocks {model.layer_ids}"
print(f"wrote {folder}: {', '.join(files)} ({model.config.n_layer} layers{layers}, vocabulary: {tokenizer.describe()}, "
      f"{dtype}); read back with from_pretrained: same logits")
