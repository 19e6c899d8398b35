"""The decode loop behind the HF rollout backend (selfdistill/rollout/decode.py, hf.py).

The reference is a row-by-row loop with no cache, no padding and no batching: each step runs the
model on the row's whole sequence so far and samples with the same (seed, step) stream. The
backend must give the same token ids, and none of its speed-ups (prefix sharing, finished rows
leaving the batch, rows per call, the compiled step) may change a token."""

from __future__ import annotations

import pytest
import torch

from selfdistill.algo import grpo
from selfdistill.rollout import MetaMode, decode as decode_module
from selfdistill.rollout.direct_step import DirectDecoder
from selfdistill.rollout.hf import HFRolloutBackend, stop_token_ids
from selfdistill.rollout.sampling import sample_tokens
from tests.conftest import TINY_RUN, compose_config, random_tiny_model

A, B, P = MetaMode.ALLOW, MetaMode.BAN, MetaMode.PLACEBO
QUESTIONS = ("1+2", "17*3+5", "9", "100-7*2", "3*(4+5)")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from more threads, and spin-waiting ones slow a shared CPU down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """A tiny random model with large weights (std 0.3): varied greedy outputs, frequent EOS."""
    model, tok = random_tiny_model(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   head_dim=16, intermediate_size=64)
    return model.eval(), tok


def _prompts(tok, k=len(QUESTIONS)):
    return [tok(f"<|bos|>Q: {q}\nA: ", add_special_tokens=False)["input_ids"] for q in QUESTIONS[:k]]


@torch.no_grad()
def _reference(model, tok, backend, prompts, modes, seeds, *, max_new_tokens, temperature, top_p, greedy=False):
    """Completions (forced tokens included) of each row decoded alone without a cache."""
    out = []
    for prompt, mode, seed in zip(prompts, modes, seeds):
        forced = backend.placebo_ids if mode == P else []
        seq, gen = list(prompt) + forced, []
        for t in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
            if mode == B:
                logits[backend.meta_ids] = float("-inf")
            nxt = int(sample_tokens(logits[None], torch.tensor([seed]), t, temperature=temperature, top_p=top_p, greedy=greedy)[0])
            seq.append(nxt)
            gen.append(nxt)
            if nxt in backend.stop_ids:
                break
        out.append(forced + gen)
    return out


def _rows(batch):
    return [batch.completion_ids[i, : int(n)].tolist() for i, n in enumerate(batch.lengths)]


MIXED = dict(modes=[A, B, P, A, A, B, P, P, A, B, A, P], seeds=[11, 12, 13, 14, 2**62, 3, 0, 99, 5, 6, 7, 8])


def _mixed_prompts(tok):
    ps = _prompts(tok)
    return [ps[i] for i in (0, 0, 0, 1, 2, 1, 3, 0, 4, 4, 3, 2)]  # repeated prompts, mixed lengths


@pytest.mark.parametrize("temperature,top_p,greedy", [(1.0, 1.0, False), (0.8, 0.9, False), (1.0, 1.0, True)])
def test_backend_matches_row_by_row_reference(tiny, temperature, top_p, greedy):
    model, tok = tiny
    backend = HFRolloutBackend(model, tok)
    prompts = _mixed_prompts(tok)
    kw = dict(max_new_tokens=24, temperature=temperature, top_p=top_p, greedy=greedy)
    batch = backend.generate(prompts, MIXED["modes"], seeds=MIXED["seeds"], **kw)
    ref = _reference(model, tok, backend, prompts, MIXED["modes"], MIXED["seeds"], **kw)
    assert _rows(batch) == ref
    lengths = [len(r) for r in ref]
    assert len(set(lengths)) > 2, "the case needs rows that stop at different steps"
    for i, (mode, row) in enumerate(zip(MIXED["modes"], ref)):
        assert batch.truncated[i] == (row[-1] not in backend.stop_ids)
        if mode == P:  # forced placebo block: given tokens, kept out of the loss
            F = len(backend.placebo_ids)
            assert row[:F] == backend.placebo_ids and batch.forced_mask[i, :F].all() and not batch.forced_mask[i, F:].any()
        if mode == B:
            assert not set(row) & set(backend.meta_ids)


