"""Faults and mistakes a real user hits, each as it failed before its fix: a changed source under a resumed
clustering job, 16-bit, Latin-1 and symlinked inputs, outputs hidden by mkstemp's 0600, damaged HF
checkpoints and damaged newest checkpoints, stale safetensors shards, and command-line mistakes that
printed a traceback (or, for evaluation, clustered first). The trainer's own faults (SIGTERM / Ctrl-C,
resume from moved shards with other workers, another model size, config errors) are in test_train.py;
damaged shards and resume identity of the data state in test_pipeline.py."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mlcd_jax import cluster, fileio
from mlcd_jax.cluster import ClusterError
from mlcd_jax.data import augment
from mlcd_jax.data.sources import FolderSource, load_arrays
from test_cluster import _png_folder

ROOT = Path(__file__).resolve().parents[1]


def _job(output_dir, folder, **kw):
    return ml_collections.ConfigDict(dict(
        source=f"folder:{folder}", output_dir=str(output_dir), num_clusters=8, top_l=2, kmeans_iters=3,
        shard_size=20, progress=False, pixels_dim=16, teacher_fit_samples=100, **kw,
    ))


@pytest.mark.parametrize("change", ["added", "removed", "renamed"])
def test_a_changed_source_is_refused_when_the_job_resumes(tmp_path, change):
    """Killed after the embed stage, the source edited, re-run: before, exit 0 with most records carrying
    another image's labels (or an IndexError); now one ClusterError that says how to start fresh."""
    images, labels = load_arrays("digits", split="all", limit=41)
    folder = tmp_path / "images"
    _png_folder(folder, images, labels, [f"img{i:03d}.png" for i in range(41)])
    out = tmp_path / "out"
    cluster.run(_job(out, folder, stages="embed"))
    first = sorted(folder.glob("class*/*.png"))[0]
    if change == "added":
        (first.parent / "img000a.png").write_bytes(first.read_bytes())
    elif change == "removed":
        first.unlink()
    else:
        first.rename(first.parent / "renamed.png")
    with pytest.raises(ClusterError, match="changed since .* use a new output_dir, or delete this one"):
        cluster.run(_job(out, folder))
    assert not (out / "manifest.json").exists()


def test_an_unchanged_source_resumes_to_the_same_shards(tmp_path):
    images, labels = load_arrays("digits", split="all", limit=41)
    folder = tmp_path / "images"
    _png_folder(folder, images, labels, [f"img{i:03d}.png" for i in range(41)])
    straight = cluster.run(_job(tmp_path / "straight", folder))
    cluster.run(_job(tmp_path / "resumed", folder, stages="embed"))
    resumed = cluster.run(_job(tmp_path / "resumed", folder))
    assert resumed["num_images"] == straight["num_images"] == 41
    for shard in straight["shards"]:
        assert (tmp_path / "resumed" / shard["path"]).read_bytes() == (tmp_path / "straight" / shard["path"]).read_bytes()


def test_symlinks_in_a_folder_source_are_followed_and_a_broken_one_is_named(tmp_path):
    """A broken symlink was listed in the manifest as key '0'; folder symlinks were skipped silently."""
    images, labels = load_arrays("digits", split="all", limit=30)
    _png_folder(tmp_path / "elsewhere", images[:10], labels[:10], [f"x{i}.png" for i in range(10)])
    folder = tmp_path / "images"
    _png_folder(folder, images[10:], labels[10:], [f"img{i:02d}.png" for i in range(20)])
    (folder / "linked").symlink_to(tmp_path / "elsewhere")
    (folder / "loop").symlink_to(folder)  # a cycle is walked once
    (folder / "aaa_broken.png").symlink_to(tmp_path / "gone.png")
    manifest = cluster.run(_job(tmp_path / "out", folder))
    assert manifest["num_source_images"] == 31 and manifest["num_images"] == 30
    assert [s["key"] for s in manifest["skipped"]] == ["aaa_broken.png"]
    assert manifest["skipped"][0]["error"] == "unreadable (No such file or directory)"


