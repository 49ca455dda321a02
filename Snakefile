# Snakemake entry point. The rules come from dvc.yaml (workflow/rules/dvc_stages.smk):
#   snakemake --cores 2                                      # local, no profile needed
#   snakemake --workflow-profile workflow/profiles/slurm     # SLURM cluster
# Training rules claim nproc x (1 + workers) cores themselves, so `--cores 2` trains one model
# at a time. After a Snakemake build, `dvc commit -f` records the outputs so `dvc status` is
# clean; outputs DVC built or restored count as up to date when dvc.lock says so (their mtimes
# are made to agree at parse time; `--config dvc_mtimes=false` turns that off).
import os
import signal

# `sbatch --signal=USR1@120` reaches this Snakemake (inside the job step) too; the training
# stage checkpoints on USR1, so Snakemake must not die first and mark the job failed.
if os.environ.get("SLURM_JOB_ID"):
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


include: "workflow/rules/dvc_stages.smk"


rule all:
    default_target: True
    input:
        [out for _n, _d, outs, *_rest in DVC_RULES for out, _is_dir in outs],
