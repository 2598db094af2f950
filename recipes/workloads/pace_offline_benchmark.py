"""CPU stand-in for AMD PACE's ``python benchmark_llm_offline.py --config cfg.json`` (offline comparison).

It reads the same JSON config, really runs framework `hf` (transformers generate) and `pace` (amd-pace's
`pace.llm.LLMModel`) on a tiny random Llama built locally (never downloaded), measures upstream's metrics with
upstream's formulas, logs in PACE's format and writes PACE's results JSON, so the recipe rehearses on any CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fcntl
import hashlib
import importlib
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol

import psutil
import torch

PROG = "pace_offline_benchmark"
LOGGER_NAME = "pace-llm-benchmark"
UPSTREAM_SCRIPT = "benchmark_llm_offline.py"
DEFAULT_MODEL_DIR = "~/.cache/benchfleet/tiny-models"
FORMAT_VERSION = "tiny-pace-llama-v1"  # part of the cache key: bump when the model or tokenizer changes
FRAMEWORKS = ("hf", "pace")
UPSTREAM_ONLY = ("vllm", "vllm_zentorch", "zentorch")
KV_CACHE_TYPES = ("BMC", "DYNAMIC", "SLAB_POOL", "PAGED")
PACE_CPU_FLAGS = ("avx512f", "avx512_bf16")
MAX_POSITIONS = 4096
PACE_INSTALL = "pip install amd-pace==1.3.0 (it needs torch==2.13.0, the CPU build)"

# Stand-in for openai/gsm8k's test questions (upstream's real data): a few arithmetic word problems, also the
# corpus the tiny tokenizer is trained on.
QUESTIONS = (
    "A baker makes 48 rolls in the morning and sells 35 of them by noon. How many rolls are left?",
    "Mia reads 12 pages a day. How many days does she need to finish a book of 180 pages?",
    "A train goes 60 miles per hour for 3 hours, then 45 miles per hour for 2 hours. How far does it go?",
    "Tom buys 4 notebooks at 3 dollars each and a pen for 2 dollars. How much does he spend in total?",
    "A garden has 7 rows of tomato plants with 9 plants in each row. How many tomato plants are there?",
    "Sara saves 15 dollars every week. After how many weeks will she have saved 210 dollars?",
    "A class of 28 students splits into teams of 4. How many teams are there?",
    "A farmer collects 126 eggs and packs them in cartons of 12. How many full cartons does he fill?",
    "Liam runs 5 kilometers on Monday, twice as far on Tuesday and 3 on Wednesday. What is the total?",
    "A shop sells pencils in packs of 8. How many packs are needed for 100 pencils?",
    "The temperature was 14 degrees in the morning and rose by 9 degrees by the afternoon. What was it then?",
    "A recipe needs 3 cups of flour for 24 cookies. How many cups are needed for 72 cookies?",
    "Ana has 3 times as many stickers as Ben, who has 17. How many stickers do they have together?",
    "A parking lot has 5 levels with 40 spaces each, and 137 cars are parked. How many spaces are free?",
    "A water tank holds 500 liters and loses 35 liters a day. How much water is left after 8 days?",
    "Jack earns 18 dollars an hour and works 6 hours a day for 5 days. How much does he earn?",
)


# ----------------------------------------------------------------------------------------------------------
# Logging as PACE's utils.py formats it: "22-Nov-26 16:03:05.304 I benchmark_llm_offline.py:383 name: msg"


class _PaceFormatter(logging.Formatter):
    """PACE's single-letter level format; the file is named as upstream's script, which this stands in for."""

    def format(self, record: logging.LogRecord) -> str:
        record.levelchar = record.levelname[:1] or "?"
        record.filename = UPSTREAM_SCRIPT
        return super().format(record)


def make_logger(stream: Any = None) -> logging.Logger:
    """The `pace-llm-benchmark` logger, PACE's format, on stderr (upstream also tees to a file in the cwd)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(
        _PaceFormatter(
            fmt="%(asctime)s.%(msecs)03d %(levelchar)s %(filename)s:%(lineno)d %(name)s: %(message)s",
            datefmt="%d-%b-%y %H:%M:%S",
        )
    )
    logger.addHandler(handler)
    return logger


