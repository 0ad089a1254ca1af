# A research variant of config/pico_tiny.py; give both files, the variant last:
#   python train.py config/pico_tiny.py config/variant_deltanet.py
attention = 'deltanet'
out_dir = 'out-deltanet'
