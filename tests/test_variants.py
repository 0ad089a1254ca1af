"""The research variants of the one GPT: RoPE / NoPE, pre / post norm, linear and gated linear attention,
DeltaNet and Gated DeltaNet."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, greedy_reference, run_script, script_functions

from model import (GPT, GPTConfig, apply_rope, check_config, delta_rule_chunked, delta_rule_recurrent,
                   linear_attention_chunked, linear_attention_recurrent, rope_tables)


@pytest.mark.parametrize('decay', [False, True], ids=['linear', 'gla'])
@pytest.mark.parametrize('chunk_size', [1, 4, 8, 16, 64])
def test_chunked_and_recurrent_forms_agree(decay, chunk_size):
    """Outputs, final state and every gradient agree within 1e-10 in float64, for chunk sizes that do and
    do not divide the length (37), starting from an empty and from a carried state."""
    torch.manual_seed(0)
    B, H, T, dk, dv = 2, 3, 37, 4, 5
    q, k, v = (torch.randn(B, H, T, d, dtype=torch.float64, requires_grad=True) for d in (dk, dk, dv))
    ld = (F.logsigmoid(torch.randn(B, H, T, dk, dtype=torch.float64) * 3) / 2).requires_grad_() if decay else None
    s0 = torch.randn(B, H, dk, dv, dtype=torch.float64, requires_grad=True)
    inputs = [q, k, v, s0] + ([ld] if decay else [])
    w = torch.randn(B, H, T, dv, dtype=torch.float64)
    results = []
    for form in (linear_attention_recurrent, lambda *a, state: linear_attention_chunked(*a, chunk_size, state=state)):
        for state in (None, s0):
            o, s = form(q, k, v, ld, state=state)
            grads = torch.autograd.grad((o * w).sum() + s.sum(), inputs, allow_unused=True)
            results.append((o, s, grads))
    for (o1, s1, g1), (o2, s2, g2) in zip(results[:2], results[2:]):
        assert (o1 - o2).abs().max() < 1e-10 and (s1 - s2).abs().max() < 1e-10
        for a, b in zip(g1, g2):
            assert (a is None and b is None) or (a - b).abs().max() < 1e-10


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def delta_inputs(B, H, T, dk, dv, dtype, gated):
    """Unit-norm q, k, values, write strengths in (0, 1) and per-head log decays (or None), as the model makes them."""
    q, k = (F.normalize(torch.randn(B, H, T, dk, dtype=dtype), dim=-1) for _ in range(2))
    beta = torch.sigmoid(torch.randn(B, H, T, 1, dtype=dtype) * 2)
    ld = -F.softplus(torch.randn(B, H, T, 1, dtype=dtype)) if gated else None
    return q, k, torch.randn(B, H, T, dv, dtype=dtype), beta, ld


@pytest.mark.parametrize('gated', [False, True], ids=['deltanet', 'gated_deltanet'])
@pytest.mark.parametrize('chunk_size', [1, 4, 16, 64])
def test_delta_rule_chunked_and_recurrent_forms_agree(gated, chunk_size):
    """The WY / UT-transform chunked form gives the recurrence's outputs and final state within 1e-5 relative
    in float32, for lengths that are not a multiple of the chunk (37, 50), from an empty and a carried state."""
    torch.manual_seed(0)
    for T in (37, 50):
        q, k, v, beta, ld = delta_inputs(2, 3, T, 8, 5, torch.float32, gated)
        for s0 in (None, torch.randn(2, 3, 8, 5)):
            o1, s1 = delta_rule_recurrent(q, k, v, beta, ld, state=s0)
            o2, s2 = delta_rule_chunked(q, k, v, beta, ld, chunk_size, state=s0)
            assert relative(o2, o1) < 1e-5 and relative(s2, s1) < 1e-5
    # the delta rule overwrites: one key written twice recalls the second value, where linear attention sums both
    key = F.normalize(torch.randn(1, 1, 1, 8), dim=-1).expand(1, 1, 2, 8)
    v = torch.randn(1, 1, 2, 5)
    o, _ = delta_rule_chunked(key, key, v, torch.ones(1, 1, 2, 1), None, chunk_size)
    assert torch.allclose(o[:, :, 1], v[:, :, 1], atol=1e-5)
    assert torch.allclose(linear_attention_chunked(key, key, v, None, chunk_size)[0][:, :, 1], v.sum(2), atol=1e-5)


@pytest.mark.parametrize('gated', [False, True], ids=['deltanet', 'gated_deltanet'])
def test_delta_rule_gradients_agree_in_float64(gated):
    torch.manual_seed(0)
    inputs = [t.requires_grad_() for t in delta_inputs(1, 2, 21, 4, 3, torch.float64, gated) if t is not None]
    q, k, v, beta = inputs[:4]
    ld = inputs[4] if gated else None
    w = torch.randn(1, 2, 21, 3, dtype=torch.float64)
    grads = [torch.autograd.grad((o * w).sum() + s.sum(), inputs)
             for o, s in (delta_rule_recurrent(q, k, v, beta, ld), delta_rule_chunked(q, k, v, beta, ld, 8))]
    for a, b in zip(*grads):
        assert (a - b).abs().max() < 1e-10


@pytest.mark.parametrize('pos_emb', ['rope', 'none'])
@pytest.mark.parametrize('attention', ['deltanet', 'gated_deltanet'])
def test_delta_attention_prefill_then_steps_equals_the_chunked_forward(attention, pos_emb):
    """The layer as generation runs it (a chunked prefill, then one token at a time from the carried state)
    against one chunked forward of the whole sequence, float32, 1e-5 relative, RoPE on and off."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=32, n_layer=1, n_head=2, n_embd=32, attention=attention,
                          pos_emb=pos_emb, chunk_size=8)).eval()
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 45, 32)
    rope = (model.rope_cos[:45], model.rope_sin[:45]) if pos_emb == 'rope' else None
    with torch.no_grad():
        full = attn(x, rope=rope)
        steps = [attn(x[:, :13], 0, None if rope is None else (rope[0][:13], rope[1][:13]))]
        for t in range(13, 45):
            steps.append(attn(x[:, t:t + 1], t, None if rope is None else (rope[0][t:t + 1], rope[1][t:t + 1])))
    assert relative(torch.cat(steps, dim=1), full) < 1e-5


