"""`python -m finetune.bench`: our training path beside a plain Trainer + PEFT recipe and a TRL-flags peer, measured in
one command on a random-init model of a preset's shape (conf/model/<preset>.yaml's `arch`; nothing is downloaded).

    python -m finetune.bench --model qwen2_5_7b --method qlora --setups ours,plain,trl_peer --steps 50 \\
        --lengths 100-512 --out docs/benchmarks/qwen2_5_7b_qlora.json
    python -m finetune.bench --model tiny --device cpu --method lora --steps 4 --warmup-steps 1 --samples 48 \\
        --lengths 80-160 --batch 2 --grad-accum 1 --max-length 256 --peer-max-length 256   # the CPU smoke test

Setups (same weights, same synthetic samples, same LoRA config and learning-rate schedule):
- ours: what `python -m finetune model=<preset> method=<method> training=gpu` builds: finetune.config.check_config,
  finetune.train.model.load_tokenizer / load_model and SFTTrainer on the runner's prompt/completion data. The lever flags
  (--liger, --batch, --checkpointing, ...) are Hydra overrides of it; each --variant adds one more `ours`.
- plain: the textbook approach without Unsloth: transformers Trainer + PEFT (+ bitsandbytes NF4 for QLoRA),
  each batch padded to its longest sample, batch 4, activation checkpointing, paged 32-bit AdamW for QLoRA.
- trl_peer: the best library-only setup (no Unsloth): SFTTrainer, bfd packing into 8,192-token rows, padding-free,
  Liger's kernels (when installed, on CUDA), activation checkpointing, paged 8-bit AdamW.

What is measured, per setup:
- real tokens/s: tokens that are not padding, counted on every micro-batch the trainer consumes (`real_tokens`),
  over the steps after --warmup-steps, the clock read after a device sync at each step's end;
- peak memory: torch.cuda.max_memory_allocated from the model load on (bitsandbytes' paged optimizer state lives
  in CUDA managed memory, which this does not count: a few MB for LoRA);
- MFU: 6·N·tokens/s over the device's dense bf16 peak, N = every parameter of the unquantized model. 6N is the
  convention used here (forward, recomputed forward and input gradients of a frozen base);
  without checkpointing a LoRA step does ~4N, so MFU then understates the work;
- the loss of every step, with the real tokens seen so far (compare curves per token: setups differ in tokens/step);
- probe_loss: the loss of the same --probe samples through the setup's own collator and loss before training,
  when every setup has the same weights (LoRA's B is zero). Setups must agree here: a padding-free row that let
  samples attend to each other, or a loss normalized differently, would show.

Setups run one after another in this process. Liger patches transformers' modeling modules for the rest of the
process, so setups without Liger run first whatever the order given.

The JSON written to --out (rewritten after each setup; a Markdown table beside it, same name with .md), with "..."
for what a run measures:
{"model": "qwen2_5_7b", "method": "qlora", "device": "NVIDIA H100 80GB HBM3", "params": 7615616512,
 "peak_flops": 9.894e14, "flops_per_token": "6N", "lengths": [100, 512], "samples": 4000, "steps": 50,
 "warmup_steps": 3, "seed": 0, "complete": true,
 "setups": [{"name": "ours", "settings": "batch 4x4, packed rows of 2048, checkpointing full, ...",
             "overrides": [...], "tokens_per_s": ..., "real_tokens": ..., "positions": ..., "padding_fraction": 0.0,
             "seconds": ..., "peak_gib": ..., "mfu": ..., "probe_loss": ..., "start_digest": "...",
             "losses": [{"step": 1, "loss": ..., "real_tokens": ...}, ...], "error": null, ...},
            {"name": "plain", ...}, {"name": "trl_peer", ...}, {"name": "ours[liger]", "error": "...", ...}],
 "ratios_vs_peer": {"ours": ..., "plain": ..., "trl_peer": 1.0},
 "latency": {"setup": "ours", "latency_seconds": ..., "answers_per_second": ..., "batch_size": 32, ...} or null,
 "versions": {"torch": ..., ...}, "command": "python -m finetune.bench ..."}
"""
import argparse
import gc
import hashlib
import json
import random
import shlex
import sys
import tempfile
import time
import traceback
from importlib.util import find_spec
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

from finetune.config import ATTENTION, check_config
from finetune.errors import ConfigError
from finetune.train.model import (TINY_TOKENIZER, build_tiny, keep_4bit_differentiable, load_model, load_tokenizer,
                            model_source, random_model)
