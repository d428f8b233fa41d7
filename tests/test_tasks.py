"""Each task is one class in one file of finetune/tasks/ that writes and reads its own answers; a new classification
task is one task entry, one builder file and YAML: a 2-label task defined here, trained and scored on the tiny model
through the normal runner."""
import importlib
import inspect
import json
import pkgutil
import random
from pathlib import Path

import pytest

from conftest import FAST, compose
from finetune import tasks
from finetune.runner import run

TASKS_DIR = Path(tasks.__file__).parent


def test_each_task_is_one_class_in_its_own_file():
    files = {type(task): Path(inspect.getfile(type(task))) for task in tasks.TASKS.values()}
    assert all(file.parent == TASKS_DIR and file.name != "__init__.py" for file in files.values()), files
    assert len(set(files.values())) == len(files), files  # no two task classes share a file
    for module in pkgutil.iter_modules([str(TASKS_DIR)]):
        classes = [c for _, c in inspect.getmembers(importlib.import_module(f"finetune.tasks.{module.name}"),
                                                    inspect.isclass) if c.__module__ == f"finetune.tasks.{module.name}"]
        assert len(classes) == 1 and classes[0] in files, (module.name, classes)


@pytest.mark.parametrize("name", [name for name, task in tasks.TASKS.items() if task.labels])
def test_a_rendered_label_reads_back(name):
    task = tasks.get(name)
    for label in task.labels:
        answer = task.render(label, 0.73)
        assert task.check(answer) is None, answer
        parsed, confidence = task.parse(answer)
        assert parsed == label, answer
        assert confidence in (None, pytest.approx(0.73)), answer
        start, end = task.span(answer, label)
        assert answer[start:end].lower() == label.lower(), answer
    assert task.parse(task.render(task.labels[0]), labels=task.labels[1:]) == (None, None)  # outside the labels given


def test_the_signal_grammar_takes_a_rendered_signal_and_nothing_else():
    import llguidance
    import llguidance.hf
    from transformers import AutoTokenizer
    from finetune.train.model import TINY_TOKENIZER
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    lltok = llguidance.hf.from_tokenizer(tokenizer)
    signals = tasks.get("signals")

    def accepts(answer):
        matcher = llguidance.LLMatcher(lltok, signals.grammar())
        ids = tokenizer.encode(answer, add_special_tokens=False)
        return matcher.consume_tokens(ids) and matcher.is_accepting()

    for label in signals.labels:
        for confidence in (0.0, 0.5, 0.73, 1.0):
            assert accepts(signals.render(label, confidence)), signals.render(label, confidence)
    assert not accepts(signals.render("CLOSE", 0.5))  # not a signal
    assert not accepts('{"signal":"BUY","confidence":0.5}')  # not the layout training writes
    assert not accepts(signals.render("BUY", 0.5)[:-1])  # unfinished
    assert all(task.grammar() is None for task in tasks.TASKS.values() if task is not signals)

BUILDER = '''
import json
from finetune.data import Built

def build(path, *, skip_bad_rows=False):
    samples = []
    for line in open(path, encoding="utf-8"):
        row = json.loads(line)
        samples.append({"messages": [{"role": "user", "content": "Is this message spam? " + row["text"]},
                                     {"role": "assistant", "content": row["label"]}],
                        "label": row["label"], "timestamp": None, "meta": {}})
    return Built(samples)
'''

DATASET = """defaults: [_pipeline, _self_]
path: {path}
task: spam
split: random
builder:
  _target_: spam_builder.build
  path: ${{..path}}
"""

EVAL = """defaults: [perplexity, _self_]
max_new_tokens: 4
metrics:
  classification:
    _target_: finetune.eval.classification.Classification
    task: spam
"""


def test_a_two_label_task_defined_here_trains_and_scores(tmp_path, monkeypatch):
    monkeypatch.setitem(tasks.TASKS, "spam", tasks.Label("spam", ("spam", "ham")))  # the task entry
    (tmp_path / "spam_builder.py").write_text(BUILDER)                                 # the builder file
    monkeypatch.syspath_prepend(str(tmp_path))
    rng = random.Random(0)
    spam = ["win money now", "free prize claim", "cheap pills offer", "you won a lottery"]
    ham = ["lunch at noon?", "meeting moved to 3pm", "see you tomorrow", "the report is attached"]
    rows = [{"text": f"{rng.choice(pool)} #{i}", "label": label}
            for i in range(160) for label, pool in [rng.choice([("spam", spam), ("ham", ham)])]]
    data = tmp_path / "messages.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    conf = tmp_path / "conf"                                                           # the YAML
    (conf / "dataset").mkdir(parents=True)
    (conf / "eval").mkdir()
    (conf / "dataset" / "spam.yaml").write_text(DATASET.format(path=data))
    (conf / "eval" / "spam.yaml").write_text(EVAL)

    cfg = compose(f"hydra.searchpath=[file://{conf}]", "dataset=spam", "eval=spam", *FAST,
                  "training.max_steps=40", "training.learning_rate=8e-3")
    result = run(cfg, tmp_path / "run")
    base, tuned = result.metrics["base"], result.metrics["tuned"]
    assert tuned["confusion_matrix"]["labels"] == ["spam", "ham"]
    assert tuned["n_answers"] == result.stats["splits"]["test"]["count"] > 0 and tuned["parse_rate"] > base["parse_rate"], (base, tuned)
    assert tuned["accuracy"] > tuned["majority_baseline"], tuned
