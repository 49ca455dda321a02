"""Machine settings are not science (issue 14, points 2 and 4).

`resources.<stage>` (ranks, loader and pool workers, torch.compile, gradient accumulation,
tokenize's encoding batch, evaluate's SR batch) is
read by the stages but declared by none, hashed by no checkpoint fingerprint and left out of the
check stage: changing it reruns nothing, in DVC or Snakemake, and a training run resumes on another
number of ranks. ARSR_RESOURCES__<STAGE>__<KEY> overrides it from the environment, a Snakemake
`set-resources` through that variable. Every process sizes its threads from the CPUs it may use.
All of it on real processes: copies of the built tiny DAG, subprocesses with a real affinity mask.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pipeline_fixtures import _env, run

from arsr.proc import _cgroup_quota

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@pytest.fixture
def proj(dvc_project: Path, tmp_path: Path) -> Path:
    """A private copy of the built tiny DAG with its dvc.lock committed (the session's stays as is)."""
    dest = tmp_path / "proj"
    shutil.copytree(dvc_project, dest, symlinks=True)
    run(["git", "add", "dvc.lock"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "built"], dest)
    return dest


def _sha(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


# --------------------------------------------------------------------------------------
# Nothing reruns
# --------------------------------------------------------------------------------------
def test_changing_every_resource_reruns_nothing(proj: Path) -> None:
    """Every resources key changed in params.yaml: `dvc status` is clean and `dvc exp run -S
    resources.train_srvar.nproc=1` runs no stage, the check included."""
    params = yaml.safe_load((proj / "params.yaml").read_text())
    res = params["resources"]
    res["shard"]["workers"] = 1
    res["tokenize"] = {"batch_size": 7, "workers": 1}
    for stage in ("train_base", "train_vqvae", "train_srvar", "train_mar"):
        res[stage] = {"nproc": 4, "workers": 0, "compile": True, "accum": 2}
    res["evaluate"] = {"batch_size": 3}
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = run(["dvc", "status", "--json"], proj).stdout
    assert json.loads(status) == {}, status
    out = run(["dvc", "exp", "run", "-S", "resources.train_srvar.nproc=1"], proj)
    text = out.stdout + out.stderr
    assert "Running stage" not in text, text
    assert "Stage 'check' didn't change, skipping" in text, text
    assert yaml.safe_load((proj / "params.yaml").read_text())["resources"]["train_srvar"]["nproc"] == 1


def test_snakemake_set_resources_rerun_nothing_and_reach_the_command(proj: Path) -> None:
    dry = run(["snakemake", "-n", "--cores", "2", "--set-resources", "train_srvar:nproc=1"], proj)
    assert "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]
    forced = run(
        ["snakemake", "-n", "-p", "--cores", "2", "--forcerun", "train_srvar", "--set-resources",
         "train_srvar:nproc=1", "train_srvar:compile=1"],
        proj,
    )  # fmt: skip
    lines = [ln for ln in forced.stdout.splitlines() if "arsr.stages.launch train_srvar" in ln]
    assert lines, forced.stdout[-3000:]
    assert "ARSR_RESOURCES__TRAIN_SRVAR__NPROC=1 " in lines[0] and "__COMPILE=1 " in lines[0], lines[0]
    assert "ARSR_RESOURCES__TRAIN_SRVAR__WORKERS=1 " in lines[0] and "ARSR_CPUS=" in lines[0], lines[0]


# --------------------------------------------------------------------------------------
# Overrides from the environment
# --------------------------------------------------------------------------------------
def test_another_nproc_resumes_the_checkpoint_through_an_env_override(proj: Path) -> None:
    """train_base trained on 2 ranks; rerun on 1 (ARSR_RESOURCES__TRAIN_BASE__NPROC=1): the launcher
    starts no torchrun, and the engine takes the checkpoint back (its fingerprint has no resources)
    instead of moving it to ckpt/stale-*."""
    ckpt = proj / "runs/base/ckpt"
    assert (ckpt / "last.pt").is_file()
    env = _env() | {"ARSR_RESOURCES__TRAIN_BASE__NPROC": "1"}
    proc = subprocess.run(
        [PY, "-m", "arsr.stages.launch", "train_base"], cwd=proj, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    launch = next(ln for ln in out.splitlines() if ln.startswith("launch: "))
    assert "torch.distributed.run" not in launch, launch
    assert "resuming from" in out and "1 rank(s)" in out, out[-4000:]
    assert not list(ckpt.glob("stale-*")), sorted(p.name for p in ckpt.iterdir())
    import torch

    fp = torch.load(ckpt / "last.pt", map_location="cpu", weights_only=False)["fingerprint"]
    assert not [k for k in fp["params"] if "nproc" in k or "workers" in k or "compile" in k], fp["params"]


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        (
            "ARSR_RESOURCES__TRAIN_BASE__NPROC",
            "two",
            "resources.train_base.nproc: Input should be a valid integer",
        ),
        ("ARSR_RESOURCES__TRAIN_BASE__NPROC", "3", "base.train.batch_size: 8 is not divisible"),
        ("ARSR_RESOURCES__TRAIN_BASS__NPROC", "1", "resources.train_bass: unknown key"),
        ("ARSR_RESOURCES__NPROC", "1", "expected ARSR_RESOURCES__<STAGE>__<KEY>"),
    ],
)
def test_a_bad_override_fails_naming_the_variable(
    dvc_project: Path, var: str, value: str, message: str
) -> None:
    """The check stage (what `dvc repro` runs first) and the launcher refuse it, naming the variable."""
    env = _env() | {var: value}
    for cmd in (
        [PY, "-m", "arsr.stages.check", "--out", os.devnull],
        [PY, "-m", "arsr.stages.launch", "train_base"],
    ):
        proc = subprocess.run(cmd, cwd=dvc_project, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and f"${var}" in proc.stderr, proc.stderr


# --------------------------------------------------------------------------------------
# Outputs that must not depend on a resource
# --------------------------------------------------------------------------------------
def test_tokens_do_not_depend_on_the_batch_size_or_the_workers(proj: Path, tmp_path: Path) -> None:
    """The DAG tokenized in batches of 32 with 2 processes; batches of 1 and 7 (short batches: one
    row takes torch's native convolution) in one process give the same bytes, latent_stats.json
    included. ARSR_CPUS=1 caps the pool at one worker (timing.json says so)."""
    ref = _sha(proj / "data/tokens")
    for batch in (1, 7):
        out = tmp_path / f"tokens{batch}"
        env = _env() | {
            "ARSR_RESOURCES__TOKENIZE__BATCH_SIZE": str(batch),
            "ARSR_CPUS": "1",
            "ARSR_DEVICE": "cpu",
        }
        subprocess.run(
            [PY, "-m", "arsr.stages.tokenize", "--out", str(out), "--runs", str(tmp_path / f"runs{batch}")],
            cwd=proj, env=env, check=True, capture_output=True, timeout=600,
        )  # fmt: skip
        assert _sha(out) == ref, f"batch {batch}: {sorted(k for k in ref if _sha(out).get(k) != ref[k])}"
        timing = json.loads((tmp_path / f"runs{batch}" / "tokenize" / "timing.json").read_text())
        assert timing["workers"] == 1 and timing["machine"]["cpus"] == 1, timing


def test_sr_outputs_do_not_depend_on_the_evaluate_batch_size(proj: Path, tmp_path: Path) -> None:
    """The DAG evaluated with 16 tiles a batch; one tile a batch and 5 (batches across images) give
    the same per-image scores: every tile samples with its own seed (eval.seed, image, tile)."""
    runs = tmp_path / "runs"  # the models only: the stage writes runs/evaluate/timing.json
    for family in ("base", "vqvae", "srvar", "mar"):
        (runs / family).mkdir(parents=True)
        shutil.copy(proj / "runs" / family / "model.pt", runs / family / "model.pt")
    ref = (proj / "eval/per_image.csv").read_text()
    for batch in (1, 5):
        out = tmp_path / f"eval{batch}"
        env = _env() | {"ARSR_RESOURCES__EVALUATE__BATCH_SIZE": str(batch), "ARSR_DEVICE": "cpu"}
        subprocess.run(
            [PY, "-m", "arsr.stages.evaluate", "--out", str(out), "--runs", str(runs)],
            cwd=proj, env=env, check=True, capture_output=True, timeout=600,
        )  # fmt: skip
        assert (out / "per_image.csv").read_text() == ref, f"batch {batch}"


# --------------------------------------------------------------------------------------
# Threads that fit the machine
# --------------------------------------------------------------------------------------
PROBE = (
    "import os, arsr, torch; from arsr.proc import usable_cpus, fit_threads; "
    "e = os.environ; n = fit_threads(int(e.get('SIBLINGS', '1'))); "
    "print(usable_cpus(), n, torch.get_num_threads(), e['OMP_NUM_THREADS'], e['OMP_WAIT_POLICY'])"
)


def _probe(env: dict[str, str], cpus: set[int] | None = None) -> list[str]:
    def pin() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    base = {k: v for k, v in os.environ.items() if not k.startswith(("ARSR_", "SLURM_", "OMP_"))}
    proc = subprocess.run(
        [PY, "-c", PROBE], env=base | env, preexec_fn=pin, capture_output=True, text=True, check=True
    )
    return proc.stdout.split()


def test_a_process_sizes_its_threads_from_the_cpus_it_may_use() -> None:
    cpus = len(os.sched_getaffinity(0))
    assert _probe({}) == [str(cpus), str(cpus), str(cpus), str(cpus), "PASSIVE"]
    assert _probe({}, cpus={0})[:3] == ["1", "1", "1"]  # taskset / SLURM binding
    assert _probe({"SIBLINGS": "2"})[1] == str(max(1, cpus // 2))  # torchrun's LOCAL_WORLD_SIZE
    assert _probe({"ARSR_CPUS": "1"})[:2] == ["1", "1"]  # Snakemake's share of the cores
    assert _probe({"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "1"})[:2] == ["1", "1"]
    assert _probe({"SLURM_CPUS_PER_TASK": "1"})[0] == str(cpus)  # outside a job: not ours
    assert _probe({"ARSR_THREADS_PER_RANK": "3"})[1:4] == ["3", "3", "3"]
    assert _probe({"OMP_WAIT_POLICY": "ACTIVE"})[4] == "ACTIVE"  # the user's choice stays


def test_the_cgroup_cpu_quota_counts(tmp_path: Path) -> None:
    """cgroup v2 (cpu.max along the process's cgroup and its ancestors) and v1 (cfs quota)."""
    root = tmp_path / "cg"
    (root / "job" / "step").mkdir(parents=True)
    (root / "job" / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    (root / "job" / "step" / "cpu.max").write_text("max 100000\n")
    own = tmp_path / "cgroup"
    own.write_text("0::/job/step\n")
    assert _cgroup_quota(root, own) == 1.5
    (root / "cpu.max").write_text("50000 100000\n")  # a container limit at the namespace root
    assert _cgroup_quota(root, own) == 0.5
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "slurm").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "slurm" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu,cpuacct" / "slurm" / "cpu.cfs_period_us").write_text("100000\n")
    own.write_text("4:cpu,cpuacct:/slurm\n1:memory:/slurm\n")
    assert _cgroup_quota(v1, own) == 2.0
    (v1 / "cpu,cpuacct" / "slurm" / "cpu.cfs_quota_us").write_text("-1\n")
    assert _cgroup_quota(v1, own) is None
    assert _cgroup_quota(tmp_path / "none", tmp_path / "missing") is None
