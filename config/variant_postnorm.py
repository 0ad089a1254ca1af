# A research variant of config/pico_tiny.py; give both files, the variant last:
#   python train.py config/pico_tiny.py config/variant_postnorm.py
norm_position = 'post'
out_dir = 'out-postnorm'
