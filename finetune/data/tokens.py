"""Samples -> what SFTTrainer trains on: token ids and a loss mask (`assistant_masks`), tokenized once.

Chat samples are rendered with the model's chat template (with the sample's `tools`). Every assistant turn
carries loss by default (`turns="all"`, as LLaMA-Factory and axolotl do); `turns="last"` trains the final
answer only; a turn with `"weight": 0` (OpenAI's per-turn weight) never does. System, user and tool turns
never carry loss.

A turn's tokens are found without template markup of our own: the conversation up to turn i rendered with
`add_generation_prompt=True` is the text before the answer, the conversation up to and including turn i
is the text to its end (the template's end-of-turn token, EOS, included: the model learns to stop). Both
must be prefixes of the whole rendering; a template for which they are not (one that rewrites earlier
turns, e.g. drops past reasoning) is named in the error. The whole text is tokenized once and each token
whose last character lies inside an answer is trained: the same ids and mask TRL builds for a
prompt/completion pair, for any number of turns.

Text samples (`segments`) are tokenized as plain text with the tokenizer's special tokens and EOS at the
end; a segment with `"train": false` carries no loss.
"""
import json
import re
from bisect import bisect_right
from itertools import accumulate, chain

from finetune.errors import DataError

TURNS = ("all", "last")


def template_name(tokenizer) -> str:
    return f"the chat template of {tokenizer.name_or_path or 'the tokenizer'}"


def render(tokenizer, conversations: list[list[dict]], tools: list | None = None, **options) -> list[str]:
    """apply_chat_template(tokenize=False) over a batch of conversations sharing `tools` (one template compile);
    a template that cannot render them is a DataError."""
    if not conversations:
        return []
    try:
        compiled = compiled_template(tokenizer) if not tools else None
        if compiled is not None:  # the template itself, without apply_chat_template's per-message conversions,
            # its globals merged once (jinja's render merges them, a ChainMap, on every call)
            context = {**compiled.globals, **tokenizer.special_tokens_map, "tools": None, "documents": None,
                       "add_generation_prompt": bool(options.get("add_generation_prompt"))}
            texts = ["".join(compiled.root_render_func(compiled.new_context({**context, "messages": chat}, shared=True)))
                     for chat in conversations]
            if texts[0] == tokenizer.apply_chat_template(conversations[0], tokenize=False, **options):
                return texts  # checked once per batch: a transformers that renders otherwise takes the slow path
        return tokenizer.apply_chat_template(conversations, tools=tools, tokenize=False, **options)
    except Exception as e:  # jinja2's TemplateError, or what the template's raise_exception() raises
        calls = any(m.get("tool_calls") for c in conversations for m in c)
        what = "tools" if tools else "tool calls" if calls else "messages"
        raise DataError(f"{template_name(tokenizer)} cannot render these {what} ({' '.join(str(e).split())[:160]}); "
                        "set model.chat_template to a template that can (model.chat_template=chatml_tools for a "
                        "ChatML tokenizer with tool calls)") from None