@pytest.mark.parametrize('attention', ['deltanet', 'gated_deltanet'])
def test_delta_attention_gradients_are_finite_at_length_1024_under_bfloat16_autocast(attention):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=1024, vocab_size=32, n_layer=1, n_head=2, n_embd=32, attention=attention))
    x = torch.randint(0, 32, (1, 1025))
    with torch.autocast('cpu', torch.bfloat16):
        _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.transformer.h[0].attn.beta_proj.weight.grad.abs().sum() > 0


def test_rope_scores_depend_only_on_the_offset():
    torch.manual_seed(0)
    cos, sin = rope_tables(8, 64, 10000.0)
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)

    def score(m, n):
        rq = apply_rope(q.view(1, 1, 1, 8), cos[m:m + 1], sin[m:m + 1])
        rk = apply_rope(k.view(1, 1, 1, 8), cos[n:n + 1], sin[n:n + 1])
        return (rq * rk).sum().item()
    for m, n in [(5, 2), (9, 9), (30, 1)]:
        for shift in (1, 7, 33):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-12)
    assert abs(score(5, 2) - score(6, 2)) > 1e-3  # and it does depend on the offset


# the delta rule's kinds under every position scheme (norms do not touch the state; 6 more, not 24)
COMBOS = list(itertools.product(['learned', 'rope', 'none'], ['layernorm', 'rmsnorm'], ['pre', 'post'],
                                ['softmax', 'linear', 'gla'])) + \
    list(itertools.product(['learned', 'rope', 'none'], ['rmsnorm'], ['pre'], ['deltanet', 'gated_deltanet']))


