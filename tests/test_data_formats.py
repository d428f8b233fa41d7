"""Generic builder on the forms other trainers publish (fixtures in tests/fixtures/formats/, in each one's own shape):
ShareGPT with tools, OpenAI tool calls / content parts / weight, alpaca history, KTO labels, preference pairs,
text and segments, media, save_to_disk folders, a LLaMA-Factory data folder, odd JSON layouts; then the pipeline
on tool-call and text data."""
import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from finetune.data.generic import build
from finetune.data.pipeline import check_sample, prepare
from finetune.errors import ConfigError, DataError
from finetune.train.model import TEMPLATES, TINY_TOKENIZER
from finetune.paths import CONF_DIR

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
AREA_TOOL = {"type": "function", "function": {
    "name": "calculate_area", "description": "Calculate the area of a given shape",
    "parameters": {"type": "object", "properties": {"shape": {"type": "string"},
                                                    "dimensions": {"type": "array", "items": {"type": "number"}}},
                   "required": ["shape", "dimensions"]}}}


def jsonl(path, *records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def chat(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


# ---- chat forms

def test_sharegpt_with_tools_function_call_observation_and_system():
    first, second = build(FIXTURES / "sharegpt_tools.json").samples
    assert first == {
        "messages": [{"role": "system", "content": "You are a geometry helper."},
                     {"role": "user", "content": "I need the area of a rectangle, 5 by 3 units."},
                     {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                         "name": "calculate_area", "arguments": {"shape": "rectangle", "dimensions": [5, 3]}}}]},
                     {"role": "tool", "content": '{"area": 15}'},
                     {"role": "assistant", "content": "The area is 15 square units."}],
        "tools": [AREA_TOOL], "label": None, "timestamp": None, "meta": {}}
    # "tools": "[]" adds no key; the conversation's own system turn wins over the system column
    assert second == {"messages": chat(("system", "Answer briefly."), ("user", "What is photoshop?"),
                                       ("assistant", "An image editor by Adobe."), ("user", "And blockchain?"),
                                       ("assistant", "A shared, tamper-proof ledger.")),
                      "label": None, "timestamp": None, "meta": {}}
    assert all(check_sample(s, "text") is None for s in (first, second))


def test_openai_tool_calls_tools_content_parts_and_weight():
    first, second = build(FIXTURES / "openai_tools.jsonl").samples
    tools = json.loads((FIXTURES / "openai_tools.jsonl").read_text().splitlines()[0])["tools"]
    assert first == {
        "messages": [{"role": "system", "content": "You are a weather bot."},
                     {"role": "user", "content": "What is the weather in Boston?\nIn fahrenheit."},
                     {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
                      "function": {"name": "get_current_weather",
                                   "arguments": {"location": "Boston, MA", "format": "fahrenheit"}}}]},
                     {"role": "tool", "content": '{"temperature": 71}', "tool_call_id": "call_1"},
                     {"role": "assistant", "content": "It is 71 F in Boston.", "weight": 1}],
        "tools": tools, "label": None, "timestamp": None, "meta": {}}
    assert second["messages"] == [{"role": "user", "content": "Capital of France?"},
                                  {"role": "assistant", "content": "Lyon.", "weight": 0},
                                  {"role": "user", "content": "Wrong, try again."},
                                  {"role": "assistant", "content": "Paris.", "weight": 1}]
    assert "tools" not in second and all(check_sample(s, "text") is None for s in (first, second))


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "hi"},
      {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}],
     r"line 1, field 'messages\[1\]\.tool_calls\[0\]\.function': arguments are not JSON"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a", "weight": 2}],
     r"line 1, field 'messages\[1\]\.weight': 2 on a assistant message; weight is 0 or 1"),
    ([{"role": "user", "content": "hi", "weight": 1}, {"role": "assistant", "content": "a"}],
     r"line 1, field 'messages\[0\]\.weight': 1 on a user message"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a", "weight": 0}],
     r"line 1, field 'messages': every assistant message has weight 0: nothing trains"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}],
     r"line 1, field 'messages\[1\]\.content': must be non-empty text"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
      {"role": "assistant", "content": "a"}],
     r"line 1, field 'messages\[0\]\.content\[0\]': a 'image_url' part: finetune trains text-only models; set "
     r"dataset\.builder\.drop_media=true"),
])
def test_bad_chat_rows_name_line_and_field(tmp_path, messages, message):
    path = jsonl(tmp_path / "c.jsonl", {"messages": messages})
    with pytest.raises(DataError, match=r"^c\.jsonl: " + message):
        build(path)


