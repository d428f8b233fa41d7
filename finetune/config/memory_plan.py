"""The memory plan of `training=gpu`: before the model loads, the activation checkpointing and the rows per
micro-batch with the highest throughput whose predicted peak fits the GPU's free memory, less headroom.

The preset says `auto` where the plan may choose; a value a recipe or the command line sets is kept as given:

    training.activation_checkpointing: auto     -> false (none), or true with activation_checkpointing_kwargs
                                                   {every_n_layers: N} (transformers checkpoints layers 0, N, 2N,
                                                   ...), none (full) or {offload: true} (saved inputs in host memory)
    training.per_device_train_batch_size: auto  -> plan.max_rows, halved until the plan fits; gradient_accumulation_steps
                                                   grows by the same factor, so the rows per optimizer step stay
    training.use_liger_kernel: auto             -> true on CUDA when liger_kernel is importable, else false

What it chose is written over `auto` in the resolved config (manifest.json's "config"), with the plan itself under
"plan" (device memory, prediction, reason); the run prints it. `plan.device_memory=24GiB` plans for that much memory
instead of the local GPU's free memory (a dry run on a machine without one).

The memory model, bytes (T = rows x training.max_length tokens per micro-batch; L layers, h hidden size,
i intermediate size, V vocabulary):
- weights: NF4 linear layers 0.516 byte a parameter (4 bits + the double-quantized absmax of each 64), embeddings
  and norms in the model dtype, fp32 after peft's k-bit preparation (the runner prepares a QLoRA base); 2 or 4
  bytes a parameter without quantization;
- trainable state: adapter weights and grads in fp32 and two AdamW moments (8 bytes, 2 with an 8-bit optimizer);
  method=full: grads and moments beside the weights, in the model dtype (moments 2 bytes with an 8-bit optimizer);
- activations: a layer that keeps them, T x (6i + 19h) with Liger's SwiGLU (its gate and up, and down_proj's input)
  and T x (10i + 25h) without; a checkpointed layer keeps its input, T x 2h (none on the device when offloaded),
  and the backward recomputes one layer at a time;
- logits: TRL's loss never holds T x V logits; the plain Trainer's does, ~16 bytes each (bf16, fp32, grad).
Attention heads do not enter: SDPA's kernels keep O(T) per layer, not O(T^2) per head.
Calibrated on the H200 runs in docs/benchmarks/h200-2026-12-04/ (each peak less its memory_at_start_gib):
tests/test_memory_plan.py checks every one within 20 %.

Throughput: a step costs 1 + 1/3 x the fraction of layers recomputed (H200, QLoRA 7B: full recompute ran at 0.75x
of none, every 2nd layer at 0.86x, every 4th at 0.95x) and 6 % more when offloading (7,091 vs 7,529 tokens/s);
a micro-batch of T tokens runs at T / (T + 512) of a busy GPU (an assumption: 1 x 8,192 and 4 x 2,048 tokens ran
within 3 % of each other; smaller micro-batches were not measured). 8 rows of 2,048 ran slower than 4 (6,572 vs
10,083 tokens/s at 99.6 GiB), so plan.max_rows is 4.
"""
import logging
import math
import os
import re
from dataclasses import dataclass
from importlib.util import find_spec

from finetune.errors import ConfigError

log = logging.getLogger(__name__)  # finetune.*: on the console of a run (finetune/rundir/logs.py) and in finetune.log

GIB = 2**30
NF4_BYTES = 0.516
KEPT = (6, 19)            # bytes per token and layer: x intermediate, x hidden, with Liger
WITHOUT_LIGER = (4, 6)    # more without: torch's SiLU output and product, RMSNorm's fp32 copies
CHECKPOINT_INPUT = 2      # x hidden: a checkpointed layer keeps its bf16 input
LOGIT_BYTES = 16
RECOMPUTE_COST = 1 / 3
OFFLOAD_COST = 1.06
BUSY_TOKENS = 512
EVERY = (8, 6, 4, 3, 2)   # every_n_layers candidates, fewest recomputed layers first
AUTO_KEYS = ("activation_checkpointing", "per_device_train_batch_size", "use_liger_kernel")
ALLOCATOR = "expandable_segments:True"


