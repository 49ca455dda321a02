# What workflow/rules/dvc_stages.smk builds its rules from: dvc.yaml read with DVC's own parser
# (DVC_RULES, one entry per stage), and the parse-time step that makes the mtimes of outputs
# Snakemake did not build agree with dvc.lock. Functions only: the rules are in dvc_stages.smk.
# Pinned DVC: `Repo.index.stages` is not public API.
#
# Outputs that Snakemake did not build (`dvc repro`, `dvc checkout`, `dvc commit`, a copy) follow
# dvc.lock. Snakemake always compares mtimes (Snakemake 9 cannot turn that trigger off) and has
# no record of such files, so a restored workspace would look stale and be retrained. So at parse
# time, in the main Snakemake process only (never in a job step), when dvc.lock exists and no
# other Snakemake holds a lock here, each stage in topological order is sorted out:
# - missing an output, downstream of a stage that will rerun, or marked incomplete: left alone
#   (Snakemake reruns it, or --rerun-incomplete decides);
# - built by Snakemake (each output has a .snakemake/metadata record whose endtime is the file's
#   mtime now): Snakemake's own triggers decide (mtime + checksums, params, input, code). Only
#   when an input is newer than an output and DVC's verdict (below) is "up to date" (an upstream
#   output replaced by the same bytes, e.g. by `dvc commit`) does the output get the input's mtime;
# - otherwise DVC's verdict decides: cmd, file deps, keyed params and outs against dvc.lock
#   (content hashes, cached in DVC's state db; a whole-file params dep, the check's, is left out:
#   the rules get no params for it and this file validates params.yaml at parse time). Up to date:
#   each output older than the stage's newest input gets that input's mtime (never a time in the
#   future), so Snakemake sees nothing to do; changed: the outputs are set 1 s before that input,
#   so Snakemake reruns the stage and everything downstream.
# A stage's benchmark file (logs/snakemake/<stage>.benchmark.tsv) counts as one of its outputs
# here, as it does for Snakemake (the oldest of outputs and benchmark is compared with the
# inputs); a stage that is up to date and has none (DVC built it, or logs/ was deleted) gets one
# with the header only (no measurement), since Snakemake reruns a stage named as a target
# (`snakemake report`) whose benchmark is missing.
# A record of a file changed since Snakemake wrote it is dropped (it describes other bytes); a
# record of a file whose mtime is moved follows it. Directory outputs carry their mtime in
# `.snakemake_timestamp` (in .dvcignore); file contents are never touched. A dry run does this too,
# so `snakemake -n` says what `snakemake` will do. `--config dvc_mtimes=false` turns it off.
import json
import os
import stat
import sys
import time
from base64 import urlsafe_b64encode
from collections import namedtuple

from dvc.repo import Repo, lock_repo

from arsr.config import RESOURCES_ENV_PREFIX, load_params
from arsr.plan import plan_problems
from arsr.proc import CPUS_ENV, usable_cpus

CHECK_STAGE = "check"  # its params: see dvc_stages.smk's header

# Every stage's log (the command's stdout and stderr) and benchmark (Snakemake's measurements of
# the job: wall time, memory, I/O, CPU time), under logs/ (git- and dvc-ignored; benchmarks/ holds
# the repository's benchmark scripts).
LOG_DIR = "logs/snakemake"

# Snakemake's report (`snakemake --report report.html`, or `report.zip`): what goes in, under which
# category; captions are workflow/report/*.rst (paths relative to dvc_stages.smk, where the rules
# are made). Every metrics file of dvc.yaml goes in; the subcategory is the stage that wrote the file;
# folders need file patterns. The per-step training plots (runs/<stage>/plots) are persist folders Snakemake is not
# told about: the report stage draws them as reports/curves.png.
REPORT_METRICS = dict(category="Metrics", caption="../report/metrics.rst")
REPORT_OUTPUTS = {
    "eval/per_image.csv": dict(category="Metrics", caption="../report/per_image.rst"),
    "eval/samples": dict(
        category="Samples", caption="../report/samples.rst", patterns=["{name}.png"],
        labels={"sample": "{name}"},
    ),
    "reports": dict(  # the page, its curves; not reports/samples/ (copies of eval/samples)
        category="Report", caption="../report/reports.rst", patterns=["{name,[^/]+}.png", "{name,[^/]+}.md"],
        labels={"file": "{name}"},
    ),
}