@pytest.mark.parametrize("share_prefix,compact,max_rows_per_call,direct_step", [
    (False, True, None, True), (True, False, None, True), (False, False, None, True), (True, True, 1, True),
    (True, True, 5, True), (False, True, 4, True), (True, True, None, False), (False, False, 3, False),
])
@pytest.mark.parametrize("greedy", [False, True])
def test_speedups_do_not_change_tokens(tiny, share_prefix, compact, max_rows_per_call, direct_step, greedy):
    model, tok = tiny
    prompts = _mixed_prompts(tok)
    kw = dict(max_new_tokens=24, temperature=1.0, top_p=0.95, greedy=greedy, seeds=MIXED["seeds"])
    default = HFRolloutBackend(model, tok).generate(prompts, MIXED["modes"], **kw)
    other = HFRolloutBackend(model, tok, share_prefix=share_prefix, compact=compact, direct_step=direct_step).generate(
        prompts, MIXED["modes"], max_rows_per_call=max_rows_per_call, **kw)
    assert torch.equal(other.completion_ids, default.completion_ids)
    assert torch.equal(other.completion_mask, default.completion_mask) and torch.equal(other.forced_mask, default.forced_mask)
    assert other.texts == default.texts


def test_a_row_alone_equals_the_row_in_a_batch_of_64(tiny):
    model, tok = tiny
    backend = HFRolloutBackend(model, tok)
    ps = _prompts(tok)
    prompts = [ps[i % 5] for i in range(64)]
    modes = [(A, B, P)[i % 3] for i in range(64)]
    seeds = [1000 + 7 * i for i in range(64)]
    kw = dict(max_new_tokens=20, temperature=1.0, top_p=1.0)
    batch = backend.generate(prompts, modes, seeds=seeds, **kw)
    for i in (0, 1, 2, 31, 63):
        alone = backend.generate([prompts[i]], [modes[i]], seeds=[seeds[i]], **kw)
        assert _rows(alone) == [_rows(batch)[i]], i
    assert len({tuple(r) for r in _rows(batch)[:5 * 3:5]}) == 3, "same prompt, other seeds: other samples"


@pytest.mark.parametrize("direct_step", [True, False])
def test_prefix_is_prefilled_once_and_finished_rows_leave_the_batch(tiny, monkeypatch, direct_step):
    """Spy on the forwards: the first (the HF model's prefill) runs the 5 distinct prefixes of 12
    rows (one placebo prefix among them), later ones (the decode steps: `DirectDecoder`'s, or the
    HF model's with `direct_step=False`) shrink as rows stop."""
    model, tok = tiny
    batches = []
    handle = model.register_forward_pre_hook(lambda _m, _a, kw: batches.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    direct_call = DirectDecoder.__call__
    monkeypatch.setattr(DirectDecoder, "__call__", lambda self, m, ids, *a: batches.append(tuple(ids.shape)) or direct_call(self, m, ids, *a))
    try:
        prompts = [p for p in _prompts(tok, 4) for _ in range(3)]
        modes = [A, A, P] * 4
        HFRolloutBackend(model, tok, direct_step=direct_step).generate(prompts, modes, seeds=list(range(12)), max_new_tokens=30,
                                                                       temperature=1.0, top_p=1.0)
    finally:
        handle.remove()
    assert batches[0][0] == 8  # 4 prompts, each plain and with the placebo block
    decode_rows = [b[0] for b in batches[1:]]
    assert all(shape[1] == 1 for shape in batches[1:]) and decode_rows[0] == 12
    assert decode_rows == sorted(decode_rows, reverse=True) and decode_rows[-1] < 12


def test_stop_ids_are_the_tokenizer_eos_and_the_generation_config_eos(tiny):
    model, tok = tiny
    saved = model.generation_config.eos_token_id
    try:
        for value, expected in ((None, [tok.eos_token_id]), (7, sorted({tok.eos_token_id, 7})),
                                ([9, tok.eos_token_id, 11], sorted({tok.eos_token_id, 9, 11}))):
            model.generation_config.eos_token_id = value
            assert stop_token_ids(model, tok) == expected
    finally:
        model.generation_config.eos_token_id = saved


def test_each_stop_id_stops_generation(tiny):
    """Greedy rows without extra stop ids, then with a token they emit midway as a stop id (in the
    generation config, int and list forms): each row ends at that token's first occurrence."""
    model, tok = tiny
    prompts = _prompts(tok)
    kw = dict(max_new_tokens=30, temperature=1.0, top_p=1.0, greedy=True)
    free = _rows(HFRolloutBackend(model, tok).generate(prompts, [A] * 5, **kw))
    row = max(free, key=len)
    candidates = [t for t in dict.fromkeys(row[2:-1]) if t != tok.eos_token_id][:2]
    assert len(candidates) == 2, row
    saved = model.generation_config.eos_token_id
    try:
        for gen_eos in (candidates[0], candidates):
            model.generation_config.eos_token_id = gen_eos
            backend = HFRolloutBackend(model, tok)
            stops = set(backend.stop_ids)
            assert stops == {tok.eos_token_id, *([gen_eos] if isinstance(gen_eos, int) else gen_eos)}
            batch = backend.generate(prompts, [A] * 5, **kw)
            for got, full in zip(_rows(batch), free):
                cut = next((k for k, t in enumerate(full) if t in stops), None)
                assert got == (full if cut is None else full[: cut + 1])
            assert any(r[-1] in stops - {tok.eos_token_id} for r in _rows(batch))
            assert not any(t in stops for text in batch.texts for t in tok(text, add_special_tokens=False)["input_ids"])
    finally:
        model.generation_config.eos_token_id = saved


def test_without_seeds_samples_follow_the_global_rng(tiny):
    model, tok = tiny
    backend = HFRolloutBackend(model, tok)
    prompts = _prompts(tok) * 4
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=1.0)
    torch.manual_seed(5)
    a = backend.generate(prompts, [A] * 20, **kw)
    torch.manual_seed(5)
    b = backend.generate(prompts, [A] * 20, **kw)
    c = backend.generate(prompts, [A] * 20, **kw)
    assert torch.equal(a.completion_ids, b.completion_ids) and not torch.equal(b.completion_ids, c.completion_ids)


