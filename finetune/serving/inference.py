"""Use a trained adapter: (signal, confidence) for a live trading loop, and plain answers for any task.

    from finetune.serving.inference import SignalProvider
    provider = SignalProvider.from_run("outputs/2024-06-01/10-00-00-lora_qwen_signals")
    provider.get_signal({"symbol": "BTC/USDT", "price": 50000, "technical": {"rsi": 28.4,
                         "trend_direction": "bullish", "trend_strength": 0.65}})   # -> ("BUY", 0.72)
    provider.get_signals([snapshot_1, snapshot_2])                                # batched, same answers
    provider.generate([[{"role": "user", "content": "Headline: ..."}]])           # any task -> ["positive"]

    SignalProvider.from_pretrained("/models/qwen", "outputs/.../adapter")         # base + adapter paths
    SignalProvider(model, tokenizer)                                             # already loaded (or merged)

Prompts are built exactly as training wrote them: `finetune.tasks.signals.market_prompt` with the
run's system prompt (`dataset.builder.system_prompt`, or the builder's default when the run did not set
it). A run trained on another builder (the demo data's own prompt format) is warned about, since its
prompts will differ; send it `messages` written as in its training data through `generate` instead.

Answers are decoded as the run's evaluation decoded them (`eval.generation`: greedy unless it says otherwise,
stopping at every id of the model's `generation_config.eos_token_id`), so the same prompt gets the answer the
report scored; greedy answers are the same batched or one by one. They are read with
`finetune.tasks.signals.parse_signal`. The rules a trading loop can rely on:
- an answer without a readable signal AND confidence is the fallback ("HOLD", 0.0), counted in
  `provider.fallbacks` (a trading loop must not act on an unquantified signal);
- `confidence_threshold`: a BUY / SELL below it becomes HOLD, keeping the model's confidence so a log
  shows how close it came; counted in `provider.held` (0.7 is a cautious setting; default 0: off);
- `vote(answers)` combines several (signal, confidence) answers by confidence-weighted vote:
  each signal's weight is the sum of its confidences, the heaviest wins with its share of the total weight
  as confidence; a fallback weighs 0 and so casts no vote; a tie for the top gives HOLD with HOLD's own
  share (BUY and SELL level: no decision, and doing nothing is the safe choice). `Ensemble(providers)`
  votes over several adapters (k-fold runs, an A/B pair, seeds) on each snapshot and applies its own
  threshold to the voted confidence. A vote over n sampled answers of one model was not chosen: sampled
  answers depend on the batch and the random state, while greedy ones are reproducible.

Speed for a trading loop that asks for one signal at a time:
- `constrained=True`: signals are decoded under the task's grammar (finetune/tasks/signals.py: always a signal and a
  confidence, so never the fallback), as `eval.constrained` scores them. A single snapshot then takes the fast
  decoder (finetune/eval/fast_decode.py: the prompt's shared start cached once, the tokens the grammar forces run in
  one pass; the same answer as generate_answers gives), single snapshots and batches; `fast=False` takes
  generate_answers.
  Off by default: free answers are the ones the report scored first.
- `merge=True` (from_run / from_pretrained): the adapter is folded into the base weights at load (`merged`); a QLoRA
  run's into its dequantized base (the 4-bit weights as training's forward pass read them, in its compute dtype).
  Off by default: a merged model has no `disable_adapter()`, which `finetune.serve` needs to serve the base beside
  the adapter.

- `dtype="bfloat16"` (from_run): the model cast after loading (and merging); on a CPU with bf16 instructions a
  step takes about half a float32 one (`cast`).
- `static=True`: answers through generate() with transformers' static KV cache, whose decode step generate()
  compiles on CUDA (torch.compile, CUDA graphs): every token a cheap replayed step instead of the fast decoder's
  few eager passes. Call `warm()` at start-up, before the first request, so the compiling happens there. On CPU
  nothing is compiled and the fast decoder is the faster path (docs/benchmarks.md).

    provider = SignalProvider.from_run(run_dir, merge=True, constrained=True, dtype="bfloat16")
    provider.get_signal(snapshot)   # -> ("BUY", 0.72), fast path

One provider is safe to share between threads (a lock serialises generation, as `finetune.serve` needs).
"""
import inspect
import json
import logging
import threading
import time
from pathlib import Path