from finetune.paths import CONF_DIR
from finetune.rundir import versions, write_json, write_text

SETUPS = ("ours", "plain", "trl_peer")
# dense bf16 tensor-core peak (no sparsity) by device name; the first match wins, so the specific names come first
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12),
                   ("A100", 312e12))
CHECKPOINTING = {  # transformers' every_n_layers / offload, TRL's selective (save attention, recompute the rest)
    "full": ["training.activation_checkpointing=true"],
    "none": ["training.activation_checkpointing=false"],
    **{name: ["training.activation_checkpointing=true", f"++training.activation_checkpointing_kwargs={{{kwargs}}}"]
       for name, kwargs in (("every2", "every_n_layers:2"), ("every4", "every_n_layers:4"),
                            ("offload", "offload:true"), ("selective", "selective:true"))},
}
SYSTEM = "You are a trading signal model. Answer with JSON: signal and confidence."
PAIRS = ("BTC-USDT", "ETH-USDT", "SOL-USDT", "BNB-USDT")


# --- command line

def lever_parser() -> argparse.ArgumentParser:
    """The speed levers of `ours`, one flag each; --variant takes the same levers without the dashes."""
    parser = argparse.ArgumentParser(add_help=False)
    levers = parser.add_argument_group("levers of `ours` (each becomes a Hydra override of training=gpu)")
    levers.add_argument("--liger", action="store_true",
                        help="Liger's RMSNorm, RoPE and SwiGLU kernels (TRL keeps its own chunked LM-head loss)")
    levers.add_argument("--batch", type=int, help="training.per_device_train_batch_size (rows of --max-length)")
    levers.add_argument("--grad-accum", type=int, help="training.gradient_accumulation_steps")
    levers.add_argument("--max-length", type=int, help="training.max_length: the packed row length")
    levers.add_argument("--checkpointing", choices=sorted(CHECKPOINTING),
                        help="full: every layer; every2/every4: every n-th layer; offload: saved activations in "
                             "pinned host memory; selective: save attention, recompute the rest (TRL); none")
    levers.add_argument("--activation-offloading", action="store_true", help="TRL's activation offloading to CPU")
    levers.add_argument("--compile", action="store_true", help="training.torch_compile")
    levers.add_argument("--attn", choices=ATTENTION, help="model.attn_implementation")
    levers.add_argument("--optim", help="training.optim, e.g. adamw_torch_fused, adamw_8bit, paged_adamw_8bit")
    levers.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="any other Hydra override of ours, e.g. training.dataloader_num_workers=4")
    return parser


def lever_overrides(levers: argparse.Namespace) -> list[str]:
    overrides = []
    if levers.liger:
        overrides.append("++training.use_liger_kernel=true")
    if levers.batch:
        overrides.append(f"training.per_device_train_batch_size={levers.batch}")
    if levers.grad_accum:
        overrides.append(f"training.gradient_accumulation_steps={levers.grad_accum}")
    if levers.max_length:
        overrides.append(f"training.max_length={levers.max_length}")
    if levers.checkpointing:
        overrides += CHECKPOINTING[levers.checkpointing]
    if levers.activation_offloading:
        overrides.append("++training.activation_offloading=true")
    if levers.compile:
        overrides.append("++training.torch_compile=true")
    if levers.attn:
        overrides.append(f"model.attn_implementation={levers.attn}")
    if levers.optim:
        overrides.append(f"training.optim={levers.optim}")
    return overrides + levers.override


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m finetune.bench", parents=[lever_parser()],
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2_5_7b", help="a preset in conf/model/ (tiny: the CPU smoke test)")
    parser.add_argument("--method", default="qlora", choices=("qlora", "lora"))
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of {', '.join(SETUPS)}")
    parser.add_argument("--variant", action="append", default=[], metavar="'LEVER[=VALUE] ...'",
                        help="one more `ours` with these levers on top of the flags above, named like the flags "
                             "without their dashes, e.g. --variant 'liger batch=8 checkpointing=every2'")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per setup")
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps left out of tokens/s (allocator, compile)")
    parser.add_argument("--lengths", default="100-512", help="sample lengths in tokens, uniform in LO-HI")
    parser.add_argument("--samples", type=int, default=4000, help="synthetic samples (epochs repeat past them)")
    parser.add_argument("--seed", type=int, default=0, help="weights of a preset's random model, and the data")
    parser.add_argument("--probe", type=int, default=8, help="samples in the probe loss")
    parser.add_argument("--plain-batch", type=int, default=4, help="plain's per-device batch (the textbook's 4)")
    parser.add_argument("--peer-max-length", type=int, default=8192, help="trl_peer's packed row length")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, when its name is not known")
    parser.add_argument("--latency", action="store_true", help="also time greedy answers on the first `ours`")
    parser.add_argument("--latency-n", type=int, default=32, help="prompts: each alone, then all in batches")
    parser.add_argument("--latency-batch", type=int, default=32)
    parser.add_argument("--latency-new-tokens", type=int, default=16, help="a signal answer is ~15 tokens")
    parser.add_argument("--latency-lengths", default="80-160", help="prompt lengths of the latency samples")
    parser.add_argument("--latency-static", action="store_true",
                        help="also time the merged model through generate() with a static KV cache (compiled on CUDA)")
    parser.add_argument("--out", type=Path, help="the JSON to write (the Markdown table goes beside it)")
    args = parser.parse_args(argv)
    args.lengths, args.latency_lengths = lengths(args.lengths, "--lengths"), lengths(args.latency_lengths,
                                                                                     "--latency-lengths")
    presets = sorted(f.stem for f in (CONF_DIR / "model").glob("*.yaml"))
    if args.model not in presets:
        parser.error(f"--model {args.model}: no conf/model/{args.model}.yaml; choose from {', '.join(presets)}")
    unknown = [s for s in args.setups.split(",") if s not in SETUPS]
    if unknown:
        parser.error(f"--setups: unknown {', '.join(unknown)}; choose from {', '.join(SETUPS)}")
    if args.steps <= args.warmup_steps:
        parser.error(f"--steps ({args.steps}) must be above --warmup-steps ({args.warmup_steps})")
    return args


