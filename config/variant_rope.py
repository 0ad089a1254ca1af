# A research variant of config/pico_tiny.py; give both files, the variant last:
#   python train.py config/pico_tiny.py config/variant_rope.py
pos_emb = 'rope'
out_dir = 'out-rope'
