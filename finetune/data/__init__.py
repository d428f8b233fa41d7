"""Dataset builders: one file per source, each exposing `build(path, ..., skip_bad_rows=False) -> Built`.

A builder turns a user's source (SQLite, JSONL, CSV, a folder of Markdown) into chat samples:

    {"messages": [{"role": "system", "content": "..."},
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "{\"signal\": \"BUY\", \"confidence\": 0.72}"}],
     "label": "BUY",                      # class label, or None for free text (style)
     "timestamp": "2024-01-05T10:00:00",  # ISO 8601, or None; drives the temporal split
     "meta": {"symbol": "BTC-USDT", "pnl_percent": 6.1}}   # JSON scalars, same keys in every sample

Optional keys, only where the source has them (finetune/data/generic.py): an assistant message may call tools,
`"tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]` (then
its content may be ""), answered by `{"role": "tool", "content": "18 C"}` (+ "name" / "tool_call_id"); an
assistant message may carry `"weight": 0 | 1` (0: not trained); a preference sample (objective=dpo) carries
`"rejected": "<the answer to move away from>"`, its last message being the chosen one; an outcome-judged sample
(objective=kto) carries `"desirable": true | false` (whether its last message went well; the pipeline keeps false
ones out of SFT's train and validation); the sample may carry `"tools": [{"type":
"function", "function": {name, description, parameters}}]`. A text sample (task text only) has no messages:
`{"segments": [{"text": "Q: 2+2?\n", "train": false}, {"text": "4", "train": true}], "label": None, ...}`.

Bad input raises `finetune.errors.DataError` with one line naming the file, row/line and column.
With `skip_bad_rows=True` a row that is bad on its own is skipped and counted in `Built.dropped`
under a short reason; a bad file (missing, wrong schema, empty) always raises.
The shared pipeline (finetune/data/pipeline.py) validates, deduplicates, splits and writes stats.
"""
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

CHUNK = 10_000  # samples per batch that is built, checked, written and tokenized in one go (pipeline.py)


@dataclass
class Built:
    """A builder's result: its samples (a list, or a generator that reads the source as it goes), or, for a
    source large enough to be built in worker processes, `parts`: picklable zero-argument callables, each
    returning (samples, dropped) for one batch of rows, which the pipeline runs where it tokenizes them.
    `dropped` counts what the builder skipped (updated with each part's); `finish(built)` is called once every
    part has run, with the number of samples they built, for the builder's own checks (e.g. none at all)."""
    samples: Iterable[dict] | None
    dropped: Counter = field(default_factory=Counter)
    parts: Iterator[Callable[[], tuple[list[dict], Counter]]] | None = None
    finish: Callable[[int], None] | None = None
