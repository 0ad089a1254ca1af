"""The one sampling function: temperature, top-k and the course's nucleus_sampling."""
import pytest
import torch

from model import check_sampling_args, nucleus_sampling, sample_next_token, top_p_filter


def kept(probs, p):
    """Indices that top_p_filter keeps for a 1-D distribution."""
    return torch.nonzero(top_p_filter(torch.tensor([probs], dtype=torch.float64), p)[0]).flatten().tolist()


# Dyadic probabilities are exact in binary, so the boundary cases p == p(1)+...+p(k) are exact too.
@pytest.mark.parametrize('probs,p,expected', [
    ([0.5, 0.25, 0.125, 0.125], 0.5, [0]),  # p(1) = p exactly: k = 1
    ([0.5, 0.25, 0.125, 0.125], 0.5000001, [0, 1]),  # just over p(1): the second token is needed
    ([0.5, 0.25, 0.125, 0.125], 0.75, [0, 1]),
    ([0.5, 0.25, 0.125, 0.125], 0.8, [0, 1, 2]),
    ([0.5, 0.25, 0.125, 0.125], 0.1, [0]),  # the most likely token is always kept
    ([0.125, 0.5, 0.125, 0.25], 0.75, [1, 3]),  # unsorted input: the set is by probability, not position
    ([0.5, 0.25, 0.125, 0.125], 1.0, [0, 1, 2, 3]),  # p = 1 keeps everything
    ([0.5, 0.5, 0.0, 0.0], 1.0, [0, 1]),  # ... every token of non-zero probability
    ([0.25, 0.25, 0.25, 0.25], 0.5, [0, 1]),  # ties: the smallest k, ordered by token id
    ([0.25, 0.25, 0.25, 0.25], 0.6, [0, 1, 2]),
    ([0.125, 0.25, 0.25, 0.375], 0.5, [1, 3]),  # tie at the boundary between ids 1 and 2: id 1 goes first
])
def test_top_p_keeps_exactly_the_smallest_set(probs, p, expected):
    assert kept(probs, p) == expected


def test_top_p_renormalises_and_batches():
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.125, 0.125, 0.25, 0.5]], dtype=torch.float64)
    out = top_p_filter(probs, 0.75)
    assert torch.equal(out, torch.tensor([[2 / 3, 1 / 3, 0, 0], [0, 0, 1 / 3, 2 / 3]], dtype=torch.float64))


def test_nucleus_sampling_draws_only_from_the_nucleus():
    torch.manual_seed(0)
    probs = torch.tensor([0.05, 0.5, 0.05, 0.3, 0.1])
    logits = probs.log().expand(4000, -1)
    draws = nucleus_sampling(logits, 0.75).flatten()  # 0.5 < 0.75 <= 0.5 + 0.3
    assert set(draws.tolist()) == {1, 3}
    share = (draws == 1).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.03  # renormalised: 0.625 vs 0.375


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 1000)
    assert torch.equal(sample_next_token(logits, temperature=0, top_k=3, top_p=0.5), logits.argmax(-1, keepdim=True))


def test_top_k_samples_only_the_k_largest():
    torch.manual_seed(0)
    logits = torch.randn(1, 100).expand(3000, -1)
    top2 = set(torch.topk(logits[0], 2).indices.tolist())
    draws = sample_next_token(logits, temperature=10.0, top_k=2)  # flat distribution over the two
    assert set(draws.flatten().tolist()) == top2


def test_top_k_then_top_p_and_low_temperature():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 2.8]]).expand(2000, -1)
    assert set(sample_next_token(logits, top_k=3, top_p=0.3).flatten().tolist()) == {1}
    assert set(sample_next_token(logits, top_k=3, top_p=0.5).flatten().tolist()) == {1, 2}
    assert set(sample_next_token(logits, temperature=0.01).flatten().tolist()) == {1}


def test_sampling_follows_the_distribution():
    torch.manual_seed(0)
    probs = torch.tensor([0.1, 0.6, 0.3])
    draws = sample_next_token(probs.log().expand(6000, -1)).flatten()
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    assert torch.allclose(freq, probs, atol=0.03)


@pytest.mark.parametrize('kwargs,phrase', [
    (dict(temperature=-0.1), 'temperature=-0.1 must be >= 0'), (dict(top_k=0), 'top_k=0 must be >= 1'),
    (dict(top_p=0.0), 'top_p=0.0 must be in (0, 1]'), (dict(top_p=1.5), 'top_p=1.5 must be in (0, 1]'),
    (dict(max_new_tokens=-1), 'max_new_tokens=-1 must be in [0, 1,000,000]'),
])
def test_sampling_argument_errors(kwargs, phrase):
    with pytest.raises(ValueError) as e:
        check_sampling_args(**kwargs)
    assert phrase in str(e.value)
