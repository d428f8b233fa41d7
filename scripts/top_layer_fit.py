"""How far does more training go? LoRA on the top layers, fitted as a classifier over cached lower layers (docs/results.md).

    python scripts/top_layer_fit.py outputs/<run> [--layer 12] [--epochs 12] [--levels 5]

An upper-bound experiment for a run's decision, not a training mode: each labelled sample's prompt and gold answer up
to the label (where likelihood scoring reads the choice: finetune/eval/likelihood.py) runs once through the frozen
base up to `--layer`; those hidden states are kept, so an epoch costs only the layers above. LoRA (rank 16 on every
linear layer above `--layer`) is trained on them with cross-entropy over the labels' first tokens at the label
position (class-balanced: the classifier a decision-weighted SFT loss approaches once the layout is learnt), many
epochs, no layout to learn. Each epoch prints its loss and the validation and test macro-F1, then the epoch with the
best validation macro-F1 beside the run's tuned answers and simple model. `--levels N` first appends to each number
in the prompts its N-quantile on the train split ("RSI: 31.4 (low)"), to see whether coarser numbers read faster.
"""
import argparse
import bisect
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from sklearn.metrics import accuracy_score, f1_score

from finetune.eval.likelihood import label_tails, left_pad, left_positions, pad_id
from finetune.serving.reopen import load_run
from linear_probe import labelled_splits, print_run_scores, run_classifier  # scripts/, beside this one

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NUMBER = re.compile(r"([A-Za-z%][A-Za-z0-9% _]*?)[: ]\s*(-?\d+(?:\.\d+)?)(?![\d.])")  # "RSI: 31.4", "rsi 34"
WORDS = {5: ["very low", "low", "mid", "high", "very high"]}


def with_levels(splits: dict, n: int) -> None:
    """Append each prompt number's n-quantile of the train split to it, in place (keys with > 5 distinct values)."""
    seen = {}
    for s in splits["train"]:
        for key, value in NUMBER.findall(s["messages"][1]["content"]):
            seen.setdefault(key.strip(), []).append(float(value))
    edges = {key: [sorted(v)[len(v) * i // n] for i in range(1, n)] for key, v in seen.items() if len(set(v)) > 5}
    words = WORDS.get(n) or [f"q{i + 1} of {n}" for i in range(n)]

    def level(match):
        key = match.group(1).strip()
        if key not in edges:
            return match.group(0)
        return f"{match.group(0)} ({words[bisect.bisect_right(edges[key], float(match.group(2)))]})"
    for rows in splits.values():
        for s in rows:
            s["messages"][1]["content"] = NUMBER.sub(level, s["messages"][1]["content"])


@torch.no_grad()
def cached(model, tokenizer, rows: list[dict], task, labels: list[str], layer: int, pad: int):
    """Each sample's hidden states at `layer` (unpadded), its gold label's index, and the labels' first token ids."""
    items = [label_tails(tokenizer, s, task, labels) for s in rows]
    firsts = [tail[0] for tail in items[0][1]]
    if len(set(firsts)) < len(firsts):
        raise SystemExit(f"the labels {labels} start with the same token: a first-token classifier cannot tell them apart")
    states = []
    for start in range(0, len(items), 16):
        ids, mask = left_pad([shared for shared, _ in items[start:start + 16]], pad, "cpu")
        hidden = model(input_ids=ids, attention_mask=mask, position_ids=left_positions(mask),
                       output_hidden_states=True).hidden_states[layer]
        states += [h[m.bool()] for h, m in zip(hidden, mask)]
    return states, torch.tensor([labels.index(str(s["label"])) for s in rows]), firsts


def batches(states: list[torch.Tensor], order: torch.Tensor, size: int):
    """Left-padded batches of cached states and their masks, with the sample indices."""
    for start in range(0, len(order), size):
        idx = order[start:start + size]
        width = max(len(states[i]) for i in idx)
        yield (torch.stack([F.pad(states[i], (0, 0, width - len(states[i]), 0)) for i in idx]),
               torch.stack([F.pad(torch.ones(len(states[i]), dtype=torch.long), (width - len(states[i]), 0))
                            for i in idx]), idx)


def keep_top(model, layer: int):
    """LoRA on the layers from `layer` up, and the model cut to them: it then takes the cached states as its input
    embeddings (a Llama-style decoder: no scaling between the embedding and the first layer)."""
    top = list(range(layer, model.config.num_hidden_layers))  # hidden_states[k] is the input of layer k
    tuned = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LINEAR,
                                             layers_to_transform=top))
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in top])
    return tuned


