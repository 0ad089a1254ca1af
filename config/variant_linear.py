# A research variant of config/pico_tiny.py; give both files, the variant last:
#   python train.py config/pico_tiny.py config/variant_linear.py
attention = 'linear'
out_dir = 'out-linear'