def lengths(text: str, flag: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split("-"))
    except ValueError:
        raise ConfigError(f"{flag}={text}: expected LO-HI in tokens, e.g. 100-512") from None
    if not 0 < lo <= hi:
        raise ConfigError(f"{flag}={text}: expected 0 < LO <= HI")
    return lo, hi


# --- the model: a random-init model of the preset's shape, read back through from_pretrained like real weights

def compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose, initialize_config_dir
    from finetune.config.registration import register
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def bench_model(model_cfg: DictConfig, seed: int, device: str) -> Path:
    """The folder every setup loads: the tiny preset's own build, or a random-init model of the preset's `arch`.

    A preset's model is built on the device in its dtype (a 7B model initialises in seconds on a GPU), saved once
    under the cache with the tiny tokenizer, and then loaded by each setup through from_pretrained: that is how
    QLoRA quantizes (BitsAndBytesConfig on load, as with real weights), so no setup needs code of its own for a
    random model, and ours loads exactly as the runner does (finetune.train.model.load_model on `model.path`).
    """
    if model_cfg.tiny is not None:
        return build_tiny(model_cfg.tiny)
    if model_cfg.get("arch") is None:
        raise ConfigError(f"model {model_cfg.name}: no `arch` block in its conf/model/ file; add the architecture "
                          "(model_type, hidden_size, ...) to benchmark its shape")
    from transformers import AutoConfig, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    config = AutoConfig.for_model(**OmegaConf.to_container(model_cfg.arch), pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    out = random_model(f"bench-{model_cfg.name}", config, seed, model_cfg.dtype, device)
    free_memory()
    return out


def parameter_count(source: Path) -> int:
    """N of the unquantized model (tied embeddings once), from its config on the meta device: no memory used."""
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    return sum(p.numel() for p in model.parameters())


# --- data: chat samples of exact token lengths, uniform in [lo, hi]

def filler_words(tokenizer) -> list[str]:
    """Words that are one token each after a space, so that a prompt grows by one token per word added."""
    words = []
    for token in sorted(tokenizer.get_vocab()):
        text = tokenizer.convert_tokens_to_string([token])
        if (text.startswith(" ") and text[1:].isascii() and text[1:].isalpha() and len(text) > 3
                and len(tokenizer.encode(text, add_special_tokens=False)) == 1):
            words.append(text[1:])
    if len(words) < 20:
        raise ConfigError(f"tokenizer {tokenizer.name_or_path}: too few one-token words to build prompts from")
    return words


def chat_length(tokenizer, messages: list[dict]) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))


