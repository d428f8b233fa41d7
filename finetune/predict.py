"""Answers from a run's adapter for a JSONL file of inputs, any recipe's task, batched, with a progress bar.

    python -m finetune.predict RUN_DIR --input in.jsonl --output out.jsonl [--batch-size 16]
                               [--task auto|signals|generate] [--max-new-tokens N] [--confidence-threshold 0.7]

One JSON object per input line, in one of three forms (other keys are ignored; `id` is copied to the output):

    {"id": "t1", "market_data": {"symbol": "BTC/USDT", "price": 50000, "technical": {"rsi": 28.4, ...}}}
    {"id": "h7", "messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}]}
    {"id": "q3", "prompt": "Headline: Fed holds rates"}

- market_data: the prompt is built as training wrote it (finetune.serving.inference.SignalProvider.signal_prompt);
- messages: sent as given; a last `assistant` message is taken as the gold answer, left out of the prompt
  and written back as "expected", so a run's own data/test.jsonl can be fed in as it is;
- prompt: one user message, after the run's training system prompt when it had one.

One output line per input line, in order:

    {"line": 1, "id": "t1", "answer": "{\"signal\": \"BUY\", \"confidence\": 0.72}",
     "signal": "BUY", "confidence": 0.72, "fallback": false}

How an answer is read (`--task`): `signals` reads every answer as a trading signal (signal, confidence,
fallback: the SignalProvider's rules, threshold included); `generate` writes the answer only; `auto` (the
default) reads market_data lines as signals and the others by the run's dataset.task: signals as above,
sentiment -> "label", action -> "action" (the parsed JSON decision or null), text -> the answer only.
A bad line stops the run before any model loads, naming the file and line; the output is written whole
or not at all.
"""
import argparse
import json
import sys
from pathlib import Path

from finetune.data import safe_json
from finetune.errors import ConfigError, DataError
from finetune.rundir.logs import log_to

TASKS = ("auto", "signals", "generate")


def read_inputs(path: Path, system_prompt: str | None) -> list[dict]:
    """Each non-blank line -> {"line", "id", "kind" (market_data | messages | prompt), "chat", "expected"};
    `system_prompt` is the run's training one (finetune.serving.inference.training_system_prompt)."""
    from finetune.tasks.signals import market_prompt
    records = []
    for number, item in safe_json.jsonl_objects(path):
        where = f"{path.name}: line {number}"
        record = {"line": number, "id": item.get("id"), "expected": None}
        if "market_data" in item:
            if not isinstance(item["market_data"], dict):
                raise DataError(f"{where}, field 'market_data': expected a JSON object, "
                                f"got {type(item['market_data']).__name__}")
            try:  # the same prompt as SignalProvider.signal_prompt
                chat = market_prompt(item["market_data"], item.get("symbol"), system_prompt)
            except ValueError as e:
                raise DataError(f"{where}, field 'market_data': {e}") from e
            record.update(kind="market_data", chat=chat)
        elif "messages" in item:
            chat = _messages(item["messages"], where)
            if chat[-1]["role"] == "assistant":
                record["expected"] = chat.pop()["content"]
            if not chat:
                raise DataError(f"{where}, field 'messages': only an assistant answer, no prompt")
            record.update(kind="messages", chat=chat)
        elif "prompt" in item:
            if not isinstance(item["prompt"], str) or not item["prompt"].strip():
                raise DataError(f"{where}, field 'prompt': expected non-empty text")
            system = [{"role": "system", "content": system_prompt}] if system_prompt else []
            record.update(kind="prompt", chat=system + [{"role": "user", "content": item["prompt"]}])
        else:
            raise DataError(f"{where}: needs one of 'market_data', 'messages' or 'prompt' "
                            f"(found: {', '.join(item) or 'no keys'})")
        records.append(record)
    if not records:
        raise DataError(f"{path}: no input lines")
    return records


def _messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}, field 'messages': expected a non-empty list of {{\"role\", \"content\"}}")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise DataError(f"{where}, field 'messages', item {i}: expected {{\"role\": str, \"content\": str}}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_answer(provider, task: str, kind: str, text: str) -> dict:
    """The parsed fields of one answer, as the module docstring says."""
    from finetune import tasks
    if task == "generate":
        return {}
    reading = "signals" if task == "signals" or kind == "market_data" else provider.task
    if reading == "signals":  # the provider's rules: fallback and threshold
        before = provider.fallbacks
        signal, confidence = provider.read_signal(text)
        return {"signal": signal, "confidence": confidence, "fallback": provider.fallbacks > before}
    return tasks.get(reading).fields(text)


def predict(provider, records: list[dict], task: str = "auto", batch_size: int = 16, progress: bool = True):
    """Yield one output row per record, generating `batch_size` prompts at a time."""
    from tqdm.auto import tqdm
    with tqdm(total=len(records), desc="predict", unit="line", disable=not progress) as bar:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            answers = provider.generate([r["chat"] for r in chunk])
            for record, text in zip(chunk, answers):
                row = {"line": record["line"], "id": record["id"], "answer": text,
                       **read_answer(provider, task, record["kind"], text)}
                if record["expected"] is not None:
                    row["expected"] = record["expected"]
                yield row
            bar.update(len(chunk))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--input", type=Path, required=True, help="JSONL: market_data, messages or prompt per line")
    parser.add_argument("--output", type=Path, required=True, help="JSONL answers, one per input line")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--task", choices=TASKS, default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's eval.max_new_tokens")
    parser.add_argument("--confidence-threshold", type=float, default=0.0, help="weaker BUY / SELL -> HOLD")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the model's own code from its folder (a run dir's setting is never used)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    log_to(args.run_dir)  # library lines and warnings into the run's finetune.log, not the console
    from finetune.serving.inference import SignalProvider, training_system_prompt
    from finetune.rundir import atomic_file
    from finetune.serving.reopen import load_run_config
    try:
        # the inputs are checked before the model loads: a bad line 9000 fails in a second, not after minutes
        records = read_inputs(args.input, training_system_prompt(load_run_config(args.run_dir, [])))
        options = {"confidence_threshold": args.confidence_threshold, "batch_size": args.batch_size}
        if args.max_new_tokens:
            options["max_new_tokens"] = args.max_new_tokens
        provider = SignalProvider.from_run(args.run_dir, args.trust_remote_code, **options)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    from finetune.train.guards import told_if_disk_full
    with told_if_disk_full(args.output):
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(args.output) as out:  # whole or absent
            for row in predict(provider, records, args.task, args.batch_size):
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(records)} answers written to {args.output}"
          + (f" ({provider.fallbacks} unparsable -> HOLD 0.0)" if provider.fallbacks else ""))


if __name__ == "__main__":
    main()