@dataclass(frozen=True)
class Job:
    """What the memory model needs besides the model's shape."""
    quantized: bool            # NF4 base (method=qlora)
    dtype_bytes: int           # the model dtype: 2 (bf16) or 4
    full: bool                 # method=full: every weight trains
    upcast_embeddings: bool    # peft's k-bit preparation: embeddings and norms in fp32
    liger: bool
    eight_bit_optimizer: bool
    row_length: int            # training.max_length: a packed row's tokens
    full_logits: bool = False  # the plain Trainer's loss (not TRL's)


def checkpointed_layers(layers: int, policy: tuple[str, int]) -> int:
    name, every = policy
    return 0 if name == "none" else math.ceil(layers / every) if name == "every" else layers


def describe(policy: tuple[str, int]) -> str:
    name, every = policy
    return {"none": "no activation checkpointing", "full": "checkpointing every layer",
            "offload": "checkpointing every layer, inputs offloaded to host memory"}.get(
        name, f"checkpointing every {every} layers")


def peak_gib(shape: dict, job: Job, rows: int, policy: tuple[str, int]) -> dict:
    """The predicted peak of device memory in GiB, by term, and its total."""
    layers, h, i = shape["num_layers"], shape["hidden_size"], shape["intermediate_size"]
    params, embeddings, trainable = shape["params"], shape["embedding_params"], shape["trainable_params"]
    optimizer = 2 if job.eight_bit_optimizer else 8
    if job.quantized:
        outside = 4 if job.upcast_embeddings else job.dtype_bytes
        weights = (params - embeddings) * NF4_BYTES + embeddings * outside
    else:
        weights = params * job.dtype_bytes
    if job.full:
        state = params * (job.dtype_bytes + (2 if job.eight_bit_optimizer else 2 * job.dtype_bytes))
    else:
        state = trainable * (4 + 4 + optimizer)
    tokens = rows * job.row_length
    per_layer = KEPT[0] * i + KEPT[1] * h + (0 if job.liger else WITHOUT_LIGER[0] * i + WITHOUT_LIGER[1] * h)
    checkpointed = checkpointed_layers(layers, policy)
    kept = (layers - checkpointed) * per_layer + (0 if policy[0] == "offload" else checkpointed * CHECKPOINT_INPUT * h)
    activations = tokens * (kept + (per_layer if checkpointed else 0))
    logits = tokens * shape["vocab_size"] * LOGIT_BYTES if job.full_logits else 0
    terms = {"weights": weights, "trainable_state": state, "activations": activations, "logits": logits}
    gib = {k: round(v / GIB, 2) for k, v in terms.items()}
    return {**gib, "total": round(sum(terms.values()) / GIB, 2)}


def speed(layers: int, policy: tuple[str, int], tokens: int) -> float:
    """Relative tokens/s (1: no recompute on a busy GPU), from the measured costs in the module docstring."""
    cost = 1 + RECOMPUTE_COST * checkpointed_layers(layers, policy) / layers
    if policy[0] == "offload":
        cost *= OFFLOAD_COST
    return tokens / (tokens + BUSY_TOKENS) / cost


def choose(shape: dict, job: Job, budget_gib: float, rows: list[int], policies: list[tuple[str, int]]) -> dict:
    """The fastest (rows, policy) whose predicted peak fits the budget; the smallest one when none fits."""
    options = [{"rows": r, "policy": p, "peak": peak_gib(shape, job, r, p),
                "speed": speed(shape["num_layers"], p, r * job.row_length)} for r in rows for p in policies]
    fitting = [o for o in options if o["peak"]["total"] <= budget_gib]
    if fitting:
        return {**max(fitting, key=lambda o: o["speed"]), "fits": True}
    return {**min(options, key=lambda o: o["peak"]["total"]), "fits": False}


