"""Style corpus builder, the writing-style use case: a folder of Markdown posts -> rewrite / continue /
summarize-expand samples whose answers are the author's own text.

Input (`path`): one folder per post, at any depth; the folder's path below `path` is the post's slug.

    posts/
      2024-03-slow-mornings/index.md     # the post, Markdown (front matter, images, code, links allowed)
      2024-03-slow-mornings/meta.json    # {"title": "Slow mornings", "date": "2024-03-02", "tags": ["life"], ...}

meta.json must be a JSON object; `title_field` ("title") and `date_field` ("date": ISO text, a date, or
epoch seconds) are read from it, then from the post's front matter; other keys are ignored. Neither
is required: a post without a date has timestamp None (then use split: random).

Cleaning keeps the prose and its paragraphs: front matter, fenced and indented code blocks, inline code,
images, HTML comments, <script>/<style> blocks, tables, reference-link definitions, footnote marks and
bare URLs are removed; links keep their text; HTML tags, heading / list / quote markers and emphasis
marks are dropped (a heading and each list item become paragraphs of their own); entities are
unescaped. Lines of a paragraph join with a space, or with nothing between Chinese characters. An
indented block holding Chinese text is kept, not taken for code: Chinese editors indent paragraphs
with spaces. A first paragraph equal to the title (the post's "# Title" line) is dropped.

Chunking: paragraphs are packed into chunks of `min_tokens`..`max_tokens` (e.g. 300-800), cutting only
between paragraphs; a paragraph longer than `max_tokens` is cut between sentences (a sentence longer
than that, between words or characters). Chunks of one post are balanced (a 900-token post gives two
of ~450, not 800 + 100); a short last chunk joins the one before when they fit together. Tokens are
counted with `tokenizer` when one is given (a tokenizer object, or a local path / hub id for
AutoTokenizer), else with a proxy: one per CJK character plus one per whitespace-separated word of
the rest. It is a proxy, not a count: BPE tokenizers give more tokens than words for English (~1.3 per
word is typical) and 0.5-1.5 per Chinese character depending on their vocabulary; the dry run
reports the exact token lengths of the built samples.

Tasks: each chunk gives one sample, its kind drawn to match `mix` (exact quotas over the shuffled
chunks, `seed`). The answer is always the author's text; no plain paraphrase of it exists, so the
inputs are made from the text itself:
- rewrite: the chunk's sentences shuffled into one block -> the chunk. The model learns to restore
  the author's order, paragraphing and connectives from a degraded draft of the same content.
- continue: the first sentences (~`continue_ratio` of the tokens) -> the rest of the chunk.
- summarize_expand: the post's title and the chunk's first sentence -> the whole chunk.
A chunk of one sentence cannot be shuffled or split, so it becomes summarize_expand. Prompts are in
Chinese for a chunk with more CJK characters than Latin letters, else in English.

Skipped and counted in `dropped` whatever skip_bad_rows says: "empty_after_cleaning" (a post with no
prose left) and "too_short" (a chunk under min_tokens, e.g. a whole post shorter than that).
Bad posts (raise DataError naming the file, or skip and count with skip_bad_rows=True):
"missing_meta", "bad_meta_json", "missing_index", "not_utf8", "bad_date". A missing folder, a file, or a
folder with no posts at all always raises, and so does a corpus that leaves no samples.

Example sample:
    {"messages": [{"role": "system", "content": "You write in the author's personal style."},
                  {"role": "user", "content": "Continue this text in my own style:\\n\\nI walk early. Always early."},
                  {"role": "assistant",
                   "content": "The street is empty. That is the point.\\n\\nHere is the thing: ..."}],
     "label": None, "timestamp": "2024-03-02T00:00:00",
     "meta": {"slug": "2024-03-slow-mornings", "title": "Slow mornings", "kind": "continue", "chunk": 1,
              "tokens": 96}}
"""
import html
import json
import math
import random
import re
from datetime import date
from pathlib import Path

import yaml

from finetune.data import Built, safe_json
from finetune.data.rows import BadRow, BadRows, sized
from finetune.data.timestamps import parse_timestamp
from finetune.errors import ConfigError, DataError