from omegaconf import OmegaConf

from finetune import tasks
from finetune.errors import ConfigError
from finetune.eval.likelihood import prompt_learning
from finetune.tasks.signals import SIGNALS, SYSTEM_PROMPT, market_prompt, parse_signal

log = logging.getLogger(__name__)

FALLBACK = ("HOLD", 0.0)
SIGNAL_BUILDER = "finetune.data.trade_signals.build"


class SignalProvider:
    def __init__(self, model, tokenizer, *, system_prompt: str | None = SYSTEM_PROMPT, max_new_tokens: int = 32,
                 batch_size: int = 16, confidence_threshold: float = 0.0, task: str = "signals",
                 generation: dict | None = None, constrained: bool = False, fast: bool = True, static: bool = False):
        if not 0.0 <= confidence_threshold <= 1.0:
            raise ConfigError(f"confidence_threshold={confidence_threshold}: a fraction in [0, 1]")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError("the tokenizer has no chat template; give one that has (the run's, or "
                              "finetune.train.model.load_tokenizer with model.chat_template set)")
        self.model, self.tokenizer = model, tokenizer
        self.system_prompt = system_prompt  # None: the prompts have no system turn
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.generation = dict(generation or {})  # model.generate keywords: the run's eval.generation (greedy if empty)
        self.confidence_threshold = confidence_threshold
        self.task = tasks.get(task).name  # the run's dataset.task: how predict / serve read an answer to `messages`
        self.grammar = tasks.get(task).grammar() if constrained else None
        if constrained and self.grammar is None:
            with_one = ", ".join(name for name, t in tasks.TASKS.items() if t.grammar() is not None)
            raise ConfigError(f"constrained=True: task={task} has no answer grammar (tasks with one: {with_one})")
        if static and prompt_learning(model):
            raise ConfigError("static=True: a prompt-learning adapter (prefix / prompt tuning) keeps its virtual "
                              "tokens in the KV cache, which a static cache does not take; serve it without static")
        # The fast decoder is greedy only, and a prompt-learning adapter keeps its virtual tokens in the cache it
        # would replace: either case takes generate_answers, as does `static`.
        self.fast = fast and not static and not self.generation and not prompt_learning(model)
        if static:  # transformers' static KV cache; on CUDA generate() compiles its decode step for it (`warm`)
            self.generation["cache_implementation"] = "static"
        self._decoder = None  # finetune.eval.fast_decode.PrefixDecoder, built on the first single constrained signal
        self.fallbacks = 0  # answers that gave no signal + confidence
        self.held = 0       # BUY / SELL answers turned into HOLD by the threshold
        self._lock = threading.Lock()

    # ---- loading

    @classmethod
    def from_run(cls, run_dir, trust_remote_code: bool = False, merge: bool = False, dtype: str | None = None,
                 **options) -> "SignalProvider":
        """The run's base model (its preset, quantization and chat template) with RUN_DIR/adapter on top, merged
        into it with `merge` (see `merged`), then cast to `dtype` (see `cast`; None: as the run loaded it). The
        run dir is read as data (finetune.serving.reopen.run_values); `trust_remote_code` is the caller's, not the
        run's."""
        from finetune.serving.reopen import load_run, tuned_model
        cfg, tokenizer, model, adapter = load_run(Path(run_dir), trust_remote_code=trust_remote_code)
        target = (cfg.dataset.get("builder") or {}).get("_target_")
        if cfg.dataset.task == "signals" and target != SIGNAL_BUILDER:
            log.warning("%s was trained on %s: get_signal builds prompts as %s writes them, which this run's "
                        "data may not; send it messages written as in its training data instead",
                        run_dir, target, SIGNAL_BUILDER)
        model = tuned_model(model, adapter)
        model = merged(model) if merge else model
        model = cast(model, dtype) if dtype else model
        options.setdefault("system_prompt", training_system_prompt(cfg))
        options.setdefault("max_new_tokens", cfg.eval.max_new_tokens)
        options.setdefault("batch_size", cfg.eval.batch_size)
        options.setdefault("task", cfg.dataset.task)
        # the evaluation's decoding (eval.generation) and stop ids: the same prompt gets the answer the report scored
        options.setdefault("generation", OmegaConf.to_container(cfg.eval.generation))
        return cls(model, tokenizer, **options)

    @classmethod
    def from_pretrained(cls, base=None, adapter=None, *, dtype: str = "auto", device: str | None = None,
                        merge: bool = False, **options) -> "SignalProvider":
        """A base model folder or hub id, with a PEFT adapter folder on top (None: the base alone, e.g. a
        merged model), merged into it with `merge` (see `merged`). With no base, the adapter's
        `base_model_name_or_path` is used, as peft does."""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
        if base is None:
            if adapter is None:
                raise ConfigError("give a base model, an adapter, or both")
            config = Path(adapter) / "adapter_config.json"
            if not config.is_file():
                raise ConfigError(f"{adapter}: not a PEFT adapter folder (no adapter_config.json)")
            base = json.loads(config.read_text())["base_model_name_or_path"]
        # a tokenizer saved with the adapter (or a merged model) carries the chat template used in training
        has_tokenizer = adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file()
        tokenizer = AutoTokenizer.from_pretrained(adapter if has_tokenizer else base)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
        model = model.to(device or ("cuda" if _cuda() else "cpu"))
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter)
            model = merged(model) if merge else model
        return cls(model, tokenizer, **options)

    # ---- answers

    def signal_prompt(self, market_data: dict, symbol=None) -> list[dict]:
        """The prompt for one snapshot, as training wrote it; ValueError for a snapshot with no indicator."""
        if not isinstance(market_data, dict):
            raise ValueError(f"market_data must be a JSON object, got {type(market_data).__name__}")
        return market_prompt(market_data, symbol, self.system_prompt)

    def generate(self, chats: list[list[dict]], max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers to prompt conversations (each a list of {"role", "content"} messages), any task."""
        from finetune.eval.suite import generate_chats
        with self._lock:
            return generate_chats(self.model, self.tokenizer, chats, max_new_tokens or self.max_new_tokens,
                                  self.batch_size, progress=False, **self.generation)

    def read_signal(self, text: str) -> tuple[str, float]:
        """An answer -> (signal, confidence) with the fallback and the threshold applied (and counted)."""
        signal, confidence = parse_signal(text)
        with self._lock:
            if signal is None or confidence is None:
                self.fallbacks += 1
                return FALLBACK
            if signal != "HOLD" and confidence < self.confidence_threshold:
                self.held += 1
                return "HOLD", confidence
        return signal, confidence

    def get_signal(self, market_data: dict, symbol=None) -> tuple[str, float]:
        return self.get_signals([market_data], symbol)[0]

    def get_signals(self, market_data: list[dict], symbol=None) -> list[tuple[str, float]]:
        """One (signal, confidence) per snapshot, generated in batches of `batch_size` (under the task's grammar
        when the provider is `constrained`)."""
        chats = [self.signal_prompt(m, symbol) for m in market_data]
        answers = self.generate_constrained(chats) if self.grammar is not None else self.generate(chats)
        return [self.read_signal(a) for a in answers]

    def generate_constrained(self, chats: list[list[dict]]) -> list[str]:
        """Answers under the task's grammar, as `generate_answers(..., grammar=...)` gives them: through the fast
        decoder when `fast` (a cached prompt prefix, forced tokens in one pass; the same answer in ~5 passes
        instead of ~16; `batch_size` chats a pass), else through generate_answers."""
        from finetune.eval.suite import generate_answers
        with self._lock:
            if self.fast:
                if self._decoder is None:
                    self._decoder = self.prefix_decoder(self.grammar)
                return [out["text"] for start in range(0, len(chats), self.batch_size)
                        for out in self._decoder.answers(chats[start:start + self.batch_size], self.max_new_tokens)]
            return generate_answers(self.model, self.tokenizer, chats, self.max_new_tokens, self.batch_size,
                                    progress=False, grammar=self.grammar, **self.generation)["texts"]


    def warm(self, room: int = 256) -> float:
        """Ready `static` decoding before the first request; returns the seconds it took. generate() sizes its static
        KV cache for the longest call so far and, on CUDA, compiles the decode step for each new shape (tens of
        seconds on a 7B model). Here: a signal prompt alone, in twos (torch.compile then makes the batch dimension
        dynamic) and in a batch of `batch_size`, the cache sized for prompts up to `room` tokens longer, so that
        requests reuse what these compiled."""
        from finetune.eval.suite import generate_answers
        chat = self.signal_prompt({"symbol": "BTC/USDT", "price": 50000.0, "technical": {"rsi": 50.0}})
        start = time.perf_counter()
        with self._lock:
            for n in sorted({1, 2, self.batch_size}):
                generate_answers(self.model, self.tokenizer, [chat] * n, self.max_new_tokens + room, n, progress=False,
                                 grammar=self.grammar, **self.generation)
        return time.perf_counter() - start

    def prefix_decoder(self, grammar: str, **options):
        """A finetune.eval.fast_decode.PrefixDecoder for this provider's signal prompts under `grammar`, built on the
        model as it answers now (under `disable_adapter()` it caches the base's prefix). `options`: its own."""
        from finetune.eval.fast_decode import PrefixDecoder
        # two prompts that part where the snapshot begins: their shared start is every signal prompt's
        probes = [self.signal_prompt({"rsi": 50}), self.signal_prompt({"price": 1})]
        return PrefixDecoder(self.model, self.tokenizer, grammar, probes, **options)


def vote(answers: list[tuple[str, float]]) -> tuple[str, float]:
    """Confidence-weighted vote: [("BUY", 0.8), ("SELL", 0.3), ("BUY", 0.5)] -> ("BUY", 0.8125)
    (BUY weighs 1.3 of 1.6). No weight at all (no answers, or only fallbacks) -> ("HOLD", 0.0)."""
    weights = {"HOLD": 0.0, "BUY": 0.0, "SELL": 0.0}
    for signal, confidence in answers:
        if signal not in SIGNALS:
            raise ValueError(f"vote: {signal!r} is not one of {', '.join(SIGNALS)}")
        weights[signal] += confidence
    total = sum(weights.values())
    if total <= 0:
        return FALLBACK
    top = max(weights.values())
    winners = [signal for signal, weight in weights.items() if weight == top]
    winner = winners[0] if len(winners) == 1 else "HOLD"
    return winner, weights[winner] / total


class Ensemble:
    """Several providers (adapters) vote on every snapshot; the vote's confidence meets `confidence_threshold`.
    Each provider keeps its own threshold: leave theirs at 0 so that weak answers still carry their weight."""

    def __init__(self, providers: list[SignalProvider], confidence_threshold: float = 0.0):
        if not providers:
            raise ConfigError("Ensemble: give at least one provider")
        self.providers, self.confidence_threshold = providers, confidence_threshold

    def get_signal(self, market_data: dict, symbol=None) -> tuple[str, float]:
        return self.get_signals([market_data], symbol)[0]

    def get_signals(self, market_data: list[dict], symbol=None) -> list[tuple[str, float]]:
        per_provider = [p.get_signals(market_data, symbol) for p in self.providers]
        results = []
        for answers in zip(*per_provider):
            signal, confidence = vote(list(answers))
            if signal != "HOLD" and confidence < self.confidence_threshold:
                signal = "HOLD"
            results.append((signal, confidence))
        return results


def merged(model):
    """A LoRA-style adapter folded into its base's weights (peft's merge_and_unload): each step runs the base's
    matmuls only. A QLoRA run is served on its dequantized base (`dequantized_merge`): the 4-bit weights as the
    training forward pass saw them, in its compute dtype, plus the adapter. Left as it is: a model without an
    adapter and a prompt-learning adapter (no weights to fold). A merged model has no `disable_adapter()`: serving
    the base beside the adapter (finetune.serve) needs the adapter unmerged."""
    from peft import PeftModel
    if not isinstance(model, PeftModel) or prompt_learning(model):
        return model
    if quantized(model):
        return dequantized_merge(model)
    return model.merge_and_unload()


def dequantized_merge(model):
    """A LoRA adapter on a bitsandbytes 4- or 8-bit base as one plain model: each quantized weight dequantized into
    the compute dtype (the values the training forward multiplied by), the adapter's delta added in float32 and the
    sum rounded once. peft's own merge would round the sum back into 4 bits and change the answers. A model this
    cannot fold (DoRA or another variant, a LoRA bias, several adapters) is returned unmerged, with a warning."""
    import torch
    from peft.tuners.lora import LoraLayer
    layers = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    unfoldable = [name for name, layer in layers.items()
                  if layer.lora_variant or any(layer.lora_bias.values()) or len(layer.lora_A) > 1]
    if unfoldable:
        log.warning("%s: a LoRA variant (DoRA), a LoRA bias or several adapters on a quantized base; the adapter "
                    "stays unmerged", unfoldable[0])
        return model
    prefix = "base_model.model."  # PeftModel > LoraModel > the transformers model
    deltas = {name.removeprefix(prefix): layer.get_delta_weight(layer.active_adapters[0]).float()
              for name, layer in layers.items() if layer.active_adapters[0] in layer.lora_A}
    base = model.unload()  # the LoRA layers taken out, nothing folded: the quantized transformers model
    quantization = base.config.quantization_config
    dtype = getattr(quantization, "bnb_4bit_compute_dtype", None) or base.dtype
    base = base.dequantize(dtype=dtype)
    base.is_loaded_in_4bit = base.is_loaded_in_8bit = False  # transformers' dequantize() leaves them set
    modules = dict(base.named_modules())
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = modules[name].weight
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    return base


def cast(model, dtype: str):
    """The model in `dtype` ("bfloat16", "float16", "float32"): a bf16 step on a CPU with bf16 instructions takes
    about half a float32 one (docs/benchmarks.md), with answers that can differ where two labels are near-tied
    (measure them on the run's held-out prompts: scripts/signal_latency.py). Not for a quantized base: merge it first
    (`merged`)."""
    import torch
    if quantized(model):
        raise ConfigError(f"dtype={dtype}: the base model is quantized; serve it as loaded, or with merge=True "
                          f"(`--merge`): its dequantized weights and the adapter in one model, which casts")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ConfigError(f"dtype={dtype!r}: one of bfloat16, float16, float32")
    return model.to(getattr(torch, dtype))


def quantized(model) -> bool:
    """Whether the model's (or a PeftModel's base's) weights are quantized (bitsandbytes 4- or 8-bit)."""
    from peft import PeftModel
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return getattr(base, "hf_quantizer", None) is not None


def training_system_prompt(cfg) -> str | None:
    """The system prompt the run's builder wrote: the config's value, else the builder's default."""
    from hydra.utils import get_method
    builder = cfg.dataset.get("builder") or {}
    if "system_prompt" in builder:
        return builder.system_prompt
    if builder.get("_target_") is None:  # a builder the package does not ship, left out of a run dir's config
        return SYSTEM_PROMPT
    parameter = inspect.signature(get_method(builder._target_)).parameters.get("system_prompt")
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()