DvcRule = namedtuple(
    "DvcRule", "name deps outs values cmd threads stage resources outputs log benchmark cluster"
)

# The cluster's hardware, from the site profile's `config` (README "A SLURM cluster"): GPUs per node
# (0: CPU nodes) and nodes per training job. Declared once: sbatch gets `--gres=gpu:<n>` (per node)
# and `--nodes`, the launcher takes one rank per GPU SLURM allocated (SLURM_GPUS_ON_NODE), and the
# preflight below checks the plan for exactly these numbers.
# `cpus_per_node` (optional) caps the cores a job asks for (a training job wants one per rank and
# loader worker; a small node has fewer: its processes then share them).
CLUSTER_SETTINGS = ("config train_nodes", "config gpus_per_node")  # (nodes, GPUs per node)


def _cluster_config():
    """(GPUs per node, nodes per training job, cores per node or None: no cap) from `config`."""
    try:
        gpus, nodes = int(config.get("gpus_per_node", 0)), int(config.get("train_nodes", 1))
        cpus = config.get("cpus_per_node")
        cpus = None if cpus in (None, "", "none") else int(cpus)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config gpus_per_node / train_nodes / cpus_per_node: not whole numbers ({err})") from None
    if gpus < 0 or nodes < 1 or (cpus is not None and cpus < 1):
        raise ValueError(
            f"config gpus_per_node: {gpus} (0 or more), train_nodes: {nodes} (1 or more), "
            f"cpus_per_node: {cpus} (1 or more)"
        )
    return gpus, nodes, cpus


def _cluster_resources(name, resources, gpus, nodes, cpus=None):
    """The job geometry of a stage (rule resources the SLURM executor turns into sbatch options; other
    executors ignore them). A training job: `nodes` nodes, one task each (the launcher; several nodes:
    `mpi: srun`, the rule runs in the batch script and the launcher starts torchrun per node), all
    `gpus` GPUs of each node (`--gres=gpu:<n>` is per node, unlike `gpu: <n>`, sbatch's `--gpus`, a
    total for the job) and a core per process (ranks x (1 + loader workers)). tokenize and evaluate
    take one GPU when there are any."""
    if "nproc" in resources:  # a training stage
        ranks = gpus or int(resources["nproc"])
        wanted = ranks * (1 + int(resources.get("workers", 0)))
        out = {"nodes": nodes, "tasks": nodes, "cpus_per_task": min(wanted, cpus or wanted)}
        if nodes > 1:
            out["mpi"] = "srun"
        if gpus:
            out |= {"gres": f"gpu:{gpus}", "tasks_per_gpu": 0}
        return out
    return {"gres": "gpu:1"} if gpus and name in ("tokenize", "evaluate") else {}


def _lookup(tree, dotted):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _stage_resources(name, params):
    """The rule's resources: its `resources.<stage>` keys (booleans as 0/1: Snakemake's are numbers)."""
    return {k: int(v) if isinstance(v, bool) else v for k, v in params["resources"].get(name, {}).items()}


def _set_resources(name):
    """The `set-resources` given for this stage ({} when this Snakemake keeps them elsewhere: only the
    thread count below reads them, the command gets the final values from Snakemake itself)."""
    try:
        over = workflow.resource_settings.overwrite_resources.get(name) or {}
    except AttributeError:
        return {}
    values = {}
    for k, v in over.items():
        try:  # a quoted profile value (slurm_extra) is an expression Snakemake evaluates per job
            values[k] = getattr(v, "value", v)
        except ValueError:
            continue
    return values


