# The course's LSTM baseline on the same data and token budget as config/pico_tiny.py, so the three model kinds
# compare on one plot:  python plot.py --runs=out-pico-tiny,out-pico-lstm,out-pico-kgram
#   python train.py config/pico_lstm.py
out_dir = 'out-pico-lstm'
dataset = 'tinystories_compact'
model_type = 'lstm'
embed_size = 128
hidden_size = 256
block_size = 128
batch_size = 16
max_iters = 350
eval_interval = 50
eval_iters = 10
log_interval = 10
learning_rate = 3e-3
warmup_iters = 30
min_lr = 3e-4
