# nanoGPT's character-level Shakespeare at its CPU size (its README's laptop command: 4 layers x 128, block 64,
# batch 12): about 2 minutes on 2 CPU cores. The first run prepares data/shakespeare_char (nanoGPT's layout, with
# meta.pkl) from the bundled data/tinyshakespeare.txt.
#   python train.py config/shakespeare_char.py
#   python sample.py --init_from=resume --out_dir=out-shakespeare-char --start="ROMEO:" --max_new_tokens=200
out_dir = 'out-shakespeare-char'
dataset = 'shakespeare_char'
model_type = 'transformer'
n_layer = 4
n_head = 4
n_embd = 128
norm = 'layernorm'  # nanoGPT's model: LayerNorm, exact GELU, no biases (bias=False is train.py's default)
activation = 'gelu'
block_size = 64
batch_size = 12
dropout = 0.0
max_iters = 2000
lr_decay_iters = 2000
eval_interval = 250
eval_iters = 20
log_interval = 50
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
beta2 = 0.99
prompt = 'ROMEO:'
