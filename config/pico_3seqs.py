# A small Transformer on the bundled number sequences (data/3seqs.txt, one sequence per line), ~1 minute on 2 CPU cores.
#   python train.py config/pico_3seqs.py          (the first run prepares data/3seqs_compact from data/3seqs.txt)
#   python sample.py --init_from=resume --out_dir=out-pico-3seqs --start="0 1 2 3 4" --top_k=1
out_dir = 'out-pico-3seqs'
dataset = '3seqs_compact'
model_type = 'transformer'
n_layer = 3
n_head = 4
n_embd = 128
block_size = 64
batch_size = 32
max_iters = 300
eval_interval = 100
eval_iters = 10
log_interval = 20
learning_rate = 3e-3
warmup_iters = 30
min_lr = 3e-4
prompt = '0 1 2 3 4'