def test_sharegpt_roles_come_from_tags(tmp_path):
    record = {"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "hello"}]}
    path = jsonl(tmp_path / "s.jsonl", record)
    with pytest.raises(DataError, match=r"s\.jsonl: line 1, field 'conversations\[0\]\.from': 'user' is not one of "
                                        r"system, human, gpt, observation, function_call"):
        build(path)
    [sample] = build(path, tags={"user_tag": "user", "assistant_tag": "assistant"}).samples
    assert sample["messages"] == chat(("user", "hi"), ("assistant", "hello"))
    tool_first = {"conversations": [{"from": "human", "value": "hi"}, {"from": "observation", "value": "x"},
                                    {"from": "gpt", "value": "ok"}]}
    with pytest.raises(DataError, match=r"'observation' is not one of system, human, gpt: a tool result must follow "
                                        r"an assistant message with tool calls"):
        build(jsonl(tmp_path / "t.jsonl", tool_first))


def test_turn_keys_decide_chat_or_sharegpt_and_columns_map_names(tmp_path):
    sharegpt_in_messages = {"messages": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    chat_in_conversations = {"conversations": chat(("user", "hi"), ("assistant", "hello"))}
    for record in (sharegpt_in_messages, chat_in_conversations):
        [sample] = build(jsonl(tmp_path / "d.jsonl", record)).samples
        assert sample["messages"] == chat(("user", "hi"), ("assistant", "hello"))
    own = {"dialog": [{"speaker": "client", "text": "Rates?"}, {"speaker": "agent", "text": "Unchanged."}]}
    [sample] = build(jsonl(tmp_path / "o.jsonl", own), format="sharegpt", columns={"messages": "dialog"},
                     tags={"role_tag": "speaker", "content_tag": "text", "user_tag": "client",
                           "assistant_tag": "agent"}).samples
    assert sample["messages"] == chat(("user", "Rates?"), ("assistant", "Unchanged."))
    qa = {"question": "2 + 2?", "answer": "4", "context": "Arithmetic."}
    [sample] = build(jsonl(tmp_path / "q.jsonl", qa),
                     columns={"instruction": "question", "input": "context", "output": "answer"}).samples
    assert sample["messages"] == chat(("user", "2 + 2?\n\nArithmetic."), ("assistant", "4"))
    with pytest.raises(ConfigError, match=r"dataset\.builder\.columns\.query: not one of messages, .*"
                                          r"\(LLaMA-Factory's query is our input\)"):
        build(tmp_path / "q.jsonl", columns={"query": "context"})
    with pytest.raises(ConfigError, match=r"dataset\.builder\.tags\.speaker_tag: not one of role_tag"):
        build(tmp_path / "q.jsonl", tags={"speaker_tag": "x"})


def test_alpaca_history_becomes_the_earlier_turns():
    first, second = build(FIXTURES / "alpaca_history.json").samples
    assert first["messages"] == chat(("system", "You are a translator."), ("user", "Say hello in French."),
                                     ("assistant", "Bonjour"), ("user", "And in German?"), ("assistant", "Hallo"),
                                     ("user", "And in Chinese?"), ("assistant", "你好"))
    assert second["messages"] == chat(("user", "Classify the headline.\n\nApple beats estimates"),
                                      ("assistant", "positive"))


def test_alpaca_bad_history_is_named(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", {"instruction": "i", "output": "o", "history": [["only one"]]})
    with pytest.raises(DataError, match=r"a\.jsonl: line 1, field 'history\[0\]': expected \[instruction, response\]"):
        build(path)


# ---- KTO and preference pairs

def test_kto_labels_become_the_desirable_flag_of_every_row(caplog):
    with caplog.at_level(logging.INFO, logger="finetune.data.generic"):
        built = build(FIXTURES / "kto.jsonl")
    assert [(s["messages"], s["desirable"]) for s in built.samples] == [
        (chat(("user", "The sky is"), ("assistant", "blue.")), True),
        (chat(("user", "The sky is"), ("assistant", "green.")), False),
        (chat(("user", "Capital of France?"), ("assistant", "Paris.")), True)]
    assert [s["label"] for s in built.samples] == [None, None, None]  # not the class labels "True" / "False"
    assert built.dropped == {}
    assert "kto.jsonl: kto: 2 desirable and 1 undesirable samples" in caplog.text


def test_kto_label_must_be_true_or_false(tmp_path):
    path = jsonl(tmp_path / "k.jsonl", {"prompt": "p", "completion": "c", "label": True},
                 {"prompt": "p", "completion": "c", "label": "yes"})
    with pytest.raises(DataError, match=r"k\.jsonl: line 2, field 'label': expected true or false"):
        build(path, format="kto")
    with pytest.raises(DataError, match=r"format=kto needs a true/false column 'label'.*dataset\.builder\.columns\.label"):
        build(jsonl(tmp_path / "n.jsonl", {"prompt": "p", "completion": "c"}), format="kto")


@pytest.mark.parametrize("file", ["dpo_explicit.jsonl", "dpo_implicit.jsonl", "dpo_sharegpt.json"])
def test_preference_pairs_stop_auto_mode_and_name_the_option(file):
    with pytest.raises(DataError, match=rf"^{file.replace('.', '[.]')}: 'chosen' / 'rejected' columns: these rows are "
                                        r"preference pairs \(DPO data\), not supervised samples; set "
                                        r"dataset\.builder\.format=chosen"):
        build(FIXTURES / file)


def test_format_chosen_trains_on_prompt_plus_chosen(caplog, tmp_path):
    with caplog.at_level(logging.INFO, logger="finetune.data.generic"):
        explicit = build(FIXTURES / "dpo_explicit.jsonl", format="chosen").samples
    assert [s["messages"] for s in explicit] == [
        chat(("user", "The sky is"), ("assistant", "blue.")),
        chat(("user", "What color is the sky?"), ("assistant", "It is blue."))]
    assert "format=chosen: 2 samples of prompt + chosen, 2 with a rejected answer ('rejected')" in caplog.text
    [implicit] = build(FIXTURES / "dpo_implicit.jsonl", format="chosen").samples
    assert implicit["messages"] == chat(("user", "What color is the sky?"), ("assistant", "It is blue."))
    [sharegpt] = build(FIXTURES / "dpo_sharegpt.json", format="chosen").samples
    # the rejected answer's text, from a string, a conversation (TRL's implicit prompt) or a ShareGPT turn
    assert [s["rejected"] for s in explicit] + [implicit["rejected"], sharegpt["rejected"]] == \
        ["green.", "It is green.", "It is green.", "Charles Dickens."]
    texts = jsonl(tmp_path / "hh.jsonl", {"chosen": "Human: hi Assistant: hello", "rejected": "Human: hi Assistant: go"})
    with pytest.raises(DataError, match=r"hh\.jsonl: line 1, field 'chosen' is text and there is no prompt column: "
                                        r"to train on it as plain text set dataset\.builder\.format=text "
                                        r"\+dataset\.builder\.columns\.text=chosen"):
        build(texts, format="chosen")
    [text] = build(texts, format="text", columns={"text": "chosen"}).samples
    assert text["segments"] == [{"text": "Human: hi Assistant: hello", "train": True}]


# ---- text

def test_text_and_segments_build_text_samples():
    built = build(FIXTURES / "text.jsonl")
    assert built.samples == [
        {"segments": [{"text": "The Federal Reserve held rates steady on Wednesday.", "train": True}],
         "label": None, "timestamp": None, "meta": {}},
        {"segments": [{"text": "Markets rallied after the announcement.", "train": True}],
         "label": None, "timestamp": None, "meta": {}}]
    first, second = build(FIXTURES / "segments.jsonl").samples
    assert first["segments"] == [{"text": "<s>Question: What is 2 + 2?\n", "train": False},
                                 {"text": "Answer: 4</s>", "train": True}]
    assert "messages" not in first and second["segments"][1] == {"text": "cat", "train": True}
    assert check_sample(first, "text") is None
    assert check_sample(first, "sentiment") == "text samples (segments) train for dataset.task=text only, not sentiment"
    assert check_sample({"segments": [{"text": "x", "train": False}]}, "text") == "no trained text in segments"


def test_segments_need_a_trained_segment(tmp_path):
    path = jsonl(tmp_path / "s.jsonl", {"segments": [{"text": "prompt", "label": False}]},
                 {"segments": [{"text": "x"}]})
    with pytest.raises(DataError, match=r"s\.jsonl: line 1, field 'segments': no segment with label true has text"):
        build(path)
    assert build(jsonl(tmp_path / "ok.jsonl", {"segments": [{"text": "a", "label": True}]}, {"segments": [{"text": "x"}]}),
                 skip_bad_rows=True).dropped == {"bad_segments": 1}


def test_a_folder_mixing_chat_and_text_names_both_files(tmp_path):
    (tmp_path / "mixed").mkdir()
    for name in ("openai_tools.jsonl", "text.jsonl"):
        (tmp_path / "mixed" / name).write_bytes((FIXTURES / name).read_bytes())
    with pytest.raises(DataError, match=r"^mixed/text\.jsonl holds text samples and mixed/openai_tools\.jsonl chat "
                                        r"samples; one build is one kind"):
        build(tmp_path / "mixed")


# ---- media

def test_media_stops_the_build_unless_drop_media(caplog, tmp_path):
    with pytest.raises(DataError, match=r"^mllm\.json: record 1, field 'images' holds images: finetune trains "
                                        r"text-only models; set dataset\.builder\.drop_media=true"):
        build(FIXTURES / "mllm.json")
    with caplog.at_level(logging.INFO, logger="finetune.data.generic"):
        first, second = build(FIXTURES / "mllm.json", drop_media=True).samples
    assert first["messages"] == chat(("user", "Who are they?"), ("assistant", "They're Kane and Gretzka from Bayern Munich."))
    assert second["messages"] == chat(("user", "Who scored?"), ("assistant", "Kane."))  # images: [] is no media
    assert "mllm.json: drop_media: media and <image>/<video>/<audio> placeholders removed from 1 rows" in caplog.text
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe it."},
                                                       {"type": "image_url", "image_url": {"url": "cat.png"}}]},
                          {"role": "assistant", "content": "A cat."}]}
    [sample] = build(jsonl(tmp_path / "p.jsonl", parts), drop_media=True).samples
    assert sample["messages"] == chat(("user", "Describe it."), ("assistant", "A cat."))