def policy_of(training: dict) -> tuple[str, int]:
    """The checkpointing a user set, as a policy."""
    if not training.get("activation_checkpointing"):
        return ("none", 0)
    kwargs = training.get("activation_checkpointing_kwargs") or {}
    if kwargs.get("offload"):
        return ("offload", 1)
    every = kwargs.get("every_n_layers", 1)
    return ("every", every) if every > 1 else ("full", 1)


def device_memory(setting, training: dict) -> tuple[float | None, str]:
    """GiB to plan for and where the number came from: plan.device_memory, else the local GPU's free memory."""
    if setting is not None:
        match = re.fullmatch(r"\s*([\d.]+)\s*(GiB|G|GB|MiB|MB)?\s*", str(setting), re.IGNORECASE)
        if not match:
            raise ConfigError(f"plan.device_memory={setting}: expected a size such as 24GiB, 80GB or 16384MiB")
        unit = (match.group(2) or "GiB").lower()
        scale = {"gib": 1, "g": 1, "gb": 1e9 / GIB, "mib": 1 / 1024, "mb": 1e6 / GIB}[unit]
        return float(match.group(1)) * scale, f"from plan.device_memory={setting}"
    import torch
    if training.get("use_cpu") or not torch.cuda.is_available():
        return None, "no CUDA GPU"
    device = int(os.environ.get("LOCAL_RANK", 0))
    free, total = torch.cuda.mem_get_info(device)
    return free / GIB, f"free on {torch.cuda.get_device_name(device)} of {total / GIB:.1f} GiB"


