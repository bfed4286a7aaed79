"""Seeded studies: every point of a config sweep trained with several seeds, reported as mean ± std.

``python -m mlcd_jax.study --config=configs/demo.py --workdir=DIR --sweep='loss.kind=mlcd,softmax;loss.top_l=8,1'
--seeds=0,1,2 [--config.key=value ...]``

The sweep is the cartesian product of its ``;``-separated keys' values, parsed to the type the key has
in the config (``--config.key=value`` overrides apply to every run). Each point × seed is one run of
:func:`mlcd_jax.experiment.run` (cluster through the shared cache, train, kNN / linear probe) in
``DIR/runs/<point>/seed<k>``, with ``eval.baselines`` emptied; the baselines that need no training
(``eval.baselines``' pixels, teacher and random_init; the random-init ViT once per seed) are computed
once for the study from the config without the sweep, and cached in ``DIR/baselines.json``.
``study.json`` keeps each run's last held-out figures (``heldout``) and the study's command, code state,
machine and date.

A run is finished when its ``results.json`` exists and its ``config.json`` records the run's config
(hence its overrides and seed); a re-run skips finished runs and the trainer resumes an interrupted one
from its checkpoint. ``DIR/study.json`` is rewritten after every run; at the end the table is printed
and ``DIR/study.png`` drawn. Spread over seeds is the sample standard deviation (ddof=1; null for a
single seed). Configuration errors are one ``config error:`` line and exit status 2; SIGTERM / Ctrl-C
checkpoints the run in training and exits with 75 (re-run to go on).

Every run's config is validated before the first one trains; a run that diverges or meets a config
error of its own is recorded in ``study.json`` as ``failed`` with its reason and the study goes on (a
re-run retries it). ``DIR`` is locked for the study (:mod:`mlcd_jax.workdir_lock`); a run already trained
under ``DIR`` with other training settings (say fewer steps) is refused as a re-run of one workdir is
(:mod:`mlcd_jax.identity`). ``seed`` is swept by ``--seeds``, not ``--sweep``.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags
from etils import epath
from ml_collections.config_flags import config_path

from mlcd_jax import cli, fileio, identity, provenance
from mlcd_jax.cli_config import PARSERS, config_error, parse_value, set_tower_override, tower_field_type

FLAGS = cli.FLAGS
flags.DEFINE_string("sweep", "", "KEY=V1,V2[;KEY2=W1,W2]: config values to sweep (cartesian product); empty: "
                    "the config alone.")
flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds (config.seed); every sweep point runs with each.")

METRICS = ("knn_top1", "linear_top1", "zero_shot_top1", "i2t_r@1", "i2t_r@5", "t2i_r@1", "t2i_r@5")
METRIC_NAMES = {"knn_top1": "kNN", "linear_top1": "linear probe", "zero_shot_top1": "zero-shot",
                "i2t_r@1": "image->text R@1", "i2t_r@5": "image->text R@5", "t2i_r@1": "text->image R@1",
                "t2i_r@5": "text->image R@5"}
STD_NOTE = "mean ± std over seeds (sample std, ddof=1), top-1 / recall in %"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")


@dataclass(frozen=True)
class Point:
    """One sweep point: dotted config keys -> typed values, a label for tables and a folder name."""

    overrides: dict[str, Any]

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.overrides.items()) or "base config"

    @property
    def name(self) -> str:
        return "__".join(_UNSAFE.sub("_", f"{k}={v}") for k, v in self.overrides.items()) or "base"


@dataclass(frozen=True)
class Run:
    """One training run of the study: a sweep point with a seed, its config and its workdir."""

    point: Point
    seed: int
    config: ml_collections.ConfigDict
    workdir: str


def parse_sweep(config: ml_collections.ConfigDict, sweep: str) -> list[Point]:
    """The points of ``KEY=V1,V2[;KEY2=W1,W2]`` (cartesian product), values typed like ``config``'s.

    Raises ValueError with a one-line message for a key not in ``config``, a value that does not parse,
    or a repeated key or value.
    """
    if not sweep.strip():
        return [Point({})]
    axes: dict[str, list[Any]] = {}
    for part in sweep.split(";"):
        key, sep, values = (s.strip() for s in part.partition("="))
        if not sep or not key or not values:
            raise ValueError(f"--sweep part {part!r} is not KEY=V1,V2")
        if key in axes:
            raise ValueError(f"--sweep names {key} twice")
        if key == "seed":
            raise ValueError("--sweep cannot hold seed: every point already runs with each of --seeds; "
                             "use --seeds=0,1,2")
        kind, optional = _sweep_type(config, key)
        if kind not in PARSERS:
            raise ValueError(f"--sweep key {key} holds a {kind.__name__}; only int, float, bool and "
                             "str values can be swept")
        try:
            parsed = [parse_value(key, token, kind, optional) for token in values.split(",")]
        except ValueError as err:
            raise ValueError(f"--sweep value {err}") from None
        if len(set(parsed)) < len(parsed):
            raise ValueError(f"--sweep repeats a value of {key}: {values}")
        axes[key] = parsed
    points = [Point(dict(zip(axes, combo))) for combo in itertools.product(*axes.values())]
    if len({p.name for p in points}) < len(points):
        raise ValueError(f"--sweep values give clashing folder names: {[p.name for p in points]}")
    return points


def _sweep_type(config: ml_collections.ConfigDict, key: str) -> tuple[type, bool]:
    """The type a sweep of ``key`` is read as and whether None is a value: the config value's, a
    placeholder's declared type, or a tower shape field's (``model.overrides.mlp_dim``)."""
    try:
        current = config_path.get_value(key, config)
        return (config_path.get_type(key, config), True) if current is None else (type(current), False)
    except (KeyError, AttributeError, TypeError, IndexError):
        field = tower_field_type(key)
        if field is None:
            raise ValueError(f"--sweep key {key} is not in the config") from None
        return field


def parse_seeds(seeds: str) -> list[int]:
    """``0,1,2`` -> [0, 1, 2]; anything else (empty, not integers, repeated) is a ValueError."""
    try:
        parsed = [int(s) for s in seeds.split(",")]
    except ValueError:
        raise ValueError(f"--seeds={seeds!r} must be comma-separated integers, e.g. 0,1,2") from None
    if len(set(parsed)) < len(parsed):
        raise ValueError(f"--seeds={seeds!r} repeats a seed")
    return parsed


def plan(base: ml_collections.ConfigDict, points: Sequence[Point], seeds: Sequence[int], workdir: str) -> list[Run]:
    """Every point × seed as a run: ``base`` with the point's overrides, ``seed`` and no per-run baselines."""
    from mlcd_jax.config_lib import ConfigError

    if not base.eval.source:
        raise ConfigError("eval.source is empty: a study compares kNN / linear-probe accuracy on a labelled source")
    runs = []
    for point in points:
        for seed in seeds:
            config = copy.deepcopy(base)
            for key, value in point.overrides.items():
                if tower_field_type(key):
                    set_tower_override(config, key, value)
                else:
                    config_path.set_value(key, config, value)
            config.seed = seed
            config.eval.baselines = ""
            runs.append(Run(point, seed, config, str(epath.Path(workdir) / "runs" / point.name / f"seed{seed}")))
    return runs


