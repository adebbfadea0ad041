"""What a Tune search leaves behind: one row per trial, the best trial and its ``best.yaml``, and the
MLflow bookkeeping of the parent run and its child runs (one per trial).

Trials stopped by ASHA are killed mid-run: the driver ends their MLflow runs and uploads what
they left (:func:`close_unfinished_children`).
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config, apply_values, load_config, plain_value
from ..config.space import TuneConfig
from .trial import trial_run_name


def trial_rows(results, spec: TuneConfig, search_name: str, epochs: int) -> list[dict]:
    rows = []
    for r in results:
        cfgv = r.config or {}
        df = r.metrics_dataframe
        history = [float(x) for x in df[spec.metric].dropna()] if df is not None and spec.metric in df else []
        metrics = r.metrics or {}
        trial_id = metrics.get("trial_id") or Path(r.path).name
        ran = int(metrics.get("epoch", len(history)) or 0)
        status = "error" if r.error else ("completed" if ran >= epochs else "stopped")
        rows.append(
            {
                "trial_id": trial_id,
                "run_name": trial_run_name(search_name, trial_id),
                **{k: plain_value(cfgv.get(k)) for k in spec.keys},
                "epochs": ran,
                spec.metric: history[-1] if history else None,
                f"best_{spec.metric}": (max(history) if spec.mode == "max" else min(history)) if history else None,
                "history": history,
                "time_total_s": metrics.get("time_total_s"),
                "status": status,
                "error": str(r.error).splitlines()[0][:300] if r.error else None,
            }
        )
    return rows


def pick_best(rows: list[dict], spec: TuneConfig) -> dict:
    """The best final ``metric`` among trials that ran every epoch (else among all that reported)."""
    scored = [r for r in rows if r[spec.metric] is not None]
    if not scored:
        errors = "; ".join(f"{r['trial_id']}: {r['error']}" for r in rows if r["error"]) or "no trial reported a metric"
        raise RuntimeError(f"every trial failed: {errors}")
    completed = [r for r in scored if r["status"] == "completed"] or scored
    sign = 1 if spec.mode == "max" else -1
    return max(completed, key=lambda r: sign * r[spec.metric])


def write_best_yaml(cfg: Config, spec: TuneConfig, best: dict, path: Path) -> Config:
    """``best.yaml``: the search config with the best values, as a distill run (checked by reloading)."""
    best_cfg = apply_values(cfg, {k: best[k] for k in spec.keys}, name=f"{cfg.run.name}-best", resume=False)
    best_cfg.tune = TuneConfig()  # a distill run: the search's own settings back to the defaults
    header = (
        f"# Best trial {best['trial_id']} of the Tune search {cfg.run.name!r}: {spec.metric} = {best[spec.metric]}"
        f" after {best['epochs']} epoch(s).\n"
        + "".join(f"#   {k} = {best[k]}\n" for k in spec.keys)
        + f"# Run it:  python jobs/distill.py --config {path}\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + best_cfg.to_yaml())
    load_config(path)  # what jobs/distill.py will do: fail here, not there
    return best_cfg


def close_unfinished_children(parent, rows: list[dict], cfg: Config) -> None:
    """Trials stopped by ASHA are killed mid-run: end their MLflow runs and upload what they left."""
    from ..tracking import Tracker, log_run_files

    if not parent.enabled:
        return
    client = parent.client
    exp_id = client.get_run(parent.run_id).info.experiment_id
    by_name = {r["run_name"]: r for r in rows}
    for run in client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'"):
        if run.info.status != "RUNNING":
            continue
        name = run.data.tags.get("mlflow.runName", "")
        row = by_name.get(name, {})
        child = Tracker(parent.uri, run.info.run_id, client=client)
        run_dir = Path(cfg.run.output_dir) / name
        if run_dir.exists():
            log_run_files(child, run_dir)
        status = row.get("status", "stopped")
        child.set_tag("tune.status", status)
        child.finish("FAILED" if status == "error" else "KILLED")


def register_best(parent, run_name: str, name: str) -> None:
    """Register the MLflow Model of the best trial's child run (``tracking.register_as``); a warning if it has none."""
    from ..tracking import register_run_model

    if not parent.enabled:
        return
    client = parent.client
    exp_id = client.get_run(parent.run_id).info.experiment_id
    runs = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}' and tags.mlflow.runName = '{run_name}'")
    try:
        if not runs:
            raise LookupError(f"no child run named {run_name!r}")
        version = register_run_model(parent.uri, runs[0].info.run_id, name)
    except Exception as e:  # noqa: BLE001 - the search's results are written already; say what is missing
        print(f"WARNING: the best trial's model was not registered as {name!r} ({type(e).__name__}: {e})", flush=True)
        return
    parent.set_tag("registered_model", f"{name}/{version}")
    print(f"registered the best trial's model as {name!r} version {version}", flush=True)


def curves_png(rows: list[dict], metric: str, path: Path) -> Path | None:
    if not any(r["history"] for r in rows):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for r in rows:
        if r["history"]:
            ax.plot(range(1, len(r["history"]) + 1), r["history"], marker="o", label=r["trial_id"])
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path



def print_summary(rows: list[dict], best: dict, spec: TuneConfig, best_path: Path) -> None:
    width = max(len(k) for k in spec.keys)
    print("\ntrials:", flush=True)
    for r in rows:
        vals = ", ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in spec.keys)
        print(f"  {r['trial_id']}  {r['status']:<9} epochs={r['epochs']}  {spec.metric}={r[spec.metric]}  {vals}", flush=True)
    print(f"\nbest trial {best['trial_id']}: {spec.metric} = {best[spec.metric]}", flush=True)
    for k in spec.keys:
        print(f"  {k:<{width}} = {best[k]}", flush=True)
    print(f"best config: {best_path}\n  python jobs/distill.py --config {best_path}", flush=True)