def test_ban_rows_never_sample_meta_tags(tiny):
    """At T=3 the allow rows emit the meta tags; the ban rows of the same prompts and seeds never do."""
    model, tok = tiny
    backend = HFRolloutBackend(model, tok)
    prompts = _prompts(tok) * 8
    kw = dict(max_new_tokens=40, temperature=3.0, top_p=1.0, seeds=list(range(40)))
    meta = set(backend.meta_ids)
    allowed = _rows(backend.generate(prompts, [A] * 40, **kw))
    banned = _rows(backend.generate(prompts, [B] * 40, **kw))
    assert sum(bool(set(r) & meta) for r in allowed) >= 3
    assert not any(set(r) & meta for r in banned)


def test_group_rollouts_use_the_rollout_config(tiny, monkeypatch):
    """generate_group_rollouts -> one decode call per `rollout.max_rows_per_call` rows, compiled
    when `rollout.compile` (a spy on the decode loop)."""
    model, tok = tiny
    calls = []
    real = decode_module.decode

    def spy(model, prefixes, *args, options, **kwargs):
        calls.append((len(prefixes), options.compiled))
        return real(model, prefixes, *args, options=options, **kwargs)

    monkeypatch.setattr("selfdistill.rollout.hf.decode", spy)
    cfg = compose_config(["experiment=demo", *TINY_RUN, "rollout.n=4", "rollout.max_rows_per_call=3"])
    batch = grpo.generate_group_rollouts(HFRolloutBackend(model, tok), _prompts(tok, 2), cfg, seeds=[1, 2])
    assert len(batch) == 8 and calls == [(3, False), (3, False), (2, False)]
    assert batch.group_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("override, match", [
    ("rollout.max_rows_per_call=0", "max_rows_per_call=0 must be >= 1"),
])
def test_rollout_config_is_checked(override, match):
    from selfdistill.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        compose_config([override])


def test_bad_calls_are_refused(tiny):
    model, tok = tiny
    backend = HFRolloutBackend(model, tok)
    kw = dict(max_new_tokens=4, temperature=1.0, top_p=1.0)
    with pytest.raises(ValueError, match="max_rows_per_call=0"):
        backend.generate(_prompts(tok, 1), [A], max_rows_per_call=0, **kw)
    with pytest.raises(ValueError, match="empty prompt"):
        backend.generate([[]], [A], **kw)
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        backend.generate(_prompts(tok, 2), [A, A], seeds=[1], **kw)
    assert len(backend.generate([], [], **kw)) == 0


@pytest.mark.slow
def test_compiled_decode_matches_eager(tiny, monkeypatch):
    """rollout.compile: the torch.compile'd step over the static cache gives the eager tokens (the
    compiled step ran: a spy on its builder)."""
    from selfdistill.rollout import compiled

    model, tok = tiny
    built = []
    real = compiled.compiled_decode_step
    monkeypatch.setattr(compiled, "compiled_decode_step", lambda m: built.append(m) or real(m))
    prompts = _mixed_prompts(tok)
    kw = dict(max_new_tokens=24, temperature=1.0, top_p=0.9, seeds=MIXED["seeds"])
    eager = HFRolloutBackend(model, tok).generate(prompts, MIXED["modes"], **kw)
    compiled_out = HFRolloutBackend(model, tok).generate(prompts, MIXED["modes"], compile=True, **kw)
    assert built and torch.equal(compiled_out.completion_ids, eager.completion_ids)
    assert model.config._attn_implementation == "sdpa"  # the packed decode attention is put back
