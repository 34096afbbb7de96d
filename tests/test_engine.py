"""The inference engine: batching never changes a request's tokens, and every sampling option does its job."""

import pytest
import torch

from binarylm.config import PRESETS, ModelConfig
from binarylm.errors import BinaryLMError
from binarylm.infer.beam import beam_search
from binarylm.infer.engine import Engine
from binarylm.infer.generate import generate_ids
from binarylm.infer.sampling import SamplingParams, process_logits, sample_rows
from binarylm.model import Transformer

BASE = dict(vocab_size=61, context_length=64, n_layer=2, n_head=4, d_model=32)
ARCHITECTURES = {
    "gpt2": {},
    "llama-gqa": dict(PRESETS["llama-tiny"], **BASE),
    "window-mqa-sinusoidal": dict(position="sinusoidal", n_kv_heads=1, sliding_window=6),
    "moe": dict(n_experts=3),
}


def model_of(kind: str = "gpt2", seed: int = 0, vocab_size: int = 61) -> Transformer:
    """float64, so that batched and one-at-a-time arithmetic cannot round to different argmaxes."""
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**BASE, **ARCHITECTURES[kind], "vocab_size": vocab_size})).double().eval()


def prompts_of(*lengths: int, vocab: int = 61) -> list[list[int]]:
    generator = torch.Generator().manual_seed(sum(lengths))
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_continuous_batching_gives_every_request_its_one_at_a_time_greedy_tokens(kind):
    model = model_of(kind)
    prompts = prompts_of(5, 9, 3, 12, 7, 1)
    budgets = [12, 3, 20, 7, 15, 9]  # requests leave at different steps, and waiting ones take their slots
    params = [SamplingParams(temperature=0, max_tokens=b) for b in budgets]
    batched = Engine(model, max_batch=3).generate(prompts, params)
    for prompt, budget, completion in zip(prompts, budgets, batched):
        assert completion.samples[0].token_ids == list(generate_ids(model, prompt, budget))
        assert completion.samples[0].finish_reason == "length"


def test_a_seeded_request_samples_the_same_tokens_whatever_else_is_in_the_batch():
    model = model_of()
    target = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, min_p=0.01, seed=42, max_tokens=16)
    alone = Engine(model, max_batch=1).generate(prompts_of(6), target)[0].samples[0].token_ids
    others = [SamplingParams(temperature=1.3, seed=i, max_tokens=5 + i, repetition_penalty=1.2) for i in range(4)]
    crowd = Engine(model, max_batch=4).generate(prompts_of(9, 6, 2, 4, 3)[:1] + prompts_of(6) + prompts_of(2, 4, 3),
                                                [others[0], target, *others[1:]])
    assert crowd[1].samples[0].token_ids == alone
    different_seed = Engine(model).generate(prompts_of(6), SamplingParams(**{**vars(target), "seed": 43}))
    assert different_seed[0].samples[0].token_ids != alone


def test_generate_ids_and_the_engine_draw_the_same_tokens_from_the_same_seed():
    model, prompt = model_of(), prompts_of(6)[0]
    settings = dict(temperature=0.9, top_k=20, top_p=0.95)
    engine = Engine(model, max_batch=2).generate([prompt], SamplingParams(**settings, seed=7, max_tokens=16))
    generator = torch.Generator().manual_seed(7)  # what the engine does with seed 7 for sample 0
    assert list(generate_ids(model, prompt, 16, **settings, generator=generator)) == engine[0].samples[0].token_ids


def test_n_samples_share_one_prefill_and_equal_separate_requests_with_successive_seeds():
    model = model_of(seed=1)
    prompt = prompts_of(8)[0]
    together = Engine(model, max_batch=4).generate([prompt], SamplingParams(temperature=1.0, n=3, seed=7,
                                                                             max_tokens=10))[0]
    for sample in together.samples:
        separate = Engine(model).generate([prompt], SamplingParams(temperature=1.0, seed=7 + sample.index,
                                                                   max_tokens=10))[0]
        assert sample.token_ids == separate.samples[0].token_ids
    assert len({tuple(s.token_ids) for s in together.samples}) > 1