def synthetic_samples(tokenizer, n: int, lo: int, hi: int, seed: int) -> list[dict]:
    """`n` signal samples whose whole chat (prompt + answer, as SFTTrainer tokenizes it) is exactly L tokens, L
    uniform in [lo, hi]. The answer follows from the prompt's RSI (< 30 BUY, > 70 SELL, else HOLD), so the loss can
    fall; filler words pad the prompt to its length. Deterministic in `seed`.

    {"messages": [{"role": "system", ...}, {"role": "user", "content": "ETH-USDT price 4312\\nRSI: 22.5\\nnews: ..."},
                  {"role": "assistant", "content": "{\\"signal\\": \\"BUY\\", \\"confidence\\": 0.78}"}],
     "label": "BUY"}
    """
    rng = random.Random(seed)
    words = filler_words(tokenizer)
    samples = []
    for _ in range(n):
        target = rng.randint(lo, hi)
        signal = rng.choice(("BUY", "SELL", "HOLD"))
        # rounded as the prompt shows it, so the rule holds on what the model sees
        low, high = {"BUY": (10, 29.9), "SELL": (70.1, 90), "HOLD": (35, 65)}[signal]
        rsi = round(rng.uniform(low, high), 1)
        head = f"{rng.choice(PAIRS)} price {rng.randint(100, 60000)}\nRSI: {rsi}\nnews:"
        answer = json.dumps({"signal": signal, "confidence": round(0.5 + abs(rsi - 50) / 100, 2)})
        filler: list[str] = []
        for _ in range(8):  # a word can merge with its neighbour's bytes; measure and correct until exact
            messages = [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": head + "".join(" " + w for w in filler)},
                        {"role": "assistant", "content": answer}]
            missing = target - chat_length(tokenizer, messages)
            if missing == 0:
                break
            if missing < 0 and not filler:
                raise ConfigError(f"--lengths starts at {lo} tokens but a sample needs {target - missing} without "
                                  "filler; raise the lower bound")
            filler = filler + [rng.choice(words) for _ in range(missing)] if missing > 0 else filler[:missing]
        else:
            raise ConfigError(f"could not build a sample of exactly {target} tokens with this tokenizer")
        samples.append({"messages": messages, "label": signal})
    return samples


def as_dataset(samples: list[dict]):
    """The runner's form: prompt/completion messages, loss on the answer only."""
    import datasets
    return datasets.Dataset.from_list([{"prompt": s["messages"][:-1], "completion": s["messages"][-1:]}
                                       for s in samples])


def tokenize(messages: list[dict], tokenizer) -> dict:
    """input_ids and labels (-100 on the prompt) as SFTTrainer makes them from a prompt/completion sample."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    start = next((i for i, (a, b) in enumerate(zip(prompt, ids)) if a != b), min(len(prompt), len(ids)))
    return {"input_ids": ids, "labels": [-100] * start + ids[start:]}


def real_tokens(batch: dict):
    """Tokens of a collated batch that are not padding: attention_mask's ones when there is one; a padding-free row
    (position_ids, no mask) is all real, since TRL pads one only for pad_to_multiple_of, which `ours` refuses."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return batch["input_ids"].numel()


# --- the three setups; each returns a trainer that has not trained yet

def ours(cfg: DictConfig, out_dir: Path, samples: list[dict]):
    """The trainer, and the memory plan training=gpu made for it (config["plan"], as manifest.json keeps it)."""
    from trl import SFTTrainer
    from finetune.train.guards import StopOnNonFiniteLoss
    config, args = check_config(cfg, out_dir)
    for line in config.get("plan", {}).get("lines", []):
        print(f"bench: {line}", flush=True)
    if args.pad_to_multiple_of is not None:
        raise ConfigError("training.pad_to_multiple_of: the bench counts a padding-free row as all real tokens; "
                          "leave it unset")
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, cfg.quantization, args.use_cpu)
    trainer = SFTTrainer(model=model, args=args, train_dataset=as_dataset(samples), processing_class=tokenizer,
                         peft_config=instantiate(cfg.method, _convert_="all"), callbacks=[StopOnNonFiniteLoss()])
    return trainer, config.get("plan")


def base_model(cfg: DictConfig, cpu: bool):
    """plain's and trl_peer's load: from_pretrained with the preset's dtype and attention, NF4 for QLoRA."""
    from transformers import AutoModelForCausalLM
    kwargs = dict(dtype=getattr(torch, cfg.model.dtype), attn_implementation=cfg.model.attn_implementation)
    if cfg.quantization is not None:
        kwargs["quantization_config"] = instantiate(cfg.quantization, _convert_="all")
        kwargs["device_map"] = {"": "cpu" if cpu else 0}
    return keep_4bit_differentiable(AutoModelForCausalLM.from_pretrained(model_source(cfg.model), **kwargs))