# ---- sources: save_to_disk, LLaMA-Factory folders, odd JSON layouts

def test_save_to_disk_dataset_and_datasetdict(tmp_path, caplog):
    datasets = pytest.importorskip("datasets")
    rows = [{"instruction": f"Say {w}.", "output": w} for w in ("hi", "bye", "ok")]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    built = build(tmp_path / "saved")
    assert [s["messages"][-1]["content"] for s in built.samples] == ["hi", "bye", "ok"]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2]),
                                   "test": datasets.Dataset.from_list([{"instruction": "Say no.", "output": ""}])})
    splits.save_to_disk(str(tmp_path / "folder" / "dict"))
    jsonl(tmp_path / "folder" / "more.jsonl", {"instruction": "Say yes.", "output": "yes"})
    with pytest.raises(DataError, match=r"^folder/dict/: split 'test' row 1, field 'output' is missing or empty"):
        build(tmp_path / "folder")
    with caplog.at_level(logging.INFO, logger="finetune.data.files"):
        built = build(tmp_path / "folder", skip_bad_rows=True)  # the save_to_disk folder's json files are no data
    assert [s["messages"][-1]["content"] for s in built.samples] == ["hi", "bye", "yes"]
    assert built.dropped == {"missing_field": 1}
    assert "folder/dict/: a DatasetDict: its splits (train, test) are read as one set; the pipeline splits it again" \
        in caplog.text


