"""Style corpus builder: Markdown cleaning, chunking, tasks, and bad posts named by file."""
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st
from omegaconf import OmegaConf

from finetune.data.style_corpus import build, chunk_paragraphs, clean_markdown, proxy_tokens, sentences
from finetune.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"min_tokens": 5, "max_tokens": 40}  # ESSAY (40 tokens) is one chunk


def words(n, start=0):
    return " ".join(f"w{i}" for i in range(start, start + n))


def post(root, slug, markdown, meta=None, meta_text=None):
    folder = root / slug
    folder.mkdir(parents=True)
    (folder / "index.md").write_text(markdown, encoding="utf-8")
    if meta_text is not None:
        (folder / "meta.json").write_text(meta_text, encoding="utf-8")
    elif meta is not False:
        (folder / "meta.json").write_text(json.dumps(meta or {"title": slug.title(), "date": "2024-03-02"}),
                                          encoding="utf-8")
    return folder


ESSAY = "\n\n".join([
    "I walk early. The street is empty. That is the point.",
    "Here is the thing: nobody tells you this. The bakery lights come on first.",
    "A dog barks twice. I do not bring my phone. My feet know the way.",
])


# ---- cleaning

def test_clean_markdown_strips_noise_and_keeps_prose():
    markdown = """---
title: "Slow mornings"
date: 2024-03-02
---
# Slow mornings

I walk **early**. See [my route](https://maps.example/x "map") and <https://a.example>, or https://b.example/c?d=1 .
Second *line* of the same paragraph, with `inline_code()` removed.

![a photo](img/1.png)

```python
print("fenced code")
```

~~~
tilde fence
~~~

    indented_code = 1

<!-- a comment -->
<script>alert("x")</script>
<p align="center"><em>A caption</em> &amp; more</p>

> A quoted line with _emphasis_ and snake_case_name.

- item one
- item two

| a | b |
|---|---|
| 1 | 2 |

[ref]: https://example.com
Setext heading
--------------
"""
    assert clean_markdown(markdown) == [
        "Slow mornings",
        "I walk early. See my route and, or. Second line of the same paragraph, with removed.",
        "A caption & more",
        "A quoted line with emphasis and snake_case_name.",
        "item one",
        "item two",
        "Setext heading",
    ]


def test_clean_markdown_chinese_lines_join_without_spaces_and_indented_chinese_is_kept():
    markdown = "　　我们走吧。今天\n很好！[链接文字](http://x.cn)看看。\n\n    　　缩进的中文段落，不是代码。\n\n    x = 1\n"
    assert clean_markdown(markdown) == ["我们走吧。今天很好！链接文字看看。", "缩进的中文段落，不是代码。"]


def test_unclosed_fence_runs_to_the_end_as_in_markdown():
    assert clean_markdown("Before.\n\n```\ncode\n\nmore code") == ["Before."]


def test_proxy_tokens_counts_words_and_cjk_characters():
    assert proxy_tokens("I walk early.") == 3
    assert proxy_tokens("我们走吧") == 4
    assert proxy_tokens("I walk 我们走吧。") == 2 + 4 + 1  # the lone '。' counts as one


def test_sentences_end_at_end_marks_closing_quotes_and_line_breaks():
    text = 'Short. Is it? "Yes." It cost 3.5 dollars.\n\n我们走吧。“真的？”他说……然后呢'
    assert [text[s:e].strip() for s, e in sentences(text)] == [
        "Short.", "Is it?", '"Yes."', "It cost 3.5 dollars.", "我们走吧。", "“真的？”", "他说……", "然后呢"]


# ---- chunking

def test_chunks_respect_bounds_and_cut_between_paragraphs():
    paragraphs = [words(10, 0), words(12, 100), words(8, 200), words(9, 300), words(11, 400)]
    chunks = chunk_paragraphs(paragraphs, proxy_tokens, 5, 25)
    assert [n for _, n in chunks] == [22, 17, 11]
    assert all(proxy_tokens(text) == n for text, n in chunks)
    assert [p for text, _ in chunks for p in text.split("\n\n")] == paragraphs