# ----------------------------------------------------------------------------------------------------------
# Config: upstream's JSON fields and checks (arguments.py verify_args), each failure one line


class ConfigError(Exception):
    """A config that upstream would refuse; the message names the file and field."""


class FrameworkUnavailable(Exception):
    """A framework that cannot run on this host; the message says why and what to install."""


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """The JSON config's fields, typed."""

    frameworks: tuple[str, ...]
    model_name: str
    dtype: str
    llm_operators: dict[str, str]
    spec_config: dict[str, Any] | None
    use_real_data: bool
    input_tokens: int
    output_tokens: int
    batch_size: int
    num_beams: int
    kv_cache_type: str
    do_sample: bool
    manual_seed: int
    warmup_runs: int
    num_runs: int
    verbose: bool
    output_dir: str | None
    time_to_first_token: bool
    time_per_tokens: bool
    system_metrics: bool

    @property
    def torch_dtype(self) -> torch.dtype:
        """bf16 is bfloat16, anything else float32 (upstream's rule)."""
        return torch.bfloat16 if self.dtype == "bf16" else torch.float32

    @property
    def token_metrics(self) -> bool:
        return self.time_to_first_token or self.time_per_tokens


def _field(
    doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = ...
) -> Any:
    """doc[key] checked against `kind`, or `default` when absent (no default: a missing field is an error)."""
    if key not in doc:
        if default is not ...:
            return default
        raise ConfigError(f"{where}{key}: missing; see the seed's example config")
    value = doc[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # JSON true is not an integer here, though Python's bool is one.
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(f"{where}{key}: expected {_kind_name(kinds)}, got {json.dumps(value)}")
    if not isinstance(value, kinds):
        raise ConfigError(f"{where}{key}: expected {_kind_name(kinds)}, got {json.dumps(value)[:60]}")
    return value


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {bool: "true or false", int: "an integer", str: "a string", dict: "an object", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def parse_config(doc: object, path: str) -> BenchConfig:
    """Validate a parsed config like upstream's verify_args; raises ConfigError naming `path`, field."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a JSON object like the seed's example config")
    where = f"{path}: "
    frameworks = doc.get("frameworks")
    if not isinstance(frameworks, list):
        frameworks = [frameworks]  # upstream accepts a single framework name
    for fw in frameworks:
        if fw in UPSTREAM_ONLY:
            raise ConfigError(f"{where}frameworks: {fw!r} runs only with upstream's script; this "
                              f"stand-in runs {' and '.join(FRAMEWORKS)}")
        if fw not in FRAMEWORKS:
            raise ConfigError(f"{where}frameworks: unsupported framework {json.dumps(fw)}; expected 'hf', "
                              "'pace' (upstream also 'vllm', 'vllm_zentorch', 'zentorch')")
    model = _field(doc, "model_args", dict, where)
    gen = _field(doc, "generation_args", dict, where)
    tokens = _field(doc, "token_metrics", dict, where)
    operators = _field(model, "llm_operators", dict, f"{where}model_args.", {})
    for key, value in operators.items():
        if not isinstance(value, str):
            raise ConfigError(f"{where}model_args.llm_operators.{key}: expected a backend name like \"TPP\"")
    spec = _field(model, "spec_config", (dict, type(None)), f"{where}model_args.", None)
    if spec is not None and not {"model_name", "num_speculated_tokens"} <= set(spec):
        raise ConfigError(f"{where}model_args.spec_config: must contain 'model_name' and "
                          "'num_speculated_tokens'")
    g = f"{where}generation_args."
    cfg = BenchConfig(
        frameworks=tuple(frameworks),
        model_name=_field(model, "model_name", str, f"{where}model_args."),
        dtype=_field(model, "dtype", str, f"{where}model_args."),
        llm_operators=dict(operators),
        spec_config=spec,
        use_real_data=_field(doc, "use_real_data", bool, where),
        input_tokens=_field(gen, "input_tokens", int, g),
        output_tokens=_field(gen, "output_tokens", int, g),
        batch_size=_field(gen, "batch_size", int, g),
        num_beams=_field(gen, "num_beams", int, g, 1),
        kv_cache_type=_field(gen, "kv_cache_type", str, g),
        do_sample=_field(gen, "do_sample", bool, g),
        manual_seed=_field(gen, "manual_seed", int, g),
        warmup_runs=_field(doc, "warmup_runs", int, where),
        num_runs=_field(doc, "num_runs", int, where),
        verbose=_field(doc, "verbose", bool, where),
        output_dir=_field(doc, "output_dir", (str, type(None)), where) or None,
        time_to_first_token=_field(tokens, "time_to_first_token", bool, f"{where}token_metrics."),
        time_per_tokens=_field(tokens, "time_per_tokens", bool, f"{where}token_metrics."),
        system_metrics=_field(doc, "system_metrics", bool, where),
    )
    for name in ("input_tokens", "output_tokens", "batch_size", "num_beams"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{g}{name}: must be a positive integer")
    if cfg.manual_seed < 0:
        raise ConfigError(f"{g}manual_seed: must be a non-negative integer")
    if cfg.kv_cache_type not in KV_CACHE_TYPES:
        raise ConfigError(f"{g}kv_cache_type: must be one of {', '.join(KV_CACHE_TYPES)}")
    if cfg.num_runs < 1:
        raise ConfigError(f"{where}num_runs: must be a positive integer")
    if cfg.warmup_runs < 0:
        raise ConfigError(f"{where}warmup_runs: must be a non-negative integer")
    if cfg.input_tokens + cfg.output_tokens > MAX_POSITIONS:
        raise ConfigError(f"{g}input_tokens + output_tokens: at most {MAX_POSITIONS} for the tiny model")
    if cfg.output_dir is not None and not os.path.exists(os.path.dirname(cfg.output_dir)):
        # Upstream's check, kept as is: "results" alone fails (its dirname is ""), "./results" works.
        raise ConfigError(f"{where}output_dir: invalid path {cfg.output_dir!r}: its parent directory must "
                          "exist (write ./name for a folder in the working directory)")
    if not cfg.verbose and cfg.output_dir is None:
        raise ConfigError(f"{where}verbose/output_dir: set verbose to true or give an output_dir, or "
                          "nothing is reported")
    return cfg


def load_config(path: str) -> BenchConfig:
    """Read and validate the JSON config file; raises ConfigError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"{path}: cannot read the config ({reason}); pass --config FILE") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return parse_config(doc, path)


# ----------------------------------------------------------------------------------------------------------
# Can the frameworks run here? Checked before any runs, like upstream's check_if_lib_available.


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo, or None where it cannot be read."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return frozenset(m[1].split()) if m else None


def pace_cpu_problem(flags: frozenset[str] | None) -> str | None:
    """Why amd-pace cannot run on a CPU with `flags` (it needs AVX512F and AVX512_BF16); None if it can."""
    if flags is None:
        return "cannot read the CPU flags from /proc/cpuinfo (amd-pace needs an x86-64 CPU with AVX512_BF16)"
    missing = [f for f in PACE_CPU_FLAGS if f not in flags]
    if missing:
        return f"this CPU lacks {' and '.join(missing)} (amd-pace 1.3.0 needs AVX512F and AVX512_BF16)"
    return None


def _import(module: str, framework: str, install: str) -> Any:
    """Import `module` for `framework`, or raise FrameworkUnavailable with the reason in one line."""
    try:
        return importlib.import_module(module)
    except Exception as exc:  # a broken native library raises OSError/RuntimeError, not only ImportError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FrameworkUnavailable(f"framework {framework} cannot run on this host: importing {module} "
                                   f"failed ({reason}); {install}") from None