def test_logprobs_equal_a_full_forward_passes_log_softmax():
    model = model_of("llama-gqa", seed=2)
    prompt = prompts_of(7)[0]
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=10, logprobs=3, prompt_logprobs=True)
    completion = Engine(model).generate([prompt], params)[0]
    sample = completion.samples[0]
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt + sample.token_ids]))
    log_probs = torch.log_softmax(logits[0], dim=-1)  # (T, V)
    for step, entry in enumerate(sample.logprobs):
        row = log_probs[len(prompt) - 1 + step]
        assert entry.token_id == sample.token_ids[step]
        assert abs(entry.logprob - row[entry.token_id].item()) < 1e-9
        assert [t for t, _ in entry.top] == torch.topk(row, 3).indices.tolist()
    expected = [None] + [log_probs[t - 1, prompt[t]].item() for t in range(1, len(prompt))]
    assert completion.prompt_logprobs[0] is None
    assert all(abs(a.logprob - b) < 1e-9 for a, b in zip(completion.prompt_logprobs[1:], expected[1:]))
    for t, entry in enumerate(completion.prompt_logprobs[1:], start=1):  # prompt tokens carry alternatives too
        assert entry.token_id == prompt[t]
        assert [i for i, _ in entry.top] == torch.topk(log_probs[t - 1], 3).indices.tolist()


def test_echo_scoring_with_no_new_tokens():
    model = model_of()
    completion = Engine(model).generate(prompts_of(5), SamplingParams(max_tokens=0, prompt_logprobs=True))[0]
    assert completion.samples[0].token_ids == [] and len(completion.prompt_logprobs) == 5


def test_stop_strings_cut_the_text_exactly_and_streaming_adds_up(small_tokenizer):
    model = model_of(seed=4, vocab_size=small_tokenizer.vocab_size)
    prompt = small_tokenizer.encode("def main():\n    ")
    free = Engine(model, small_tokenizer).generate([prompt], SamplingParams(temperature=0, max_tokens=40))[0]
    text = free.samples[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]  # a string that certainly appears
    assert stop and stop in text
    events = []
    engine = Engine(model, small_tokenizer)
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=40, stop=[stop]), on_event=events.append)
    while engine.has_work():
        engine.step()
    stopped = engine.finished.popitem()[1].samples[0]
    assert stopped.text == text[: text.index(stop)] and stopped.finish_reason == "stop"
    assert "".join(e.text for e in events) == stopped.text and events[-1].finish_reason == "stop"


def test_stop_token_ids_and_logit_bias():
    model = model_of(seed=5)
    prompt = prompts_of(4)[0]
    forced = Engine(model).generate([prompt], SamplingParams(temperature=0, max_tokens=6, logit_bias={17: 100.0}))
    assert forced[0].samples[0].token_ids == [17] * 6
    free = Engine(model).generate([prompt], SamplingParams(temperature=0, max_tokens=10))[0].samples[0].token_ids
    stopper = free[3]
    stopped = Engine(model).generate([prompt], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stopper]))
    assert stopped[0].samples[0].token_ids == free[: free.index(stopper)]
    assert stopped[0].samples[0].finish_reason == "stop"


def test_penalties_follow_their_formulas():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    counts = torch.tensor([[2, 0, 1, 0]])
    seen = torch.tensor([[True, True, False, False]])  # token 0, 1 seen (prompt or output)
    params = [SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)]
    got = process_logits(logits, params, counts, seen)
    expected = torch.tensor([[2.0 / 2 - 0.5 * 2 - 0.25, -1.0 * 2, 0.5 - 0.5 - 0.25, 3.0]])
    assert torch.allclose(got, expected)


def test_per_row_truncation_matches_the_shared_functions():
    torch.manual_seed(6)
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=0),
              SamplingParams(temperature=1.0, min_p=1.0)]
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    picks = sample_rows(logits, params, generators)
    assert picks.tolist() == logits.argmax(-1).tolist()  # top_k 1, greedy and min_p 1 all keep only the top
    wide = [SamplingParams(temperature=1.0, top_p=0.5, seed=0)] * 3
    for _ in range(20):
        picks = sample_rows(logits, wide, generators)
        for row, token in enumerate(picks.tolist()):
            probs = torch.softmax(logits[row], -1)
            sorted_probs, order = probs.sort(descending=True)
            rank = order.tolist().index(token)
            assert (sorted_probs[:rank].sum() < 0.5).item()  # inside the top-p nucleus


def test_aborting_frees_the_slot_for_a_waiting_request():
    model = model_of()
    engine = Engine(model, max_batch=1)
    first = engine.add_request(prompts_of(3)[0], SamplingParams(max_tokens=30))
    second = engine.add_request(prompts_of(4)[0], SamplingParams(temperature=0, max_tokens=5))
    engine.step()
    assert len(engine.running) == 1 and len(engine.waiting) == 1
    engine.abort(first)
    engine.step()
    assert engine.finished[first].samples[0].finish_reason == "abort"
    while engine.has_work():
        engine.step()
    assert engine.finished[second].samples[0].token_ids == list(generate_ids(model, prompts_of(4)[0], 5))