def _threads(name, resources, gpus=0):
    """Cores a stage occupies: the processes it starts (see dvc_stages.smk's header)."""
    res = {**resources, **_set_resources(name)}
    if "nproc" in res and gpus:  # one rank per GPU
        return gpus * (1 + int(res.get("workers", 0)))
    if "nproc" in res:
        return max(1, int(res["nproc"]) * (1 + int(res.get("workers", 0))))
    if "workers" in res:
        return max(1, int(res["workers"]))
    return usable_cpus() if name == "evaluate" else 1


def shell_template(name, resources):
    """The rule's shell template: the stage's command (params.cmd, so a changed dvc.yaml command is a
    params change) after its resources (final values: set-resources applied) and cores, its stdout
    and stderr into the log. Constant per stage, so Snakemake's code trigger does not fire when a
    resource changes. Snakemake empties the log before each run of the job, a requeued SLURM job's
    too; so in a SLURM job the output also goes to the job's SLURM log (`tee`, which ignores the
    time-limit signal meant for the stage; the profile opens that log in append mode), which keeps
    every window of a training that spans several. The redirection is an `exec` of its own, not a
    suffix of the command: bash then execs the stage (its last command) instead of waiting for it,
    so signals (SLURM's USR1 before the time limit) reach the stage, not a shell."""
    env = [f"{RESOURCES_ENV_PREFIX}{name.upper()}__{k.upper()}={{resources.{k}}}" for k in resources]
    log = (
        'if [ -n "${{SLURM_JOB_ID:-}}" ]; then exec > >(trap "" USR1 TERM; exec tee -a {log}) 2>&1; '
        "else exec >> {log} 2>&1; fi;"
    )
    return " ".join([log, *env, f"{CPUS_ENV}={{threads}}", "{params.cmd}"])


def _declare(path, is_dir, metric, stage):
    """The Snakemake output for a stage's out: directory() for a folder, report() when the report
    shows it (subcategory: the stage that writes it)."""
    out = directory(path) if is_dir else path
    spec = REPORT_OUTPUTS.get(path) or (REPORT_METRICS if metric else None)
    return report(out, subcategory=stage, **spec) if spec else out


def _dvc_rules(repo, root="."):
    stages = [s for s in repo.index.stages if getattr(s, "cmd", None)]
    # The check stage's rules, before the DAG is built: the schema (defaults count), the
    # cross-section rules, and every key a stage declares present in the file; a bad
    # params.yaml fails here, by key, before Snakemake deletes or runs anything.
    declared = {
        k: f"dvc.yaml stage {s.name}" for s in stages for d in s.deps if hasattr(d, "params") for k in d.params
    }
    checked = load_params(os.path.join(root, "params.yaml"), required=declared)
    params = checked.model_dump(mode="json")
    gpus, nodes, cpus = _cluster_config()
    if workflow.is_main_process:
        # The preflight of `arsr check --nodes --gpus-per-node`, before the first job is submitted:
        # the global batches for these nodes x ranks x accum, free disk. Fails in seconds, by key.
        problems = plan_problems(checked, nodes, gpus, root, setting_names=CLUSTER_SETTINGS)
        if problems:
            raise ValueError("the plan for this cluster does not work:\n  " + "\n  ".join(problems))
    for s in stages:
        deps, keys = [], []
        for d in s.deps:
            if hasattr(d, "params"):
                keys += list(d.params) if s.name != CHECK_STAGE else []
            else:
                deps.append(os.path.relpath(d.fs_path, root))
        outs, outputs = [], []
        for o in s.outs:
            if o.persist and os.path.isdir(o.fs_path) or o.persist and not os.path.splitext(o.fs_path)[1]:
                continue  # a checkpoint or plots folder (a persist *file*, the check's, stays an output)
            path = os.path.relpath(o.fs_path, root)
            is_dir = os.path.isdir(path) or not os.path.splitext(path)[1]
            outs.append((path, is_dir))
            outputs.append(_declare(path, is_dir, getattr(o, "metric", False), s.name))
        values = {k: _lookup(params, k) for k in sorted(keys)}
        cmd = s.cmd if isinstance(s.cmd, str) else " && ".join(s.cmd)
        name = s.name.replace("@", "__")
        res = _stage_resources(name, params)
        yield DvcRule(
            name, deps, outs, values, cmd, _threads(name, res, gpus), s, res, outputs,
            f"{LOG_DIR}/{name}.log", f"{LOG_DIR}/{name}.benchmark.tsv", _cluster_resources(name, res, gpus, nodes, cpus),
        )  # fmt: skip