def check_frameworks(cfg: BenchConfig, source: str) -> None:
    """Raise FrameworkUnavailable (one line) if a requested framework cannot run here, before anything runs;
    ConfigError (naming `source`) for operator names PACE does not know."""
    first = "hf" if "hf" in cfg.frameworks else "pace"
    _import("transformers", first, "pip install 'transformers>=5' tokenizers")
    if "pace" in cfg.frameworks:
        problem = pace_cpu_problem(cpu_flags())
        if problem is not None:
            raise FrameworkUnavailable(f"framework pace cannot run on this host: {problem}")
        _import("pace", "pace", PACE_INSTALL)
        try:
            convert_operators(cfg.llm_operators)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


def convert_operators(operators: Mapping[str, str]) -> dict[Any, Any]:
    """PACE's operator-to-backend enums from the config's names, as upstream converts them."""
    ops = importlib.import_module("pace.llm.ops")
    attention = importlib.import_module("pace.llm.attention")
    out: dict[Any, Any] = {}
    for key, value in operators.items():
        op_names = [op.value for op in ops.LLMOperatorType]
        if key.lower() not in op_names:
            raise ConfigError(f"model_args.llm_operators.{key}: unsupported operator; expected one of "
                              f"{op_names}")
        op = ops.LLMOperatorType(key.lower())
        is_attention = op == ops.LLMOperatorType.Attention
        backends = attention.AttentionBackendType if is_attention else ops.LLMBackendType
        names = [b.value for b in backends]
        if value.lower() not in names:
            raise ConfigError(f"model_args.llm_operators.{key}: unsupported backend {value!r}; expected one "
                              f"of {names}")
        out[op] = backends(value.lower())
    return out


