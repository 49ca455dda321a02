"""The `arsr` command line (issue 16, point 5): argparse everywhere (``--x=y`` = ``--x y``), one rule
for the standalone tools' settings, ``arsr --help``, training through the launcher, progress lines
in logs. A tiny SRVAR model.pt (untrained, built here in a second) stands in for a trained one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from stage_helpers import one_thread, write_tiny_srvar  # noqa: F401  (one_thread: autouse)

from arsr.cli import COMMANDS, summary
from arsr.cli import main as arsr_main
from arsr.data.imresize import imresize
from arsr.eval.registry import METRICS
from arsr.progress import LineProgress
from arsr.stages.common import params_option

PN = (1, 2, 3, 4)
SCALE = 2
# What the tools should take from the params file: greedy tokens (no refiner: seed-free outputs),
# one tile per batch and no overlap, so `upscale` (image by image) and `evaluate` (all tiles
# together) compute exactly the same tiles.
EVAL = {"tile_overlap": 0, "seed": 5, "srvar": {"decode": "greedy", "top_k": 3},
        "mar": {"num_iter": 3}}  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", ARSR_DEVICE="cpu", WANDB_MODE="disabled", **extra)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_JOB_ID", "SLURM_STEP_ID"):
        env.pop(var, None)
    return env


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """``python -m arsr.cli ARGS`` with stdout and stderr piped (not a terminal)."""
    cmd = [sys.executable, "-m", "arsr.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def proj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with params.yaml (eval: EVAL), runs/srvar/model.pt (a tiny x2 SRVAR on a tiny hr
    tokenizer), a benchmark folder bench/HR with two images, their LR images in lr/, and an eval/
    output of the pipeline that standalone tools must not touch."""
    root = tmp_path_factory.mktemp("cli")
    params = {"eval": EVAL, "resources": {"evaluate": {"batch_size": 1}}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    write_tiny_srvar(root, scale=SCALE, patch_nums=PN, jitter=0.3)
    rng = np.random.default_rng(0)
    (root / "bench/HR").mkdir(parents=True)
    (root / "lr").mkdir()
    for name, (h, w) in {"a": (16, 20), "b": (12, 12)}.items():
        hr = np.clip(rng.normal(128, 40, (h // 4, w // 4, 3)), 0, 255).astype(np.uint8)
        hr = np.asarray(Image.fromarray(hr).resize((w, h), Image.BICUBIC))
        Image.fromarray(hr).save(root / "bench/HR" / f"{name}.png")
        Image.fromarray(imresize(hr, 1.0 / SCALE)).save(root / "lr" / f"{name}.png")  # evaluate's LR
    (root / "eval").mkdir()
    (root / "eval/metrics.json").write_text('{"pipeline": "output"}')
    return root


def _settings_line(stderr: str, tool: str) -> str:
    return next(line for line in stderr.splitlines() if line.startswith(f"{tool}: settings from"))


def _upscale_psnr(proj: Path, out: Path) -> dict[str, float]:
    psnr = METRICS["psnr"].fn
    scores = {}
    for name in ("a", "b"):
        sr = np.asarray(Image.open(out / f"{name}_x{SCALE}.png"))
        hr = np.asarray(Image.open(proj / "bench/HR" / f"{name}.png"))
        scores[name] = psnr([sr], [hr], SCALE, "cpu")[0]
    return scores


def test_standalone_tools_take_settings_from_params_and_leave_pipeline_outputs_alone(proj: Path) -> None:
    """`evaluate --hr-dir=DIR` (the `=` form the old argv check missed) and `upscale` read the same
    eval section: both echo the same settings, and upscale's images score exactly evaluate's
    per-image PSNR. eval/ stays as it was, no W&B run or runs/evaluate/ appears; upscale's progress
    reaches a piped stderr as plain lines."""
    before = {p: p.read_bytes() for p in (proj / "eval").rglob("*") if p.is_file()}
    out = proj / "scores.json"
    ev = _run(["evaluate", f"--hr-dir={proj / 'bench'}", f"--scale={SCALE}", "--methods=bicubic,srvar",
               "--metrics=psnr", f"--json={out}", f"--model-dir={proj / 'runs'}"], proj)  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    up = _run(["upscale", "--model", str(proj / "runs/srvar/model.pt"), "--input", str(proj / "lr"),
               "--output", str(proj / "up")], proj, ARSR_PROGRESS_EVERY="0")  # fmt: skip
    assert up.returncode == 0, up.stderr

    ev_line, up_line = _settings_line(ev.stderr, "evaluate"), _settings_line(up.stderr, "upscale")
    assert "params.yaml's eval section" in ev_line
    assert ev_line.removeprefix("evaluate") == up_line.removeprefix("upscale")
    assert "seed=5" in ev_line and "decode=greedy, " in ev_line and "top_k=3," in ev_line
    assert "num_iter=3" in ev_line
    result = json.loads(out.read_text())
    assert result["settings"]["srvar"]["decode"] == "greedy" and result["settings"]["mar"]["num_iter"] == 3
    assert result["settings"]["seed"] == 5 and "batch_size" not in result["settings"]  # a resource
    want = _upscale_psnr(proj, proj / "up")
    for name, score in want.items():
        assert result["per_image"]["srvar"][name]["psnr"] == pytest.approx(score, abs=1e-9), name
    assert result["per_image"]["srvar"]["a"]["psnr"] != result["per_image"]["bicubic"]["a"]["psnr"]

    assert {p: p.read_bytes() for p in (proj / "eval").rglob("*") if p.is_file()} == before
    assert not (proj / "runs/evaluate").exists() and not (proj / "wandb").exists()
    lines = [line for line in up.stderr.splitlines() if line.startswith("upscale: ") and " img (" in line]
    assert lines[0].startswith("upscale: 1/2 img (50%), ") and "ETA" in lines[0], up.stderr
    assert lines[-1].startswith("upscale: 2/2 img (100%), ") and "elapsed" in lines[-1], up.stderr


def test_a_flag_overrides_params_in_both_tools(
    proj: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--srvar-decode sample (and --seed) over the params file's greedy: both tools echo it, the
    --json records it and the SR row's scores change; --params FILE is read by both alike."""
    monkeypatch.chdir(proj)
    monkeypatch.setenv("ARSR_DEVICE", "cpu")
    greedy = json.loads((proj / "scores.json").read_text())["per_image"]["srvar"]
    params = tmp_path / "other.yaml"
    params.write_text(yaml.safe_dump({"eval": {**EVAL, "srvar": {"decode": "greedy", "top_k": 2}}}))
    flags = ["--srvar-decode", "sample", "--seed=11", f"--params={params}"]
    out = tmp_path / "sample.json"
    argv = ["evaluate", "--hr-dir", str(proj / "bench"), "--scale", str(SCALE), "--methods", "srvar",
            "--metrics", "psnr", "--json", str(out), "--model-dir", str(proj / "runs")]  # fmt: skip
    assert arsr_main([*argv, *flags]) == 0
    ev_line = _settings_line(capsys.readouterr().err, "evaluate")
    upscale = ["upscale", "--model", str(proj / "runs/srvar/model.pt"), "--input", str(proj / "lr/a.png"),
               "--output", str(tmp_path / "up"), "--device", "cpu"]  # fmt: skip
    assert arsr_main([*upscale, *flags]) == 0
    up_line = _settings_line(capsys.readouterr().err, "upscale")
    assert ev_line.removeprefix("evaluate") == up_line.removeprefix("upscale")
    assert f"{params}'s eval section, overridden by --srvar-decode --seed" in ev_line
    assert "seed=11" in ev_line and "decode=sample" in ev_line and "top_k=2," in ev_line
    result = json.loads(out.read_text())
    assert result["settings"]["srvar"] == {**result["settings"]["srvar"], "decode": "sample", "top_k": 2}
    assert result["per_image"]["srvar"] != greedy


def test_bad_settings_are_errors_naming_the_key(proj: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    """An out-of-range option and a params file with a bad key stop both tools with exit 2."""
    img = str(proj / "lr/a.png")
    up = ["upscale", "--model", str(proj / "runs/srvar/model.pt"), "--input", img, "--output", str(tmp_path)]
    assert arsr_main([*up, "--srvar-top-k=-1", f"--params={proj / 'params.yaml'}"]) == 2
    assert "eval.srvar.top_k" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"eval": {"srvar": {"top_kk": 3}}}))
    ev = ["evaluate", "--hr-dir", str(proj / "bench"), "--params", str(bad), "--metrics", "psnr"]
    for argv in (ev, [*up, "--params", str(bad)]):
        assert arsr_main(argv) == 2
        err = capsys.readouterr().err
        assert str(bad) in err and "eval.srvar.top_kk: unknown key" in err, err


def test_evaluate_refuses_options_of_the_other_mode(capsys: pytest.CaptureFixture) -> None:
    """Without --hr-dir the DAG stage runs: a standalone option there (or a DAG option with --hr-dir)
    would be silently ignored, so it is an error."""
    with pytest.raises(SystemExit) as exit_info:
        arsr_main(["evaluate", "--json=x.json", "--srvar-top-k", "3"])
    assert exit_info.value.code == 2
    assert "--json, --srvar-top-k: only with --hr-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        arsr_main(["evaluate", "--hr-dir", "x", "--out=elsewhere"])
    assert "--out: not with --hr-dir" in capsys.readouterr().err


def test_help_lists_every_command_with_one_line() -> None:
    cmd = [sys.executable, "-m", "arsr.cli", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    lines = out.stdout.split("commands:\n", 1)[1].splitlines()
    assert [line.split()[0] for line in lines] == sorted(COMMANDS)
    for line in lines:
        name, text = line.split(maxsplit=1)
        assert text == summary(COMMANDS[name]) and len(text) > 20, line
    assert "shard" in COMMANDS and "images -> WebDataset tars" in out.stdout
    assert "launch" not in COMMANDS and "common" not in COMMANDS


def test_training_commands_start_through_the_launcher(tmp_path: Path) -> None:
    """`arsr train_srvar --params=F` reads F's resources.train_srvar.nproc (1 here: the default 2
    would start torchrun) and execs the stage as the DAG does; --help only prints the stage's help."""
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"resources": {"train_srvar": {"nproc": 1}}}))
    proc = _run(["train_srvar", f"--params={params}", "--tokens=none"], tmp_path)
    launch = next(line for line in proc.stderr.splitlines() if line.startswith("launch: "))
    assert launch.endswith(f"-m arsr.stages.train_srvar --params={params} --tokens=none")
    assert "torch.distributed.run" not in launch
    assert proc.returncode == 2 and "arsr train_srvar: error:" in proc.stderr  # no tokens here
    help_ = _run(["train_srvar", "--help"], tmp_path)
    assert help_.returncode == 0 and "usage: arsr train_srvar" in help_.stdout
    assert "launch:" not in help_.stderr


def test_params_option_reads_every_spelling() -> None:
    assert params_option(["--params=a.yaml", "--out", "x"]) == "a.yaml"
    assert params_option(["--out=x", "--params", "b.yaml"]) == "b.yaml"
    assert params_option(["--out", "x"]) == "params.yaml"


def test_line_progress_prints_throttled_lines_and_a_last_one(capsys: pytest.CaptureFixture) -> None:
    for _ in LineProgress(range(3), desc="demo", unit="tile", every=0):
        pass
    assert capsys.readouterr().err.splitlines()[-1].startswith("demo: 3/3 tile (100%), 0:00 elapsed")
    bar = LineProgress(total=10, desc="slow", every=3600)
    bar.update(4)
    bar.update(6)
    assert capsys.readouterr().err == ""  # nothing before the interval...
    bar.close()
    bar.close()
    # ...and one at the end
    assert capsys.readouterr().err.splitlines() == ["slow: 10/10 it (100%), 0:00 elapsed"]