def test_llamafactory_folder_entries(caplog):
    folder = FIXTURES / "llamafactory"
    with pytest.raises(ConfigError, match=r"llamafactory/dataset_info\.json lists 6 datasets: set "
                                          r"dataset\.builder\.dataset_name to one of orca_demo, glaive_toolcall_demo, "
                                          r"kto_demo, dpo_demo, c4_demo \(1 more are on a hub\)"):
        build(folder)
    [orca] = build(folder, dataset_name="orca_demo").samples  # prompt / response / system_prompt columns
    assert orca["messages"] == chat(("system", "You are an AI assistant."),
                                    ("user", "Translate to German: Good morning."), ("assistant", "Guten Morgen."))
    [glaive] = build(folder, dataset_name="glaive_toolcall_demo").samples
    assert [m["role"] for m in glaive["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert glaive["messages"][1]["tool_calls"] == [{"type": "function", "function": {
        "name": "convert_currency", "arguments": {"amount": 100, "from": "USD", "to": "EUR"}}}]
    assert [t["function"]["name"] for t in glaive["tools"]] == ["convert_currency"]
    kto = build(folder, dataset_name="kto_demo")  # kto_tag -> label, role/content tags
    assert [(s["messages"][-1]["content"], s["desirable"]) for s in kto.samples][0] == ("D: Science/Tech.", True)
    assert [s["desirable"] for s in kto.samples] == [True, False]
    with pytest.raises(DataError, match=r"dpo_demo\.json: 'chosen' / 'rejected' columns: these rows are preference "
                                        r"pairs"):
        build(folder, dataset_name="dpo_demo")
    [dpo] = build(folder, dataset_name="dpo_demo", format="chosen").samples
    assert dpo["messages"] == chat(("user", "Summarize the news.\n\nThe Fed held rates steady."),
                                   ("assistant", "Rates were left unchanged."))
    c4 = build(folder, dataset_name="c4_demo").samples  # an alpaca entry with only a prompt column: pre-training
    assert [s["segments"] for s in c4] == [[{"text": "Beginners BBQ Class Taking Place in Missoula!", "train": True}],
                                           [{"text": "Discussion in 'Mac OS X Lion (10.7)' started by axboi87.",
                                             "train": True}]]
    with pytest.raises(DataError, match=r"dataset 'alpaca_en': no file_name \(it names hf_hub_url "
                                        r"'llamafactory/alpaca_en'\); finetune reads local files only"):
        build(folder, dataset_name="alpaca_en")
    with pytest.raises(ConfigError, match=r"dataset_name=nope: not in llamafactory/dataset_info\.json; it lists orca_demo"):
        build(folder, dataset_name="nope")
    with pytest.raises(ConfigError, match=r"dataset_name=x: text\.jsonl is not a LLaMA-Factory data folder"):
        build(FIXTURES / "text.jsonl", dataset_name="x")


