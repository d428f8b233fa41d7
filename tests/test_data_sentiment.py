"""sentiment builder: CSV (quoting, BOM, Chinese) and JSONL, label synonyms, named errors."""
import json
from collections import Counter
from pathlib import Path

import pytest

from finetune.data.sentiment import build
from finetune.errors import ConfigError, DataError

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "headlines.csv"


def test_csv_with_bom_quotes_chinese_and_synonyms(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text(
        "text,label,timestamp,source\n"
        '"Apple beats estimates, raises guidance",Bullish,2024-01-05 14:30,wire\n'
        "\n"
        '"Tesla misses,\nshares fall",NEG,2024-01-06T09:35:00Z,wire\n'
        "宁德时代召开股东大会,中性,1704500000,wire\n"
        "招商银行遭监管调查,利空,2024-01-07T10:00:00+08:00,wire\n",
        encoding="utf-8-sig")
    built = build(path, timestamp_field="timestamp")
    assert [(s["label"], s["meta"]["line"], s["meta"]["raw_label"]) for s in built.samples] == [
        ("positive", 2, "Bullish"), ("negative", 4, "NEG"), ("neutral", 6, "中性"), ("negative", 7, "利空")]
    first = built.samples[0]
    assert first["messages"] == [
        {"role": "system", "content": "You classify the sentiment of financial news headlines."},
        {"role": "user", "content": "Headline: Apple beats estimates, raises guidance\nSentiment?"},
        {"role": "assistant", "content": "positive"}]
    assert built.samples[1]["messages"][1]["content"] == "Headline: Tesla misses, shares fall\nSentiment?"
    assert [s["timestamp"] for s in built.samples] == [
        "2024-01-05T14:30:00", "2024-01-06T09:35:00", "2024-01-06T00:13:20", "2024-01-07T02:00:00"]
    assert built.dropped == {}


def test_unknown_label_names_file_line_column_and_value(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("text,label\nGood news,positive\nOdd news,sideways\nBad news,negative\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        build(path)
    assert str(e.value).startswith("h.csv: line 3, column 'label': unknown label 'sideways' (known: ")
    built = build(path, skip_bad_rows=True)
    assert [s["label"] for s in built.samples] == ["positive", "negative"]
    assert built.dropped == {"unknown_label": 1}
    # a user's own ids: extra synonyms are added to the defaults
    path.write_text("text,label\nGood news,2\nOdd news,1\nBad news,bearish\n", encoding="utf-8")
    built = build(path, synonyms={"2": "positive", 1: "neutral"})
    assert [s["label"] for s in built.samples] == ["positive", "neutral", "negative"]
    with pytest.raises(ConfigError, match="'2' maps to 'good'"):
        build(path, synonyms={"2": "good"})


def test_jsonl_malformed_line_and_custom_fields(tmp_path):
    path = tmp_path / "h.jsonl"
    lines = [json.dumps({"headline": "Nvidia surges", "y": 1, "time": "2024-02-01"}, ensure_ascii=False),
             '{"headline": "broken", "y": ',
             "",
             json.dumps({"headline": "比亚迪股价暴跌", "y": -1, "time": "2024-02-02"}, ensure_ascii=False),
             "[1, 2]",
             json.dumps({"headline": "", "y": 0, "time": "2024-02-03"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    options = dict(text_field="headline", label_field="y", timestamp_field="time",
                   synonyms={"1": "positive", "0": "neutral"})
    with pytest.raises(DataError, match=r"h\.jsonl: line 2, malformed JSON"):
        build(path, **options)
    built = build(path, skip_bad_rows=True, **options)
    assert [(s["label"], s["meta"]["line"], s["timestamp"]) for s in built.samples] == [
        ("positive", 1, "2024-02-01T00:00:00"), ("negative", 4, "2024-02-02T00:00:00")]
    assert built.dropped == {"malformed_json": 2, "empty_text": 1}


def test_bad_files_always_raise(tmp_path):
    with pytest.raises(DataError, match="missing.csv: file not found"):
        build(tmp_path / "missing.csv")
    (tmp_path / "h.txt").write_text("text,label\n")
    with pytest.raises(DataError, match=r"unsupported extension '\.txt'"):
        build(tmp_path / "h.txt")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty.csv: the file is empty"):
        build(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="header.csv: no samples left"):
        build(tmp_path / "header.csv", skip_bad_rows=True)
    (tmp_path / "cols.csv").write_text("headline,sentiment\nx,positive\n")
    with pytest.raises(DataError, match=r"cols.csv: no column 'text' in the header \(found: headline, sentiment\)"):
        build(tmp_path / "cols.csv")
    (tmp_path / "nots.csv").write_text("text,label\nx,positive\n")
    with pytest.raises(DataError, match=r"no column 'timestamp' in the header \(found: text, label\)"):
        build(tmp_path / "nots.csv", timestamp_field="timestamp")
    (tmp_path / "allbad.jsonl").write_text('{"text": "x", "label": "??"}\n')
    with pytest.raises(DataError, match=r"no samples left \(dropped: \{'unknown_label': 1\}\)"):
        build(tmp_path / "allbad.jsonl", skip_bad_rows=True)


def test_bad_timestamp_and_short_row(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label,timestamp\nA up,positive,soon\nB flat,neutral\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"t\.csv: line 2, column 'timestamp': 'soon' is not a date-time"):
        build(path, timestamp_field="timestamp")
    with pytest.raises(DataError, match=r"no samples left \(dropped: \{'bad_timestamp': 2\}\)"):
        build(path, timestamp_field="timestamp", skip_bad_rows=True)
    assert build(path).samples[1]["timestamp"] is None  # without a timestamp field the short row is fine


def test_gbk_file_needs_its_encoding(tmp_path):
    path = tmp_path / "gbk.csv"
    path.write_bytes("text,label\n茅台业绩大增,利好\n".encode("gbk"))
    with pytest.raises(DataError, match="gbk.csv: not utf-8-sig text .* set dataset.builder.encoding"):
        build(path)
    assert build(path, encoding="gbk").samples[0]["label"] == "positive"


def test_sample_data_is_balanced_and_timed():
    built = build(SAMPLE, timestamp_field="timestamp")
    assert Counter(s["label"] for s in built.samples) == {"positive": 150, "neutral": 150, "negative": 150}
    assert all(s["timestamp"] for s in built.samples) and not built.dropped
    assert any("，" in s["messages"][1]["content"] for s in built.samples)  # Chinese rows are there