def test_chunks_are_balanced_and_a_short_tail_joins_the_chunk_before():
    # 90 tokens with max 80: two chunks of ~45, not 80 + 10
    balanced = chunk_paragraphs([words(10, i * 10) for i in range(9)], proxy_tokens, 5, 80)
    assert [n for _, n in balanced] == [50, 40]
    # a 3-token tail (under min 5) fits with the chunk before it
    merged = chunk_paragraphs([words(20), words(3, 50)], proxy_tokens, 5, 25)
    assert merged == [(words(20) + "\n\n" + words(3, 50), 23)]


def test_a_long_paragraph_is_cut_between_sentences_then_between_words():
    sentence = "one two three four five six."
    paragraph = " ".join([sentence] * 5)  # 30 tokens, max 14: two sentences per piece
    chunks = chunk_paragraphs([paragraph], proxy_tokens, 1, 14)
    assert [n for _, n in chunks] == [12, 12, 6]
    assert all(text.startswith("one") and text.endswith("six.") for text, _ in chunks)
    huge = chunk_paragraphs([words(30)], proxy_tokens, 1, 14)  # one sentence of 30 words
    assert [n for _, n in huge] == [10, 10, 10] and " ".join(t for t, _ in huge) == words(30)
    zh = chunk_paragraphs(["我" * 30], proxy_tokens, 1, 14)
    assert [t for t, _ in zh] == ["我" * 10] * 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=12), st.integers(10, 60))
def test_chunking_never_exceeds_max_and_keeps_every_paragraph_in_order(sizes, max_tokens):
    paragraphs = [words(n, i * 100) for i, n in enumerate(sizes)]
    chunks = chunk_paragraphs(paragraphs, proxy_tokens, 1, max_tokens)
    assert all(0 < n <= max_tokens for _, n in chunks)
    assert " ".join(t.replace("\n\n", " ") for t, _ in chunks) == " ".join(paragraphs)


def test_a_tokenizer_can_replace_the_proxy(tmp_path):
    class CharTokenizer:  # one token per character: chunks get ~6x smaller than with the word proxy
        def encode(self, text, add_special_tokens=False):
            return list(text)

    post(tmp_path, "a", ESSAY)
    by_words = build(tmp_path, min_tokens=1, max_tokens=80)
    by_chars = build(tmp_path, min_tokens=1, max_tokens=80, tokenizer=CharTokenizer())
    assert len(by_words.samples) == 1 and by_words.samples[0]["meta"]["tokens"] == 40
    assert len(by_chars.samples) == 3 and all(s["meta"]["tokens"] <= 80 for s in by_chars.samples)


# ---- tasks and samples

def test_samples_carry_meta_timestamp_and_the_authors_text(tmp_path):
    post(tmp_path, "2024/slow-mornings", "# Slow mornings\n\n![x](y.png)\n\n" + ESSAY,
         {"title": "Slow mornings", "date": "2024-03-02T07:30:00+08:00", "tags": ["life"]})
    built = build(tmp_path, min_tokens=1, max_tokens=40, mix={"summarize_expand": 1})
    [sample] = built.samples
    assert sample["label"] is None and sample["timestamp"] == "2024-03-01T23:30:00"
    assert sample["meta"] == {"slug": "2024/slow-mornings", "title": "Slow mornings", "kind": "summarize_expand",
                              "chunk": 1, "tokens": 40}
    system, user, assistant = sample["messages"]
    assert system == {"role": "system", "content": "You write in the author's personal style."}
    assert assistant["content"] == ESSAY  # the "# Slow mornings" title line is not part of the prose
    assert user["content"] == ('Expand this point into a passage in my own style for the post "Slow mornings":\n'
                               "I walk early.")


