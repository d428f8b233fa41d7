"""Writing-style distance of generated text to the reference corpus, by style indicators.

References are the samples' gold assistant answers (the author's own text); outputs are the model's
answers to the same prompts. Four parts are measured on each side and compared:

- sentence length: sentences end at 。！？!?；;… , a '.' before a space, or a line break. Length unit:
  characters (letters, digits, CJK; no punctuation) for Chinese, because jieba's word boundaries shift
  with its dictionary; words for other languages. Histogram over `length_bins` (the last bin is open).
- word frequency: jieba for Chinese, `\\w+` words (apostrophes and decimal numbers kept whole) for other
  languages, lower-cased, punctuation dropped.
- punctuation: how often each mark is used per non-space character ('，' and ',' are different marks:
  that choice is style); the share of all the other characters is one more bucket.
- vocabulary diversity: MATTR, the mean type-token ratio over every `window`-token window of the joined
  tokens (plain type-token ratio when there are fewer tokens than that).

Distances: Jensen-Shannon divergence in bits (0 = same distribution, 1 = disjoint) for the three
distributions (one side empty: 1.0; both empty: 0.0), |difference| for MATTR. `style_distance` is the
plain mean of the four, so it lies in [0, 1]; lower is closer to the author.

    {"style_distance": 0.31, "sentence_length_js": 0.12, "word_freq_js": 0.58, "punctuation_js": 0.05,
     "mattr_diff": 0.04, "language": "zh",
     "sentence_length_mean": 18.5, "sentence_length_std": 6.1, "punctuation_ratio": 0.11, "mattr": 0.82,
     "reference": {"sentence_length_mean": 21.0, "sentence_length_std": 7.3, "punctuation_ratio": 0.12,
                   "mattr": 0.86},
     "sentence_length_hist": {"edges": [0, 5, ...], "output": [0, 3, ...], "reference": [1, 2, ...]},
     "sentence_lengths": {"output": [12, 25, ...], "reference": [...]},
     "top_words": {"output": [["我们", 12], ...], "reference": [...]},
     "punctuation": {"output": {"，": 0.06, ...}, "reference": {...}}}
"""
import logging
import math
import re
import statistics
import unicodedata
from collections import Counter

import jieba

from finetune.errors import DataError

jieba.setLogLevel(logging.WARNING)  # its "Building prefix dict" chatter is noise in a run log

_SENTENCE_END = re.compile(r"[。！？!?；;…]+|\.(?=\s|$)|\n+")
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")
_WORD = re.compile(r"\d+(?:[.,]\d+)+|\w+(?:['’]\w+)*")  # 3.5 and 1,200 are one word each


def is_punctuation(char: str) -> bool:
    return unicodedata.category(char).startswith("P")


def detect_language(texts: list[str]) -> str:
    """'zh' when CJK characters outnumber Latin letters, else 'en' (used for every non-Chinese text)."""
    joined = "".join(texts)
    return "zh" if len(_CJK.findall(joined)) > len(_LATIN.findall(joined)) else "en"


def words(text: str, language: str) -> list[str]:
    if language == "zh":
        return [w.lower() for w in jieba.lcut(text) if re.search(r"\w", w)]
    return _WORD.findall(text.lower())


def sentence_lengths(text: str, language: str) -> list[int]:
    lengths = []
    for sentence in _SENTENCE_END.split(text):
        n = len(re.findall(r"\w", sentence)) if language == "zh" else len(_WORD.findall(sentence))
        if n:
            lengths.append(n)
    return lengths


def mattr(tokens: list[str], window: int) -> float:
    if not tokens:
        return 0.0
    if len(tokens) <= window:
        return len(set(tokens)) / len(tokens)
    counts = Counter(tokens[:window])
    total = len(counts)
    for i in range(window, len(tokens)):
        counts[tokens[i]] += 1
        counts[tokens[i - window]] -= 1
        if counts[tokens[i - window]] == 0:
            del counts[tokens[i - window]]
        total += len(counts)
    return total / (len(tokens) - window + 1) / window