def schedule(cfg: DictConfig, steps: int, seed: int, cpu: bool) -> dict:
    """The learning-rate schedule of training=gpu, shared by every setup so that loss curves compare."""
    t = cfg.training
    return dict(learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_steps,
                max_grad_norm=t.max_grad_norm, max_steps=steps, logging_steps=1, save_strategy="no",
                report_to="none", seed=seed, use_cpu=cpu, bf16=not cpu)


def plain(cfg: DictConfig, out_dir: Path, samples: list[dict], steps: int, seed: int, cpu: bool, batch: int):
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed
    import datasets
    tokenizer = load_tokenizer(cfg.model)
    model = base_model(cfg, cpu)
    model.enable_input_require_grads()  # PEFT on a frozen, checkpointed base needs a grad path from the inputs
    set_seed(seed)  # as SFTTrainer does before it wraps the model: every setup starts from the same LoRA A
    model = get_peft_model(model, instantiate(cfg.method, _convert_="all"))
    args = TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=1, activation_checkpointing=True,
                             optim="paged_adamw_32bit" if cfg.quantization is not None else "adamw_torch",
                             **schedule(cfg, steps, seed, cpu))
    data = datasets.Dataset.from_list([tokenize(s["messages"], tokenizer) for s in samples])
    return Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                   data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))  # pad to the longest in the batch


def trl_peer(cfg: DictConfig, out_dir: Path, samples: list[dict], steps: int, seed: int, cpu: bool,
             max_length: int):
    from trl import SFTConfig, SFTTrainer
    args = SFTConfig(output_dir=str(out_dir), packing=True, packing_strategy="bfd", padding_free=True,
                     max_length=max_length, per_device_train_batch_size=1, gradient_accumulation_steps=1,
                     activation_checkpointing=True, use_liger_kernel=not cpu and find_spec("liger_kernel") is not None,
                     optim="paged_adamw_8bit", **schedule(cfg, steps, seed, cpu))
    return SFTTrainer(model=base_model(cfg, cpu), args=args, train_dataset=as_dataset(samples),
                      processing_class=load_tokenizer(cfg.model), peft_config=instantiate(cfg.method, _convert_="all"))


# --- measuring one trainer

class Meter(TrainerCallback):
    """The real tokens of every micro-batch the trainer consumes, and the clock and counts at each step's end."""

    def __init__(self, cuda: bool):
        self.cuda, self.real, self.positions, self.marks = cuda, 0, 0, []

    def count(self, batch: dict) -> None:
        self.real = self.real + real_tokens(batch)  # a device tensor stays on the device until the step's sync
        self.positions += batch["input_ids"].numel()

    def mark(self, step: int) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.marks.append((step, time.perf_counter(), int(self.real), self.positions))

    def on_train_begin(self, args, state, control, **kwargs):
        self.mark(0)

    def on_step_end(self, args, state, control, **kwargs):
        self.mark(state.global_step)


