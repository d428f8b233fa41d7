"""Train the tiny model's byte-level BPE tokenizer on the sample data in data/ and save it in finetune/assets/tiny/.

The tiny preset is random-init, so its tokenizer only has to cover the sample data well (byte-level BPE
covers any text, Chinese included). Re-run after changing data/: `python scripts/make_tiny_tokenizer.py`.
It writes tokenizer.json + tokenizer_config.json with a ChatML template whose assistant turn is wrapped in
{% generation %} tags, so TRL's assistant-only loss works with it too.
"""
import json
import sqlite3
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "finetune" / "assets" / "tiny"
VOCAB_SIZE = 2048
SPECIAL = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|im_start|>assistant\n{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def texts():
    """Every string in the sample data: JSON values, CSV/Markdown lines, SQLite TEXT cells."""
    for path in sorted((ROOT / "data").rglob("*")):
        if path.suffix == ".db":
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'"):
                for row in con.execute(f'SELECT * FROM "{table}"'):
                    yield from (str(v) for v in row if v is not None)
            con.close()
        elif path.suffix in {".jsonl", ".json", ".csv", ".md", ".txt"}:
            yield path.read_text(encoding="utf-8")


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # Chat markup is in every sample, so the tokenizer should see it the way the chat template writes it.
    tok.train_from_iterator(list(texts()), trainer=trainer)  # a list: the trainer reads from other threads
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>",
                                   bos_token=None, unk_token=None, chat_template=CHAT_TEMPLATE)
    OUT.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(OUT)
    config = json.loads((OUT / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # standalone: never swapped for a model's own class
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    print(f"vocab {tok.get_vocab_size()} -> {OUT}")


if __name__ == "__main__":
    main()