# --- outputs not built by Snakemake follow dvc.lock (see the header) ------------------------
_SMK = ".snakemake"
_STAMP = ".snakemake_timestamp"
# What Snakemake's benchmark file starts with (benchmark.py, BenchmarkRecord.get_header()).
_BENCHMARK_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _smk_mtime_ns(path, follow):
    """The mtime Snakemake compares (io.IOFile.mtime_uncached): a directory's timestamp file if it
    has one; inputs (follow) take the later of a symlink and its target, outputs the link."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        if not follow:
            return st.st_mtime_ns
        target = os.stat(path)
        t = target.st_mtime_ns
        if stat.S_ISDIR(target.st_mode) and os.path.exists(os.path.join(path, _STAMP)):
            t = os.stat(os.path.join(path, _STAMP)).st_mtime_ns
        return max(st.st_mtime_ns, t)
    if stat.S_ISDIR(st.st_mode) and os.path.exists(os.path.join(path, _STAMP)):
        return os.stat(os.path.join(path, _STAMP)).st_mtime_ns
    return st.st_mtime_ns


def _set_mtime_ns(path, ns):
    if os.path.isdir(path) and not os.path.islink(path):
        path = os.path.join(path, _STAMP)  # what Snakemake's touch() does for a directory
        open(path, "a").close()
    os.utime(path, ns=(ns, ns), follow_symlinks=False)


def _record_path(kind, path):
    """Snakemake's file persistence (persistence/file.py `_record_path`, NAME_MAX 255)."""
    b64 = urlsafe_b64encode(path.encode()).decode()
    parts = [b64[i : i + 254] for i in range(0, len(b64), 254)]
    return os.path.join(_SMK, kind, *[f"@{p}" for p in parts[:-1]], parts[-1])


def _snakemake_record(path):
    """``(file, record)``: Snakemake's record of the output ``path`` when it describes the file
    there now (its endtime is the file's mtime), else None; a record of other bytes is dropped."""
    rec_path = _record_path("metadata", path)
    try:
        with open(rec_path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if record.get("endtime") == _mtime_float(path):
        return rec_path, record
    os.remove(rec_path)
    return None


def _move_output(path, ns, record=None):
    """Give an output the mtime ``ns``; a record of it follows (same bytes, new mtime)."""
    _set_mtime_ns(path, ns)
    if record is not None:
        rec_path, rec = record
        rec["endtime"] = _mtime_float(path)
        with open(f"{rec_path}.tmp", "w") as f:
            json.dump(rec, f)
        os.replace(f"{rec_path}.tmp", rec_path)


def _mtime_float(path):
    """The float mtime Snakemake records as an output's endtime (the link's own for a symlink)."""
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode) and os.path.exists(os.path.join(path, _STAMP)):
        return os.stat(os.path.join(path, _STAMP)).st_mtime
    return st.st_mtime


def _dvc_changed(stage):
    """`Stage.changed()` restricted to what the Snakemake rule declares (see the header)."""
    if stage.changed_stage():
        return True
    for dep in stage.deps:
        if hasattr(dep, "params") and (not dep.params or stage.name == CHECK_STAGE):
            continue  # the check's sections (or a whole-file params dep): the rule has no params for them
        if dep.status():
            return True
    return stage.changed_outs(allow_missing=False)