def test_rewrite_gives_a_shuffled_draft_and_continue_splits_at_a_sentence(tmp_path):
    post(tmp_path, "a", ESSAY)
    [rewrite] = build(tmp_path, min_tokens=1, max_tokens=40, mix={"rewrite": 1}).samples
    draft = rewrite["messages"][1]["content"].split("\n\n", 1)[1]
    answer = rewrite["messages"][2]["content"]
    assert answer == ESSAY and draft != answer.replace("\n\n", " ")
    assert sorted(re.split(r"(?<=\.) ", draft)) == sorted(re.split(r"(?<=\.) ", answer.replace("\n\n", " ")))
    [cont] = build(tmp_path, min_tokens=1, max_tokens=40, mix={"continue": 1}, continue_ratio=0.25).samples
    head = cont["messages"][1]["content"].removeprefix("Continue this text in my own style:\n\n")
    # the first sentences that reach 25 % of the chunk's 40 tokens: 11 tokens
    assert head == "I walk early. The street is empty. That is the point."
    assert head + "\n\n" + cont["messages"][2]["content"] == ESSAY
    assert cont["meta"]["kind"] == "continue"


def test_chinese_chunks_get_chinese_prompts_and_one_sentence_chunks_become_summarize_expand(tmp_path):
    post(tmp_path, "zh", "说到底，我喜欢早起。街上没人。面包店先亮灯。就这样。", {"title": "早晨", "date": "2024-01-01"})
    post(tmp_path, "one", "Just one sentence here without an end mark", {"title": "One"})
    built = build(tmp_path, min_tokens=1, max_tokens=100, mix={"rewrite": 1})
    by_slug = {s["meta"]["slug"]: s for s in built.samples}
    assert by_slug["zh"]["messages"][1]["content"].startswith("用我的风格改写这段草稿：\n\n")
    assert by_slug["one"]["meta"]["kind"] == "summarize_expand"
    assert by_slug["one"]["timestamp"] is None  # no date anywhere: None, not an error


def test_mix_quotas_are_exact_and_deterministic(tmp_path):
    for i in range(10):
        post(tmp_path, f"p{i}", ESSAY.replace("early", f"early {i}"))
    built = build(tmp_path, min_tokens=1, max_tokens=50, mix={"rewrite": 0.5, "continue": 0.3, "summarize_expand": 0.2})
    assert Counter(s["meta"]["kind"] for s in built.samples) == {"rewrite": 5, "continue": 3, "summarize_expand": 2}
    again = build(tmp_path, min_tokens=1, max_tokens=50, mix={"rewrite": 0.5, "continue": 0.3, "summarize_expand": 0.2})
    assert again.samples == built.samples
    with pytest.raises(ConfigError, match="unknown kind 'paraphrase'"):
        build(tmp_path, mix={"paraphrase": 1})
    with pytest.raises(ConfigError, match="min_tokens=50, max_tokens=10"):
        build(tmp_path, min_tokens=50, max_tokens=10)


def test_title_and_date_fall_back_to_front_matter(tmp_path):
    post(tmp_path, "fm", '---\ntitle: "From front matter"\ndate: 2023-05-06\n---\n' + ESSAY, {"tags": ["x"]})
    [sample] = build(tmp_path, **SMALL).samples
    assert sample["meta"]["title"] == "From front matter" and sample["timestamp"] == "2023-05-06T00:00:00"


def test_empty_and_short_posts_are_counted_not_fatal(tmp_path):
    post(tmp_path, "good", ESSAY)
    post(tmp_path, "only-noise", "# Good\n\n![img](a.png)\n\n```\ncode only\n```\n\n<img src='b.png'>\n",
         {"title": "Good"})
    post(tmp_path, "short", "Too short.")
    post(tmp_path, ".git/hidden", "Ignored.")
    built = build(tmp_path, **SMALL)
    assert [s["meta"]["slug"] for s in built.samples] == ["good"]
    assert built.dropped == {"empty_after_cleaning": 1, "too_short": 1}


# ---- bad input: the file is named

