"""Style metrics on short Chinese and English texts, every number worked out by hand."""
import math

import pytest

from finetune.errors import DataError
from finetune.eval.style import Style, js_divergence, mattr, sentence_lengths, words

REFERENCE = "我爱北京。北京天安门！我爱天安门。"


def samples(*answers):
    return [{"messages": [{"role": "user", "content": "改写"}, {"role": "assistant", "content": a}],
             "label": None, "timestamp": None, "meta": {}} for a in answers]


def kl(p, q):
    return sum(a * math.log2(a / b) for a, b in zip(p, q) if a)


def js(p, q):
    m = [(a + b) / 2 for a, b in zip(p, q)]
    return (kl(p, m) + kl(q, m)) / 2


def test_jieba_words_and_sentence_lengths():
    # jieba: 我/爱/北京 。 北京/天安门 ！ 我/爱/天安门 。 -> 8 words, 4 types, each twice
    assert words(REFERENCE, "zh") == ["我", "爱", "北京", "北京", "天安门", "我", "爱", "天安门"]
    # characters per sentence: 我爱北京 = 4, 北京天安门 = 5, 我爱天安门 = 5
    assert sentence_lengths(REFERENCE, "zh") == [4, 5, 5]
    assert words("It's a test, isn't it?", "en") == ["it's", "a", "test", "isn't", "it"]
    # '3.5' is not a sentence end, '.' before a space is; lengths in words
    assert sentence_lengths("Price rose 3.5 percent. Good!\nYes", "en") == [4, 1, 1]


def test_mattr_and_js_by_hand():
    tokens = words(REFERENCE, "zh")
    assert mattr(tokens, 50) == pytest.approx(4 / 8)          # fewer tokens than the window: plain TTR
    # windows of 3: 我爱北京 3, 爱北京北京 2, 北京北京天安门 2, 北京天安门我 3, 天安门我爱 3, 我爱天安门 3 -> 16 / 18
    assert mattr(tokens, 3) == pytest.approx(16 / 18)
    assert mattr([], 3) == 0.0
    # P = (1/2, 1/2), Q = (1, 0), M = (3/4, 1/4):
    # KL(P||M) = .5 log2(.5/.75) + .5 log2(.5/.25) = 0.20752; KL(Q||M) = log2(1/.75) = 0.41504; JS = 0.31128
    assert js_divergence([1, 1], [1, 0]) == pytest.approx(0.31128, abs=1e-5)
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert js_divergence([0, 0], [0, 0]) == 0.0 and js_divergence([0, 0], [1, 0]) == 1.0


def test_style_by_hand_chinese():
    m = Style()(samples=samples(REFERENCE), outputs=["我爱北京。"])
    assert m["language"] == "zh"
    ref = m["reference"]
    # lengths 4, 5, 5: mean 14/3, population std sqrt(((2/3)^2 + (1/3)^2 + (1/3)^2) / 3) = sqrt(2/9)
    assert ref["sentence_length_mean"] == pytest.approx(14 / 3)
    assert ref["sentence_length_std"] == pytest.approx(math.sqrt(2 / 9))
    assert ref["punctuation_ratio"] == pytest.approx(3 / 17)  # 。！。 among 14 + 3 characters
    assert m["punctuation_ratio"] == pytest.approx(1 / 5)
    assert m["top_words"]["reference"] == [["我", 2], ["爱", 2], ["北京", 2], ["天安门", 2]]
    assert m["sentence_lengths"] == {"output": [4], "reference": [4, 5, 5]}
    assert m["sentence_length_hist"]["output"][:2] == [1, 0] and m["sentence_length_hist"]["reference"][:2] == [1, 2]

    # sentence-length bins [0,5) [5,10): output (1, 0), reference (1/3, 2/3)
    # M = (2/3, 1/3): KL(P||M) = log2(1.5) = 0.58496, KL(Q||M) = -1/3 + 2/3 = 1/3 -> JS = 0.45915
    assert m["sentence_length_js"] == pytest.approx(0.45915, abs=1e-5)
    # words: output 我 爱 北京 at 1/3 each, reference 我 爱 北京 天安门 at 1/4 -> JS = 0.13793
    assert m["word_freq_js"] == pytest.approx(js([1 / 3, 1 / 3, 1 / 3, 0], [1 / 4] * 4))
    assert m["word_freq_js"] == pytest.approx(0.13793, abs=1e-5)
    # characters (。, other, ！): output (1/5, 4/5, 0), reference (2/17, 14/17, 1/17) -> JS = 0.03732
    assert m["punctuation_js"] == pytest.approx(js([1 / 5, 4 / 5, 0], [2 / 17, 14 / 17, 1 / 17]))
    assert m["punctuation_js"] == pytest.approx(0.03732, abs=1e-5)
    assert m["mattr_diff"] == pytest.approx(0.5)              # 3/3 types vs 4/8
    # (0.45915 + 0.13793 + 0.03732 + 0.5) / 4 = 0.28360
    assert m["style_distance"] == pytest.approx(0.28360, abs=1e-5)


def test_identical_text_has_zero_distance_and_empty_output_is_far():
    texts = ["I write short sentences. Then a long one follows, with commas, and more words!", REFERENCE]
    same = Style()(samples=samples(*texts), outputs=texts)
    assert same["style_distance"] == pytest.approx(0.0, abs=1e-12)
    # empty answer: all three distributions empty -> 1.0 each; MATTR 0 vs 0.5 -> (1 + 1 + 1 + 0.5) / 4
    empty = Style(language="zh")(samples=samples(REFERENCE), outputs=[""])
    assert empty["style_distance"] == pytest.approx(0.875)
    assert empty["sentence_length_mean"] is None


def test_english_auto_and_bad_inputs():
    m = Style()(samples=samples("Short one. Another short one."), outputs=["Short one. Another short one."])
    assert m["language"] == "en" and m["reference"]["sentence_length_mean"] == pytest.approx(2.5)
    with pytest.raises(DataError, match="held-out sample 1: no assistant message"):
        Style()(samples=[{"messages": [{"role": "user", "content": "x"}]}], outputs=["y"])
    with pytest.raises(ValueError, match="1 samples but 2 outputs"):
        Style()(samples=samples("a"), outputs=["a", "b"])
    with pytest.raises(ValueError, match="language='fr'"):
        Style(language="fr")
