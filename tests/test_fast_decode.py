"""The fast single-signal path (finetune/eval/fast_decode.py) on the tiny trade-signals run: fast-forwarded,
prefix-cached answers equal generate_answers' constrained greedy ones, the cached prefix is left as it was between
requests, and a merged adapter answers as the unmerged one."""
import pytest
import torch

from conftest import ROOT, single_torch_thread
from finetune.data.pipeline import read_jsonl
from finetune.errors import ConfigError
from finetune.eval.fast_decode import PrefixDecoder, render
from finetune.eval.likelihood import common_prefix
from finetune.eval.suite import generate_answers
from finetune.serving.inference import SignalProvider
from test_inference import SNAPSHOTS, tiny_signal_run

N = 24  # held-out-like prompts: the last lines of the demo data (the tiny run trained on data/trades.db)


one_thread = pytest.fixture(scope="module", autouse=True)(single_torch_thread)


@pytest.fixture(scope="module")
def run_dir(cache_dir):
    return tiny_signal_run(cache_dir)


@pytest.fixture(scope="module")
def provider(run_dir):
    return SignalProvider.from_run(run_dir, constrained=True)


@pytest.fixture(scope="module")
def chats():
    return [s["messages"][:-1] for s in read_jsonl(ROOT / "data" / "demo_signals.jsonl")[-N:]]


@pytest.fixture(scope="module")
def reference(provider, chats):
    """Today's constrained greedy answers, one prompt per generate() call."""
    outs = [generate_answers(provider.model, provider.tokenizer, [c], provider.max_new_tokens, 1, progress=False,
                             grammar=provider.grammar) for c in chats]
    return [{key: out[key][0] for key in ("texts", "tokens", "stopped")} for out in outs]


@pytest.fixture(scope="module")
def decoder(provider):
    probes = [provider.signal_prompt({"rsi": 50}), provider.signal_prompt({"price": 1})]
    return PrefixDecoder(provider.model, provider.tokenizer, provider.grammar, probes)


def test_fast_answers_equal_constrained_greedy_answers(decoder, chats, reference):
    assert len(decoder.prefix) > 10  # the system turn is cached
    answers = [decoder.answer(c, 32) for c in chats]
    assert [{"texts": a["text"], "tokens": a["tokens"], "stopped": a["stopped"]} for a in answers] == reference
    assert len({r["texts"] for r in reference}) > 1  # varied answers, not one string everywhere
    # forced runs went through in one pass: far fewer passes than answer tokens
    assert sum(a["passes"] for a in answers) < sum(a["tokens"] for a in answers) / 2


def test_the_cached_prefix_is_left_as_it_was(decoder, provider, chats, reference):
    length = decoder.cache.get_seq_length()
    first = decoder.cache.layers[0].keys.clone()
    a, b = chats[0], chats[1]
    assert [decoder.answer(c, 32)["text"] for c in (a, b, a)] == [reference[i]["texts"] for i in (0, 1, 0)]
    assert decoder.cache.get_seq_length() == length and torch.equal(decoder.cache.layers[0].keys, first)
    uncached = PrefixDecoder(provider.model, provider.tokenizer, provider.grammar)  # no probes: no prefix cache
    assert uncached.cache is None and uncached.answer(b, 32)["text"] == reference[1]["texts"]


def test_a_prompt_that_parts_inside_the_prefix_runs_from_there(decoder, provider, reference, chats):
    """A prompt without the system turn shares only the template's first tokens with the cached prefix."""
    chat = chats[2][1:]
    ids = render(provider.tokenizer, chat)
    assert len(common_prefix([decoder.prefix, ids])) < len(decoder.prefix)
    expected = generate_answers(provider.model, provider.tokenizer, [chat], 32, 1, progress=False,
                                grammar=provider.grammar)["texts"]
    assert [decoder.answer(chat, 32)["text"]] == expected