KINDS = ("rewrite", "continue", "summarize_expand")
SYSTEM_PROMPT = "You write in the author's personal style."
PROMPTS = {
    "en": {"rewrite": "Rewrite this draft in my own style:\n\n{text}",
           "continue": "Continue this text in my own style:\n\n{text}",
           "summarize_expand": "Expand this point into a passage in my own style{title}:\n{text}",
           "title": ' for the post "{title}"'},
    "zh": {"rewrite": "用我的风格改写这段草稿：\n\n{text}",
           "continue": "用我的风格续写下面这段文字：\n\n{text}",
           "summarize_expand": "用我的风格{title}把这个要点展开成一段文字：\n{text}",
           "title": "，为《{title}》"},
}

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")
_CJK_EDGE = re.compile(r"[\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")
_LATIN = re.compile(r"[A-Za-z]")
# where a sentence ends: end marks (and closing quotes), a '.' before a space, or a line break
_SENTENCE_END = re.compile(r"[。！？!?…]+[”’\"」』）)]*\s*|\.[”’\"」』）)]*\s+|\n+")

_FRONT_MATTER = re.compile(r"\A(---|\+\+\+)[ \t]*\n(.*?)\n(?:\1|\.\.\.)[ \t]*(?:\n|\Z)", re.S)
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
_HTML_RAW = re.compile(r"<(script|style|pre|code)\b[^>]*>.*?</\1\s*>", re.S | re.I)
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_INDENTED = re.compile(r"^(?: {4}|\t)")
_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d{1,9}[.)])\s+")
_HEADING = re.compile(r"^ {0,3}#{1,6}(?:\s+|$)(.*?)(?:\s+#+)?\s*$")
_RULE = re.compile(r"^ {0,3}(?:(?:[-*_]\s*){3,}|=+)\s*$")  # thematic break or setext underline
_TABLE_ROW = re.compile(r"^\s*\|.*\|\s*$")
_REF_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*\S+.*$")
_QUOTE = re.compile(r"^\s*(?:>\s?)+")
# bracket text excludes '[' (and an autolink '<'): each try stops at the next one, so "[[[[..." is linear
_IMAGE = re.compile(r"!\[[^\[\]]*\]\([^)]*\)|!\[[^\[\]]*\]\[[^\[\]]*\]")
_LINK = re.compile(r"\[([^\[\]]*)\]\([^)]*\)|\[([^\[\]]+)\]\[[^\[\]]*\]")
_FOOTNOTE = re.compile(r"\[\^[^\[\]]+\]:?")
_AUTOLINK = re.compile(r"<(?:https?|ftp|mailto):[^<>\s]*>")
_URL = re.compile(r"(?:https?|ftp)://[^\s<>()（）\[\]]+")
_INLINE_CODE = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
_BREAK_TAG = re.compile(r"<br\s*/?>|</?p\b[^>]*>", re.I)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>")
_STRONG = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")
_EMPHASIS = re.compile(r"(?<![\w*])\*(?=\S)(.+?)(?<=\S)\*(?![\w*])|(?<![\w_])_(?=\S)(.+?)(?<=\S)_(?![\w_])")
_STRIKE = re.compile(r"~~(.+?)~~")


