# A research variant of config/pico_tiny.py; give both files, the variant last:
#   python train.py config/pico_tiny.py config/variant_gated_deltanet.py
attention = 'gated_deltanet'
out_dir = 'out-gated_deltanet'
