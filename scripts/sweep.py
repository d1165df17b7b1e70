"""Hyperparameter sweep: Hydra multirun over conf/, each job one DVC experiment (slmkit.sweep).

    python scripts/sweep.py --multirun lora.r=4,8 train.learning_rate=1e-4,3e-4       (make sweep ARGS=...)
    ... hydra/launcher=parallel        two jobs at once (joblib), threads split between them
    ... hydra/sweeper=search 'lora.r=choice(4,8,16)' 'train.learning_rate=interval(1e-4,3e-3)'   (optuna)
    ... hydra/launcher=slurm           one SLURM job per sweep job (submitit)

Every job's table row (overrides, accuracy, stages run/reused) is printed at the end and written to
sweeps/<time>/summary.md; `dvc exp show` lists the same experiments. A job whose pipeline fails (the
parity gate, say) is listed with its error line and the others go on; the sweep then exits 1. A bad
config value stops the sweep before any job runs.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from slmkit import sweep
from slmkit.config import ConfigError
from slmkit.stage import StageError


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def job(raw: DictConfig) -> float:
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    try:
        cfg = sweep.job_config(raw)
        sweep_id = Path(hc.sweep.dir).name
        result = sweep.run_job(
            cfg,
            overrides,
            Path(hc.sweep.dir) / hc.sweep.subdir,
            sweep.experiment_name(f"sweep-{sweep_id}", hc.job.num),
            threads=sweep.thread_budget(int(hc.launcher.get("n_jobs") or 1)),
        )
    except ConfigError as err:  # a bad value: no job of this sweep should start
        print(f"slmkit sweep: job {hc.job.num} ({' '.join(overrides)}): error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except StageError as err:  # this job's pipeline failed: the other jobs go on; the sweep exits 1 at the end
        print(f"slmkit sweep: job {hc.job.num} ({' '.join(overrides)}): error: {err}", file=sys.stderr)
        return float("nan")  # Optuna records the trial as failed
    model, acc, seconds = result["objective_model"], result["objective"], result["seconds"]
    print(f"job {hc.job.num} {result['name']}: {model} accuracy {acc:.4f} ({seconds} s)")
    return result["objective"]


if __name__ == "__main__":
    job()
    sys.exit(1 if sweep.FAILED_JOBS else 0)
