# A small Transformer on the bundled TinyStories slice, with its vocabulary compacted: ~2 minutes on 2 CPU cores.
#   python train.py config/pico_tiny.py           (the first run prepares data/tinystories_compact from the slice)
out_dir = 'out-pico-tiny'
dataset = 'tinystories_compact'
model_type = 'transformer'
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
batch_size = 16
max_iters = 350
eval_interval = 50
eval_iters = 10
log_interval = 10
learning_rate = 3e-3
warmup_iters = 30
min_lr = 3e-4