def test_16_bit_grayscale_is_scaled_not_clipped():
    """A 0..65535 gradient became [0, 255, 255, ...] (clipped to 8 bits)."""
    gradient = (np.arange(16, dtype=np.uint16) * 4369).reshape(4, 4)
    buf = io.BytesIO()
    Image.fromarray(gradient).save(buf, format="PNG")
    decoded = augment.decode_image(buf.getvalue())
    assert decoded.shape == (4, 4, 1) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded[:, :, 0].ravel(), np.arange(16) * 17)


def test_a_latin1_caption_is_read_not_fatal(tmp_path):
    """One caption file in Latin-1 killed the clustering job with a UnicodeDecodeError naming no file."""
    images, labels = load_arrays("digits", split="all", limit=2)
    _png_folder(tmp_path, images, labels, ["a.png", "b.png"])
    (tmp_path / f"class{labels[0]}" / "a.txt").write_bytes("café crème".encode("latin-1"))
    (tmp_path / f"class{labels[1]}" / "b.txt").write_bytes("\ufeffnaïve\n".encode("utf-8"))
    source = FolderSource(str(tmp_path))
    assert sorted(source[i]["caption"] for i in range(2)) == ["café crème", "naïve"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_respect_the_umask(tmp_path, umask, mode):
    """Shards, manifest and config.json were written 0600 whatever the umask (mkstemp's mode)."""
    previous = os.umask(umask)
    try:
        fileio.write_atomic(tmp_path / "manifest.json", "{}")
        with fileio.atomic_path(tmp_path / "shard.array_record") as tmp:
            Path(tmp).write_bytes(b"x")
    finally:
        os.umask(previous)
    for name in ("manifest.json", "shard.array_record"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


@pytest.fixture
def hf_dir(tmp_path):
    from flax import nnx

    from mlcd_jax.interop.hf import save_vision
    from mlcd_jax.models import VisionTransformer, get_preset

    save_vision(VisionTransformer(get_preset("tiny"), rngs=nnx.Rngs(0)), str(tmp_path / "hf"))
    return tmp_path / "hf"


@pytest.mark.parametrize("damage,message", [
    ("config_not_json", r"config.json is not JSON"),
    ("truncated_weights", r"model.safetensors is not a readable safetensors file"),
    ("hidden_size", r"the weights in .* do not fit its config.json \(CLIPVisionModel, width 96"),
])
def test_a_damaged_hf_checkpoint_is_one_error_naming_the_file(hf_dir, damage, message):
    """A non-JSON config.json, a truncated safetensors file or a config whose hidden size differs from the
    weights ('cannot reshape array of size 4096 ...') raised without naming the file."""
    from mlcd_jax.cluster.teachers import TeacherError, build_teacher
    from mlcd_jax.interop.files import InteropError
    from mlcd_jax.interop.hf import load_vision

    config_path, weights = hf_dir / "config.json", hf_dir / "model.safetensors"
    if damage == "config_not_json":
        config_path.write_text("{not json")
    elif damage == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        config = json.loads(config_path.read_text())
        config["hidden_size"] = 96
        config_path.write_text(json.dumps(config))
    with pytest.raises(InteropError, match=message):
        load_vision(str(hf_dir))
    with pytest.raises(TeacherError, match="teacher 'hf:.*': .*" + message):  # the clustering job's one line
        build_teacher(f"hf:{hf_dir}", cluster.default_config(), str(hf_dir))


def test_an_unsharded_save_over_a_sharded_one_leaves_no_stale_shards(tmp_path):
    """Sharded, then unsharded, to one path left 15 stale model-000xx-of-00015.safetensors files."""
    from flax import nnx

    from mlcd_jax.interop.hf import load_vision, save_vision
    from mlcd_jax.models import VisionTransformer, get_preset

    model = VisionTransformer(get_preset("tiny"), rngs=nnx.Rngs(0))
    save_vision(model, str(tmp_path), max_shard_bytes=100_000)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    save_vision(model, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert load_vision(str(tmp_path))[1] == model.config


@pytest.mark.parametrize("damage", ["arrays_deleted", "iterator_json_overwritten", "ocdbt_manifest_emptied"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, capsys):
    """A data file deleted, the iterator JSON overwritten or ``manifest.ocdbt`` emptied never fell back to
    the previous step; the real DATA_LOSS sat at line 249 of 349 lines of noise."""
    import jax
    import jax.numpy as jnp

    from mlcd_jax import checkpointing
    from mlcd_jax.data.pipeline import make_train_loader
    from test_pipeline import _write

    loader = make_train_loader(_write(tmp_path, load_arrays("digits", split="all", limit=200)[0]),
                               global_batch_size=20, image_size=8, top_l=3, seed=0)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    manager = checkpointing.create_manager(str(tmp_path / "w"), keep=3, async_save=False)
    iterator = iter(loader)
    for step in (1, 2):
        next(iterator)
        state = {"params": {"w": jnp.full(3, float(step))}, "proto": jnp.full((8, 4), float(step))}
        checkpointing.save(manager, step, state, iterator, force=True)
    manager.close()
    newest = tmp_path / "w" / "checkpoints" / "2"
    if damage == "arrays_deleted":
        for data in (newest / "state" / "d").iterdir():
            data.unlink()
    elif damage == "iterator_json_overwritten":
        next((newest / "iter").glob("*.json")).write_text("{}")
    else:
        (newest / "state" / "manifest.ocdbt").write_bytes(b"")
    abstract = {"params": {"w": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=device)},
                "proto": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=device)}
    manager = checkpointing.create_manager(str(tmp_path / "w"), keep=3, async_save=False)
    fresh = iter(loader)
    state, step = checkpointing.restore(manager, abstract, fresh, num_classes=8)
    manager.close()
    assert step == 1 and float(state["proto"][0, 0]) == 1.0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: checkpoint 2 ")]
    assert len(warnings) == 1 and "using checkpoint 1" in warnings[0]
    assert (tmp_path / "w" / "checkpoints_broken" / "2").is_dir()
    reference = iter(loader)
    next(reference)
    np.testing.assert_array_equal(next(fresh)["labels"], next(reference)["labels"])  # the data state of step 1


def test_a_checkpoint_with_another_optimizer_layout_is_one_line_and_kept(tmp_path):
    """Checkpoints of an older mlcd_jax (no temperature group in the optimizer) failed to resume with
    orbax's dump of both tree structures; now one CheckpointMismatch names the first differing entry."""
    import jax
    import jax.numpy as jnp
    import optax

    from mlcd_jax import checkpointing

    params = {"w": jnp.ones(3)}
    manager = checkpointing.create_manager(str(tmp_path / "w"), keep=3, async_save=False)
    state = {"params": params, "opt_state": optax.adamw(1e-3).init(params)}
    checkpointing.save(manager, 1, state, None, force=True)
    manager.close()
    manager = checkpointing.create_manager(str(tmp_path / "w"), keep=3, async_save=False)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def abstract(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)

    assert checkpointing.restore(manager, abstract(state), num_classes=8)[1] == 1
    other = abstract({"params": params, "opt_state": optax.MultiSteps(optax.adamw(1e-3), 2).init(params)})
    with pytest.raises(checkpointing.CheckpointMismatch,
                       match=r"^checkpoint 1 in .* holds an optimizer state of another layout than this run's "
                             r"\(opt_state\.0\.count is only in the checkpoint\)"):
        checkpointing.restore(manager, other, num_classes=8)
    manager.close()
    assert (tmp_path / "w" / "checkpoints" / "1").is_dir()  # nothing moved aside


def _cli(*args: str, module: str = "mlcd_jax.main") -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    return subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


@pytest.mark.parametrize("args,message", [
    (("--config=configs/nope.py",), "config error: [Errno 2] No such file or directory: 'configs/nope.py'"),
    (("--config=configs/demo.py:digits", "--config.num_train_step=3"),
     "config error: unknown key 'num_train_step'; did you mean 'num_train_steps'?"),
    (("--config=configs/demo.py:digits", "--config.mesh_rules=proto=dat"),
     "config error: mesh_rules: mesh rule 'proto=dat': unknown mesh axes ['dat']"),
    (("--config=configs/demo.py:digits", "--config.model.dtype=float64"),
     "config error: model.dtype='float64': choose one of float32, bfloat16, float16"),
    (("--config=configs/demo.py:digits", "--config.batch_size=12"),
     "config error: batch_size=12 is not divisible by the 8 data-parallel devices"),
])
def test_config_mistakes_are_one_line_before_anything_runs(tmp_path, args, message):
    """Including batch_size=12 on 8 devices, reported only after the whole clustering job had run."""
    out = _cli(*args, f"--workdir={tmp_path / 'w'}", f"--config.data.cache_dir={tmp_path / 'cache'}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr.splitlines()[-1] and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "clustering" not in out.stdout and not (tmp_path / "cache").exists()


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "w").write_text("a file")
    out = _cli("--config=configs/demo.py:digits", f"--workdir={tmp_path / 'w' / 'run'}",
               f"--config.data.cache_dir={tmp_path / 'cache'}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.splitlines()[-1] == f"config error: --workdir={tmp_path / 'w' / 'run'} is not a writable directory (Not a directory)"
    assert not (tmp_path / "cache").exists()


def test_a_read_only_workdir_is_one_line(tmp_path):
    """A read-only workdir gave a traceback. Root writes through mode 0555, so as root the folder is made
    read-only by a read-only bind mount (skipped where mounting is not allowed)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = False
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-o", "bind,ro", str(ro), str(ro)], capture_output=True).returncode:
            pytest.skip("root writes through file modes and this machine does not allow a read-only bind mount")
        mounted = True
    else:
        ro.chmod(0o555)
    try:
        out = _cli("--config=configs/demo.py:digits", f"--workdir={ro / 'run'}",
                   f"--config.data.cache_dir={tmp_path / 'cache'}")
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], check=True)
        ro.chmod(0o755)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.splitlines()[-1].startswith(f"config error: --workdir={ro / 'run'} is not a writable directory (")
    assert not (tmp_path / "cache").exists()


def test_evaluating_an_empty_workdir_is_one_line_and_neither_clusters_nor_writes(tmp_path):
    """It created W/checkpoints and ran the clustering job before failing."""
    workdir = tmp_path / "empty"
    workdir.mkdir()
    out = _cli("--config=configs/demo.py:digits", f"--workdir={workdir}",
               f"--config.data.cache_dir={tmp_path / 'cache'}", module="mlcd_jax.evaluate")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.splitlines()[-1] == (f"config error: --workdir={workdir} holds no checkpoints: nothing to "
                                           "evaluate (train there first)")
    assert list(workdir.iterdir()) == [] and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "env,want",
    [
        ({}, str(max(os.cpu_count() or 1, 16))),  # the config's 8 fake devices
        ({"XLA_FLAGS": "--xla_force_host_platform_device_count=12"}, str(max(os.cpu_count() or 1, 24))),
        ({"PJRT_NPROC": "5"}, "5"),  # an explicit value wins
        ({"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}, None),  # no collectives, nothing to do
    ],
)
def test_fake_cpu_devices_get_twice_their_threads(monkeypatch, env, want):
    """XLA:CPU's pool of max(cores, devices) threads let a collective over the 8 fake devices hold every
    thread; one more queued launch deadlocked LiT's training on the 2-core box in 4 of 7 runs, in none of
    6 with twice the threads. prepare_process sizes the pool before JAX starts."""
    from mlcd_jax import cli

    for key in ("XLA_FLAGS", "PJRT_NPROC"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cli.prepare_process(ml_collections.ConfigDict({"cpu_devices": 8}))
    assert "xla_force_host_platform_device_count=" in os.environ["XLA_FLAGS"]
    assert os.environ.get("PJRT_NPROC") == want


def test_clustering_that_leaves_most_clusters_empty_warns_with_the_counts(tmp_path, capsys):
    """Constant images left 7 of 8 clusters empty with only a scikit-learn warning."""
    images = np.full((30, 8, 8), 128, np.uint8)
    _png_folder(tmp_path / "images", images, np.zeros(30, int), [f"img{i:02d}.png" for i in range(30)])
    manifest = cluster.run(_job(tmp_path / "out", tmp_path / "images"))
    empty = manifest["cluster_sizes_top1"]["empty"]
    assert empty > 4
    assert f"warning: {empty} of 8 clusters are empty (top-1 of 30 images)" in capsys.readouterr().err