def counting_batch(n, length):
    """Sequences counting by a step d in {1, 2, 3} (mod 29), d drawn per sequence: the last token narrows
    the next to three, and attention to the one before it tells which."""
    x0, d = torch.randint(0, 29, (n, 1)), torch.randint(1, 4, (n, 1))
    return (x0 + d * torch.arange(length)) % 29


def trained(config, steps=150, seed=0):
    """A small model trained in float64 on counting_batch, so that its weights are far from their initial
    values and greedy decoding depends on what attention computes (all 42 combinations reach a loss of
    0.4-1.0 nats, below the ln 3 that the last token alone allows)."""
    torch.manual_seed(seed)
    model = GPT(config).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        seq = counting_batch(16, config.block_size + 1)
        _, loss = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize('pos_emb,norm,norm_position,attention', COMBOS,
                         ids=['-'.join(c) for c in COMBOS])
def test_greedy_generate_equals_recompute(pos_emb, norm, norm_position, attention):
    """KV cache or recurrent state, over a prompt longer than one chunk and past block_size (where every
    attention kind conditions on the last block_size tokens), in float64."""
    config = GPTConfig(block_size=20, vocab_size=32, n_layer=2, n_head=2, n_embd=16, pos_emb=pos_emb, norm=norm,
                       norm_position=norm_position, attention=attention, chunk_size=5)
    model = trained(config)
    prompt = counting_batch(2, 12)
    out = model.generate(prompt, 25, temperature=0)
    assert torch.equal(out, greedy_reference(model, prompt, 25))
    assert len(set(out[0, 12:].tolist())) > 3  # decoding varies: the state and positions matter


@pytest.mark.parametrize('attention', ['linear', 'gla', 'deltanet', 'gated_deltanet'])
def test_short_convolution_generates_as_it_recomputes(attention):
    """The short convolution's last inputs, carried while generating, give what recomputing the whole text
    gives: over a prompt shorter than the kernel, one longer, and past block_size."""
    config = GPTConfig(block_size=20, vocab_size=32, n_layer=2, n_head=2, n_embd=16, pos_emb='rope',
                       attention=attention, chunk_size=5, short_conv=4)
    model = trained(config)
    for n in (2, 12):
        prompt = counting_batch(2, n)
        assert torch.equal(model.generate(prompt, 25, temperature=0), greedy_reference(model, prompt, 25))
    x = counting_batch(2, 12)  # causal: a later token changes no earlier position's output
    y = x.clone()
    y[:, 8] = (y[:, 8] + 1) % 32
    assert torch.equal(model(x)[0][:, :8], model(y)[0][:, :8]) and not torch.equal(model(x)[0], model(y)[0])
    with pytest.raises(ValueError, match='short_conv=4 is an option of the linear family'):
        check_config(GPTConfig(attention='softmax', short_conv=4))


@pytest.mark.parametrize('attention', ['softmax', 'linear', 'gla', 'deltanet', 'gated_deltanet'])
@pytest.mark.parametrize('pos_emb', ['learned', 'rope', 'none'])
def test_every_kind_trains_in_float32(attention, pos_emb):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=32, attention=attention,
                          pos_emb=pos_emb, chunk_size=6))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.arange(17).repeat(8, 1) % 32  # counting: learnable by every kind
    losses = []
    for _ in range(30):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert model.generate(x[:1, :4], 8, temperature=0).shape == (1, 12)