def test_a_dataset_info_json_that_is_no_registry_is_metadata(tmp_path):
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "dataset_info.json").write_text(json.dumps({"citation": "", "features": {"text": {}}}))
    jsonl(tmp_path / "hub" / "train.jsonl", {"text": "doc one"})
    assert build(tmp_path / "hub").samples == [{"segments": [{"text": "doc one", "train": True}], "label": None,
                                                "timestamp": None, "meta": {}}]
    with pytest.raises(ConfigError, match=r"dataset_name=x: hub is not a LLaMA-Factory data folder"):
        build(tmp_path / "hub", dataset_name="x")


def test_json_array_in_jsonl_and_one_pretty_printed_record(caplog, tmp_path):
    with caplog.at_level(logging.INFO, logger="finetune.data.files"):
        built = build(FIXTURES / "array.jsonl")
        [pretty] = build(FIXTURES / "pretty.json").samples
    assert [s["messages"] for s in built.samples] == [chat(("user", "Say hi."), ("assistant", "Hi!")),
                                                      chat(("user", "Say bye."), ("assistant", "Bye!"))]
    assert "array.jsonl: one JSON list, not JSON Lines: read as a list of 2 records" in caplog.text
    assert pretty["messages"] == chat(("user", "Hi"), ("assistant", "Hello."))
    assert "pretty.json: one JSON object across several lines: read as one record" in caplog.text
    (tmp_path / "bad.jsonl").write_text('[{"instruction": "i", "output": "o"},\n {"instruction": "i2"}]')
    with pytest.raises(DataError, match=r"bad\.jsonl: record 2, field 'output' is missing or empty"):
        build(tmp_path / "bad.jsonl")


# ---- config and the pipeline

