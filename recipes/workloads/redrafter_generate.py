"""CPU stand-in for ReDrafter's ``python3 -m recurrent_drafting.cmd.generate`` (the beam-grid sweep's task).

It accepts the upstream flags, runs real speculative decoding (a recurrent drafter beam-searches candidates, a
target LM verifies them in one batched pass) on tiny randomly initialised models built locally, and prints the
upstream summary table, so sweeps can be rehearsed on machines without GPUs or model downloads.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, NoReturn

import torch
import torch.nn.functional as F
from torch import nn

# Caps that keep one task at a few seconds on one CPU core; the real flags are accepted and capped here.
PROMPT_LENGTH_CAP = 16
GENERATION_LENGTH_CAP = 64
MAX_BEAM_WIDTH = 64
MAX_BEAM_LENGTH = 32
MT_BENCH_PROMPTS = 80  # upstream reads HuggingFaceH4/mt_bench_prompts, which has 80 prompts
DEFAULT_MODEL_DIR = "~/.cache/benchfleet/tiny-models"
FORMAT_VERSION = "tiny-redrafter-v1"  # part of the cache key: bump when architecture or distillation changes

KV = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    """Sizes of the tiny target LM and its recurrent drafter."""

    vocab: int = 512
    d_model: int = 192
    n_layers: int = 3
    n_heads: int = 4
    d_ff: int = 768
    max_positions: int = 128
    d_draft: int = 64
    d_draft_head: int = 128


# ---------------------------------------------------------------------------------------------------------------
# Models


class _Block(nn.Module):
    """Pre-norm transformer block whose attention can also attend to keys/values of an earlier prefix."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ff1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.ff2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, past: KV | None) -> tuple[torch.Tensor, KV]:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        att = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None])
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        x = x + self.ff2(F.gelu(self.ff1(self.ln2(x))))
        return x, (k, v)


class TinyLM(nn.Module):
    """Decoder-only causal transformer: the target model whose greedy output speculation must reproduce."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_positions, cfg.d_model)
        # Small position embeddings keep hidden states alike across positions, so a drafter distilled on short
        # continuations stays accurate at later positions.
        nn.init.normal_(self.pos.weight, std=0.1)
        self.blocks = nn.ModuleList([_Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(cfg.d_model)
        # Untied: a tied random head makes every token predict itself, so greedy output would repeat one token.
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, past: list[KV] | None = None
    ) -> tuple[torch.Tensor, list[KV]]:
        """Hidden states [B, T, D] of `tokens`, plus each layer's keys/values for them (to serve as a prefix).

        `mask` [B, T, P+T] says which of the P prefix keys and T own keys each token may attend to.
        """
        x = self.tok(tokens) + self.pos(positions)
        present: list[KV] = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, mask, None if past is None else past[i])
            present.append(kv)
        hidden: torch.Tensor = self.ln_f(x)
        return hidden, present

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from hidden states."""
        logits: torch.Tensor = self.head(hidden)
        return logits


