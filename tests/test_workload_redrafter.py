"""The ReDrafter stand-in workload: speculation reproduces greedy decoding, and its output parses as upstream's."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from recipes.workloads import redrafter_generate as rg

SCRIPT = Path(rg.__file__)
LLM, DRAFTER = "lmsys/vicuna-7b-v1.3", "/tmp/test-drafter"

# UPSTREAM.md's sample with one correction: there `accept_candidate_tokens:` has one space too many (50 columns
# where every other line has 49). tabulate 0.10.0, fed upstream's draw_table rows, prints it as below.
UPSTREAM_SAMPLE = """\
Title: beamwidth4_beamlen3
---------------------------------------  ------
Average number of tokens per step:            1
Average draft head acceptance rate (%):       0
---------------------------------------  ------
Wall time (seconds) per step

generate_candidates:                      0.011
verify_candidates:                       0.0062
accept_candidate_tokens:                 0.0034
---------------------------------------  ------
Tokens/second                            48.409
---------------------------------------  ------"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory where the tiny models have been built once (a few seconds) for this module."""
    path = tmp_path_factory.mktemp("tiny-models")
    rg.load_or_build(path, LLM, DRAFTER)
    return path


@pytest.fixture(scope="module")
def models(model_dir: Path) -> tuple[rg.TinyLM, rg.RecurrentDrafter]:
    return rg.load_or_build(model_dir, LLM, DRAFTER)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the script; output decoded without newline translation, so carriage returns survive."""
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], check=False, capture_output=True, timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def _tokens_per_step(models: tuple[rg.TinyLM, rg.RecurrentDrafter], width: int, length: int) -> float:
    lm, drafter = models
    prompts = rg.random_prompts(8, 16, seed=11, vocab=lm.cfg.vocab)
    records: list[rg.StepRecord] = []
    for batch in (prompts[:4], prompts[4:]):
        rg.speculative_generate(lm, drafter, batch, 32, width, length, records)
    return rg.summarize(records, length).tokens_per_step


def test_speculative_decoding_reproduces_plain_greedy_decoding(
    models: tuple[rg.TinyLM, rg.RecurrentDrafter],
) -> None:
    lm, drafter = models
    prompts = rg.random_prompts(5, 16, seed=3, vocab=lm.cfg.vocab)  # varied lengths: a ragged, left-padded batch
    assert len({p.shape[0] for p in prompts}) > 1
    expected = [rg.greedy_decode(lm, p, 24) for p in prompts]
    for width, length in [(1, 1), (1, 4), (3, 2), (4, 5), (8, 8)]:
        records: list[rg.StepRecord] = []
        got = rg.speculative_generate(lm, drafter, prompts, 24, width, length, records)
        assert [g.tolist() for g in got] == [e.tolist() for e in expected], (width, length)
        if length > 1:  # drafts were accepted, so the equality above exercised multi-token steps
            assert max(r.accepted for r in records) > 0


def test_wider_and_longer_beams_accept_no_fewer_tokens_per_step(
    models: tuple[rg.TinyLM, rg.RecurrentDrafter],
) -> None:
    # Per step a wider beam need not contain a narrower one's candidates, so this is a property of the averages.
    grid = [(1, 1), (1, 2), (1, 5), (4, 5), (8, 8)]
    per_step = [_tokens_per_step(models, width, length) for width, length in grid]
    assert per_step[0] == 1.0  # beam_length 1 drafts nothing
    assert per_step == sorted(per_step), dict(zip(grid, per_step, strict=True))
    assert per_step[3] > per_step[2]  # beam width alone helps the distilled drafter
    assert per_step[3] >= 2.5  # the distillation made the drafter agree with the target most of the time


def test_script_prints_upstream_table_and_a_carriage_return_progress_bar(model_dir: Path) -> None:
    proc = _run(
        f"--hf_llm={LLM}", f"--hf_drafter={DRAFTER}", "--hf_tokenizer=tok", "--eval_mt_bench=True",
        "--max_prompt_length=256", "--max_generation_length=1024", "--beam_width=3", "--beam_length=4",
        "--max_num_prompts=4", "--batch_size=2", "--use_gpu=-1", "--dtype=bf16", f"--model_dir={model_dir}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    title = re.search(r"Title: beamwidth(\d+)_beamlen(\d+)", out)
    per_step = re.search(r"^Average number of tokens per step:\s+([\d.]+)", out, re.M)
    rate = re.search(r"^Tokens/second\s+([\d.]+)", out, re.M)
    assert title and per_step and rate, out
    assert title.groups() == ("3", "4")
    assert 1 <= float(per_step.group(1)) <= 4
    assert float(rate.group(1)) > 0
    assert "\n\n\nTitle: " in out  # upstream prints os.linesep before the table
    assert out.count("['t") == 2  # one line of decoded sequences per batch, as upstream prints
    assert "running on the CPU" in proc.stderr
    assert "\rGenerating: 100%" in proc.stderr and proc.stderr.endswith("]\n")
    assert "building" not in proc.stderr  # the models in model_dir were reused


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--beam_width=0"], "argument --beam_width: must be between 1 and 64, got 0"),
        (["--beam_length=x"], "argument --beam_length: expected an integer, got 'x'"),
        (["--eval_mt_bench=maybe"], "argument --eval_mt_bench: expected True or False"),
        (["--eval_mt_bench=False"], "--eval_mt_bench=False opens upstream's interactive chat"),
        (["--max_num_prompts=2", "--batch_size=4"], "no full batch"),
        (["--dtype=int8"], "argument --dtype: invalid choice: 'int8'"),
    ],
)
def test_bad_flag_values_are_argparse_errors(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        rg.main(["--hf_drafter=d", "--eval_mt_bench=True", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_script_exits_2_on_a_bad_flag() -> None:
    proc = _run("--hf_drafter=d", "--eval_mt_bench=True", "--beam_width=-3")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == (
        "redrafter_generate: error: argument --beam_width: must be between 1 and 64, got -3"
    )


def test_help_says_it_stands_in_for_upstream() -> None:
    proc = _run("--help")
    assert proc.returncode == 0
    assert "Stand-in for ReDrafter's `python3 -m recurrent_drafting.cmd.generate`" in proc.stdout
    assert f"capped at {rg.PROMPT_LENGTH_CAP} tokens" in proc.stdout


def test_table_reproduces_upstream_sample_byte_for_byte() -> None:
    stats = rg.TableStats(1.0, 0.0, 0.011, 0.0062, 0.0034, 48.409)
    assert rg.format_table("beamwidth4_beamlen3", stats) == UPSTREAM_SAMPLE


def test_table_formats_numbers_as_tabulate_does() -> None:
    # Expected text printed by tabulate 0.10.0 from upstream's draw_table rows: :.4f, then format "g".
    stats = rg.TableStats(3.80434, 56.08695, 0.00093, 0.0025, 0.00012, 1234567.8)
    assert rg.format_table("beamwidth48_beamlen16", stats) == textwrap.dedent("""\
        Title: beamwidth48_beamlen16
        ---------------------------------------  -----------
        Average number of tokens per step:            3.8043
        Average draft head acceptance rate (%):       56.087
        ---------------------------------------  -----------
        Wall time (seconds) per step

        generate_candidates:                          0.0009
        verify_candidates:                            0.0025
        accept_candidate_tokens:                      0.0001
        ---------------------------------------  -----------
        Tokens/second                            1.23457e+06
        ---------------------------------------  -----------""")


def test_summary_uses_upstream_formulas() -> None:
    records = [rg.StepRecord(2.0, 0.01, 0.02, 0.01), rg.StepRecord(0.0, 0.03, 0.02, 0.01)]
    stats = rg.summarize(records, beam_length=4)
    assert stats.tokens_per_step == pytest.approx(2.0)  # mean of accepted + 1
    assert stats.acceptance_rate == pytest.approx(25.0)  # 100 * (2 - 1) / 4
    assert stats.tokens_per_second == pytest.approx(2.0 / 0.05)


def test_concurrent_first_uses_build_once_and_agree(tmp_path: Path) -> None:
    # Two processes start on an empty model directory; the lock lets one build and the others load its file.
    builds = tmp_path / "builds.txt"
    snippet = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        sys.path.insert(0, {str(SCRIPT.parent)!r})
        import redrafter_generate as rg

        def build(llm, drafter):
            with open({str(builds)!r}, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            time.sleep(1.0)  # widen the window in which an unlocked cache would be built twice
            lm = rg.TinyLM(rg.TinyConfig(d_model=32, d_ff=64, n_layers=1))
            return lm, rg.RecurrentDrafter(lm.cfg)

        lm, _ = rg.load_or_build(Path(sys.argv[1]), "llm", "drafter", build=build)
        print(float(sum(p.double().sum() for p in lm.parameters())))
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", snippet, str(tmp_path / "models")], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    sums = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert [p.returncode for p in procs] == [0, 0]
    assert len(builds.read_text().split()) == 1
    assert len(sums) == 1  # both use the same weights
    assert sorted(f.suffix for f in (tmp_path / "models").iterdir()) == [".lock", ".pt"]


def test_unreadable_model_file_is_one_clear_line(tmp_path: Path) -> None:
    path = rg.model_path(tmp_path, "llm", "drafter")
    path.write_bytes(b"not a torch file")
    proc = _run("--hf_llm=llm", "--hf_drafter=drafter", "--eval_mt_bench=True", f"--model_dir={tmp_path}")
    assert proc.returncode == 1
    assert f"{path}: cannot load the tiny models" in proc.stderr
    assert "delete the file to rebuild it" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_models_are_built_deterministically_from_their_names() -> None:
    # Hosts that each build their own cache must get the same models, or their results would not compare.
    small = rg.TinyConfig(d_model=32, d_ff=64, n_layers=1, d_draft=16, d_draft_head=32)
    (lm_a, drafter_a), (lm_b, drafter_b) = rg.build_models("llm", "d", small), rg.build_models("llm", "d", small)
    lm_c, _ = rg.build_models("other-llm", "d", small)
    assert torch.equal(lm_a.head.weight, lm_b.head.weight)
    assert torch.equal(drafter_a.cell.weight_hh, drafter_b.cell.weight_hh)  # distillation is deterministic too
    assert not torch.equal(lm_a.head.weight, lm_c.head.weight)