def test_generic_defaults_are_generic_data():
    cfg = OmegaConf.load(CONF_DIR / "dataset" / "generic.yaml")
    assert (cfg.task, cfg.split) == ("text", "random")
    options = {k: v for k, v in OmegaConf.to_container(cfg.builder).items() if k not in ("_target_", "path")}
    assert options["columns"] == {} and options["tags"] == {} and options["drop_media"] is False
    [first, _] = build(FIXTURES / "sharegpt_tools.json", **options).samples
    assert first["tools"] == [AREA_TOOL]


def pipeline_cfg(path, **over):
    base = OmegaConf.load(CONF_DIR / "dataset" / "_pipeline.yaml")
    return OmegaConf.merge(base, {"path": str(path), "task": "text", "split": "random", "val_size": 0.0,
                                  "test_size": 0.0, "builder": {"_target_": "finetune.data.generic.build",
                                                                "path": str(path)}}, over)


def tiny_tokenizer(template=None):
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def test_pipeline_counts_tool_call_and_text_tokens(tmp_path):
    tokenizer = tiny_tokenizer((TEMPLATES / "chatml_tools.jinja").read_text())
    splits, stats = prepare(pipeline_cfg(FIXTURES / "sharegpt_tools.json"), tokenizer, tmp_path / "tools", seed=0)
    on_disk = json.loads((tmp_path / "tools" / "stats.json").read_text())
    assert on_disk["splits"]["train"]["count"] == 2 and on_disk["splits"]["train"]["tokens"]["total"] > 0
    expected = sum(len(tokenizer(tokenizer.apply_chat_template(s["messages"], tools=s.get("tools"), tokenize=False),
                                 add_special_tokens=False)["input_ids"]) for s in splits["train"])
    assert on_disk["splits"]["train"]["tokens"]["total"] == expected
    assert any(s.get("tools") == [AREA_TOOL] for s in splits["train"])  # tools survive the split files

    splits, stats = prepare(pipeline_cfg(FIXTURES / "text.jsonl"), tokenizer, tmp_path / "text", seed=0)
    on_disk = json.loads((tmp_path / "text" / "stats.json").read_text())
    texts = ["The Federal Reserve held rates steady on Wednesday.<|im_end|>",
             "Markets rallied after the announcement.<|im_end|>"]
    assert on_disk["splits"]["train"]["tokens"]["total"] == \
        sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) > 0
    assert on_disk["splits"]["train"]["labels"] == {"None": 2}
    with pytest.raises(DataError, match=r"sample 1: text samples \(segments\) train for dataset\.task=text only"):
        prepare(pipeline_cfg(FIXTURES / "text.jsonl", task="sentiment"), tokenizer, None, seed=0)
    with pytest.raises(DataError, match=r"dataset\.augment rewrites a chat sample's user turn; these are text samples"):
        prepare(pipeline_cfg(FIXTURES / "text.jsonl", augment={"copies": 1}), tokenizer, None, seed=0)


def test_a_template_without_tool_support_stops_the_pipeline(tmp_path):
    source = tmp_path / "tools.jsonl"
    source.write_bytes((FIXTURES / "openai_tools.jsonl").read_bytes())
    # the tiny tokenizer's own ChatML template renders neither tool calls nor tools: they would not train
    with pytest.raises(DataError, match=r"the chat template of .*tiny does not render tool calls or tools \(the "
                                        r"rendered sample lacks 'get_current_weather'\).*set model\.chat_template"):
        prepare(pipeline_cfg(source), tiny_tokenizer(), None, seed=0)
    raising = "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool role') }}{% endif %}" \
              "{{ m['content'] }}<|im_end|>{% endfor %}"
    with pytest.raises(DataError, match=r"the chat template of .*tiny cannot render these tools \(no tool role\); "
                                        r"set model\.chat_template"):
        prepare(pipeline_cfg(source), tiny_tokenizer(raising), None, seed=0)


def test_check_sample_takes_tool_messages_and_tool_calls():
    call = {"type": "function", "function": {"name": "f", "arguments": {}}}
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                         {"role": "tool", "content": "1"}, {"role": "assistant", "content": "one"}], "label": None}
    assert check_sample(good, "text") is None
    stray = {**good, "messages": [good["messages"][0], good["messages"][2], good["messages"][3]]}
    assert check_sample(stray, "text") == "a tool message must follow an assistant message with tool_calls"
    empty = {**good, "messages": [good["messages"][0], {"role": "assistant", "content": ""}]}
    assert check_sample(empty, "text") == "empty assistant content"