def test_the_token_budget_cuts_the_answer_where_generate_does(decoder, provider, chats):
    for budget in (1, 3, 7):
        expected = generate_answers(provider.model, provider.tokenizer, [chats[3]], budget, 1, progress=False,
                                    grammar=provider.grammar)
        out = decoder.answer(chats[3], budget)
        assert (out["text"], out["tokens"], out["stopped"]) == (expected["texts"][0], budget, False)


def test_the_provider_gives_the_same_signals_fast_or_not(run_dir, provider):
    slow = SignalProvider(provider.model, provider.tokenizer, constrained=True, fast=False)
    one_by_one = [provider.get_signal(m) for m in SNAPSHOTS]
    assert provider._decoder is not None  # the single signals took the fast path
    assert one_by_one == [slow.get_signal(m) for m in SNAPSHOTS] == provider.get_signals(SNAPSHOTS)
    assert provider.fallbacks == 0  # constrained answers always carry a signal and a confidence


def test_merged_weights_answer_as_the_adapter_does(run_dir, provider, chats, reference):
    merged = SignalProvider.from_run(run_dir, merge=True, constrained=True)
    assert not hasattr(merged.model, "disable_adapter")  # a plain model: the adapter is in its weights
    assert [merged.generate_constrained([c])[0] for c in chats] == [r["texts"] for r in reference]


def test_a_static_cache_with_a_compiled_decode_step_answers_the_same(run_dir, chats, reference):
    """static=True, as on CUDA: generate() on transformers' static KV cache, its decode step compiled (asked for on
    CPU here with transformers' own flag), compiled at warm(): the same answers, one by one and batched, with no
    compiling left for the requests."""
    from transformers import CompileConfig
    compile_on_cpu = CompileConfig()
    compile_on_cpu._compile_all_devices = True  # generate() compiles on accelerators only, unless told
    static = SignalProvider.from_run(run_dir, merge=True, constrained=True, static=True, batch_size=8,
                                     generation={"compile_config": compile_on_cpu})
    assert not static.fast and static.generation["cache_implementation"] == "static"
    static.warm(room=64)
    assert hasattr(static.model, "_compiled_call")  # generate() took the compiled decode step
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    want = [r["texts"] for r in reference]
    assert [static.generate_constrained([c])[0] for c in chats] == want
    assert static.generate_constrained(chats) == want
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # warm() compiled every shape used


def test_static_refuses_a_prompt_learning_adapter(run_dir):
    from peft import PrefixTuningConfig, get_peft_model
    provider = SignalProvider.from_run(run_dir, merge=True)
    prefixed = get_peft_model(provider.model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ConfigError, match="static=True: a prompt-learning adapter"):
        SignalProvider(prefixed, provider.tokenizer, static=True)


def test_constrained_needs_a_task_with_a_grammar(provider):
    with pytest.raises(ConfigError, match="task=sentiment has no answer grammar.*signals"):
        SignalProvider(provider.model, provider.tokenizer, task="sentiment", constrained=True)


def test_a_proposal_greedy_would_not_make_is_cut_where_it_parts(provider, chats, reference):
    """Forced bytes proposed one character a token (a split the grammar allows but greedy decoding does not pick):
    the first token greedy picks instead is kept, the rest of the proposal masked out of the cache, same answers."""
    tokenizer = provider.tokenizer

    class CharByChar(PrefixDecoder):
        def propose(self, matcher):  # forced bytes only; the drafts come from earlier answers as usual
            forced = tokenizer.decode(matcher.compute_ff_tokens())
            return [t for ch in forced for t in tokenizer(ch, add_special_tokens=False)["input_ids"]]

    probes = [provider.signal_prompt({"rsi": 50}), provider.signal_prompt({"price": 1})]
    decoder = CharByChar(provider.model, provider.tokenizer, provider.grammar, probes)
    canonical = PrefixDecoder(provider.model, provider.tokenizer, provider.grammar, probes)
    answers = [decoder.answer(c, 32) for c in chats[:8]]
    assert [(a["text"], a["tokens"]) for a in answers] == [(r["texts"], r["tokens"]) for r in reference[:8]]
    assert sum(a["passes"] for a in answers) > sum(canonical.answer(c, 32)["passes"] for c in chats[:8])
    batch = decoder.answers(chats[:8], 32)  # and in a batch, row by row
    assert [(a["text"], a["tokens"]) for a in batch] == [(r["texts"], r["tokens"]) for r in reference[:8]]