def compiled_template(tokenizer):
    """transformers' compiled jinja template for the tokenizer's chat template (cached by transformers), or None
    where this transformers has no such helper: plain chats of plain dicts render 2x faster through it."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return None
    template = getattr(tokenizer, "chat_template", None)
    return _compile_jinja_template(template) if isinstance(template, str) else None


def check_tools_rendered(tokenizer, text: str, messages: list[dict], tools: list | None) -> None:
    """A template that silently leaves tool calls or tools out would train on answers without them."""
    names = [c["function"]["name"] for m in messages for c in m.get("tool_calls") or []]
    names += [t["function"]["name"] for t in tools or []]
    missing = [name for name in names if name not in text]
    if missing:
        raise DataError(f"{template_name(tokenizer)} does not render tool calls or tools (the rendered sample "
                        f"lacks {missing[0]!r}), so they would not train; set model.chat_template to a template "
                        "that does (model.chat_template=chatml_tools for a ChatML tokenizer)")


def answer_spans(tokenizer, chats: list[list[dict]], tools: list | None, turns: str) -> list[tuple[str, list]]:
    """Each rendered conversation (all sharing `tools`) and the (start, end) character span of each of its
    assistant turns that trains; the renders are batched (conversations, then every prefix at once)."""
    if turns not in TURNS:
        raise DataError(f"dataset.train_turns={turns}: choose {' or '.join(TURNS)}")
    texts = render(tokenizer, chats, tools)
    trained = []  # (chat, turn) for each answer that trains
    for c, messages in enumerate(chats):
        if tools or any(m.get("tool_calls") for m in messages):
            check_tools_rendered(tokenizer, texts[c], messages, tools)
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        trained += [(c, i) for i in (assistant[-1:] if turns == "last" else assistant)
                    if messages[i].get("weight", 1) != 0]
    befores = render(tokenizer, [chats[c][:i] for c, i in trained], tools, add_generation_prompt=True)
    inner = [(c, i) for c, i in trained if i < len(chats[c]) - 1]  # the last turn ends where the whole text does
    throughs = dict(zip(inner, render(tokenizer, [chats[c][:i + 1] for c, i in inner], tools)))
    spans = [[] for _ in chats]
    for (c, i), before in zip(trained, befores):
        text, through = texts[c], throughs.get((c, i), texts[c])
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise DataError(f"{template_name(tokenizer)} renders turn {i + 1} differently inside the whole "
                            "conversation, so its answer tokens cannot be found; set model.chat_template to a "
                            "template that renders each turn the same way (finetune/assets/templates: chatml, "
                            "alpaca)")
        spans[c].append((len(before), len(through)))
    return list(zip(texts, spans))


def segment_spans(segments: list[dict]) -> tuple[str, list[tuple]]:
    text, spans = "", []
    for segment in segments:
        if segment["train"]:
            spans.append((len(text), len(text) + len(segment["text"])))
        text += segment["text"]
    return text, spans


def encode(tokenizer, texts: list[str], special: bool, cache: dict | None = None) -> list:
    """The fast tokenizer's encodings of `texts` (ids, offsets, char_to_token), in one batch: from the backend
    directly (the Python wrapper's per-text conversion costs as much as the encoding), through the wrapper when
    the backend is set to pad or cut (the wrapper lifts that for the call). Chat texts are encoded by pieces
    where that is exact (`encode_pieces`); `cache` keeps the pieces' encodings from one call to the next."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return tokenizer(texts, add_special_tokens=special).encodings
    splitter = None if special else special_splitter(backend)
    if splitter is not None and texts:
        joined = encode_pieces(backend, splitter, texts, {} if cache is None else cache)
        whole = backend.encode(texts[0], add_special_tokens=False)
        if joined[0].ids == whole.ids and joined[0].offsets == whole.offsets:  # checked once per batch
            return joined
    return backend.encode_batch(texts, add_special_tokens=special)


# The pre-tokenizer patterns after whose newlines a text can be cut (see `splits_at_lines`): GPT-2's (ByteLevel's
# own), and the Split patterns of Llama 3 and Qwen 2 (as they appear in their tokenizer.json).
LINE_SAFE_PATTERNS = {
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}

def splits_at_lines(backend) -> bool:
    """Whether the tokenizer always ends a pre-token after a newline that sits between two non-space characters,
    and encodes the text after it as it would a text that starts there: a byte-level BPE (no dropout) whose
    pre-tokenizer is GPT-2's regex (ByteLevel, no prefix space), or Llama 3's / Qwen 2's Split with digit
    splitting, and no normalizer but NFC. In each of those patterns no alternative matches a newline followed by
    a non-space (only `\\s+` takes it, alone), and none that ends a pre-token before a newline looks past it;
    so the text's tokens are its lines' tokens, and a line that recurs (`Trend: bullish`) is encoded once.
    SentencePiece-style tokenizers (Metaspace; merges across a newline) are not cut."""
    spec = json.loads(backend.to_str())
    model, normalizer, pre = spec.get("model") or {}, spec.get("normalizer"), spec.get("pre_tokenizer")
    if model.get("type") != "BPE" or model.get("dropout") or (normalizer and normalizer.get("type") != "NFC"):
        return False
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    regex = False
    for step in steps:
        kind = (step or {}).get("type")
        if kind == "ByteLevel" and not step.get("add_prefix_space"):
            regex = regex or step.get("use_regex", True)
        elif kind == "Split" and step.get("pattern", {}).get("Regex") in LINE_SAFE_PATTERNS and \
                step.get("behavior") == "Isolated" and not step.get("invert"):
            regex = True
        elif kind != "Digits":
            return False
    return regex


class Cutter:
    """Cuts a text into pieces that each encode alone as they do inside it: at the tokenizer's added tokens (kept
    as pieces of their own), and, where `lines`, after each newline between two characters that are not
    whitespace (`splits_at_lines`). Two C-level splits and a loop over lines: a regex with a lookbehind tried at
    every character costs twice as much."""

    def __init__(self, added: list[str], lines: bool):
        self.added = set(added)
        longest_first = sorted(self.added, key=len, reverse=True)  # leftmost-longest, as the tokenizer matches them
        self.specials = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
        self.lines = lines

    def __call__(self, text: str) -> list[str]:
        pieces = []
        for k, piece in enumerate(self.specials.split(text)):
            if k % 2:
                pieces.append(piece)
            elif piece:
                pieces += self.cut_lines(piece) if self.lines else [piece]
        return pieces

    @staticmethod
    def cut_lines(text: str) -> list[str]:
        pieces, current = [], None
        for line in text.split("\n"):
            if current is None:
                current = line
            elif current and line and not current[-1].isspace() and not line[0].isspace():
                pieces.append(current + "\n")  # a newline between two non-space characters ends a piece
                current = line
            else:
                current += "\n" + line
        pieces.append(current)
        return pieces


def special_splitter(backend) -> Cutter | None:
    """The Cutter of a tokenizer: at its added tokens, and after its lines where `splits_at_lines`, where encoding
    each piece alone gives the whole text's tokens: the tokenizer cuts at added tokens itself before it
    pre-tokenizes, unless an added token strips its neighbours' whitespace or is matched after normalization.
    None where it is not exact."""
    added = list(backend.get_added_tokens_decoder().values())
    if not added or any(t.lstrip or t.rstrip or t.single_word or (t.normalized and backend.normalizer is not None)
                        for t in added):
        return None
    return Cutter([t.content for t in added], splits_at_lines(backend))


class Joined:
    """A text's encoding put together from its pieces' encodings: ids, offsets and char_to_token as the whole
    text's. `encodings` maps a piece to its encoding, an added token to its id."""
    __slots__ = ("ids", "pieces", "chars", "tokens", "encodings")

    def __init__(self, ids: list[int], pieces: list[str], tokens: list[int], encodings: dict):
        self.ids, self.pieces, self.tokens, self.encodings = ids, pieces, tokens, encodings
        self.chars = list(accumulate(map(len, pieces), initial=0))  # each piece's first character

    def __len__(self) -> int:
        return len(self.ids)

    def char_to_token(self, position: int) -> int | None:
        k = bisect_right(self.chars, position) - 1
        encoding = self.encodings[self.pieces[k]]
        if isinstance(encoding, int):  # an added token holds all of its characters
            return self.tokens[k]
        found = encoding.char_to_token(position - self.chars[k])
        return None if found is None else self.tokens[k] + found

    @property
    def offsets(self) -> list[tuple[int, int]]:
        out = []
        for piece, start in zip(self.pieces, self.chars):
            encoding = self.encodings[piece]
            out += ([(start, start + len(piece))] if isinstance(encoding, int)
                    else [(a + start, b + start) for a, b in encoding.offsets])
        return out


CACHED_PIECES = 200_000  # a cache that grows past this is emptied (~100 MB of encodings)


def encode_pieces(backend, splitter: Cutter, texts: list[str], cache: dict) -> list[Joined]:
    """Each text cut at its added tokens (and lines); each piece encoded once while it is in `cache` (piece ->
    its encoding, or an added token's id): a chat's system prompt, role headers, recurring answers and lines
    repeat in every sample, most of its characters."""
    if len(cache) > CACHED_PIECES:
        cache.clear()
    cut = list(map(splitter, texts))
    distinct = dict.fromkeys(chain.from_iterable(cut))
    new = [piece for piece in distinct if piece not in cache]
    special = [piece for piece in new if piece in splitter.added]
    plain = [piece for piece in new if piece not in splitter.added]
    cache.update((piece, backend.token_to_id(piece)) for piece in special)
    cache.update(zip(plain, backend.encode_batch(plain, add_special_tokens=False)))
    ids_of = {piece: [found] if isinstance(found, int) else found.ids for piece, found in zip(distinct, map(
        cache.__getitem__, distinct))}
    counts = {piece: len(ids) for piece, ids in ids_of.items()}
    return [Joined(list(chain.from_iterable(map(ids_of.__getitem__, pieces))), pieces,
                   list(accumulate(map(counts.__getitem__, pieces), initial=0)), cache) for pieces in cut]


def trained_ranges(encoding, text_length: int, spans: list[tuple]) -> list[tuple[int, int]]:
    """[(low, high)] per character span (start, end): the tokens whose last character lies in (start, end].
    The token holding character `start` is the first of them, the one holding `end` the first after (tokens run
    in text order), found in Rust; where a boundary character is in no token (whitespace a tokenizer trims from
    its offsets), every token's end offset decides."""
    n, ranges = len(encoding), []
    for start, end in spans:
        low = encoding.char_to_token(start) if start < text_length else n
        high = encoding.char_to_token(end) if end < text_length else n
        if low is None or high is None:
            ends = [stop for _, stop in encoding.offsets]
            return [(bisect_right(ends, start), bisect_right(ends, end)) for start, end in spans]
        ranges.append((low, high))
    return ranges


def trained_tokens(samples: list[dict], tokenizer, turns: str = "all", cache: dict | None = None) -> list[tuple]:
    """(input_ids, [(low, high)] token ranges that carry loss) per sample, the texts tokenized in one batched call
    per kind; `cache` (see `encode`) carries the encodings of recurring pieces from one call to the next."""
    out = [None] * len(samples)
    for plain_text in (False, True):
        picked = [i for i, s in enumerate(samples) if ("segments" in s) == plain_text]
        if not picked:
            continue
        if plain_text:
            prepared = [segment_spans(samples[i]["segments"]) for i in picked]
        else:  # samples without tools in one batch, each with tools on its own
            plain = [i for i in picked if not samples[i].get("tools")]
            found = dict(zip(plain, answer_spans(tokenizer, [samples[i]["messages"] for i in plain], None, turns)))
            for i in picked:
                if samples[i].get("tools"):
                    found[i] = answer_spans(tokenizer, [samples[i]["messages"]], samples[i]["tools"], turns)[0]
            prepared = [found[i] for i in picked]
        # a chat template writes its own special tokens; plain text gets the model's BOS, as TRL gives it
        encoded = encode(tokenizer, [text for text, _ in prepared], plain_text, cache)
        for i, (text, spans), encoding in zip(picked, prepared, encoded):
            ids = encoding.ids
            ranges = [(low, high) for low, high in trained_ranges(encoding, len(text), spans) if high > low]
            if plain_text and tokenizer.eos_token_id is not None and ids[-1:] != [tokenizer.eos_token_id]:
                ids.append(tokenizer.eos_token_id)
                if samples[i]["segments"][-1]["train"]:
                    ranges.append((len(ids) - 1, len(ids)))
            out[i] = (ids, ranges)
    return out


def tokenize_many(samples: list[dict], tokenizer, turns: str = "all", cache: dict | None = None) -> list[dict]:
    """[{"input_ids", "assistant_masks", "first_trained"}] per sample (first_trained: the index of the first
    token with loss, or the length when none has)."""
    out = []
    for ids, ranges in trained_tokens(samples, tokenizer, turns, cache):
        mask = [0] * len(ids)
        for low, high in ranges:
            mask[low:high] = [1] * (high - low)
        out.append({"input_ids": ids, "assistant_masks": mask,
                    "first_trained": min((low for low, _ in ranges), default=len(ids))})
    return out


def tokenize(sample: dict, tokenizer, turns: str = "all") -> dict:
    """{"input_ids": [...], "assistant_masks": [0/1 per token]} for one chat or text sample."""
    return tokenize_many([sample], tokenizer, turns)[0]