@pytest.mark.parametrize('attention', ['softmax', 'linear', 'gla', 'deltanet', 'gated_deltanet'])
def test_attention_weights_reproduce_the_attention(attention):
    """interpret.py's attention_weights is the causal matrix that mixes the values: rows of softmax and linear
    attention sum to 1, and weights @ v gives the attention's output (before the head norm and output gate of GLA)."""
    (attention_weights,) = script_functions('interpret.py', 'attention_weights')
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16, attention=attention,
                          pos_emb='rope', chunk_size=4)).double().eval()
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    rope = (model.rope_cos[:11], model.rope_sin[:11])
    w = attention_weights(attn, x, rope)
    assert w.shape == (2, 2, 11, 11) and torch.all(w.triu(1) == 0)
    if attention == 'softmax':
        q, k, v = attn.qkv(x, rope)
        assert torch.allclose(w.sum(-1), torch.ones(2, 2, 11, dtype=torch.float64))
        assert torch.allclose(w @ v, F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return
    q, k, v = attn.qkv(x)
    rq, rk = apply_rope(q, *rope), apply_rope(k, *rope)
    if attention == 'linear':  # with RoPE the numerator's features are rotated, the normalizer's are not
        numerator = linear_attention_chunked(rq, rk, v, None, 4)[0]
        normalizer = linear_attention_chunked(q, k, torch.ones_like(v[..., :1]), None, 4)[0]
        assert torch.allclose(w @ v, numerator / normalizer)
        plain = attention_weights(attn, x)  # without RoPE, rows are convex weights
        assert torch.allclose(plain.sum(-1), torch.ones(2, 2, 11, dtype=torch.float64)) and plain.min() >= 0
    elif attention == 'gla':
        log_decay = (F.logsigmoid(attn.gate_proj(x)) / 16).view(2, 11, 2, -1).transpose(1, 2)
        assert torch.allclose(w @ v, linear_attention_chunked(rq, rk, v, log_decay, 4)[0])
    else:  # the delta rule: the recurrence's outputs, token by token
        log_decay = attn.log_decay(x) if attention == 'gated_deltanet' else None
        assert torch.allclose(w @ v, delta_rule_recurrent(rq, rk, v, attn.beta(x), log_decay)[0])


def test_parameter_counts_match_across_attention_kinds():
    counts = {a: sum(p.numel() for p in GPT(GPTConfig(block_size=64, vocab_size=100, n_layer=2, n_head=4, n_embd=128,
                                                      attention=a)).parameters())
              for a in ('softmax', 'linear', 'gla', 'deltanet', 'gated_deltanet')}
    assert counts['linear'] == counts['softmax']
    for a in ('gla', 'deltanet', 'gated_deltanet'):  # the rank-16 gate, or b and a per head, only
        assert abs(counts[a] - counts['softmax']) / counts['softmax'] < 0.02


def test_bad_option_values(tmp_path):
    with pytest.raises(ValueError,
                       match="attention='flash' is not one of: softmax, linear, gla, deltanet, gated_deltanet"):
        GPT(GPTConfig(attention='flash'))
    with pytest.raises(ValueError, match="pos_emb='alibi' is not one of: learned, rope, none"):
        GPT(GPTConfig(pos_emb='alibi'))
    with pytest.raises(ValueError, match="norm_position='sandwich' is not one of: pre, post"):
        GPT(GPTConfig(norm_position='sandwich'))
    assert_one_line_error(run_script('train.py', '--attention=flash', f'--out_dir={tmp_path}'),
                          "attention='flash' is not one of: softmax, linear, gla, deltanet, gated_deltanet")
    assert_one_line_error(run_script('train.py', '--model_type=gpt2', '--pos_emb=rope', f'--out_dir={tmp_path}'),
                          "options of model_type='transformer'", "fine-tuning keeps the pretrained model's architecture")


@pytest.mark.parametrize('attention', ['linear', 'gla', 'gated_deltanet'])
def test_half_precision_state_decodes_like_the_chunked_forward(attention):
    """With bfloat16 weights the recurrent state is summed in float32: 1,000 tokens on, token-by-token
    attention still gives what the chunked form gives for the whole sequence (a bfloat16 state drifts)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=1000, vocab_size=64, n_layer=1, n_head=2, n_embd=32, attention=attention,
                          pos_emb='none')).to(torch.bfloat16)
    attn = model.transformer.h[0].attn
    x = torch.randn(1, 1000, 32).to(torch.bfloat16)
    with torch.no_grad():
        full = attn(x)[0, -1].float()
        attn(x[:, :8], start_pos=0)
        for t in range(8, 1000):
            step = attn(x[:, t:t + 1], start_pos=t)[0, -1].float()
    assert (step - full).norm() / full.norm() < 0.02
