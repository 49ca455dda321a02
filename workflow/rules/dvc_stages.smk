# One Snakemake rule per dvc.yaml stage, built with DVC's own parser (DVC_RULES, from
# common.smk), so the DAG has a single definition (dvc.yaml). Each one has
# - input: the stage's deps (upstream outputs make the edges);
# - output: its outs, except `persist: true` folders (checkpoint folders must survive a
#   rerun; Snakemake deletes declared outputs before running a job); dvc.yaml's metrics, the
#   evaluation table, the sample grids and the report stage's page and curves are flagged for
#   Snakemake's report (`snakemake --report report.html`; common.smk's REPORT_OUTPUTS);
# - params: the resolved values (schema defaults included) of the stage's keys, so Snakemake's params
#   trigger reruns a stage when (and only when) one of *its* keys changes (the check's sections are
#   left out: common.smk validates params.yaml at parse time, and a rerun check would only give every
#   stage a newer input);
# - resources: the stage's `resources.<stage>` keys (params.yaml, or ARSR_RESOURCES__* in
#   Snakemake's environment), which a profile's or the command line's `set-resources` overrides per
#   stage (`set-resources: {train_srvar: {nproc: 4}}`); the command gets them as
#   ARSR_RESOURCES__<STAGE>__<KEY> (booleans as 0/1) and ARSR_CPUS={threads}, so the stage runs
#   with them and shares its cores among its processes (arsr.proc). Not params: nothing reruns;
# - threads: a stage claims one core per process it starts: a training stage `nproc x (1 + workers)`
#   (ranks and their loader processes), shard and tokenize their `workers`, evaluate the CPUs it
#   may use, others 1; capped by Snakemake at --cores, so `snakemake --cores 2` trains one
#   model at a time and `--cores 8` may train two (tiny loaders). Cluster resources stay in the
#   profile (workflow/profiles/slurm);
# - log: logs/snakemake/<stage>.log, the command's stdout and stderr (two trainings at once do
#   not mix on the terminal; the profiles' show-failed-logs prints a failed job's log), and
#   benchmark: logs/snakemake/<stage>.benchmark.tsv (wall time, memory, I/O of the job);
# - conda: environment.yml, the software the stages need (documentation: the stages run in the
#   environment Snakemake runs in, whose `arsr` is this checkout; no --software-deployment-method).
# Outputs that Snakemake did not build follow dvc.lock: see common.smk.


include: "common.smk"


for _r in DVC_RULES:

    rule:
        name:
            _r.name
        input:
            _r.deps,
        output:
            _r.outputs,
        params:
            values=json.dumps(_r.values, sort_keys=True),
            cmd=_r.cmd,
        log:
            _r.log,
        benchmark:
            _r.benchmark
        conda:
            "../../environment.yml"
        threads: _r.threads
        resources:
            **_r.resources,
            **_r.cluster,
        shell:
            shell_template(_r.name, _r.resources)