class RecurrentDrafter(nn.Module):
    """ReDrafter-style drafter: a GRU over draft tokens, conditioned on the target's last hidden state."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab, cfg.d_draft)
        self.init = nn.Linear(cfg.d_model, cfg.d_draft)
        self.cell = nn.GRUCell(cfg.d_draft, cfg.d_draft)
        self.head = nn.Sequential(
            nn.Linear(cfg.d_draft + cfg.d_model, cfg.d_draft_head), nn.SiLU(), nn.Linear(cfg.d_draft_head, cfg.vocab)
        )

    def start(self, hidden: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """RNN state after reading `token`, the target's pending token, whose context `hidden` [N, D] summarises."""
        return self.advance(torch.tanh(self.init(hidden)), token)

    def advance(self, state: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """RNN state after reading one more token."""
        new_state: torch.Tensor = self.cell(self.emb(token), state)
        return new_state

    def log_probs(self, state: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the next draft token."""
        return F.log_softmax(self.head(torch.cat([state, hidden], -1)).float(), -1)

    def beam_search(self, hidden: torch.Tensor, token: torch.Tensor, width: int, length: int) -> torch.Tensor:
        """Beams [N, width, length]: the pending `token` followed by length-1 drafted tokens, best first."""
        n = token.shape[0]
        head = token[:, None, None].expand(n, width, 1)
        if length == 1:
            return head.contiguous()
        state = self.start(hidden, token)
        scores, first = self.log_probs(state, hidden).topk(width, -1)  # [N, W]
        seqs = first[:, :, None]
        states = state[:, None, :].expand(n, width, state.shape[-1])
        hiddens = hidden[:, None, :].expand(n, width, hidden.shape[-1])
        vocab = self.cfg.vocab
        for _ in range(length - 2):
            states = self.advance(states.reshape(n * width, -1), seqs[:, :, -1].reshape(-1)).view(n, width, -1)
            total = (scores[:, :, None] + self.log_probs(states, hiddens)).view(n, width * vocab)
            scores, flat = total.topk(width, -1)
            parent, tok = flat // vocab, flat % vocab
            seqs = torch.cat([seqs.gather(1, parent[:, :, None].expand(-1, -1, seqs.shape[2])), tok[:, :, None]], 2)
            states = states.gather(1, parent[:, :, None].expand(-1, -1, states.shape[2]))
        return torch.cat([head, seqs], 2)


# ---------------------------------------------------------------------------------------------------------------
# Masks and padding


def _prefix_mask(real: torch.Tensor) -> torch.Tensor:
    """Causal self-attention mask [B, T, T] over left-padded rows; pads see only themselves (no empty rows)."""
    t = real.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=real.device).tril()
    eye = torch.eye(t, dtype=torch.bool, device=real.device)
    return (causal[None] & real[:, None, :]) | eye[None]


def _positions(real: torch.Tensor) -> torch.Tensor:
    """Position ids counted from each row's first real token (pads get 0)."""
    return (real.long().cumsum(1) - 1).clamp(min=0)


def _left_pad(seqs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-aligned token matrix [B, T] and its real-token mask, as upstream keeps input_ids."""
    width = max(int(s.shape[0]) for s in seqs)
    tokens = torch.zeros(len(seqs), width, dtype=torch.long, device=seqs[0].device)
    real = torch.zeros(len(seqs), width, dtype=torch.bool, device=seqs[0].device)
    for i, s in enumerate(seqs):
        tokens[i, width - s.shape[0] :] = s
        real[i, width - s.shape[0] :] = True
    return tokens, real


# ---------------------------------------------------------------------------------------------------------------
# Decoding


@torch.inference_mode()
def greedy_decode(lm: TinyLM, prompt: torch.Tensor, n_new: int) -> torch.Tensor:
    """Plain greedy decoding of one prompt, recomputing the whole sequence each token: the reference output."""
    seq = prompt
    for _ in range(n_new):
        real = torch.ones(1, seq.shape[0], dtype=torch.bool, device=seq.device)
        hidden, _ = lm(seq[None], _positions(real), _prefix_mask(real))
        seq = torch.cat([seq, lm.logits(hidden[0, -1]).argmax(-1, keepdim=True)])
    return seq[prompt.shape[0] :]


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One decoding step of one batch: draft tokens accepted (mean over the batch) and each phase's wall time."""

    accepted: float
    generate_candidates: float
    verify_candidates: float
    accept_candidate_tokens: float


class _PhaseClock:
    """Times decoding phases like upstream's stats.Step.time (synchronising CUDA around each phase)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def time(self, phase: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds[phase] = time.perf_counter() - start


@torch.inference_mode()
def speculative_generate(
    lm: TinyLM,
    drafter: RecurrentDrafter,
    prompts: Sequence[torch.Tensor],
    n_new: int,
    beam_width: int,
    beam_length: int,
    records: list[StepRecord] | None = None,
) -> list[torch.Tensor]:
    """Greedy decoding of a batch of prompts, sped up by recurrent drafting; returns n_new tokens per prompt.

    Each step the drafter beam-searches `beam_width` beams of `beam_length` tokens (the target's pending token and
    beam_length-1 drafts), the target scores every beam in one batched pass over the shared prefix, and the beam
    with the longest prefix agreeing with the target's greedy choices is accepted, plus the target's next token.
    """
    device = prompts[0].device
    committed = list(prompts)
    tokens, real = _left_pad(committed)
    hidden, _ = lm(tokens, _positions(real), _prefix_mask(real))
    h_star = hidden[:, -1]  # target state at each row's last committed token
    t_star = lm.logits(h_star).argmax(-1)  # the target's greedy next token, committed by the next step
    produced = [0] * len(prompts)
    causal = torch.ones(beam_length, beam_length, dtype=torch.bool, device=device).tril()
    while True:
        active = [i for i, n in enumerate(produced) if n < n_new]
        if not active:
            break
        rows = torch.tensor(active, device=device)
        clock = _PhaseClock(device)
        with clock.time("generate_candidates"):
            beams = drafter.beam_search(h_star[rows], t_star[rows], beam_width, beam_length)  # [A, W, L]
        with clock.time("verify_candidates"):
            tokens, real = _left_pad([committed[i] for i in active])
            _, past = lm(tokens, _positions(real), _prefix_mask(real))
            past = [(k.repeat_interleave(beam_width, 0), v.repeat_interleave(beam_width, 0)) for k, v in past]
            n_rows = len(active) * beam_width
            lengths = real.sum(1).repeat_interleave(beam_width)
            mask = torch.cat(
                [
                    real.repeat_interleave(beam_width, 0)[:, None, :].expand(n_rows, beam_length, -1),
                    causal[None].expand(n_rows, -1, -1),
                ],
                2,
            )
            positions = lengths[:, None] + torch.arange(beam_length, device=device)
            cand_hidden, _ = lm(beams.reshape(n_rows, beam_length), positions, mask, past)
            predicted = lm.logits(cand_hidden).argmax(-1).view(len(active), beam_width, beam_length)
        with clock.time("accept_candidate_tokens"):
            agree = (beams[:, :, 1:] == predicted[:, :, :-1]).long().cumprod(-1).sum(-1)  # [A, W]
            best = agree.argmax(-1)
            pick = torch.arange(len(active), device=device)
            n_accepted = agree[pick, best]
            chosen = beams[pick, best]
            cand_hidden = cand_hidden.view(len(active), beam_width, beam_length, -1)[pick, best, n_accepted]
            next_tokens = predicted[pick, best, n_accepted]
            for j, i in enumerate(active):
                a = int(n_accepted[j])
                committed[i] = torch.cat([committed[i], chosen[j, : a + 1]])
                produced[i] += a + 1
            h_star = h_star.clone()
            t_star = t_star.clone()
            h_star[rows] = cand_hidden.to(h_star.dtype)
            t_star[rows] = next_tokens
        if records is not None:
            records.append(
                StepRecord(
                    float(n_accepted.float().mean()),
                    clock.seconds["generate_candidates"],
                    clock.seconds["verify_candidates"],
                    clock.seconds["accept_candidate_tokens"],
                )
            )
    return [seq[p.shape[0] : p.shape[0] + n_new] for seq, p in zip(committed, prompts, strict=True)]


# ---------------------------------------------------------------------------------------------------------------
# Building, distilling and caching the tiny models


def _seed_of(*parts: str) -> int:
    return int(hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8], 16)


@torch.inference_mode()
def _greedy_continuations(lm: TinyLM, prompts: torch.Tensor, n_new: int) -> torch.Tensor:
    """Greedy continuations of equal-length prompts [N, P] with an incremental key/value cache (fast)."""
    n, p = prompts.shape
    real = torch.ones(n, p, dtype=torch.bool)
    hidden, past = lm(prompts, _positions(real), _prefix_mask(real))
    seq = [prompts, lm.logits(hidden[:, -1:]).argmax(-1)]
    for step in range(n_new - 1):
        length = p + step
        mask = torch.ones(n, 1, length + 1, dtype=torch.bool)
        hidden, kv = lm(seq[-1], torch.full((n, 1), length), mask, past)
        past = [(torch.cat([pk, k], 2), torch.cat([pv, v], 2)) for (pk, pv), (k, v) in zip(past, kv, strict=True)]
        seq.append(lm.logits(hidden).argmax(-1))
    return torch.cat(seq, 1)


def distil_drafter(
    lm: TinyLM, drafter: RecurrentDrafter, seed: int, steps: int = 150, unroll: int = 4
) -> float:
    """Train the drafter to predict the target's own greedy continuations of random prompts; returns final loss.

    With random weights the drafter would never agree with the target; distillation makes acceptance high enough
    that beam width and length matter, as with a trained ReDrafter.
    """
    gen = torch.Generator().manual_seed(seed)
    cfg = lm.cfg
    prompt_len, cont_len = 12, 48
    prompts = torch.randint(cfg.vocab, (128, prompt_len), generator=gen)
    seqs = _greedy_continuations(lm, prompts, cont_len)
    with torch.inference_mode():
        real = torch.ones_like(seqs, dtype=torch.bool)
        hidden, _ = lm(seqs, _positions(real), _prefix_mask(real))
    # Example at position t: target state h_t and its greedy token x_{t+1}; predict x_{t+2} .. x_{t+1+unroll}.
    starts = range(prompt_len - 1, seqs.shape[1] - 1 - unroll)
    h = torch.cat([hidden[:, t] for t in starts]).clone()
    first = torch.cat([seqs[:, t + 1] for t in starts]).clone()
    targets = torch.cat([seqs[:, t + 2 : t + 2 + unroll] for t in starts]).clone()
    opt = torch.optim.Adam(drafter.parameters(), lr=3e-3)
    loss = torch.zeros(())
    for _ in range(steps):
        idx = torch.randint(h.shape[0], (128,), generator=gen)
        state = drafter.start(h[idx], first[idx])
        losses = []
        for k in range(unroll):
            losses.append(F.nll_loss(drafter.log_probs(state, h[idx]), targets[idx, k]))
            state = drafter.advance(state, targets[idx, k])
        loss = torch.stack(losses).mean()
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    return float(loss.detach())


def build_models(hf_llm: str, hf_drafter: str, cfg: TinyConfig | None = None) -> tuple[TinyLM, RecurrentDrafter]:
    """Randomly initialise the target (seeded by its name) and distil a drafter from it (seeded by both names)."""
    cfg = cfg or TinyConfig()
    with torch.random.fork_rng():  # leave the caller's global RNG untouched
        torch.manual_seed(_seed_of(FORMAT_VERSION, hf_llm))
        lm = TinyLM(cfg).eval()
        torch.manual_seed(_seed_of(FORMAT_VERSION, hf_llm, hf_drafter))
        drafter = RecurrentDrafter(cfg)
    distil_drafter(lm, drafter, _seed_of(FORMAT_VERSION, hf_llm, hf_drafter, "data"))
    return lm, drafter.eval()


class ModelCacheError(Exception):
    """The model directory cannot be used; the message says which path and what to do."""


def model_path(model_dir: Path, hf_llm: str, hf_drafter: str) -> Path:
    """Where the tiny models for this (--hf_llm, --hf_drafter) pair live: a readable label plus a hash of both."""
    key = hashlib.sha256(f"{FORMAT_VERSION}\0{hf_llm}\0{hf_drafter}".encode()).hexdigest()[:12]
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", hf_llm.rstrip("/").rsplit("/", 1)[-1])[:40] or "llm"
    return model_dir / f"{label}-{key}.pt"


def _load(path: Path) -> tuple[TinyLM, RecurrentDrafter]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        cfg = TinyConfig(**blob["config"])
        lm, drafter = TinyLM(cfg), RecurrentDrafter(cfg)
        lm.load_state_dict(blob["target"])
        drafter.load_state_dict(blob["drafter"])
    except Exception as exc:
        raise ModelCacheError(f"{path}: cannot load the tiny models ({exc}); delete the file to rebuild it") from exc
    return lm.eval(), drafter.eval()


Builder = Callable[[str, str], tuple[TinyLM, RecurrentDrafter]]


def load_or_build(
    model_dir: Path,
    hf_llm: str,
    hf_drafter: str,
    build: Builder = build_models,
    log: Callable[[str], None] | None = None,
) -> tuple[TinyLM, RecurrentDrafter]:
    """Load the cached tiny models, building them once under a file lock if absent (safe across processes)."""
    path = model_path(model_dir, hf_llm, hf_drafter)
    if path.exists():
        return _load(path)
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115 - held for the whole build
    except OSError as exc:
        raise ModelCacheError(f"{model_dir}: cannot create the model directory ({exc}); pass --model_dir") from exc
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent first use waits here, then loads what the winner saved
        if path.exists():
            return _load(path)
        if log is not None:
            log(f"building the tiny models into {path} (first use, a few seconds)")
        lm, drafter = build(hf_llm, hf_drafter)
        blob: dict[str, object] = {
            "config": dataclasses.asdict(lm.cfg),
            "target": lm.state_dict(),
            "drafter": drafter.state_dict(),
            "labels": {"hf_llm": hf_llm, "hf_drafter": hf_drafter, "format": FORMAT_VERSION},
        }
        _save_atomically(blob, path)
    return lm, drafter


def _save_atomically(blob: dict[str, object], path: Path) -> None:
    """Write to a temporary file in the same directory, then rename: readers never see a partial file."""
    tmp = ""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise ModelCacheError(f"{path.parent}: cannot save the tiny models ({exc}); pass --model_dir") from exc
        raise


# ---------------------------------------------------------------------------------------------------------------
# Summary table, as upstream's stats.summarize and stats.draw_table print it


@dataclasses.dataclass(frozen=True)
class TableStats:
    """The numbers of upstream's summary table."""

    tokens_per_step: float
    acceptance_rate: float
    generate_candidates: float
    verify_candidates: float
    accept_candidate_tokens: float
    tokens_per_second: float


def summarize(records: Sequence[StepRecord], beam_length: int) -> TableStats:
    """Upstream's formulas: tokens/step = mean(accepted + 1); rate = 100*(tokens/step - 1)/beam_length;
    tokens/second = tokens/step divided by the summed mean phase times (per sequence, as upstream reports it)."""
    n = len(records)
    tokens_per_step = sum(r.accepted + 1 for r in records) / n
    gen = sum(r.generate_candidates for r in records) / n
    ver = sum(r.verify_candidates for r in records) / n
    acc = sum(r.accept_candidate_tokens for r in records) / n
    return TableStats(
        tokens_per_step,
        100.0 * (tokens_per_step - 1) / beam_length,
        gen,
        ver,
        acc,
        tokens_per_step / (gen + ver + acc),
    )


def _tabulate_number(value: float) -> str:
    """Upstream formats with :.4f, then tabulate re-parses the string and prints it with format 'g'."""
    return format(float(f"{value:.4f}"), "g")


def format_table(title: str, stats: TableStats) -> str:
    """Upstream's table: tabulate 'simple' format, headers [Title, ''], columns aligned left and right."""
    sep = None
    rows: list[tuple[str, str] | None] = [
        ("Average number of tokens per step:", _tabulate_number(stats.tokens_per_step)),
        ("Average draft head acceptance rate (%):", _tabulate_number(stats.acceptance_rate)),
        sep,
        ("Wall time (seconds) per step", ""),
        ("", ""),
        ("generate_candidates:", _tabulate_number(stats.generate_candidates)),
        ("verify_candidates:", _tabulate_number(stats.verify_candidates)),
        ("accept_candidate_tokens:", _tabulate_number(stats.accept_candidate_tokens)),
        sep,
        ("Tokens/second", _tabulate_number(stats.tokens_per_second)),
        sep,
    ]
    header = f"Title: {title}"
    cells = [r for r in rows if r is not None]
    # tabulate's minimum column width is the header's width plus 2.
    left = max(len(header) + 2, *(len(r[0]) for r in cells))
    right = max(2, *(len(r[1]) for r in cells))
    dashes = "-" * left + "  " + "-" * right
    lines = [(header.ljust(left) + "  " + "".rjust(right)).rstrip(), dashes]
    for row in rows:
        lines.append(dashes if row is None else (row[0].ljust(left) + "  " + row[1].rjust(right)).rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Progress bar (tqdm-like, on stderr)


class ProgressBar:
    """A tqdm-style bar redrawn in place with carriage returns, one update per batch, ending with a newline."""

    def __init__(self, total: int, stream: IO[str], desc: str = "Generating") -> None:
        self.total, self.stream, self.desc = total, stream, desc
        self.n = 0
        self.start = time.perf_counter()
        self._draw()

    @staticmethod
    def _clock(seconds: float) -> str:
        m, s = divmod(int(seconds), 60)
        return f"{m:02d}:{s:02d}"

    def _draw(self) -> None:
        elapsed = time.perf_counter() - self.start
        frac = self.n / self.total if self.total else 1.0
        filled = int(frac * 10)
        bar = "#" * filled + " " * (10 - filled)
        if self.n:
            rate = self.n / elapsed if elapsed > 0 else float("inf")
            remaining = self._clock((self.total - self.n) / rate) if rate else "?"
            speed = f"{rate:5.2f}it/s" if rate >= 1 else f"{1 / rate:5.2f}s/it"
        else:
            remaining, speed = "?", "?it/s"
        self.stream.write(
            f"\r{self.desc}: {frac * 100:3.0f}%|{bar}| {self.n}/{self.total} "
            f"[{self._clock(elapsed)}<{remaining}, {speed}]"
        )
        self.stream.flush()

    def update(self) -> None:
        self.n += 1
        self._draw()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


# ---------------------------------------------------------------------------------------------------------------
# Command line

HELP = f"""\
Stand-in for ReDrafter's `python3 -m recurrent_drafting.cmd.generate` (apple/ml-recurrent-drafter), for
rehearsing benchmark sweeps on the CPU. It accepts the upstream flags and runs real speculative decoding:
a recurrent drafter (a GRU fed the target's last hidden state) beam-searches --beam_width beams of
--beam_length tokens (the target's pending token plus beam_length-1 drafts), a target transformer verifies
all beams in one batched pass, and the longest agreeing prefix plus the target's next token is accepted.
Decoding is greedy, so the output equals plain greedy decoding with the target (upstream's sweep samples).

The models are tiny and random (vocab 512, 3 layers), never downloaded: --hf_llm, --hf_drafter and
--hf_tokenizer only name them. They are built on first use (the drafter is distilled from the target for a
few seconds) and cached in --model_dir. Prompts are random token sequences drawn with --seed, not MT-Bench.
So that a task takes seconds, prompts are at most {PROMPT_LENGTH_CAP} tokens (--max_prompt_length is capped),
generation stops after {GENERATION_LENGTH_CAP} new tokens (--max_generation_length is capped), and beams are at
most {MAX_BEAM_WIDTH} wide and {MAX_BEAM_LENGTH} long. As upstream, prompts go in batches of --batch_size and an
incomplete last batch is dropped.

Output, as upstream prints it: a progress bar on stderr, a line of token sequences per batch, then the
summary table: Title: beamwidthW_beamlenL; average tokens per step (accepted drafts + 1); acceptance rate
100*(tokens per step - 1)/beam_length; mean wall time per step of each phase; Tokens/second = tokens per
step / summed phase times (per sequence, as upstream computes it).
"""


def _bool_flag(text: str) -> bool:
    """absl-style boolean flag values."""
    value = text.strip().lower()
    if value in {"true", "t", "1", "yes", "y"}:
        return True
    if value in {"false", "f", "0", "no", "n"}:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _int_in(low: int, high: int | None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            limit = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {limit}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The upstream flags (absl names), plus --model_dir and --seed for the stand-in."""
    p = argparse.ArgumentParser(
        prog="redrafter_generate", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--hf_llm", default="lmsys/vicuna-7b-v1.3", help="target LLM name (a cache key here)")
    p.add_argument("--hf_drafter", required=True, help="drafter name or path (a cache key here)")
    p.add_argument("--hf_tokenizer", default="lmsys/vicuna-7b-v1.3", help="tokenizer name (a label here)")
    p.add_argument(
        "--eval_mt_bench",
        type=_bool_flag,
        nargs="?",
        const=True,
        default=False,
        help="must be True: upstream's False opens an interactive chat, which is not emulated",
    )
    p.add_argument(
        "--max_prompt_length", type=_int_in(1, None), default=50, help=f"capped at {PROMPT_LENGTH_CAP} tokens"
    )
    p.add_argument(
        "--max_generation_length",
        type=_int_in(1, None),
        default=60,
        help=f"new tokens per prompt, capped at {GENERATION_LENGTH_CAP}",
    )
    p.add_argument("--beam_width", type=_int_in(1, MAX_BEAM_WIDTH), default=10, help="beams drafted per step")
    p.add_argument(
        "--beam_length", type=_int_in(1, MAX_BEAM_LENGTH), default=5, help="tokens per beam, pending one included"
    )
    p.add_argument(
        "--max_num_prompts",
        type=_int_in(-1, MT_BENCH_PROMPTS),
        default=-1,
        help=f"number of prompts; -1 means all {MT_BENCH_PROMPTS} (as MT-Bench has)",
    )
    p.add_argument("--batch_size", type=_int_in(1, None), default=1)
    p.add_argument("--use_gpu", type=int, default=0, help="CUDA device index; negative (or no CUDA) runs on the CPU")
    p.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        default="bf16",
        help="compute dtype on CUDA; on the CPU the tiny models always compute in fp32",
    )
    p.add_argument("--model_dir", default=DEFAULT_MODEL_DIR, help="where the tiny models are cached")
    p.add_argument("--seed", "--rng_seed", dest="seed", type=int, default=123, help="seed of the random prompts")
    return p


def random_prompts(n: int, max_prompt_length: int, seed: int, vocab: int) -> list[torch.Tensor]:
    """Random token prompts of varied lengths (half to all of the capped maximum), reproducible from the seed."""
    gen = torch.Generator().manual_seed(seed)
    longest = min(max_prompt_length, PROMPT_LENGTH_CAP)
    lengths = torch.randint(max(1, longest // 2), longest + 1, (n,), generator=gen)
    return [torch.randint(vocab, (int(length),), generator=gen) for length in lengths]


def _pick_device(use_gpu: int, parser: argparse.ArgumentParser) -> torch.device:
    if use_gpu >= 0 and torch.cuda.is_available():
        if use_gpu >= torch.cuda.device_count():
            parser.error(f"--use_gpu={use_gpu}: only {torch.cuda.device_count()} CUDA devices")
        return torch.device(f"cuda:{use_gpu}")
    return torch.device("cpu")


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype to compute in. On the CPU always fp32: at these tiny shapes bf16 gains little even on CPUs with
    native bf16 and is far slower on CPUs without it (fp16 CPU matmuls are ~40x slower)."""
    if device.type == "cpu":
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _fail(message: str) -> NoReturn:
    print(f"redrafter_generate: {message}", file=sys.stderr)
    sys.exit(1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.eval_mt_bench:
        parser.error("--eval_mt_bench=False opens upstream's interactive chat, not emulated; pass True")
    n_prompts = MT_BENCH_PROMPTS if args.max_num_prompts < 0 else args.max_num_prompts
    if n_prompts < args.batch_size:
        parser.error(f"--max_num_prompts={n_prompts} is less than --batch_size={args.batch_size}: no full batch")
    torch.set_num_threads(1)  # several tasks share a few cores
    device = _pick_device(args.use_gpu, parser)
    dtype = compute_dtype(args.dtype, device)
    if device.type == "cpu":
        why = "negative --use_gpu" if args.use_gpu < 0 else "no CUDA device"
        print(f"redrafter_generate: running on the CPU ({why}), computing in fp32 (--dtype={args.dtype})",
              file=sys.stderr)
    try:
        lm, drafter = load_or_build(
            Path(args.model_dir).expanduser(),
            args.hf_llm,
            args.hf_drafter,
            log=lambda line: print(f"redrafter_generate: {line}", file=sys.stderr),
        )
    except ModelCacheError as exc:
        _fail(str(exc))
    lm, drafter = lm.to(device=device, dtype=dtype), drafter.to(device=device, dtype=dtype)
    prompts = [p.to(device) for p in random_prompts(n_prompts, args.max_prompt_length, args.seed, lm.cfg.vocab)]
    n_batches = n_prompts // args.batch_size
    n_new = min(args.max_generation_length, GENERATION_LENGTH_CAP)
    records: list[StepRecord] = []
    bar = ProgressBar(n_batches, sys.stderr)
    for b in range(n_batches):
        batch = prompts[b * args.batch_size : (b + 1) * args.batch_size]
        outputs = speculative_generate(lm, drafter, batch, n_new, args.beam_width, args.beam_length, records)
        # Upstream prints each batch's decoded sequences (prompt and output); tokens print as t<id>.
        print([" ".join(f"t{t}" for t in torch.cat([p, o]).tolist()) for p, o in zip(batch, outputs, strict=True)])
        bar.update()
    bar.close()
    print(os.linesep)  # upstream's draw_table starts with print(os.linesep)
    print(format_table(f"beamwidth{args.beam_width}_beamlen{args.beam_length}", summarize(records, args.beam_length)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