def test_a_batch_answers_as_each_prompt_alone(decoder, provider, chats, reference):
    """Prompts of different lengths (one without the system turn, so parting inside the cached prefix) and budgets
    that cut the answers: each row's answer is its answer alone."""
    mixed = chats[:10] + [chats[2][1:]]
    alone = [decoder.answer(c, 32) for c in mixed]
    batch = decoder.answers(mixed, 32)
    assert [(a["text"], a["tokens"], a["stopped"]) for a in batch] == [(a["text"], a["tokens"], a["stopped"])
                                                                         for a in alone]
    assert [a["text"] for a in batch[:10]] == [r["texts"] for r in reference[:10]]
    assert batch[0]["passes"] < sum(a["passes"] for a in alone) / 2  # one pass a step for the whole batch
    assert [a["tokens"] for a in decoder.answers(chats[:4], 5)] == [5] * 4


def test_a_provider_cast_to_bf16_answers_in_bf16(run_dir):
    provider = SignalProvider.from_run(run_dir, merge=True, constrained=True, dtype="bfloat16")
    assert {p.dtype for p in provider.model.parameters()} == {torch.bfloat16}
    assert len(provider.get_signals(SNAPSHOTS)) == len(SNAPSHOTS) and provider.fallbacks == 0
    with pytest.raises(ConfigError, match="dtype='int8': one of bfloat16, float16, float32"):
        SignalProvider.from_run(run_dir, dtype="int8")


def test_drafts_from_earlier_answers_save_passes_and_never_change_an_answer(provider, chats, reference):
    probes = [provider.signal_prompt({"rsi": 50}), provider.signal_prompt({"price": 1})]
    decoder = PrefixDecoder(provider.model, provider.tokenizer, provider.grammar, probes, seen=0)  # never drafts
    undrafted = [decoder.answer(c, 32) for c in chats[:8]]
    decoder = PrefixDecoder(provider.model, provider.tokenizer, provider.grammar, probes)
    # earlier answers that all went another way: every draft is wrong from its first token
    wrong = [t for t in provider.tokenizer.encode('{"signal": "NONE"}', add_special_tokens=False)]
    decoder.seen.extend([wrong] * 5)
    first = [decoder.answer(c, 32) for c in chats[:8]]
    again = [decoder.answer(c, 32) for c in chats[:8]]  # now it has seen these very answers
    texts = [r["texts"] for r in reference[:8]]
    assert [a["text"] for a in undrafted] == [a["text"] for a in first] == [a["text"] for a in again] == texts
    assert sum(a["passes"] for a in again) < sum(a["passes"] for a in undrafted)
    assert any(a["passes"] == 1 for a in again)  # the commonest answer checked whole in the prompt's own pass


def test_the_latency_metric_times_the_fast_path_where_the_task_has_a_grammar(provider):
    from finetune.eval.latency import Latency
    samples = read_jsonl(ROOT / "data" / "demo_signals.jsonl")[-4:]
    out = Latency(n=4, batch_size=4, max_new_tokens=32, task="signals")(samples=samples, model=provider.model,
                                                                         tokenizer=provider.tokenizer)
    for prefix in ("", "fast_"):
        assert 0 < out[f"{prefix}latency_p50_seconds"] <= out[f"{prefix}latency_p99_seconds"]
        assert out[f"{prefix}answers_per_second"] > 0
    free = Latency(n=4, batch_size=4, task="sentiment")(samples=samples, model=provider.model,
                                                        tokenizer=provider.tokenizer)
    assert "latency_p50_seconds" in free and not any(k.startswith("fast_") for k in free)  # no grammar: no fast path