def _empty_benchmark(path):
    """A benchmark file without a measurement, for a stage that is up to date and has none."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.tmp", "w") as f:
        f.write(_BENCHMARK_HEADER)
    os.replace(f"{path}.tmp", path)


def _sync_mtimes_with_dvc(repo, rules):
    """Make the mtimes of outputs Snakemake did not build agree with dvc.lock. Returns a report."""
    locks = os.path.join(_SMK, "locks")
    if os.path.isdir(locks) and os.listdir(locks):
        return "skipped: another Snakemake holds a lock here (or a stale one: snakemake --unlock)"
    producer = {out: r.name for r in rules for out, _ in r.outs}
    upstream = {r.name: {producer[d] for d in r.deps if d in producer} for r in rules}
    order, done = [], set()
    while len(order) < len(rules):  # topological (dvc.yaml order among the ready ones)
        ready = [r for r in rules if r.name not in done and upstream[r.name] <= done]
        if not ready:
            return "skipped: dvc.yaml has a cycle"
        order += ready
        done |= {r.name for r in ready}
    rerun, fixed, forced, benchmarks = set(), [], [], []
    now = time.time_ns()
    with lock_repo(repo):
        for r in order:
            paths = [p for p, _ in r.outs]
            if upstream[r.name] & rerun or not all(os.path.lexists(p) for p in paths):
                rerun.add(r.name)  # Snakemake reruns it whatever its mtimes say
                continue
            if any(os.path.exists(_record_path("incomplete", p)) for p in paths):
                continue  # an interrupted Snakemake job: --rerun-incomplete decides
            records = {p: _snakemake_record(p) for p in paths}  # (drops stale records)
            inputs = [d for d in r.deps if os.path.lexists(d)]
            if not inputs:
                continue
            newest = max(_smk_mtime_ns(d, follow=True) for d in inputs)
            products = paths + [r.benchmark] if os.path.lexists(r.benchmark) else paths
            older = [p for p in products if _smk_mtime_ns(p, follow=False) < newest]
            if all(records.values()):  # Snakemake built these very files
                if older and not _dvc_changed(r.stage):  # an input replaced by the same bytes
                    for p in older:
                        _move_output(p, min(newest, now), records.get(p))
                    fixed.append(r.name)
            elif _dvc_changed(r.stage):
                rerun.add(r.name)
                for p in paths:
                    if p not in older:
                        _move_output(p, newest - 1_000_000_000, records[p])
                forced.append(r.name)
                continue
            elif older:
                for p in older:
                    _move_output(p, min(newest, now), records.get(p))
                fixed.append(r.name)
            if not os.path.lexists(r.benchmark):  # (Snakemake's triggers may still rerun it: no harm)
                _empty_benchmark(r.benchmark)
                benchmarks.append(r.name)
    msg = []
    if fixed:
        msg.append(f"up to date in dvc.lock, outputs given their inputs' mtime: {', '.join(fixed)}")
    if forced:
        msg.append(f"changed since dvc.lock, will rerun: {', '.join(forced)}")
    if benchmarks:
        msg.append(f"empty benchmark files written (no measurement): {', '.join(benchmarks)}")
    return "; ".join(msg)


with Repo(".") as _repo:
    DVC_RULES = list(_dvc_rules(_repo))
    if (
        workflow.is_main_process
        and str(config.get("dvc_mtimes", True)).lower() not in ("false", "0", "no", "off")
        and os.path.exists("dvc.lock")
    ):
        _t0 = time.perf_counter()
        try:
            _msg = _sync_mtimes_with_dvc(_repo, DVC_RULES)
        except Exception as _err:  # never block a run: Snakemake's own triggers still apply
            _msg = f"skipped ({type(_err).__name__}: {_err})"
        if _msg:
            print(f"workflow/rules/common.smk: mtimes follow dvc.lock: {_msg} "
                  f"[{time.perf_counter() - _t0:.2f} s]", file=sys.stderr)