def build(path, *, skip_bad_rows=False, min_tokens=300, max_tokens=800, tokenizer=None, mix=None,
          continue_ratio=0.3, title_field="title", date_field="date", system_prompt=SYSTEM_PROMPT,
          seed=42) -> Built:
    if not 0 < min_tokens <= max_tokens:
        raise ConfigError(f"dataset.builder.min_tokens={min_tokens}, max_tokens={max_tokens}: need 0 < min <= max")
    if not 0 < continue_ratio < 1:
        raise ConfigError(f"dataset.builder.continue_ratio={continue_ratio}: must be between 0 and 1")
    mix = _mix_option(mix)
    count = _token_counter(tokenizer)
    root = Path(path)
    if not root.exists():
        raise DataError(f"{root.name}: folder not found ({root}); "
                        "set dataset.path to a folder of <slug>/index.md + meta.json")
    if not root.is_dir():
        raise DataError(f"{root.name}: is a file; dataset.path must be a folder of <slug>/index.md + meta.json")
    folders = sorted({p.parent for name in ("index.md", "meta.json") for p in root.rglob(name)
                      if not any(part.startswith(".") for part in p.relative_to(root).parts)})
    if not folders:
        raise DataError(f"{root.name}: no posts (no <slug>/index.md + meta.json under {root})")

    bad = BadRows(None, skip_bad_rows, "fix it or set dataset.skip_bad_rows=true")  # messages name the file
    dropped = bad.dropped
    chunks = []  # (post, chunk number, text, tokens)
    for folder in folders:
        try:
            post = _read_post(root, folder, title_field, date_field)
        except BadRow as err:
            bad(err.reason, err.message)
            continue
        paragraphs = clean_markdown(post["markdown"])
        if paragraphs and post["title"] and paragraphs[0].casefold() == post["title"].casefold():
            paragraphs = paragraphs[1:]  # the post's "# Title" line: the title is not the author's prose
        if not paragraphs:
            dropped["empty_after_cleaning"] += 1
            continue
        for number, (text, tokens) in enumerate(chunk_paragraphs(paragraphs, count, min_tokens, max_tokens), 1):
            if tokens < min_tokens:
                dropped["too_short"] += 1
            else:
                chunks.append((post, number, text, tokens))
    if not chunks:
        raise DataError(f"{root.name}: no samples left from {len(folders)} posts (dropped: {dict(dropped)}); "
                        f"posts need at least min_tokens={min_tokens} tokens of prose after cleaning")

    order = list(range(len(chunks)))
    random.Random(seed).shuffle(order)
    kinds = [kind for kind, n in _quotas(mix, len(chunks)).items() for _ in range(n)]
    samples = [None] * len(chunks)
    for i, kind in zip(order, kinds):
        post, number, text, tokens = chunks[i]
        rng = random.Random(f"{seed}:{post['slug']}:{number}")  # the same draft whatever else is in the corpus
        kind, user, answer = _task(kind, text, post["title"], count, continue_ratio, rng)
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        samples[i] = {"messages": messages, "label": None, "timestamp": post["timestamp"],
                      "meta": {"slug": post["slug"], "title": post["title"], "kind": kind, "chunk": number,
                               "tokens": tokens}}
    return Built(samples, dropped)


# ---- reading a post

def _read_post(root, folder, title_field, date_field) -> dict:
    slug = folder.relative_to(root).as_posix() if folder != root else root.name
    where = f"{root.name}/{slug}" if folder != root else root.name
    index, meta_file = folder / "index.md", folder / "meta.json"
    if not index.is_file():
        raise BadRow("missing_index", f"{where}/index.md: missing (the folder has meta.json but no post)")
    if not meta_file.is_file():
        raise BadRow("missing_meta", f"{where}/meta.json: missing; add one with at least "
                                     f'{{"{title_field}": ..., "{date_field}": ...}}')
    for file in (index, meta_file):  # a link out of the corpus (index.md -> /etc/passwd) is not the author's text
        if not file.resolve().is_relative_to(root.resolve()):
            raise BadRow("outside_corpus", f"{where}/{file.name}: a link to {file.resolve()}, outside {root.name}/; "
                                           "copy the file into the corpus folder")
    markdown, meta_text = sized(_read_text(index, where), f"{where}/index.md"), _read_text(meta_file, where)
    try:
        meta = safe_json.loads(meta_text)
    except json.JSONDecodeError as e:
        raise BadRow("bad_meta_json", f"{where}/meta.json: invalid JSON at line {e.lineno} column {e.colno} "
                                      f"({e.msg})") from None
    if not isinstance(meta, dict):
        raise BadRow("bad_meta_json", f"{where}/meta.json: expected a JSON object, got {type(meta).__name__}")
    front = _front_matter(markdown)
    title = meta.get(title_field) if meta.get(title_field) not in (None, "") else front.get(title_field)
    raw_date, date_from = (meta.get(date_field), "meta.json") if meta.get(date_field) not in (None, "") else \
        (front.get(date_field), "index.md front matter")
    timestamp = parse_timestamp(raw_date)
    if raw_date not in (None, "") and timestamp is None:
        raise BadRow("bad_date", f"{where}/{'meta.json' if date_from == 'meta.json' else 'index.md'}: "
                                 f"field '{date_field}': {raw_date!r} is not a date (use ISO, e.g. 2024-03-02)")
    title = " ".join(str(title).split()) if title not in (None, "") else None
    return {"slug": slug, "title": title, "timestamp": timestamp, "markdown": markdown}


def _read_text(file, where) -> str:
    try:
        return file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadRow("not_utf8", f"{where}/{file.name}: not UTF-8 text ({e.reason} at byte {e.start}); "
                                 "re-save it as UTF-8") from None