def js_divergence(p: Counter | list, q: Counter | list) -> float:
    """Jensen-Shannon divergence in bits of two count vectors (Counters keyed alike, or equal-length lists)."""
    keys = sorted(set(p) | set(q)) if isinstance(p, Counter) else range(len(p))
    p_total, q_total = sum(p[k] for k in keys), sum(q[k] for k in keys)
    if not p_total or not q_total:
        return 0.0 if p_total == q_total else 1.0
    js = 0.0
    for k in keys:
        a, b = p[k] / p_total, q[k] / q_total
        m = (a + b) / 2
        js += (a * math.log2(a / m) if a else 0.0) / 2 + (b * math.log2(b / m) if b else 0.0) / 2
    return min(max(js, 0.0), 1.0)


class Style:
    needs_generation = True

    def __init__(self, language: str = "auto", window: int = 50, top_k: int = 20,
                 length_bins: tuple = (0, 5, 10, 15, 20, 30, 40, 60, 80, 120)):
        if language not in ("auto", "en", "zh"):
            raise ValueError(f"Style: language={language!r} is not one of auto, en, zh")
        self.language = language
        self.window = window
        self.top_k = top_k
        self.length_bins = list(length_bins)

    def profile(self, texts: list[str], language: str) -> dict:
        lengths = [n for text in texts for n in sentence_lengths(text, language)]
        tokens = [w for text in texts for w in words(text, language)]
        chars = [c for text in texts for c in text if not c.isspace()]
        marks = Counter(c for c in chars if is_punctuation(c))
        histogram = [0] * len(self.length_bins)
        for n in lengths:
            histogram[max((i for i, edge in enumerate(self.length_bins) if n >= edge), default=0)] += 1
        return {"lengths": lengths, "histogram": histogram, "words": Counter(tokens),
                "marks": marks, "chars": Counter({**marks, "<other>": len(chars) - sum(marks.values())}),
                "mattr": mattr(tokens, self.window),
                "punctuation_ratio": sum(marks.values()) / len(chars) if chars else 0.0,
                "sentence_length_mean": statistics.fmean(lengths) if lengths else None,
                "sentence_length_std": statistics.pstdev(lengths) if lengths else None}

    def __call__(self, *, samples: list[dict], outputs: list[str], model=None, tokenizer=None) -> dict:
        if len(samples) != len(outputs):
            raise ValueError(f"Style: {len(samples)} samples but {len(outputs)} outputs")
        if not samples:
            raise DataError("Style: the held-out split is empty; enlarge the dataset or the test split")
        references = []
        for i, sample in enumerate(samples, 1):
            answers = [m["content"] for m in sample["messages"] if m.get("role") == "assistant"]
            if not answers:
                raise DataError(f"held-out sample {i}: no assistant message to use as the reference text")
            references.append(answers[-1])
        language = detect_language(references) if self.language == "auto" else self.language
        out = self.profile([o if isinstance(o, str) else "" for o in outputs], language)
        ref = self.profile(references, language)

        parts = {"sentence_length_js": js_divergence(out["histogram"], ref["histogram"]),
                 "word_freq_js": js_divergence(out["words"], ref["words"]),
                 "punctuation_js": js_divergence(out["chars"], ref["chars"]),
                 "mattr_diff": abs(out["mattr"] - ref["mattr"])}
        scalars = ("sentence_length_mean", "sentence_length_std", "punctuation_ratio", "mattr")
        n_out, n_ref = sum(out["chars"].values()) or 1, sum(ref["chars"].values()) or 1
        return {
            "style_distance": sum(parts.values()) / len(parts),
            **parts,
            "language": language,
            **{key: out[key] for key in scalars},
            "reference": {key: ref[key] for key in scalars},
            "sentence_length_hist": {"edges": self.length_bins, "output": out["histogram"],
                                     "reference": ref["histogram"]},
            "sentence_lengths": {"output": out["lengths"], "reference": ref["lengths"]},
            "top_words": {"output": [list(x) for x in out["words"].most_common(self.top_k)],
                          "reference": [list(x) for x in ref["words"].most_common(self.top_k)]},
            "punctuation": {"output": {m: c / n_out for m, c in out["marks"].most_common()},
                            "reference": {m: c / n_ref for m, c in ref["marks"].most_common()}},
        }
