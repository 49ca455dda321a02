# One Snakemake rule per dvc.yaml stage, built with DVC's own parser, so the DAG has a
# single definition (dvc.yaml). Pinned DVC: `Repo.index.stages` is not public API.
#
# - inputs: the stage's deps (upstream outputs make the edges);
# - outputs: its outs, except `persist: true` folders (checkpoint folders must survive a
#   rerun; Snakemake deletes declared outputs before running a job);
# - params: the resolved values (schema defaults included) of the stage's keys, so Snakemake's params
#   trigger reruns a stage when (and only when) one of *its* keys changes;
# - resources/threads: from the profile (workflow/profiles/*), never from params.yaml.
import json
import os

from dvc.repo import Repo

from arsr.config import load_params


def _lookup(tree, dotted):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _dvc_rules(root="."):
    with Repo(root) as repo:
        stages = [s for s in repo.index.stages if getattr(s, "cmd", None)]
        # The check stage's rules, before the DAG is built: the schema (defaults count), the
        # cross-section rules, and every key a stage declares present in the file; a bad
        # params.yaml fails here, by key, before Snakemake deletes or runs anything.
        declared = {
            k: f"dvc.yaml stage {s.name}" for s in stages for d in s.deps if hasattr(d, "params") for k in d.params
        }
        params = load_params(os.path.join(root, "params.yaml"), required=declared).model_dump(mode="json")
        for s in stages:
            deps, keys = [], []
            for d in s.deps:
                if hasattr(d, "params"):
                    keys += list(d.params)
                else:
                    deps.append(os.path.relpath(d.fs_path, root))
            outs = []
            for o in s.outs:
                if o.persist and os.path.isdir(o.fs_path) or o.persist and not os.path.splitext(o.fs_path)[1]:
                    continue  # a checkpoint or plots folder (a persist *file*, the check's, stays an output)
                path = os.path.relpath(o.fs_path, root)
                outs.append((path, os.path.isdir(path) or not os.path.splitext(path)[1]))
            values = {k: _lookup(params, k) for k in sorted(keys)}
            cmd = s.cmd if isinstance(s.cmd, str) else " && ".join(s.cmd)
            yield s.name.replace("@", "__"), deps, outs, values, cmd


DVC_RULES = list(_dvc_rules())

for _name, _deps, _outs, _values, _cmd in DVC_RULES:
    rule:
        name: _name
        input: _deps
        output: [directory(p) if is_dir else p for p, is_dir in _outs]
        params:
            values=json.dumps(_values, sort_keys=True),
            cmd=_cmd,
        threads: 1
        shell: "{params.cmd}"