def _front_matter(markdown) -> dict:
    match = _FRONT_MATTER.match(markdown.lstrip("\ufeff"))
    if not match or match.group(1) != "---":
        return {}
    try:
        data = yaml.safe_load(match.group(2))
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: `date: 2024-13-45`; deep [[[...
        return {}  # only a fallback for title/date: broken front matter is still stripped
    # scalars only: YAML aliases can nest a list a billion items deep in a few lines (str() would never end)
    return {k: v for k, v in data.items() if isinstance(v, (str, int, float, date))} if isinstance(data, dict) else {}


# ---- cleaning

def clean_markdown(markdown: str) -> list[str]:
    """Markdown -> its prose paragraphs (see the module docstring for what goes)."""
    text = markdown.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    text = _FRONT_MATTER.sub("", text, count=1)
    text = _HTML_COMMENT.sub("", text)
    text = _HTML_RAW.sub("\n\n", text)
    lines, fence, in_code, in_list, previous_blank = [], None, False, False, True
    for line in text.split("\n"):
        if fence:  # inside a fenced block: skip up to the closing fence (or the end, as Markdown does)
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
            continue
        opening = _FENCE.match(line)
        if opening:
            fence, previous_blank = opening.group(1), True
            lines.append("")
            continue
        blank = not line.strip()
        if _INDENTED.match(line) and not blank and (in_code or (previous_blank and not in_list)) \
                and not _CJK.search(line):
            in_code = True
            continue
        if not blank:
            in_code = False
            if not _INDENTED.match(line):
                in_list = bool(_LIST_ITEM.match(line))
        previous_blank = blank
        if _TABLE_ROW.match(line) or _REF_DEFINITION.match(line) or _RULE.match(line):
            lines.append("")
            continue
        heading = _HEADING.match(line)
        if heading:  # a heading is a paragraph of its own
            lines += ["", heading.group(1), ""]
            continue
        line = _QUOTE.sub("", line)
        if _LIST_ITEM.match(line):  # each list item is a paragraph: items do not run into one another
            lines += ["", _LIST_ITEM.sub("", line, count=1)]
        else:
            lines.append(line)
    paragraphs = []
    for block in re.split(r"\n\s*\n", "\n".join(lines)):
        joined = ""
        for line in block.split("\n"):
            line = line.strip(" \t\u3000")
            if line:
                joined = _join(joined, line) if joined else line
        paragraph = _clean_inline(joined)
        if re.search(r"\w", paragraph):  # drop leftovers such as "()" or a lone "|"
            paragraphs.append(paragraph)
    return paragraphs


def _clean_inline(text: str) -> str:
    text = _INLINE_CODE.sub("", text)
    text = _IMAGE.sub("", text)
    text = _LINK.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(2), text)
    text = _IMAGE.sub("", text)  # an image that was a link's text: [![alt](img)](url)
    text = _FOOTNOTE.sub("", text)
    text = _AUTOLINK.sub("", text)
    text = _URL.sub("", text)
    text = _BREAK_TAG.sub(" ", text)
    text = _TAG.sub("", text)
    text = _STRIKE.sub(r"\1", text)
    text = _STRONG.sub(r"\2", text)
    text = _EMPHASIS.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(2), text)
    text = html.unescape(text).replace("\xa0", " ")
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" +([,.;:!?，。；：！？、)）])", r"\1", text)  # "Run  now ." after inline code went
    text = re.sub(r"(?<=[(（]) +| +(?=[)）])", "", text)
    text = re.sub(r"\(\s*\)|（\s*）", "", text)  # "(see )" after its link went
    return text.strip()


def _join(left: str, right: str) -> str:
    """Glue two pieces of one paragraph: nothing between Chinese, a space elsewhere."""
    if _CJK_EDGE.match(left[-1]) or _CJK_EDGE.match(right[0]):
        return left + right
    return left + " " + right


# ---- chunking

def proxy_tokens(text: str) -> int:
    """One per CJK character, plus one per whitespace-separated word of the rest (punctuation alone counts)."""
    return len(_CJK.findall(text)) + len(_CJK.sub(" ", text).split())


def sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence of `text`, ends after its end mark; line breaks also end one."""
    spans, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        if text[start:match.end()].strip():
            spans.append((start, match.end()))
        start = match.end()
    if text[start:].strip():
        spans.append((start, len(text)))
    return spans


def chunk_paragraphs(paragraphs: list[str], count, min_tokens: int, max_tokens: int) -> list[tuple[str, int]]:
    """Pack paragraphs into balanced chunks of at most max_tokens -> [(text, tokens)]; see the module docstring."""
    units = []  # (text, tokens, separator before it: a paragraph break, or None inside a paragraph)
    for paragraph in paragraphs:
        n = count(paragraph)
        pieces = [(paragraph, n)] if n <= max_tokens else _split_long(paragraph, count, max_tokens)
        units += [(piece, pn, "\n\n" if i == 0 else None) for i, (piece, pn) in enumerate(pieces)]
    groups = _pack(units, max_tokens)
    if len(groups) > 1 and _size(groups[-1]) < min_tokens and _size(groups[-2]) + _size(groups[-1]) <= max_tokens:
        groups[-2:] = [groups[-2] + groups[-1]]
    return [(_text(group), _size(group)) for group in groups]


def _split_long(paragraph: str, count, max_tokens: int) -> list[tuple[str, int]]:
    """A paragraph over max_tokens -> pieces of at most max_tokens, cut between sentences where possible."""
    atoms = []
    for start, end in sentences(paragraph):
        sentence = paragraph[start:end].strip()
        n = count(sentence)
        if n <= max_tokens:
            atoms.append((sentence, n, None))
        else:  # one huge sentence: cut between words, or between CJK characters
            atoms += [(a, count(a), None) for a in re.findall(rf"{_CJK.pattern}|[^\s{_CJK.pattern[1:-1]}]+", sentence)]
    return [(_text(group), _size(group)) for group in _pack(atoms, max_tokens)]


def _pack(units, max_tokens) -> list[list[tuple]]:
    """Greedy packing aimed at equal sizes: as many groups as max_tokens forces, each near total / that many."""
    total = sum(n for _, n, _ in units)
    target = total / max(1, math.ceil(total / max_tokens))
    groups, current, size = [], [], 0
    for unit in units:
        if current and (size + unit[1] > max_tokens or size >= target):
            groups.append(current)
            current, size = [], 0
        current.append(unit)
        size += unit[1]
    return groups + [current]


def _size(group) -> int:
    return sum(n for _, n, _ in group)


def _text(group) -> str:
    text = group[0][0]
    for piece, _, separator in group[1:]:
        text = text + separator + piece if separator else _join(text, piece)
    return text


def _token_counter(tokenizer):
    if tokenizer is None:
        return proxy_tokens
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer  # only when asked: a slow import
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


# ---- tasks

def _task(kind, text, title, count, continue_ratio, rng) -> tuple[str, str, str]:
    """-> (kind actually used, user prompt, answer)."""
    language = "zh" if len(_CJK.findall(text)) > len(_LATIN.findall(text)) else "en"
    prompts = PROMPTS[language]
    spans = sentences(text)
    if len(spans) < 2:
        kind = "summarize_expand"
    if kind == "rewrite":
        parts = [text[s:e].strip() for s, e in spans]
        shuffled = parts[:]
        rng.shuffle(shuffled)
        if shuffled == parts:  # the draft must differ from the answer
            shuffled = parts[1:] + parts[:1]
        draft = shuffled[0]
        for part in shuffled[1:]:
            draft = _join(draft, part)
        return kind, prompts["rewrite"].format(text=draft), text
    if kind == "continue":
        total, seen, cut = count(text), 0, spans[0][1]
        for start, end in spans[:-1]:  # at least one sentence on each side
            cut = end
            seen += count(text[start:end])
            if seen >= continue_ratio * total:
                break
        return kind, prompts["continue"].format(text=text[:cut].strip()), text[cut:].strip()
    first = text[spans[0][0]:spans[0][1]].strip() if spans else text
    where = prompts["title"].format(title=title) if title else ""
    return kind, prompts["summarize_expand"].format(title=where, text=first), text


def _mix_option(mix):
    mix = dict(mix or {"rewrite": 1, "continue": 1, "summarize_expand": 1})
    unknown = sorted(set(mix) - set(KINDS))
    if unknown:
        raise ConfigError(f"dataset.builder.mix: unknown kind {unknown[0]!r} (choices: {', '.join(KINDS)})")
    if any(not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 for v in mix.values()) \
            or sum(mix.values()) <= 0:
        raise ConfigError(f"dataset.builder.mix: weights must be numbers >= 0, not all 0 (got {mix})")
    return {k: mix.get(k, 0) / sum(mix.values()) for k in KINDS}


def _quotas(mix, total) -> dict[str, int]:
    """round(share * total) per kind, the remainders going to the largest fractions, so they sum to total."""
    raw = {k: mix[k] * total for k in KINDS}
    quota = {k: int(raw[k]) for k in KINDS}
    for k in sorted(KINDS, key=lambda k: raw[k] - quota[k], reverse=True)[:total - sum(quota.values())]:
        quota[k] += 1
    return quota
