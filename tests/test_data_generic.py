"""Generic builder: chat / alpaca / prompt-completion in JSONL, JSON, CSV and Parquet; bad rows named by line."""
import json
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from finetune.data.generic import build, parse_timestamp
from finetune.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
CHAT = {"messages": [{"role": "user", "content": "RSI: 28.4", "name": "trader"},
                     {"role": "assistant", "content": '{"signal": "BUY", "confidence": 0.72}'}],
        "label": "BUY", "timestamp": "2024-01-05T10:00:00+02:00", "extra": [1, 2]}


def jsonl(path, *records, raw=()):
    lines = [json.dumps(r, ensure_ascii=False) for r in records] + list(raw)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_chat_jsonl_keeps_roles_and_content_only(tmp_path):
    built = build(jsonl(tmp_path / "d.jsonl", CHAT), system_prompt="You are a trader.")
    assert built.samples == [{
        "messages": [{"role": "system", "content": "You are a trader."},
                     {"role": "user", "content": "RSI: 28.4"},
                     {"role": "assistant", "content": '{"signal": "BUY", "confidence": 0.72}'}],
        "label": "BUY", "timestamp": "2024-01-05T08:00:00", "meta": {}}]
    own_system = {**CHAT, "messages": [{"role": "system", "content": "Mine."}] + CHAT["messages"]}
    [sample] = build(jsonl(tmp_path / "s.jsonl", own_system), system_prompt="You are a trader.").samples
    assert [m["content"] for m in sample["messages"]][0] == "Mine."  # a record's own system turn wins


def test_alpaca_json_list_with_and_without_input(tmp_path):
    records = [{"instruction": "Classify the headline.", "input": "Apple beats estimates", "output": "positive",
                "system": "You classify headlines.", "label": 2},
               {"instruction": "Say hi in Chinese.", "input": None, "output": "你好", "label": "neutral"}]
    (tmp_path / "a.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    first, second = build(tmp_path / "a.json").samples
    assert first["messages"] == [{"role": "system", "content": "You classify headlines."},
                                 {"role": "user", "content": "Classify the headline.\n\nApple beats estimates"},
                                 {"role": "assistant", "content": "positive"}]
    assert second["messages"] == [{"role": "user", "content": "Say hi in Chinese."},
                                  {"role": "assistant", "content": "你好"}]
    assert (first["label"], second["label"]) == ("2", "neutral")  # mixed types: text labels
    assert first["timestamp"] is None  # no timestamp column anywhere: None, not an error


def test_prompt_completion_csv_through_datasets(tmp_path):
    (tmp_path / "p.csv").write_text(
        'prompt,completion,label,timestamp\n'
        '"Headline: Apple beats, raises guidance\nSentiment?",positive,positive,2024-01-05 14:30:00\n'
        '标题：茅台业绩下滑,negative,negative,1704450600\n', encoding="utf-8")
    (tmp_path / "n.csv").write_text("prompt,completion,label\na,b,1\nc,d,\ne,f,0\n")
    with pytest.raises(DataError, match=r"n\.csv: row 2, field 'label' is missing or empty"):
        build(tmp_path / "n.csv")
    assert [s["label"] for s in build(tmp_path / "n.csv", skip_bad_rows=True).samples] == ["1", "0"]
    (tmp_path / "n.csv").unlink()
    first, second = build(tmp_path / "p.csv").samples
    assert first["messages"] == [{"role": "user", "content": "Headline: Apple beats, raises guidance\nSentiment?"},
                                 {"role": "assistant", "content": "positive"}]
    assert second["messages"][0]["content"] == "标题：茅台业绩下滑"
    assert (first["timestamp"], second["timestamp"]) == ("2024-01-05T14:30:00", "2024-01-05T10:30:00")


def test_parquet_with_datetime_column_and_meta_fields(tmp_path):
    pandas = pytest.importorskip("pandas")
    when = pandas.to_datetime(["2024-01-05 10:00", "2024-01-06 00:00"])
    frame = pandas.DataFrame({"prompt": ["RSI: 28.4", "RSI: 75.0"], "completion": ["BUY", "SELL"],
                              "label": ["BUY", "SELL"], "when": when,
                              "symbol": ["BTC-USDT", None], "pnl_percent": [6.1, -3.5]})
    frame.to_parquet(tmp_path / "t.parquet")
    built = build(tmp_path / "t.parquet", timestamp_field="when", meta_fields=["symbol", "pnl_percent"])
    assert [s["timestamp"] for s in built.samples] == ["2024-01-05T10:00:00", "2024-01-06T00:00:00"]
    assert [s["meta"] for s in built.samples] == [{"symbol": "BTC-USDT", "pnl_percent": 6.1},
                                                  {"symbol": None, "pnl_percent": -3.5}]


def test_conversational_prompt_completion_and_messages_as_csv_text(tmp_path):
    record = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
              "completion": [{"role": "assistant", "content": "Hello."}]}
    [sample] = build(jsonl(tmp_path / "c.jsonl", record), system_prompt="ignored").samples
    assert [m["role"] for m in sample["messages"]] == ["system", "user", "assistant"]
    assert sample["messages"][0]["content"] == "Be brief."
    messages = json.dumps(CHAT["messages"]).replace('"', '""')
    (tmp_path / "m.csv").write_text(f'messages,label\n"{messages}",BUY\n', encoding="utf-8")
    [sample] = build(tmp_path / "m.csv").samples
    assert sample["messages"][-1]["content"] == '{"signal": "BUY", "confidence": 0.72}'