@pytest.mark.parametrize("prompt, params, message", [
    ([1] * 60, SamplingParams(max_tokens=10), "exceed the context of 64"),
    ([], SamplingParams(), "no tokens"),
    ([99], SamplingParams(), "outside the model's vocabulary"),
    ([1], SamplingParams(min_p=2.0), "min_p must be a number between 0.0 and 1.0"),
    ([1], SamplingParams(logit_bias={500: 1.0}), "token id 500"),
    ([1], SamplingParams(top_p=0.0), "top_p must be in"),
])
def test_bad_requests_are_clear_errors(prompt, params, message):
    with pytest.raises(BinaryLMError, match=message):
        Engine(model_of()).add_request(prompt, params)


@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa"])
def test_beam_search_with_one_beam_is_greedy_and_wider_beams_score_at_least_as_well(kind):
    model = model_of(kind, seed=7)
    prompt = prompts_of(5)[0]
    one = beam_search(model, prompt, beam_width=1, max_new_tokens=10)[0]
    assert one.token_ids == list(generate_ids(model, prompt, 10))
    wide = beam_search(model, prompt, beam_width=4, max_new_tokens=10, length_penalty=0.0)
    assert len(wide) == 4 and wide[0].log_prob >= one.log_prob - 1e-9
    assert [h.score for h in wide] == sorted((h.score for h in wide), reverse=True)
    end = one.token_ids[2]
    with_end = beam_search(model, prompt, beam_width=1, max_new_tokens=10, eos_id=end)[0]
    assert with_end.token_ids == one.token_ids[: one.token_ids.index(end) + 1] and with_end.finished


def test_a_draw_of_exactly_zero_still_picks_a_kept_token(monkeypatch):
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.zeros(1))
    picks = sample_rows(logits, [SamplingParams(temperature=1.0, top_k=1)], [None])
    assert picks.tolist() == [1]


def test_edge_settings_never_give_silent_nonsense():
    model = model_of(seed=8)
    prompt = prompts_of(4)[0]
    greedy = Engine(model).generate([prompt], GREEDY)[0].samples[0].token_ids
    tiny = Engine(model).generate([prompt], SamplingParams(temperature=1e-45, max_tokens=12))[0]
    assert tiny.samples[0].token_ids == greedy  # a vanishing temperature is greedy, not an overflow
    with pytest.raises(BinaryLMError, match="logit_bias values"):
        Engine(model).add_request(prompt, SamplingParams(logit_bias={3: float("inf")}))
    wide = Engine(model).generate([prompt], SamplingParams(max_tokens=2, logprobs=20))[0]
    assert len(wide.samples[0].logprobs[0].top) == 20
    engine = Engine(model)
    engine.add_request(prompt, request_id="mine")
    with pytest.raises(BinaryLMError, match="already in use"):
        engine.add_request(prompt, request_id="mine")


def test_every_request_gets_a_final_event_even_without_decoding():
    model = model_of()
    events = []
    engine = Engine(model, max_batch=1)
    engine.add_request(prompts_of(3)[0], SamplingParams(max_tokens=0, prompt_logprobs=True), on_event=events.append)
    engine.add_request(prompts_of(3)[0], SamplingParams(max_tokens=20), on_event=events.append)
    queued = engine.add_request(prompts_of(3)[0], SamplingParams(max_tokens=20), on_event=events.append)
    engine.step()
    engine.abort(queued)
    engine.step()
    finals = [(e.request_id, e.finish_reason) for e in events if e.finish_reason]
    assert ("req-0", "length") in finals and (queued, "abort") in finals


def test_prompts_admitted_together_are_prefilled_in_one_padded_forward_with_the_same_results():
    model = model_of("llama-gqa", seed=9)
    prompts = prompts_of(3, 11, 6)
    settings = [SamplingParams(max_tokens=0, prompt_logprobs=True),  # scoring only, in the middle of the queue
                SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=True),
                SamplingParams(temperature=1.0, seed=4, n=2, max_tokens=8)]
    together = Engine(model, max_batch=8).generate(prompts, settings)
    for prompt, setting, done in zip(prompts, settings, together):
        alone = Engine(model, max_batch=8).generate([prompt], setting)[0]
        assert [s.token_ids for s in done.samples] == [s.token_ids for s in alone.samples]
        if setting.prompt_logprobs:
            pairs = zip(done.prompt_logprobs[1:], alone.prompt_logprobs[1:])
            assert all(abs(a.logprob - b.logprob) < 1e-9 for a, b in pairs)