# ----------------------------------------------------------------------------------------------------------
# The tiny model: a random Llama and a BPE tokenizer trained on QUESTIONS, saved with save_pretrained


def model_path(model_dir: Path, model_name: str) -> Path:
    """Where the tiny stand-in for `model_name` lives: a readable label plus a hash of the name."""
    key = hashlib.sha256(f"{FORMAT_VERSION}\0{model_name}".encode()).hexdigest()[:12]
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name.rstrip("/").rsplit("/", 1)[-1])[:40] or "llm"
    return model_dir / f"pace-{label}-{key}"


def build_tiny_model(target: Path, model_name: str) -> None:
    """Write a tiny random LlamaForCausalLM and its tokenizer into `target` (a new directory); ~0.5 s."""
    transformers = importlib.import_module("transformers")
    tokenizers = importlib.import_module("tokenizers")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(QUESTIONS), trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    seed = int(hashlib.sha256(f"{FORMAT_VERSION}\0{model_name}\0weights".encode()).hexdigest()[:8], 16)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    (target / "benchfleet-tiny-model.json").write_text(
        json.dumps({"stands_in_for": model_name, "format": FORMAT_VERSION}) + "\n", encoding="utf-8"
    )


def resolve_model(
    model_name: str,
    model_dir: Path,
    log: Callable[[str], None],
    build: Callable[[Path, str], None] = build_tiny_model,
) -> Path:
    """A local model directory as is, else the cached tiny stand-in, built under a file lock on first use."""
    given = Path(model_name).expanduser()
    if (given / "config.json").is_file():
        return given
    path = model_path(model_dir, model_name)
    if (path / "config.json").is_file():
        return path
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115 - held for the whole build
    except OSError as exc:
        reason = exc.strerror or str(exc)
        message = f"{model_dir}: cannot create the model cache ({reason}); pass --model-dir"
        raise ConfigError(message) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent first use waits here, then uses what the winner saved
        if (path / "config.json").is_file():
            return path
        log(f"Building the tiny stand-in model for {model_name} into {path} (first use)")
        tmp = Path(tempfile.mkdtemp(dir=model_dir, prefix=path.name + ".", suffix=".tmp"))
        try:
            build(tmp, model_name)
            shutil.rmtree(path, ignore_errors=True)  # a half-written directory without config.json
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


# ----------------------------------------------------------------------------------------------------------
# Inputs (upstream's data.py BenchMarkDataGenerator)