def test_folder_detects_the_format_per_file(tmp_path):
    jsonl(tmp_path / "chat.jsonl", CHAT)
    (tmp_path / "sub").mkdir()
    jsonl(tmp_path / "sub" / "alpaca.jsonl", {"instruction": "i", "output": "o", "label": "x", "timestamp": 1704450600})
    (tmp_path / "notes.txt").write_text("not data")
    built = build(tmp_path)
    assert [s["messages"][-1]["content"] for s in built.samples] == [CHAT["messages"][-1]["content"], "o"]


def test_meta_fields_read_top_level_then_a_meta_object(tmp_path):
    # the pipeline's own split files ({"messages", "label", "timestamp", "meta"}) read back
    record = {**CHAT, "meta": {"symbol": "BTC-USDT", "pnl_percent": 6.1}, "extra": [1, 2]}
    path = jsonl(tmp_path / "train.jsonl", record)
    [sample] = build(path, meta_fields=["symbol", "pnl_percent", "extra", "nope"]).samples
    assert sample["meta"] == {"symbol": "BTC-USDT", "pnl_percent": 6.1, "extra": "[1, 2]", "nope": None}


# ---- bad rows: file, line and field named; skip_bad_rows counts them

def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", CHAT, raw=["", '{"messages": [', "[1, 2]"])
    with pytest.raises(DataError, match=r"^d\.jsonl: line 3, malformed JSON \(Expecting value at column 15\); "
                                        r"fix it or set dataset\.skip_bad_rows=true$"):
        build(path)
    built = build(path, skip_bad_rows=True)
    assert len(built.samples) == 1 and built.dropped == {"malformed_json": 1, "not_an_object": 1}


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "hi"}], "label": "x"},
     r"line 2, field 'messages': the last message is 'user', it must be the assistant's answer"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}], "label": "x"},
     r"line 2, field 'messages\[1\]\.role': 'tool' is not one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}], "label": "x"},
     r"line 2, field 'messages\[0\]\.content': must be non-empty text"),
    ({"messages": [], "label": "x"}, r"line 2, field 'messages': expected a non-empty list of \{role, content\}"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     r"line 2, field 'label' is missing or empty"),
    ({**CHAT, "timestamp": "next friday"}, r"line 2, field 'timestamp': 'next friday' is not a date-time"),
])
def test_bad_record_names_line_and_field(tmp_path, record, message):
    path = jsonl(tmp_path / "d.jsonl", CHAT, record)
    with pytest.raises(DataError, match=r"^d\.jsonl: " + message):
        build(path)
    assert len(build(path, skip_bad_rows=True).samples) == 1


