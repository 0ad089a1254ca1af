# The course's k-gram MLP (k=3) on the same data and token budget as config/pico_tiny.py, so the three model kinds
# compare on one plot:  python plot.py --runs=out-pico-tiny,out-pico-lstm,out-pico-kgram
#   python train.py config/pico_kgram.py
out_dir = 'out-pico-kgram'
dataset = 'tinystories_compact'
model_type = 'kgram_mlp'
kgram_k = 3
embed_size = 128
num_inner_mlp_layers = 1
block_size = 128
batch_size = 16
max_iters = 350
eval_interval = 50
eval_iters = 10
log_interval = 10
learning_rate = 3e-3
warmup_iters = 30
min_lr = 3e-4
