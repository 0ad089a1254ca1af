"""
Write data/3seqs.txt: number sequences in the Pico-LLM course's --input_files format, one space-separated
integer sequence per line. The course's own file could not be retrieved, so this one is generated; its kinds
follow what the course's file is described as holding (counting runs, arithmetic and Fibonacci-like
sequences, powers of 2, constant runs).
    python data/make_3seqs.py
"""
import os
import random

n_lines = 3333  # as many as the course's file
seed = 1337

rng = random.Random(seed)


def sequence():
    kind = rng.choice(['count0', 'count', 'count', 'step', 'down', 'fib', 'pow2', 'const', 'squares'])
    n = rng.randint(8, 30)
    if kind == 'count0':  # counting from 0, the course's "0 1 2 3 4" example
        return list(range(n))
    if kind == 'count':
        a = rng.randint(0, 200)
        return list(range(a, a + n))
    if kind == 'step':
        a, d = rng.randint(0, 50), rng.randint(2, 9)
        return [a + d * i for i in range(n)]
    if kind == 'down':
        a = rng.randint(n, 200)
        return list(range(a, a - n, -1))
    if kind == 'fib':
        s = [rng.randint(0, 5), rng.randint(1, 5)]
        while len(s) < min(n, 20):
            s.append(s[-1] + s[-2])
        return s
    if kind == 'pow2':
        return [2 ** i for i in range(min(n, 16))]
    if kind == 'const':
        return [rng.randint(0, 9)] * n
    return [i * i for i in range(min(n, 25))]


path = os.path.join(os.path.dirname(os.path.abspath(__file__)), '3seqs.txt')
with open(path, 'w') as f:
    for _ in range(n_lines):
        f.write(' '.join(map(str, sequence())) + '\n')
print(f"wrote {n_lines} sequences to {path}")