class DataGenerator:
    """Batches of `input_tokens` tokens: one random sequence repeated `batch_size` times, or left-padded
    questions (upstream tokenizes openai/gsm8k, the stand-in QUESTIONS). Each call picks a random batch."""

    def __init__(self, tokenizer: Any, cfg: BenchConfig, max_iter: int, log: logging.Logger) -> None:
        transformers = importlib.import_module("transformers")
        tqdm = importlib.import_module("tqdm")
        self._rng = random.Random(cfg.manual_seed)
        self.batches: list[Any] = []
        bs, n = cfg.batch_size, cfg.input_tokens
        if not cfg.use_real_data:
            log.info(f"Generating random input of {n} tokens for {bs} samples")
            ids = torch.tensor([self._rng.choices(list(tokenizer.get_vocab().values()), k=n)] * bs)
            mask = torch.ones_like(ids)
            self.batches.append(transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask}))
        else:
            tokenizer.padding_side = "left"
            log.info(f"Generating real data input of {n} tokens for {bs} batch size using built-in "
                     "arithmetic questions (stand-in for openai/gsm8k: vmain).")
            for idx in tqdm.tqdm(range(max_iter + 1), desc="Tokenizing data", total=max_iter):
                questions = [QUESTIONS[(idx * bs + j) % len(QUESTIONS)] for j in range(bs)]
                encoded = tokenizer(questions, padding="max_length", truncation=True, max_length=n,
                                    return_tensors="pt")
                self.batches.append(encoded)
        log.info(f"Data generator initialized with {len(self.batches)} samples")

    def next(self) -> Any:
        return self.batches[self._rng.randrange(len(self.batches))]


# ----------------------------------------------------------------------------------------------------------
# Measurement (upstream's metrics.py)


class TokenLatencyStreamer:
    """Time between consecutive `put` calls of generate: the first put is the prompt, each later a token."""

    def __init__(self, log: logging.Logger) -> None:
        log.warning(
            "Using TokenLatencyStreamer for monitoring token generation times, this might affect the "
            "performance,as it uses some system resources to monitor the token generation times."
            " PLEASE DISABLE FOR ABSOLUTE PERFORMANCE BENCHMARKING"
        )
        self.start_time: float | None = None
        self.time_per_tokens: list[float] = []
        self.end_time_first_token: float | None = None

    def put(self, value: object) -> None:
        now = time.perf_counter()
        if self.start_time is None:
            self.time_per_tokens = []
            self.start_time = now
            return
        if not self.time_per_tokens:
            self.end_time_first_token = now
        self.time_per_tokens.append(now - self.start_time)
        self.start_time = now

    def end(self) -> None:
        self.start_time = None


class SystemMonitor:
    """CPU % and RAM use (MB above the level at start) sampled by psutil every `interval` s in a thread."""

    def __init__(self, log: logging.Logger, interval: float = 1.0) -> None:
        log.warning(
            "Using SystemMonitor for monitoring system resources, this might affect the performance,"
            "as it uses some system resources to monitor the CPU and RAM usage."
            " PLEASE DISABLE FOR ABSOLUTE PERFORMANCE BENCHMARKING"
        )
        self._log = log
        self.interval = interval
        log.info(f"SystemMonitor initialized with interval: {interval} seconds.")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cpu_usage: list[float] = []
        self.ram_usage: list[float] = []
        self._initial_ram = float(psutil.virtual_memory().used)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.ram_usage.append(float(psutil.virtual_memory().used))
            self.cpu_usage.append(float(psutil.cpu_percent()))
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        self._log.info("SystemMonitor started in the background.")

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._log.info("SystemMonitor stopped.")
        self.ram_usage = [(x - self._initial_ram) / (1024 * 1024) for x in self.ram_usage]

    def history(self) -> dict[str, object]:
        return {"interval": self.interval, "cpu_usage": self.cpu_usage, "ram_usage": self.ram_usage,
                "peak_ram_usage": max(self.ram_usage)}


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """One generate call: wall time, sequence lengths (prompt included), and the streamer's token timings."""

    total_time: float
    input_tokens: int
    total_tokens: int
    ttft: float | None
    time_per_tokens: list[float] | None