def _comparable(record: dict[str, Any], shards_from_cache: bool) -> dict[str, Any]:
    """A config as JSON, without ``data.shards`` when the clustering cache fills it in (the cluster
    settings that decide it are compared instead)."""
    if shards_from_cache:
        record["data"].pop("shards", None)
    return record


def finished_result(run: Run) -> dict[str, Any] | None:
    """The trained model's row of ``run``'s ``results.json`` if the run finished with its config, else None."""
    from mlcd_jax import experiment

    out = epath.Path(run.workdir)
    if not ((out / "results.json").exists() and (out / "config.json").exists()):
        return None
    from_cache = not run.config.data.shards
    recorded = fileio.load_json(out / "config.json")
    recorded.pop(identity.HISTORY, None)
    recorded = _comparable(recorded, from_cache)
    if recorded != _comparable(json.loads(run.config.to_json_best_effort()), from_cache):
        return None
    name = experiment.trained_model_name(run.config)
    return next((r for r in fileio.load_json(out / "results.json") if r["model"] == name), None)


def seed_stats(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``n`` and, for each of :data:`METRICS` that every row has, its mean and sample std (ddof=1;
    None for a single row) over the rows."""
    stats: dict[str, Any] = {"n": len(rows)}
    for metric in METRICS:
        if rows and all(metric in r for r in rows):
            values = np.array([r[metric] for r in rows], np.float64)
            stats[f"{metric}_mean"] = float(values.mean())
            stats[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else None
    return stats


def _baseline_context(base: ml_collections.ConfigDict) -> dict[str, Any]:
    """What the baseline rows depend on; ``baselines.json`` from another context is recomputed."""
    record = json.loads(base.to_json_best_effort())
    record["eval"].pop("baselines")
    return {key: record[key] for key in ("seed", "model", "data", "eval")}


def study_baselines(base: ml_collections.ConfigDict, seeds: Sequence[int], workdir: str) -> list[dict[str, Any]]:
    """The study's baseline rows: pixels and teacher once, the random-init ViT for each seed (mean, sample
    std and ``per_seed``), for those of ``base.eval.baselines``; cached in ``workdir/baselines.json``."""
    from mlcd_jax import experiment

    configured = experiment.configured_baselines(base)
    if "single_label" in configured:
        print("baselines: single_label is not trained per study; sweep loss.kind=mlcd,softmax instead", flush=True)
    wanted = [b for b in experiment.BASELINE_MODELS if b in configured]
    path = epath.Path(workdir) / "baselines.json"
    context = _baseline_context(base)
    cache = fileio.load_json(path) if path.exists() else {}
    if cache.get("context") != context:
        cache = {"context": context, "rows": {}}
    rows = cache["rows"]
    todo = [(b, base.seed) for b in wanted if b != "random_init" and b not in rows]
    if "random_init" in wanted:
        todo += [("random_init", s) for s in seeds if str(s) not in rows.get("random_init", {})]
    if todo:
        print(f"baselines: computing {', '.join(b if b != 'random_init' else f'{b} seed {s}' for b, s in todo)}",
              flush=True)
    for baseline, seed in todo:
        config = copy.deepcopy(base)
        config.seed = seed
        if baseline == "teacher":
            config = experiment.with_shards(config)
        row = experiment.baseline_row(config, baseline)
        if baseline == "random_init":
            rows.setdefault("random_init", {})[str(seed)] = row
        else:
            rows[baseline] = row
        fileio.write_atomic(path, json.dumps(cache, indent=1, default=float) + "\n")
    out = []
    for baseline in wanted:
        if baseline != "random_init":
            out.append({**rows[baseline], "n": 1})
            continue
        per_seed = [{"seed": s, **{m: v for m, v in rows[baseline][str(s)].items() if m in METRICS}} for s in seeds]
        stats = seed_stats(per_seed)
        row = {"model": experiment.BASELINE_MODELS[baseline]}
        for m in METRICS:
            if f"{m}_mean" in stats:
                row |= {m: stats[f"{m}_mean"], f"{m}_std": stats[f"{m}_std"]}
        out.append({**row, "n": stats["n"], "per_seed": per_seed})
    return out


def final_heldout(workdir: str) -> dict[str, Any] | None:
    """A run's last held-out figures (the training-time evaluators' ``heldout/...`` scalars in its
    ``metrics.jsonl``) with their ``step``, or None when it logged none."""
    from mlcd_jax.evaluate.evaluators import HELDOUT
    from mlcd_jax.evaluate.pictures import read_metrics

    path, found = epath.Path(workdir) / "metrics.jsonl", None
    for row in read_metrics(path) if path.exists() else []:
        held = {k: v for k, v in row.items() if k.startswith(HELDOUT)}
        found = {"step": row["step"], **held} if held else found
    return found


def study_record(points: Sequence[Point], runs: Sequence[dict[str, Any]], baselines: list[dict[str, Any]]) -> dict:
    """study.json: the runs (finished, or failed with their reason), the baselines and one summary row per
    point with finished runs."""
    summary = []
    for point in points:
        done = [r for r in runs if r["overrides"] == point.overrides and "failed" not in r]
        if done:
            summary.append({"overrides": point.overrides, **seed_stats(done)})
    return {"runs": list(runs), "baselines": baselines, "summary": summary}


def _percent(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def study_table(record: dict[str, Any]) -> str:
    """The printed table: one row per sweep point, then the baselines, top-1 as mean ± std in %."""
    from mlcd_jax.evaluate.report import results_table

    metrics = _reported(record)
    rows = [{"model": Point(s["overrides"]).label, "n": s["n"],
             **{m: _percent(s.get(f"{m}_mean"), s.get(f"{m}_std")) for m in metrics}} for s in record["summary"]]
    rows += [{"model": b["model"], "n": b["n"], **{m: _percent(b.get(m), b.get(f"{m}_std")) for m in metrics}}
             for b in record["baselines"]]
    return f"{STD_NOTE}\n" + results_table(rows, ["model", "n", *metrics])


def _reported(record: dict[str, Any]) -> list[str]:
    """The :data:`METRICS` some sweep point or baseline has (in that order)."""
    return [m for m in METRICS
            if any(f"{m}_mean" in s for s in record["summary"]) or any(m in b for b in record["baselines"])]


def study_png(record: dict[str, Any], path: str, title: str) -> None:
    """Grouped bars (kNN, linear, zero-shot, recall: those reported) per sweep point with std error bars;
    baselines as labelled horizontal lines."""
    from mlcd_jax.evaluate.pictures import new_figure, save_figure

    summary = record["summary"]
    metrics = _reported(record)
    colours = dict(zip(METRICS, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
                                 "tab:pink")))
    names = METRIC_NAMES
    fig = new_figure((max(10.0, 5.0 + 0.8 * len(metrics) * len(summary)), 6.0), dpi=100)
    ax = fig.subplots()
    x, width = np.arange(len(summary)), 0.76 / max(len(metrics), 1)
    for j, metric in enumerate(metrics):
        means = [100 * s[f"{metric}_mean"] if f"{metric}_mean" in s else np.nan for s in summary]
        stds = [100 * (s.get(f"{metric}_std") or 0.0) for s in summary]
        bars = ax.bar(x + (j - (len(metrics) - 1) / 2) * width, means, width, yerr=stds, capsize=5, color=colours[metric],
                      label=f"{names[metric]} (mean ± std)")
        ax.bar_label(bars, fmt="%.1f", label_type="center", color="white", fontsize="large")
    for baseline, style in zip(record["baselines"], itertools.cycle((":", "--", "-."))):
        for metric in metrics:
            if metric in baseline:
                value = 100 * baseline[metric]
                ax.axhline(value, color=colours[metric], linestyle=style, linewidth=1.5,
                           label=f"{baseline['model']}, {names[metric]}: {value:.1f}%")
    ax.set_xticks(x, [Point(s["overrides"]).label for s in summary], rotation=15 if len(summary) > 4 else 0)
    ax.set(xlabel="sweep point", ylabel="top-1 accuracy / recall (%)", ylim=(0, 100), title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.set_layout_engine("constrained")
    save_figure(fig, path)


def check_plan(runs: Sequence[Run]) -> None:
    """Every run's config validated before the first one trains, one ConfigError line for the first
    mistake: the config itself, a ``workdir:`` tower (``{seed}`` filled in) that is neither a trained run
    nor an earlier run of this study, and a run already trained here with other settings."""
    from mlcd_jax import train
    from mlcd_jax.config_lib import ConfigError

    planned: set[str] = set()
    for run in runs:
        where = f"sweep point {run.point.label} seed {run.seed}"
        try:
            train.checked_mesh(run.config)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        for key in ("image_tower", "text_tower"):
            spec = run.config.loss.get(key, "")
            path = spec.removeprefix("workdir:").replace("{seed}", str(run.seed))
            if spec.startswith("workdir:") and path not in planned and identity.read(path) is None:
                raise ConfigError(f"{where}: loss.{key}={spec}: {path} holds no trained run (no config.json)")
        identity.check_rerun(run.config, run.workdir)
        planned.add(run.workdir)


def _train_point(run: Run) -> dict[str, Any] | str:
    """The trained model's results row of ``run`` (trained and evaluated now), or why it failed: a
    divergence or a config error found inside the run fails that point, not the study."""
    from mlcd_jax import experiment
    from mlcd_jax.config_lib import ConfigError
    from mlcd_jax.train import TrainingDiverged

    try:
        rows = experiment.run(copy.deepcopy(run.config), run.workdir)["eval"]
    except (TrainingDiverged, ConfigError) as err:
        reason = f"{'diverged' if isinstance(err, TrainingDiverged) else 'config error'}: {err}"
        print(f"failed: {reason}", file=sys.stderr, flush=True)
        return reason
    return next(r for r in rows if r["model"] == experiment.trained_model_name(run.config))


def run_study(base: ml_collections.ConfigDict, points: Sequence[Point], seeds: Sequence[int], workdir: str) -> dict:
    """Trains and evaluates every run not finished yet (failed ones are retried), then writes study.json /
    study.png and prints the table; a run that fails is recorded with its reason and the study goes on."""
    runs = plan(base, points, seeds, workdir)
    check_plan(runs)
    out = epath.Path(workdir)
    baselines = study_baselines(base, seeds, workdir)
    origin = provenance.of_command("python -m mlcd_jax.study", sys.argv[1:])
    finished: list[dict[str, Any]] = []
    for i, run in enumerate(runs, 1):
        progress = f"[{i}/{len(runs)}] {run.point.label} seed {run.seed}"
        row = finished_result(run)
        print(f"{progress}: {'done (cached)' if row else 'training'}", flush=True)
        row = row or _train_point(run)
        entry = {"overrides": run.point.overrides, "seed": run.seed}
        if isinstance(row, str):
            finished.append({**entry, "failed": row, "workdir": run.workdir})
        else:
            finished.append({**entry, **{m: row[m] for m in METRICS if m in row}, "workdir": run.workdir,
                             "heldout": final_heldout(run.workdir)})
        record = {**study_record(points, finished, baselines), **origin}
        fileio.write_atomic(out / "study.json", json.dumps(record, indent=1, default=float) + "\n")
    print(study_table(record), flush=True)
    title = f"{base.eval.source}: top-1 / recall over seeds {', '.join(map(str, seeds))} (mean ± sample std)"
    study_png(record, str(out / "study.png"), title)
    print(f"study: {out / 'study.json'}, {out / 'study.png'}", flush=True)
    failed = [r for r in finished if "failed" in r]
    if failed:
        print(f"study: {len(failed)} of {len(runs)} runs failed (their reasons are in study.json); re-run the same "
              "command to retry only those", file=sys.stderr, flush=True)
    return record


def main(argv: list[str]) -> None:
    del argv
    config = cli.loaded_config()
    cli.prepare_process(config)
    try:
        if FLAGS.coordinator_address or FLAGS.num_processes:
            raise ValueError("a study runs in one process: drop --coordinator_address / --num_processes")
        points, seeds = parse_sweep(config, FLAGS.sweep), parse_seeds(FLAGS.seeds)
    except ValueError as err:
        config_error(err)
    cli.run_or_exit(lambda: cli.locked(FLAGS.workdir, "study", lambda: run_study(config, points, seeds, FLAGS.workdir)))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=cli.parse_flags)