def test_alpaca_record_missing_output_names_line_and_field(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", {"instruction": "i", "output": "o"}, {"instruction": "i2", "output": ""})
    with pytest.raises(DataError, match=r"a\.jsonl: line 2, field 'output' is missing or empty \(alpaca form needs "
                                        r"instruction, output\)"):
        build(path)
    assert build(path, skip_bad_rows=True).dropped == {"missing_field": 1}


def test_bad_files_always_raise(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        build(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records \(the file is empty\)"):
        build(tmp_path / "empty.jsonl", skip_bad_rows=True)
    jsonl(tmp_path / "odd.jsonl", {"question": "q", "answer": "a"})
    with pytest.raises(DataError, match=r"odd\.jsonl: cannot tell the format from its columns "
                                        r"\(found: answer, question\)"):
        build(tmp_path / "odd.jsonl")
    with pytest.raises(DataError, match=r"odd\.jsonl: line 1, field 'messages' is missing"):
        build(tmp_path / "odd.jsonl", format="chat")
    (tmp_path / "list.json").write_text('[{"prompt": "p", "completion": "c"},\n {"prompt": }]')
    with pytest.raises(DataError, match=r"list\.json: invalid JSON at line 2 column 13"):
        build(tmp_path / "list.json")
    (tmp_path / "one.json").write_text('{\n  "data": [{"prompt": "p", "completion": "c"}]\n}')
    with pytest.raises(DataError, match=r"one\.json: one JSON dict spanning several lines"):
        build(tmp_path / "one.json")
    (tmp_path / "bad.csv").write_text("prompt,completion\np,c\np,c,extra\n")
    with pytest.raises(DataError, match=r"bad\.csv: cannot read as CSV \(.*Expected 2 fields in line 3, saw 3"):
        build(tmp_path / "bad.csv")
    (tmp_path / "gbk.jsonl").write_bytes('{"prompt": "你好", "completion": "x"}'.encode("gbk"))
    with pytest.raises(DataError, match=r"gbk\.jsonl: not utf-8-sig text"):
        build(tmp_path / "gbk.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"d\.txt: unsupported extension"):
        build(tmp_path / "d.txt")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=r"nothing/: no \.jsonl / \.json / \.csv / \.parquet files"):
        build(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="format=vicuna: choose auto, chat, sharegpt, alpaca, prompt_completion, "
                                          "kto, chosen, text"):
        build(tmp_path / "odd.jsonl", format="vicuna")  # sharegpt became a format (tests/test_data_formats.py)


def test_all_rows_bad_leaves_no_samples(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", {"prompt": "p", "completion": ""})
    with pytest.raises(DataError, match=r"d\.jsonl: no samples left \(dropped: \{'missing_field': 1\}\)"):
        build(path, skip_bad_rows=True)


def test_json_lines_under_a_json_name(tmp_path):
    path = jsonl(tmp_path / "d.json", CHAT, {**CHAT, "label": "SELL"})
    assert [s["label"] for s in build(path).samples] == ["BUY", "SELL"]


@pytest.mark.parametrize("value, expected", [
    ("2024-01-05", "2024-01-05T00:00:00"), ("2024-01-05T10:00:00Z", "2024-01-05T10:00:00"),
    ("2024/3/2", "2024-03-02T00:00:00"), ("2024年3月2日", "2024-03-02T00:00:00"),
    (1704450600, "2024-01-05T10:30:00"), (1704450600000, "2024-01-05T10:30:00"),
    ("2024", None), ("soon", None), (None, None), (True, None), (float("nan"), None),
])
def test_parse_timestamp(value, expected):
    assert parse_timestamp(value) == expected


def test_demo_signals_build_with_the_shipped_config():
    cfg = OmegaConf.load(ROOT / "conf" / "dataset" / "generic.yaml")
    options = {k: v for k, v in OmegaConf.to_container(cfg.builder).items() if k not in ("_target_", "path")}
    built = build(ROOT / "data" / "demo_signals.jsonl", **options)
    assert len(built.samples) == 600 and not built.dropped
    assert Counter(s["label"] for s in built.samples) == {"BUY": 200, "SELL": 200, "HOLD": 200}
    assert all(s["timestamp"] for s in built.samples)


def test_text_prompt_completion_as_a_continuation_keeps_every_character(tmp_path):
    rows = [{"prompt": f"{i} x 3 =", "completion": f" {3 * i}"} for i in range(30)]
    path = jsonl(tmp_path / "pc.jsonl", *rows)
    chat = build(path).samples[0]["messages"]
    assert chat[-1] == {"role": "assistant", "content": "0"}  # chat turns: the answer, stripped
    first = build(path, completion="continuation").samples[0]
    assert first["segments"] == [{"text": "0 x 3 =", "train": False}, {"text": " 0", "train": True}]
    with pytest.raises(ConfigError, match="completion=prose: choose chat .* or continuation"):
        build(path, completion="prose")
    from conftest import compose
    from finetune.runner import run
    result = run(compose("dataset=generic", f"dataset.path={path}", "dataset.builder.completion=continuation",
                         "eval=perplexity", "dry_run=true"), tmp_path / "run")
    assert result.stats["kind"] == "text"
