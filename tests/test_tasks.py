"""A new classification task is one task entry, one builder file and YAML: a 2-label task defined here, trained
and scored on the tiny model through the normal runner."""
import json
import random

from conftest import FAST, compose
from finetune import tasks
from finetune.runner import run

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