def calculate_metrics(
    batch_size: int, outputs: Sequence[GenerationOutput], cfg: BenchConfig
) -> dict[str, object]:
    """Upstream's formulas: token counts are sequence lengths summed over runs, times the batch size; rates
    divide by the summed generation time; per-token times are averaged position by position over the runs."""
    times = [o.total_time for o in outputs]
    total_tokens = batch_size * sum(o.total_tokens for o in outputs)
    gen_tokens = batch_size * sum(o.total_tokens - o.input_tokens for o in outputs)
    ttfts = [o.ttft for o in outputs if o.ttft is not None]
    per_token = [o.time_per_tokens for o in outputs if o.time_per_tokens is not None]
    return {
        "total_tokens": total_tokens,
        "total_gen_tokens": gen_tokens,
        "average_gen_time": sum(times) / len(times),
        "average_latency_per_token": sum(times) / total_tokens,
        "total_tps": total_tokens / sum(times),
        "output_tps": gen_tokens / sum(times),
        "average_ttft": sum(ttfts) / len(ttfts) if ttfts else None,
        "time_per_tokens": torch.tensor(per_token).mean(dim=0).tolist() if per_token else None,
    }


# ----------------------------------------------------------------------------------------------------------
# Frameworks


class Framework(Protocol):
    def generate(self, inputs: Any) -> GenerationOutput: ...


def _timings(
    streamer: TokenLatencyStreamer | None, start: float, cfg: BenchConfig
) -> tuple[float | None, list[float] | None]:
    """Time to first token and per-token times of the last generate, each only when the config asks for it."""
    ttft = None
    if streamer is not None and cfg.time_to_first_token and streamer.end_time_first_token is not None:
        ttft = streamer.end_time_first_token - start
    per_token = list(streamer.time_per_tokens) if streamer is not None and cfg.time_per_tokens else None
    return ttft, per_token


class HuggingFaceFramework:
    """transformers' AutoModelForCausalLM.generate, greedy or sampled, exactly output_tokens new tokens."""

    def __init__(self, path: Path, cfg: BenchConfig, log: logging.Logger) -> None:
        transformers = importlib.import_module("transformers")
        self.cfg = cfg
        self.model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=cfg.torch_dtype)
        transformers.set_seed(cfg.manual_seed)
        self.streamer = TokenLatencyStreamer(log) if cfg.token_metrics else None
        self.kwargs: dict[str, object] = {
            "max_new_tokens": cfg.output_tokens,
            "min_new_tokens": cfg.output_tokens,
            "streamer": self.streamer,
            "do_sample": cfg.do_sample,
        }

    def generate(self, inputs: Any) -> GenerationOutput:
        ids = inputs["input_ids"]
        start = time.perf_counter()
        out = self.model.generate(ids, attention_mask=inputs["attention_mask"], **self.kwargs)
        end = time.perf_counter()
        ttft, per_token = _timings(self.streamer, start, self.cfg)
        return GenerationOutput(end - start, int(ids.shape[1]), int(out.shape[1]), ttft, per_token)


class PaceFramework:
    """amd-pace's LLMModel(path).generate with the config's KV cache type and operator backends."""

    def __init__(self, path: Path, cfg: BenchConfig, log: logging.Logger) -> None:
        llm = importlib.import_module("pace.llm")
        pace_logging = importlib.import_module("pace.utils.logging")
        kinds = llm.KVCacheType
        caches = {"BMC": kinds.BMC, "SLAB_POOL": kinds.SLAB_POOL, "PAGED": kinds.PAGED}
        if cfg.spec_config is not None:
            log.warning("spec_config (PARD speculative decoding) is not emulated by this stand-in; "
                        "running without it")
        self.cfg = cfg
        self.model = llm.LLMModel(
            str(path),
            dtype=cfg.torch_dtype,
            kv_cache_type=caches.get(cfg.kv_cache_type.upper(), kinds.DYNAMIC),
            opconfig=llm.OperatorConfig(**convert_operators(cfg.llm_operators)),
        )
        self.streamer = TokenLatencyStreamer(log) if cfg.token_metrics else None
        self.sampling = llm.SamplingConfig(
            max_new_tokens=cfg.output_tokens,
            min_new_tokens=cfg.output_tokens,
            do_sample=cfg.do_sample,
            temperature=torch.rand(1).item() if cfg.do_sample else 0,
            seed=cfg.manual_seed,
        )
        # PACE logs its sampling config at every generate; upstream silences it around the call.
        self._generate = pace_logging.suppress_logging_fn(self.model.generate)

    def generate(self, inputs: Any) -> GenerationOutput:
        start = time.perf_counter()
        out = self._generate(inputs, self.sampling, text_streamer=self.streamer)
        end = time.perf_counter()
        ttft, per_token = _timings(self.streamer, start, self.cfg)
        prompt, total = int(inputs["input_ids"].shape[1]), int(out.output_token_ids.shape[1])
        return GenerationOutput(end - start, prompt, total, ttft, per_token)