@torch.no_grad()
def probe_loss(trainer, features: list[dict]) -> float:
    """The loss of `features` through the trainer's own collator and compute_loss, in eval mode (no dropout)."""
    batch = trainer.data_collator([dict(f) for f in features])
    batch = {k: v.to(trainer.args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    trainer.model.eval()
    try:
        return float(trainer.compute_loss(trainer.model, batch))
    finally:
        trainer.model.train()


def start_digest(model) -> str:
    """The trainable weights before training, rounded to bf16 (TRL keeps QLoRA adapters in bf16): the same in
    every setup when all start from the same adapter, so their loss curves differ only by the path."""
    digest = hashlib.sha256()
    for _, param in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        digest.update(param.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def settings(trainer) -> str:
    a = trainer.args
    rows = f"packed rows of {a.max_length}" if getattr(a, "packing", False) else "padded to the batch's longest"
    kwargs = a.activation_checkpointing_kwargs or {}
    checkpointing = ("off" if not a.activation_checkpointing else "selective" if kwargs.get("selective")
                     else "offload" if kwargs.get("offload") else f"every {kwargs['every_n_layers']} layers"
                     if kwargs.get("every_n_layers", 1) > 1 else "full")
    parts = [f"batch {a.per_device_train_batch_size}x{a.gradient_accumulation_steps}", rows,
             f"checkpointing {checkpointing}", str(a.optim.value if hasattr(a.optim, "value") else a.optim),
             f"attn {trainer.model.config._attn_implementation}"]
    parts += [name for name, on in (("liger", a.use_liger_kernel), ("torch.compile", a.torch_compile),
                                    ("activation offloading", getattr(a, "activation_offloading", False))) if on]
    return ", ".join(parts)


def measure(name: str, trainer, probe: list[dict], warmup: int, cuda: bool) -> dict:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    meter = Meter(cuda)
    trainer.add_callback(meter)
    for callback in (ProgressCallback, PrinterCallback):  # one line per setup, not one per step
        trainer.remove_callback(callback)
    step = trainer.training_step

    def counted(model, inputs, num_items_in_batch=None):  # instrumentation only: the trainer's own step runs
        meter.count(inputs)
        return step(model, inputs, num_items_in_batch)

    trainer.training_step = counted
    before, digest = probe_loss(trainer, probe), start_digest(trainer.model)
    trainer.train()
    marks = {m[0]: m for m in meter.marks}
    last = max(marks)
    (_, t0, real0, _), (_, t1, real1, _) = marks[warmup], marks[last]
    losses = [{"step": e["step"], "loss": e["loss"], "real_tokens": marks[e["step"]][2]}
              for e in trainer.state.log_history if "loss" in e and e["step"] in marks]
    return {"name": name, "settings": settings(trainer), "steps": last, "real_tokens": marks[last][2],
            "positions": marks[last][3], "padding_fraction": round(1 - marks[last][2] / marks[last][3], 4),
            "seconds": round(t1 - t0, 3), "tokens_per_s": round((real1 - real0) / (t1 - t0), 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "probe_loss": before, "start_digest": digest, "losses": losses, "error": None}


def free_memory() -> None:
    """Give the last setup's memory back before the next one's peak is measured: every setup starts from zero.

    The Trainer registers each nn.Embedding with bitsandbytes' process-wide GlobalOptimManager when the optimizer
    is 8-bit (their state stays 32-bit), and the manager kept them: ~1 GiB a setup on the 7B shape, inside every
    later setup's peak. Its registry is emptied here (the next optimizer registers its own)."""
    if "bitsandbytes" in sys.modules:
        sys.modules["bitsandbytes"].optim.GlobalOptimManager.get_instance().initialize()
    gc.collect()  # trainer <-> callbacks and the counted training_step are reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def latency(trainer, tokenizer, args) -> dict:
    """Greedy answers of the trained model (base + adapter, as inference serves it): one prompt at a time, then in
    batches. A random-init model never says EOS, so every free answer runs to --latency-new-tokens: the worst case.
    Also the fast constrained path a trading loop serves (fast_*: the signal grammar, the prompts' shared start
    cached, forced tokens and drafts checked in one pass; finetune/eval/fast_decode.py), where the grammar ends
    every answer; then the same on the adapter merged into the base (merged_fast_*; a QLoRA base dequantized:
    finetune.serving.inference.merged), as one adapter is served, and how many of its batched answers equal the
    unmerged ones. The merge folds the adapter into the trained model's weights: this comes last. With
    --latency-static, the merged model also through generate() on a static KV cache (merged_static_*: compiled on
    CUDA after `warm`, whose seconds are merged_static_warm_seconds)."""
    from finetune import tasks
    from finetune.eval.latency import Latency, timings
    from finetune.serving.inference import SignalProvider, merged
    lo, hi = args.latency_lengths
    samples = synthetic_samples(tokenizer, args.latency_n, lo, hi, args.seed + 1)
    timed = Latency(n=args.latency_n, batch_size=args.latency_batch, max_new_tokens=args.latency_new_tokens)
    grammar = tasks.get("signals").grammar()
    out = timed(samples=samples, model=trainer.model, tokenizer=tokenizer)  # free answers
    fast, unmerged = timed.fast(samples, trainer.model, tokenizer, grammar)
    model = merged(trainer.model.eval())
    fast_merged, texts = timed.fast(samples, model, tokenizer, grammar, prefix="merged_fast_")
    out |= fast | fast_merged | {"merged_same_answers": f"{sum(a == b for a, b in zip(texts, unmerged))}/{len(texts)}"}
    if args.latency_static:  # generate() on a static KV cache, its decode step compiled on CUDA, warmed first
        static = SignalProvider(model, tokenizer, constrained=True, static=True, batch_size=args.latency_batch,
                                max_new_tokens=args.latency_new_tokens)
        chats = [s["messages"][:-1] for s in samples]
        out["merged_static_warm_seconds"] = static.warm(room=hi)
        answers = []
        out |= timings(lambda c: static.generate_constrained([c]), lambda cs: answers.extend(
            static.generate_constrained(cs)), chats, "merged_static_")
        out["merged_static_same_answers"] = f"{sum(a == b for a, b in zip(answers, texts))}/{len(texts)}"
    return {**out, "n": args.latency_n, "batch_size": args.latency_batch, "max_new_tokens": args.latency_new_tokens,
            "prompt_lengths": [lo, hi]}


# --- the run

def peak_flops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if args.device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def planned(args) -> list[tuple[str, list[str]]]:
    """(name, lever overrides) per setup; setups that use Liger go last (it patches modules for the process)."""
    base = lever_overrides(args)
    plan = [(name, base if name == "ours" else []) for name in args.setups.split(",")]
    for text in args.variant:
        levers = lever_parser().parse_args([f"--{word}" for word in shlex.split(text)])
        plan.append((f"ours[{text.strip()}]", base + lever_overrides(levers)))
    liger_here = args.device == "cuda" and find_spec("liger_kernel") is not None

    def uses_liger(item: tuple[str, list[str]]) -> bool:  # trl_peer's, ours' `auto` (training=gpu), or a lever
        name, overrides = item
        if name == "plain" or "++training.use_liger_kernel=false" in overrides:
            return False
        return liger_here or "++training.use_liger_kernel=true" in overrides

    return sorted(plan, key=uses_liger)


def run(args, save=lambda report: None) -> dict:
    """Every planned setup, one after another; `save` gets the report after each, so a run cut short keeps what
    it measured."""
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ConfigError("--device cuda but this machine has no CUDA GPU; --device cpu runs the smoke test")
    if cuda:  # before the random model is built on the GPU: as the runner's memory plan sets it
        from finetune.config.memory_plan import use_cuda_allocator_for_packing
        use_cuda_allocator_for_packing()
    common = [f"model={args.model}", f"method={args.method}", "training=gpu", f"seed={args.seed}",
              f"training.max_steps={args.steps}", "training.logging_steps=1", "training.eval_strategy=no",
              "training.save_strategy=no", "training.load_best_model_at_end=false"]
    if not cuda:  # training=gpu, run on the CPU: only the smoke test does this
        common += ["training.use_cpu=true", "training.bf16=false", "training.dataloader_num_workers=0"]
    cfg = compose(common)
    source = bench_model(cfg.model, args.seed, args.device)
    path = [] if cfg.model.tiny is not None else [f"model.path={source}"]
    cfg = compose(common + path)
    tokenizer = load_tokenizer(cfg.model)
    samples = synthetic_samples(tokenizer, args.samples, *args.lengths, args.seed)
    probe = [tokenize(s["messages"], tokenizer) for s in samples[: args.probe]]
    params, flops = parameter_count(source), peak_flops(args)
    report = {"model": args.model, "method": args.method,
              "device": torch.cuda.get_device_name() if cuda else "cpu", "params": params, "peak_flops": flops,
              "flops_per_token": "6N", "lengths": list(args.lengths), "samples": args.samples, "steps": args.steps,
              "warmup_steps": args.warmup_steps, "seed": args.seed, "setups": [], "ratios_vs_peer": None,
              "latency": None, "complete": False,
              "versions": {**versions(), "liger-kernel": version_of("liger-kernel")},
              "command": "python -m finetune.bench " + shlex.join(args.argv)}
    for name, overrides in planned(args):
        free_memory()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started, leftover = time.perf_counter(), torch.cuda.memory_allocated() / 2**30 if cuda else None
        trainer, plan = None, None
        with tempfile.TemporaryDirectory(prefix="bench-") as out_dir:
            try:
                if name.startswith("ours"):
                    trainer, plan = ours(compose(common + path + overrides), Path(out_dir), samples)
                elif name == "plain":
                    trainer = plain(cfg, Path(out_dir), samples, args.steps, args.seed, not cuda, args.plain_batch)
                else:
                    trainer = trl_peer(cfg, Path(out_dir), samples, args.steps, args.seed, not cuda,
                                       args.peer_max_length)
                result = measure(name, trainer, probe, args.warmup_steps, cuda)
                result["plan"] = plan
                result["mfu"] = round(6 * params * result["tokens_per_s"] / flops, 4) if flops else None
                if args.latency and report["latency"] is None and name.startswith("ours"):
                    report["latency"] = {"setup": name, **latency(trainer, trainer.processing_class, args)}
            except Exception as err:  # one setup failing (OOM, a lever that does not apply) must not lose the rest
                traceback.print_exc()
                result = {"name": name, "error": f"{type(err).__name__}: {err}".splitlines()[0]}
            finally:
                if trainer is not None and cuda:
                    trainer.accelerator.free_memory()  # drops accelerate's references to model and optimizer
                del trainer
        # memory still held from the setups before (should be ~0): a leak would inflate this setup's peak
        result.update(overrides=overrides, wall_seconds=round(time.perf_counter() - started, 1),
                      memory_at_start_gib=None if leftover is None else round(leftover, 2))
        report["setups"].append(result)
        report["ratios_vs_peer"] = ratios(report["setups"])
        save(report)
        print(f"bench: {name}: " + (f"{result['tokens_per_s']:,.0f} real tokens/s, peak "
                                    f"{result['peak_gib']} GiB, probe loss {result['probe_loss']:.4f}"
                                    if not result["error"] else f"failed: {result['error']}"), flush=True)
    report["complete"] = True
    save(report)
    return report


def ratios(results: list[dict]) -> dict | None:
    """Real tokens/s of each setup over trl_peer's."""
    peer = next((r for r in results if r["name"] == "trl_peer" and not r["error"]), None)
    return {r["name"]: round(r["tokens_per_s"] / peer["tokens_per_s"], 3) for r in results
            if not r["error"]} if peer else None


def version_of(package: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def markdown(report: dict) -> str:
    peer = report["ratios_vs_peer"] or {}
    n = report["params"]
    size = f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"
    lines = [f"{report['model']} ({size} parameters), {report['method']}, {report['device']}, lengths "
             f"{report['lengths'][0]}-{report['lengths'][1]}, {report['steps']} steps ({report['warmup_steps']} "
             f"warm-up steps not timed){'' if report['complete'] else '; INCOMPLETE: the run was cut short'}", "",
             "| setup | settings | real tokens/s | x trl_peer | peak GiB | MFU (6N) | probe loss "
             "| loss first -> last |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["setups"]:
        if r["error"]:
            lines.append(f"| {r['name']} | failed: {r['error'].replace('|', '/')} | | | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        ratio = f"{peer[r['name']]:.2f}" if r["name"] in peer else "n/a"
        peak = r["peak_gib"] if r["peak_gib"] is not None else "n/a"
        curve = f"{r['losses'][0]['loss']:.3f} -> {r['losses'][-1]['loss']:.3f}" if r["losses"] else ""
        lines.append(f"| {r['name']} | {r['settings']} | {r['tokens_per_s']:,.0f} | {ratio} | {peak} | {mfu} "
                     f"| {r['probe_loss']:.4f} | {curve} |")
    if report["latency"]:
        t = report["latency"]
        lines += ["", f"Latency ({t['setup']}, greedy, {t['max_new_tokens']} new tokens, prompts "
                      f"{t['prompt_lengths'][0]}-{t['prompt_lengths'][1]} tokens): {t['latency_seconds']:.3f} s "
                      f"for one signal, {t['answers_per_second']:.1f} signals/s in batches of {t['batch_size']}"]
        if "fast_latency_p50_seconds" in t:
            lines += [f"Fast constrained path (signal grammar, cached prompt start, forced tokens and drafts in one "
                      f"pass): p50 {t['fast_latency_p50_seconds']:.3f} s, p99 {t['fast_latency_p99_seconds']:.3f} s "
                      f"for one signal, {t['fast_answers_per_second']:.1f} signals/s in batches"]
        if "merged_fast_latency_p50_seconds" in t:
            lines += [f"The same, adapter merged into the base: p50 {t['merged_fast_latency_p50_seconds']:.3f} s, p99 "
                      f"{t['merged_fast_latency_p99_seconds']:.3f} s, {t['merged_fast_answers_per_second']:.1f} "
                      f"signals/s; {t['merged_same_answers']} answers as unmerged"]
        if "merged_static_latency_p50_seconds" in t:
            lines += [f"Merged, generate() on a static KV cache (compiled on CUDA; warm-up "
                      f"{t['merged_static_warm_seconds']:.1f} s): p50 {t['merged_static_latency_p50_seconds']:.3f} s, "
                      f"p99 {t['merged_static_latency_p99_seconds']:.3f} s, "
                      f"{t['merged_static_answers_per_second']:.1f} signals/s; "
                      f"{t['merged_static_same_answers']} answers as the merged fast path"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)

    def save(report: dict) -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_json(args.out, report)
            write_text(args.out.with_suffix(".md"), markdown(report))

    report = run(args, save)
    print(markdown(report))
    return report


if __name__ == "__main__":
    try:
        outcome = main()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    sys.exit(1 if any(r["error"] for r in outcome["setups"]) else 0)