def test_missing_meta_json_names_the_file_or_is_skipped(tmp_path):
    corpus = tmp_path / "corpus"
    post(corpus, "good", ESSAY)
    post(corpus, "no-meta", ESSAY, meta=False)
    with pytest.raises(DataError, match=r"corpus/no-meta/meta\.json: missing.*skip_bad_rows"):
        build(corpus, **SMALL)
    built = build(corpus, skip_bad_rows=True, **SMALL)
    assert built.dropped == {"missing_meta": 1} and {s["meta"]["slug"] for s in built.samples} == {"good"}


@pytest.mark.parametrize("meta_text, message", [
    ('{"title": "x",\n "date": }', r"corpus/bad/meta\.json: invalid JSON at line 2 column 10"),
    ('["not", "an", "object"]', r"corpus/bad/meta\.json: expected a JSON object, got list"),
    ('{"title": "x", "date": "last tuesday"}', r"corpus/bad/meta\.json: field 'date': 'last tuesday' is not a date"),
])
def test_bad_meta_json_names_file_and_place(tmp_path, meta_text, message):
    corpus = tmp_path / "corpus"
    post(corpus, "good", ESSAY)
    post(corpus, "bad", ESSAY, meta_text=meta_text)
    with pytest.raises(DataError, match=message):
        build(corpus, **SMALL)
    assert len(build(corpus, skip_bad_rows=True, **SMALL).samples) == 1


def test_non_utf8_and_index_less_posts_are_named(tmp_path):
    corpus = tmp_path / "corpus"
    folder = post(corpus, "gbk", "")
    (folder / "index.md").write_bytes("我们走吧。".encode("gbk"))
    with pytest.raises(DataError, match=r"corpus/gbk/index\.md: not UTF-8 text"):
        build(corpus, **SMALL)
    (folder / "index.md").unlink()
    with pytest.raises(DataError, match=r"corpus/gbk/index\.md: missing"):
        build(corpus, **SMALL)


def test_bad_folders_always_raise(tmp_path):
    with pytest.raises(DataError, match="folder not found"):
        build(tmp_path / "nope")
    (tmp_path / "file.md").write_text("x")
    with pytest.raises(DataError, match="file.md: is a file"):
        build(tmp_path / "file.md")
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty: no posts \(no <slug>/index\.md \+ meta\.json"):
        build(tmp_path / "empty")
    post(tmp_path / "tiny", "a", "Too short.")
    with pytest.raises(DataError, match=r"no samples left from 1 posts \(dropped: \{'too_short': 1\}\)"):
        build(tmp_path / "tiny", min_tokens=5, max_tokens=30, skip_bad_rows=True)


# ---- the shipped sample data and config

def test_sample_essays_build_with_the_shipped_config():
    cfg = OmegaConf.load(ROOT / "conf" / "dataset" / "style_corpus.yaml")
    options = {k: v for k, v in OmegaConf.to_container(cfg.builder).items() if k not in ("_target_", "path")}
    assert cfg.builder._target_ == "finetune.data.style_corpus.build"
    built = build(ROOT / "data" / "essays", **options)
    samples = built.samples
    assert len(samples) >= 80 and all(s["timestamp"] for s in samples)
    assert len({s["meta"]["slug"] for s in samples}) == 12
    kinds = Counter(s["meta"]["kind"] for s in samples)
    assert set(kinds) == {"rewrite", "continue", "summarize_expand"} and max(kinds.values()) - min(kinds.values()) <= 2
    answers = [s["messages"][-1]["content"] for s in samples]
    assert sum(bool(re.search(r"[\u4e00-\u9fff]", a)) for a in answers) >= 20  # Chinese essays too
    assert any("Here is the thing:" in a for a in answers) and any("说到底" in a for a in answers)
    assert not any(re.search(r"https?://|!\[|\]\(|```|`|<[a-z]|^#|\.jpg", a, re.M) for a in answers)
    assert all(s["meta"]["tokens"] <= options["max_tokens"] for s in samples)