def label_logits(model, states: torch.Tensor, mask: torch.Tensor, first_ids: torch.Tensor) -> torch.Tensor:
    """The cut model's logits for the labels' first tokens at the last position of each left-padded row."""
    out = model(inputs_embeds=states, attention_mask=mask, position_ids=left_positions(mask),
                logits_to_keep=torch.tensor([-1]))
    return out.logits[:, -1][:, first_ids].float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--layer", type=int, default=12, help="hidden_states index cached; LoRA trains the layers above")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--levels", type=int, default=0, help="append each number's quantile of this many (0: off)")
    parser.add_argument("--threads", type=int, default=2)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    metric = run_classifier(a.run, "fit")
    _, tokenizer, model, _ = load_run(a.run, use_cpu=True)
    model.eval()
    pad = pad_id(tokenizer)
    splits = labelled_splits(a.run)
    if a.levels:
        with_levels(splits, a.levels)
    began = time.perf_counter()
    data = {name: cached(model, tokenizer, rows, metric.task, metric.labels, a.layer, pad)
            for name, rows in splits.items()}
    print(f"layer {a.layer} of {sum(map(len, splits.values()))} samples cached in {time.perf_counter() - began:.0f} s")
    first_ids = torch.tensor(data["train"][2])
    tuned = keep_top(model, a.layer)

    def scored(name):
        tuned.eval()
        states, gold, _ = data[name]
        with torch.no_grad():
            pred = torch.cat([label_logits(model, s, m, first_ids).argmax(-1)
                              for s, m, _ in batches(states, torch.arange(len(states)), a.batch_size)])
        return f1_score(gold, pred, average="macro"), accuracy_score(gold, pred), pred

    states, gold, _ = data["train"]
    counts = torch.bincount(gold, minlength=len(metric.labels)).float()
    balance = counts.sum() / (len(counts) * counts.clamp(min=1))  # class weights: each label counts the same
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=a.learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=a.learning_rate, pct_start=0.1,
                                                   total_steps=a.epochs * -(-len(states) // a.batch_size))
    best = None
    print("| epoch | seconds | train loss | validation macro-F1 | test accuracy | test macro-F1 | test answers |\n"
          "|---|---|---|---|---|---|---|")
    for epoch in range(1, a.epochs + 1):
        tuned.train()
        start, total = time.perf_counter(), 0.0
        for s, m, idx in batches(states, torch.randperm(len(states)), a.batch_size):
            loss = F.cross_entropy(label_logits(model, s, m, first_ids), gold[idx], weight=balance)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            total += loss.item() * len(idx)
        seconds = time.perf_counter() - start
        val, _, _ = scored("validation")
        test_f1, test_acc, pred = scored("test")
        answers = " / ".join(f"{label} {int((pred == i).sum())}" for i, label in enumerate(metric.labels))
        print(f"| {epoch} | {seconds:.0f} | {total / len(states):.3f} | {val:.3f} | {test_acc:.3f} | {test_f1:.3f} | "
              f"{answers} |", flush=True)
        best = (val, epoch, test_acc, test_f1) if best is None or val > best[0] else best
    print(f"\nkept by validation: epoch {best[1]}: test accuracy {best[2]:.3f}, macro-F1 {best[3]:.3f} "
          f"({time.perf_counter() - began:.0f} s in all)")
    print_run_scores(a.run)


if __name__ == "__main__":
    main()
