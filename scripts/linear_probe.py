"""Does the model already hold the decision where it answers? A linear probe on a run's own splits (docs/results.md).

    python scripts/linear_probe.py outputs/<run> [--side base|tuned] [--layers 6,12,18,24,30]

Each labelled sample's prompt and its gold answer up to the label (where likelihood scoring reads the model's
choice: finetune/eval/likelihood.py) run through the model once; the hidden state at that last position, at each
layer asked, is the sample's features. A logistic regression (balanced class weights) is fitted on the train split
for each layer and strength, the pair with the best validation macro-F1 is kept, and its test accuracy and
macro-F1 are printed beside the run's own: the tuned answers and the simple model of metrics.json. A probe well
above the tuned answers says the training, not the model's reading of the prompt, is what falls short.
"""
import argparse
import json
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.preprocessing import StandardScaler

from finetune.data.pipeline import read_jsonl
from finetune.eval.checkpoint import classifier
from finetune.eval.likelihood import label_tails, left_pad, left_positions, pad_id
from finetune.rundir import DATA
from finetune.serving.reopen import load_run, load_run_config, tuned_model

STRENGTHS = (0.01, 0.1, 1.0)  # LogisticRegression's C: smaller is more regularised


@torch.no_grad()
def features(model, tokenizer, samples: list[dict], task, labels: list[str], layers: list[int],
             batch_size: int = 16) -> dict:
    """{layer: (samples, hidden) array}: the hidden state at the last shared token of each sample's candidates."""
    pad = pad_id(tokenizer)
    out = {layer: [] for layer in layers}
    for start in range(0, len(samples), batch_size):
        shared = [label_tails(tokenizer, s, task, labels)[0] for s in samples[start:start + batch_size]]
        ids, mask = left_pad(shared, pad, "cpu")
        hidden = model(input_ids=ids, attention_mask=mask, position_ids=left_positions(mask),
                       output_hidden_states=True).hidden_states
        for layer in layers:
            out[layer].append(hidden[layer][:, -1].float())
    return {layer: torch.cat(rows).numpy() for layer, rows in out.items()}


def run_classifier(run: Path, purpose: str):
    """The run's classification metric (its labels and task), from the config that trained it."""
    metric = classifier(instantiate(load_run_config(run).eval.metrics, _convert_="all"))
    if metric is None:
        raise SystemExit(f"{run}: its eval suite has no classification metric (labels) to {purpose}")
    return metric


def labelled_splits(run: Path) -> dict:
    """{split: the run's samples with a label} for train, validation and test, as the run saved them."""
    return {name: [s for s in read_jsonl(run / DATA / f"{name}.jsonl") if s.get("label") is not None]
            for name in ("train", "validation", "test")}


def print_run_scores(run: Path) -> None:
    """The run's own test accuracy and macro-F1 (its tuned answers and its simple model, metrics.json) to set beside."""
    scored = json.loads((run / "metrics.json").read_text())
    for name in ("tuned", "simple_model"):
        if name in scored:
            print(f"the run's {name.replace('_', ' ')}: accuracy {scored[name]['accuracy']:.3f}, "
                  f"macro-F1 {scored[name]['macro_f1']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--side", choices=["base", "tuned"], default="base")
    parser.add_argument("--layers", default="6,12,18,24,30", help="hidden_states indices (0: the embeddings)")
    parser.add_argument("--threads", type=int, default=2)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    metric = run_classifier(a.run, "probe for")
    _, tokenizer, model, adapter = load_run(a.run, use_cpu=True)
    if a.side == "tuned":
        model = tuned_model(model, adapter)
    model.eval()
    splits = labelled_splits(a.run)
    layers = [int(x) for x in a.layers.split(",")]
    began = time.perf_counter()
    x = {name: features(model, tokenizer, rows, metric.task, metric.labels, layers) for name, rows in splits.items()}
    y = {name: [str(s["label"]) for s in rows] for name, rows in splits.items()}
    print(f"{a.side} features of {sum(map(len, splits.values()))} samples in {time.perf_counter() - began:.0f} s")
    print("| layer | C | validation macro-F1 | test accuracy | test macro-F1 |\n|---|---|---|---|---|")
    best = None
    for layer in layers:
        scale = StandardScaler().fit(x["train"][layer])
        for strength in STRENGTHS:
            probe = LogisticRegression(C=strength, max_iter=5000, class_weight="balanced")
            probe.fit(scale.transform(x["train"][layer]), y["train"])
            val = f1_score(y["validation"], probe.predict(scale.transform(x["validation"][layer])), average="macro")
            test = probe.predict(scale.transform(x["test"][layer]))
            row = (val, layer, strength, accuracy_score(y["test"], test), f1_score(y["test"], test, average="macro"))
            print(f"| {layer} | {strength} | {val:.3f} | {row[3]:.3f} | {row[4]:.3f} |")
            best = row if best is None or row[0] > best[0] else best
    print(f"\nkept by validation: layer {best[1]}, C {best[2]}: test accuracy {best[3]:.3f}, macro-F1 {best[4]:.3f}")
    print_run_scores(a.run)


if __name__ == "__main__":
    main()