def _make_framework(name: str, path: Path, cfg: BenchConfig, log: logging.Logger) -> Framework:
    if name == "pace":
        return PaceFramework(path, cfg, log)
    return HuggingFaceFramework(path, cfg, log)


# ----------------------------------------------------------------------------------------------------------
# The benchmark (upstream's benchmark() and main())


def _operators_for_json(cfg: BenchConfig) -> dict[str, str]:
    """Upstream converts the operator names to PACE's lower-case enums when pace runs, and dumps those."""
    if "pace" in cfg.frameworks:
        return {k.lower(): v.lower() for k, v in cfg.llm_operators.items()}
    return dict(cfg.llm_operators)


def model_args_json(cfg: BenchConfig) -> dict[str, object]:
    """Upstream's ModelArgs as it dumps them (dtype as torch prints it)."""
    return {"model_name": cfg.model_name, "dtype": str(cfg.torch_dtype),
            "llm_operators": _operators_for_json(cfg), "spec_config": cfg.spec_config}


def generation_args_json(cfg: BenchConfig) -> dict[str, object]:
    """Upstream's GenerationArgs as it dumps them (it dropped num_beams)."""
    return {"input_tokens": cfg.input_tokens, "output_tokens": cfg.output_tokens,
            "batch_size": cfg.batch_size, "kv_cache_type": cfg.kv_cache_type, "do_sample": cfg.do_sample,
            "manual_seed": cfg.manual_seed}


def benchmark(framework: str, cfg: BenchConfig, path: Path, log: logging.Logger,
              system_interval: float) -> dict[str, object]:
    """Warm-up runs, then timed runs of one framework; its entry of `benchmark_results`."""
    tqdm = importlib.import_module("tqdm")
    transformers = importlib.import_module("transformers")
    log.info(f"Running benchmark for model: {cfg.model_name} using {framework} framework")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:  # some models have none
        tokenizer.pad_token = tokenizer.eos_token
    data = DataGenerator(tokenizer, cfg, cfg.warmup_runs + cfg.num_runs, log)
    monitor = SystemMonitor(log, system_interval) if cfg.system_metrics else None
    if monitor is not None:
        monitor.start()  # before the model loads, as upstream does
    model = _make_framework(framework, path, cfg, log)
    log.info("Performing warm-up runs...")
    for _ in tqdm.tqdm(range(cfg.warmup_runs), desc="Warming up"):
        model.generate(data.next())
    log.info("Warm-up complete.")
    outputs: list[GenerationOutput] = []
    log.info("Starting timed runs...")
    for _ in tqdm.tqdm(range(cfg.num_runs), desc="Benchmarking"):
        outputs.append(model.generate(data.next()))
    log.info("Timed runs complete.")
    if monitor is not None:
        monitor.stop()
    entry: dict[str, object] = {
        "framework": framework,
        "metrics": calculate_metrics(cfg.batch_size, outputs, cfg),
        "system_metrics": monitor.history() if monitor is not None else None,
    }
    if cfg.verbose:
        shown = {"framework": framework, "model_args": model_args_json(cfg),
                 "generation_args": generation_args_json(cfg), "num_runs": cfg.num_runs,
                 "warmup_runs": cfg.warmup_runs, **entry}
        text = json.dumps({k: v for k, v in shown.items() if v is not None}, indent=4)
        log.info(f"Benchmark results: {text}")
    return entry


def results_document(cfg: BenchConfig, entries: Sequence[dict[str, object]]) -> dict[str, object]:
    """PACE's results JSON: the common arguments once, then one entry per framework."""
    return {"model_args": model_args_json(cfg), "generation_args": generation_args_json(cfg),
            "num_runs": cfg.num_runs, "warmup_runs": cfg.warmup_runs, "benchmark_results": list(entries)}