def use_cuda_allocator_for_packing() -> None:
    """Expandable segments for long packed runs (micro-batches of changing size fragment the default caching
    allocator; near its limit a larger batch ran slower than a smaller one), unless the user set their own.
    Read when torch first allocates on CUDA, so this runs before."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOCATOR)


def resolve_liger(training: dict, cuda: bool) -> str:
    on = cuda and find_spec("liger_kernel") is not None
    training["use_liger_kernel"] = on
    why = ("CUDA, liger-kernel installed" if on else "no CUDA GPU" if not cuda else
           "liger-kernel not installed: pip install -e '.[gpu]'")
    return f"training.use_liger_kernel: auto -> {str(on).lower()} ({why})"


def resolve_auto(cfg, config: dict) -> None:
    """Replace `auto` in config["training"] by what this machine (or plan.device_memory) allows, and record the plan
    and the lines the run prints under config["plan"]."""
    training, plan = config["training"], dict(config.get("plan") or {})
    autos = [key for key in AUTO_KEYS if training.get(key) == "auto"]
    if not autos:
        return
    import torch
    cuda = not training.get("use_cpu") and torch.cuda.is_available()
    lines = []
    if cuda:  # before the first CUDA allocation of a run: nothing touches the GPU before its config is checked
        use_cuda_allocator_for_packing()
        plan["allocator"] = os.environ["PYTORCH_CUDA_ALLOC_CONF"]
        lines.append(f"PYTORCH_CUDA_ALLOC_CONF={plan['allocator']}")
    if "use_liger_kernel" in autos:
        lines.append(resolve_liger(training, cuda))
    if {"activation_checkpointing", "per_device_train_batch_size"} & set(autos):
        lines += plan_memory(cfg, training, plan)
    plan["lines"] = lines
    config["plan"] = plan
    for line in lines:
        log.info("%s", line)


def plan_memory(cfg, training: dict, plan: dict) -> list[str]:
    """Choose the `auto` checkpointing and rows; write them into `training` and the record into `plan`."""
    from finetune.config.estimate import model_shape
    max_rows = int(plan.get("max_rows") or 4)
    accumulation = int(training.get("gradient_accumulation_steps") or 1)
    rows_auto = training.get("per_device_train_batch_size") == "auto"
    rows = [max_rows >> k for k in range(max_rows.bit_length())] if rows_auto else [training["per_device_train_batch_size"]]
    prefix = cfg.method is not None and str(cfg.method.get("_target_", "")).endswith("PrefixTuningConfig")
    if training.get("activation_checkpointing") != "auto":
        policies = [policy_of(training)]
    elif prefix:  # peft's prefix-tuning breaks under checkpointing (finetune/config/__init__.py refuses it)
        policies = [("none", 0)]
    else:
        policies = [("none", 0), *(("every", n) for n in EVERY), ("full", 1), ("offload", 1)]
    memory, source = device_memory(plan.get("device_memory"), training)
    if memory is None:  # nothing to plan from: the most memory-saving checkpointing, the most rows
        chosen = {"rows": rows[0], "policy": ("full", 1) if len(policies) > 1 else policies[0]}
        reason = f"{source} and no plan.device_memory (e.g. plan.device_memory=24GiB plans for such a card)"
        apply(training, chosen, accumulation, max_rows if rows_auto else None)
        plan.update(device_memory_gib=None, source=source, reason=reason, **choice_record(training))
        return [f"plan: {describe(chosen['policy'])}, {rows_text(training)}: {reason}"]
    shape = model_shape(cfg.model, cfg.method)
    quantized = cfg.get("quantization") is not None
    job = Job(quantized=quantized, dtype_bytes=4 if cfg.model.dtype == "float32" else 2, full=cfg.method is None,
              upcast_embeddings=quantized and not cfg.model.get("modules_to_save"),  # runner.load_base prepares it
              liger=training.get("use_liger_kernel") is True, eight_bit_optimizer="8bit" in str(training.get("optim")),
              row_length=int(training["max_length"]))
    headroom = float(plan.get("headroom", 0.1))
    budget = memory * (1 - headroom)
    chosen = choose(shape, job, budget, rows, policies)
    apply(training, chosen, accumulation, max_rows if rows_auto else None)
    fastest = speed(shape["num_layers"], ("none", 0), max(rows) * job.row_length)
    relative = chosen["speed"] / fastest
    reason = (f"predicted peak {chosen['peak']['total']:.1f} GiB of {budget:.1f} GiB usable ({memory:.1f} GiB "
              f"{source}, less {headroom:.0%} headroom); " +
              ("the fastest that fits" + ("" if relative > 0.999 else f", ~{relative:.2f}x of no checkpointing")
               if chosen["fits"] else "NOTHING FITS: the smallest plan; expect CUDA out of memory (lower "
               "training.max_length, or method=qlora)"))
    plan.update(device_memory_gib=round(memory, 2), source=source, budget_gib=round(budget, 2),
                predicted_gib=chosen["peak"], reason=reason, **choice_record(training))
    return [f"plan: {describe(chosen['policy'])}, {rows_text(training)} of {job.row_length} tokens x "
            f"{training['gradient_accumulation_steps']} accumulation: {reason}"]


def rows_text(training: dict) -> str:
    rows = training["per_device_train_batch_size"]
    return f"{rows} row{'s' if rows != 1 else ''}"


def apply(training: dict, chosen: dict, accumulation: int, max_rows: int | None) -> None:
    """Write the plan's choice over `auto` (max_rows None: the rows are the user's); a value the user set is left
    as it is. Fewer rows than max_rows accumulate more micro-batches: the rows per optimizer step stay."""
    if max_rows is not None:
        training["per_device_train_batch_size"] = chosen["rows"]
        training["gradient_accumulation_steps"] = accumulation * (max_rows // chosen["rows"])
    if training.get("activation_checkpointing") == "auto":
        name, every = chosen["policy"]
        training["activation_checkpointing"] = name != "none"
        kwargs = {k: v for k, v in (training.get("activation_checkpointing_kwargs") or {}).items()
                  if k not in ("every_n_layers", "offload")}
        kwargs.update({"every": {"every_n_layers": every}, "offload": {"offload": True}}.get(name, {}))
        training["activation_checkpointing_kwargs"] = kwargs or None


def choice_record(training: dict) -> dict:
    keys = ("activation_checkpointing", "activation_checkpointing_kwargs", "per_device_train_batch_size",
            "gradient_accumulation_steps")
    return {"chosen": {f"training.{k}": training.get(k) for k in keys}}
