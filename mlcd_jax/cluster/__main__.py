"""``python -m mlcd_jax.cluster --config=configs/cluster/default.py [--config.key=value ...]``.

Prints the manifest's summary; a config file that does not load, a bad ``--config.key``, and bad
settings or inputs found by the job are one ``config error:`` line with exit status 2, as every command
of ``python -m mlcd_jax`` (this one is ``python -m mlcd_jax cluster``).
``--config.runner=beam --config.beam_options='--runner=...'`` runs the embed and assign stages on Apache
Beam (``mlcd_jax.cluster.runners.beam``); ``--dry-run`` (= ``--config.dry_run=True``) prints the plan
(and the pipeline options) instead, writing nothing.
"""

import json

from absl import app, flags
from ml_collections import config_flags

from mlcd_jax.cli_config import config_error, loaded_config, parse_flags
from mlcd_jax.cluster.config import ClusterError
from mlcd_jax.cluster.job import run
from mlcd_jax.cluster.teachers import TeacherError
from mlcd_jax.data.records import RecordError
from mlcd_jax.data.source_base import SourceError

config_flags.DEFINE_config_file("config", None, "clustering job config file", lock_config=True)
_DRY_RUN = flags.DEFINE_bool("dry-run", False, "print the plan (runner=beam: the pipeline options) and exit")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    config = loaded_config()  # a config file that does not load is one line
    if _DRY_RUN.value:
        with config.unlocked():
            config.dry_run = True
    try:
        manifest = run(config)
    except (ClusterError, TeacherError, SourceError, RecordError) as e:
        config_error(e)
    summary = {k: v for k, v in manifest.items() if k not in ("shards", "skipped", "settings")}
    print(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)