def results_path(cfg: BenchConfig, now: datetime.datetime) -> str:
    """Upstream's file name: <frameworks>_<model (/ as --)>_<dtype>_bs<B>_it<I>_nt<N>_<time>_results.json."""
    assert cfg.output_dir is not None
    model = cfg.model_name.replace("/", "--")
    name = (f"{'-'.join(cfg.frameworks)}_{model}_{cfg.torch_dtype}_bs{cfg.batch_size}_it{cfg.input_tokens}"
            f"_nt{cfg.output_tokens}_{now.strftime('%Y%m%d_%H%M%S')}_results.json")
    return os.path.join(cfg.output_dir, name)


# ----------------------------------------------------------------------------------------------------------
# Command line

HELP = """\
Stand-in for AMD PACE's `python benchmark_llm_offline.py --config cfg.json` (amd/AMD-PACE,
benchmarks/llm/performance), for rehearsing the offline framework comparison on any CPU machine.

It reads the same JSON config (frameworks, model_args, generation_args, warmup_runs, num_runs,
token_metrics, system_metrics, verbose, output_dir) and runs each framework for real:
  hf    transformers AutoModelForCausalLM.generate
  pace  amd-pace's pace.llm.LLMModel(path).generate (needs the amd-pace wheel, torch 2.13.0 and a CPU with
        AVX512F and AVX512_BF16; otherwise it fails with one line saying why, it is never faked)
vllm, vllm_zentorch and zentorch run only with upstream's script.

model_name is a local model directory (used as is), or else a label: a tiny random Llama (4 layers,
hidden 256) and a BPE tokenizer trained on a few lines are built for it on first use and cached in
--model-dir; nothing is downloaded. use_real_data tokenizes a few built-in arithmetic questions (upstream:
openai/gsm8k); spec_config is not emulated (a warning, then plain decoding).

Output as upstream's: log lines "dd-Mon-yy HH:MM:SS.mmm I benchmark_llm_offline.py:N pace-llm-benchmark:
message" and tqdm bars (Warming up, Benchmarking) on stderr, and the results JSON written to output_dir as
<frameworks>_<model>_<dtype>_bs<B>_it<I>_nt<N>_<timestamp>_results.json, last line "Results saved to: PATH".
Metrics use upstream's formulas (token counts are summed over the timed runs and times the batch size).
Unlike upstream it writes no pace_llm_benchmark.log in the working directory and does not sleep 5 s after
each framework.
"""


def build_parser() -> argparse.ArgumentParser:
    """Upstream's --config/-c, plus where the tiny models are cached and the system-monitor interval."""
    p = argparse.ArgumentParser(
        prog=PROG, description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", "-c", required=True, help="path to the JSON config (upstream's format)")
    p.add_argument("--model-dir", default=DEFAULT_MODEL_DIR, help="where the tiny stand-in models are cached")
    p.add_argument("--system-interval", type=float, default=1.0,
                   help="seconds between system_metrics samples (upstream: 1)")
    return p


def _fail(message: str, code: int) -> NoReturn:
    print(f"{PROG}: {message}", file=sys.stderr)
    sys.exit(code)


def _quiet_transformers() -> None:
    """Keep transformers' advisory warnings (generation flags, deprecations) out of the benchmark log."""
    importlib.import_module("transformers").logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.system_interval <= 0:
        _fail("--system-interval: expected a positive number of seconds", 2)
    log = make_logger()
    try:
        cfg = load_config(args.config)
        check_frameworks(cfg, args.config)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except FrameworkUnavailable as exc:
        _fail(str(exc), 1)
    _quiet_transformers()
    try:
        path = resolve_model(cfg.model_name, Path(args.model_dir).expanduser(), log.info)
    except ConfigError as exc:
        _fail(str(exc), 1)
    entries = [benchmark(fw, cfg, path, log, args.system_interval) for fw in cfg.frameworks]
    if cfg.output_dir is not None:
        os.makedirs(cfg.output_dir, exist_ok=True)
        out = results_path(cfg, datetime.datetime.now())
        with open(out, "w", encoding="utf-8") as f:
            json.dump(results_document(cfg, entries), f, indent=4)
        log.info(f"Results saved to: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
