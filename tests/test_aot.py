"""``python -m mlcd_jax.aot``: the train step compiled ahead of time for TPU slices (libtpu) and fake CPUs."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlcd_jax import aot
from mlcd_jax.losses import plan_head
from mlcd_jax.models import flops_per_image, get_preset

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"topology", "num_slices", "num_chips", "hbm_bytes_per_chip", "per_chip", "cross_slice", "fits",
        "xla_flops_per_step", "model_flops_per_step", "head"}
PER_CHIP = {"argument_bytes", "output_bytes", "temp_bytes", "total_bytes"}
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install 'mlcd_jax[tpu]')")
# A small model with the real head: compiles in seconds, still the trainer's full step.
TINY = ["--config.model.name=tiny", "--config.data.image_size=32",
        "--config.loss.num_classes=100000", "--config.model.dtype=bfloat16"]


@pytest.mark.parametrize("spec, chips, grid, hbm_gib", [
    ("v5p-8", 4, (2, 2, 1), 95), ("v5p-64", 32, (2, 4, 4), 95), ("v4-8", 4, (2, 2, 1), 32),
    ("v5e-16", 16, (4, 4), 16), ("v5litepod-8", 8, (2, 4), 16), ("v6e-4", 4, (2, 2), 32), ("v6e-256", 256, (16, 16), 32),
])
def test_slice_names_follow_cloud_tpu(spec, chips, grid, hbm_gib):
    topology = aot.parse_topology(spec)
    assert (topology.num_chips, topology.grid, topology.hbm_bytes_per_chip) == (chips, grid, hbm_gib * 2**30)


@pytest.mark.parametrize("spec, message", [
    ("v5p-6", "2 per chip"), ("v5e-12", "power-of-two"), ("tpu-8", "use v4-N"), ("cpu:0", "N >= 1"), ("v5p", "use v4-N"), ("v4-4", "smallest v4 slice"),
])
def test_bad_topology_is_one_line(spec, message):
    with pytest.raises(ValueError, match=message):
        aot.parse_topology(spec)


def _run(topology: str, *overrides: str, json_path: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    cmd = [sys.executable, "-m", "mlcd_jax.aot", "--config=configs/vitb16.py", f"--topology={topology}", *TINY,
           *overrides]
    if json_path:
        cmd.append(f"--json={json_path}")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _check_contract(result: dict, topology: str, chips: int, batch: int) -> None:
    assert set(result) == KEYS and set(result["per_chip"]) == PER_CHIP
    assert (result["topology"], result["num_chips"]) == (topology, chips)
    per = result["per_chip"]
    assert 0 < per["total_bytes"] <= per["argument_bytes"] + per["output_bytes"] + per["temp_bytes"]
    # The state alone: W + AdamW moments of 100,000 x 64 prototypes, split over the chips.
    assert per["argument_bytes"] > 3 * 4 * 100_000 * 64 / chips
    model = get_preset("tiny", image_size=32)
    assert result["model_flops_per_step"] == pytest.approx(3 * batch * flops_per_image(model))
    assert result["xla_flops_per_step"] > 0
    # The head: 100,000 rows over every chip, room for the expected positives of B·8 labels.
    assert result["head"] == plan_head(100_000, chips, batch * 8, 0.1, "paper", "expected").report()


@needs_libtpu
@pytest.mark.parametrize("topology, chips, hbm_gib", [("v5p-8", 4, 95), ("v5e-16", 16, 16)])
def test_compiles_for_a_tpu_slice_with_libtpu(tmp_path, topology, chips, hbm_gib):
    out = _run(topology, f"--config.batch_size={8 * chips}", json_path=tmp_path / "plan.json")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert json.loads((tmp_path / "plan.json").read_text()) == result
    _check_contract(result, topology, chips, 8 * chips)
    assert result["hbm_bytes_per_chip"] == hbm_gib * 2**30 and result["fits"] is True
    assert result["cross_slice"] == {"bytes_per_chip": 0, "bytes_per_step": 0, "by_collective": {}}
    assert "metadata" not in out.stderr and "TPU_WORKER_HOSTNAMES" not in out.stderr  # libtpu kept quiet


@needs_libtpu
def test_compiles_for_two_slices_with_the_data_axis_across_them():
    out = _run("v5p-8", "--num-slices=2", "--config.batch_size=64", "--config.mesh.data=2", "--config.mesh.fsdp=-1")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert set(result) == KEYS and (result["num_slices"], result["num_chips"], result["fits"]) == (2, 4, True)
    assert result["per_chip"]["argument_bytes"] > 3 * 4 * 100_000 * 64 / 8  # the state over all 8 chips
    # Over DCN: the gradients' all-reduce over the data axis (at least each chip's bf16 share of tiny's 2
    # blocks of 64 x 64 and 64 x 256 matrices, split 4 ways by fsdp) and the prototype head's gathers of
    # the global batch (each chip's 8 images: a bf16 embedding of 64, int32 top-8 labels).
    cross = result["cross_slice"]
    assert cross["bytes_per_chip"] == sum(cross["by_collective"].values()) > 0
    assert cross["bytes_per_step"] == 8 * cross["bytes_per_chip"]
    assert cross["by_collective"]["ALL_REDUCE"] > 2 * 2 * (4 * 64 * 64 + 2 * 64 * 256) / 4
    assert cross["by_collective"]["ALL_GATHER"] >= 8 * (64 * 2 + 8 * 4)
    bad = _run("v5p-8", "--num-slices=2", "--config.batch_size=64", "--config.mesh.data=1", "--config.mesh.fsdp=-1")
    assert bad.returncode != 0 and "not a multiple of the 2 slices" in bad.stderr.splitlines()[-1]


def test_cross_slice_bytes_are_the_megascale_sends_of_the_compiled_step():
    hlo = "\n".join([
        '  %send = (bf16[24,8,128]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}, token[]) send(%a, %after-all), channel_id=4, '
        'is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",'
        '_xla_megascale_target="{1,2}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}',
        '  %send.1 = (s32[8,8]{1,0:T(8,128)}, u32[]{:S(2)}, token[]) send(%b, %after-all.1), channel_id=5, '
        'frontend_attributes={_xla_megascale_transfer_type="ALL_GATHER"}',
        '  %send.2 = (f32[1,1,128]{2,1,0}, u32[]{:S(2)}, token[]) send(%c, %after-all.2), channel_id=6, '
        'frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}',
        '  %recv = (s32[16,8]{1,0:T(8,128)}, u32[]{:S(2)}, token[]) recv(%after-all.3), channel_id=7, '
        'frontend_attributes={_xla_megascale_transfer_type="ALL_GATHER"}',
        '  %all-reduce.1 = bf16[64,256]{1,0} all-reduce(%d), channel_id=8, replica_groups={{0,1,2,3}}',
    ])
    layer = "\n".join([  # a scanned layer sending its gradients: once per iteration
        "%body.1 (p: (s32[], bf16[4,128])) -> (s32[], bf16[4,128]) {",
        '  %send.9 = (bf16[4,128]{1,0}, u32[], token[]) send(%g, %after-all.9), channel_id=9, '
        'frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}',
        "}",
        "%cond.1 (p: (s32[], bf16[4,128])) -> pred[] {",
        "  %constant.7 = s32[]{:T(128)} constant(24)",
        "  %i = s32[]{:T(128)} get-tuple-element(%p), index=0",
        "  ROOT %lt = pred[] compare(%i, %constant.7), direction=LT",
        "}",
    ])
    entry = "ENTRY %main.1_spmd (param: f32[8]) -> f32[8] {"
    loops = [  # XLA's trip count; libtpu's form: i = 1 (the first iteration peeled off) while i < 24
        '  %while.1 = (s32[], bf16[4,128]) while(%t), condition=%cond.1, body=%body.1, '
        'backend_config={"known_trip_count":{"n":"24"}}',
        "  %constant.8 = s32[]{:T(128)} constant(1)",
        "  %copy.9 = s32[]{:T(128)} copy(%constant.8), backend_config={}",
        "  %tuple.2 = (s32[], bf16[4,128]) tuple(%copy.9, %g), metadata={}",
        "  %while.2 = (s32[], bf16[4,128]) while(%tuple.2), condition=%cond.1, body=%body.1",
    ]
    assert aot.cross_slice_bytes("\n".join([entry, hlo, *loops, "}", layer])) == {
        "ALL_REDUCE": 24 * 8 * 128 * 2 + 128 * 4 + (24 + 23) * 4 * 128 * 2, "ALL_GATHER": 64 * 4}


@needs_libtpu
def test_multislice_mesh_splits_only_the_data_axis_over_slices():
    code = ("from mlcd_jax import aot, sharding; aot.quiet_libtpu(); "
            "mesh = sharding.make_mesh({'data': 4, 'fsdp': 2, 'model': 1}, aot.devices(aot.parse_topology('v5p-8'), 2)); "
            "print([[d.slice_index for d in row] for row in mesh.devices[:, :, 0]])")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[[0, 0], [0, 0], [1, 1], [1, 1]]"  # an fsdp row: one slice


@needs_libtpu
def test_a_step_too_big_for_the_chip_says_so():
    """libtpu refuses the program; the plan reports the usage it measured instead of a traceback."""
    out = _run("v5e-16", f"--config.batch_size={16 * 65536}")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["fits"] is False and result["per_chip"]["total_bytes"] > 16 * 2**30
    assert result["per_chip"]["argument_bytes"] is None  # the compiler stopped before the split
    assert "does not fit: libtpu reports" in out.stderr


def test_fake_cpu_devices_keep_the_xla_cpu_plan():
    out = _run("cpu:4", "--config.batch_size=32")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    _check_contract(result, "cpu:4", 4, 32)
    assert result["hbm_bytes_per_chip"] is None and result["fits"] is None


def test_config_errors_are_one_line():
    out = _run("v5p-6")
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("config error: topology 'v5p-6'")
    out = _run("cpu:4", "--config.batch_size=30")
    assert out.returncode == 2 and "not divisible by the 4 data-parallel devices" in out.stderr.splitlines()[-1]


def test_a_tpu_slice_without_libtpu_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(ValueError, match=r"needs libtpu: pip install 'mlcd_jax\[tpu\]'"):
        aot.devices(aot.parse_topology("v5e-16"))


def test_importing_aot_defines_no_flags_next_to_main():
    """Both modules in one process (a pytest worker, a notebook): no duplicate --config."""
    from mlcd_jax import cli, study  # noqa: F401  (they define the run's flags)

    assert "topology" not in cli.FLAGS


@needs_libtpu
def test_the_teachers_forward_compiles_for_a_tpu_slice(tmp_path):
    """benchmarks/teacher.py --topology: the embed stage's forward compiled by libtpu, XLA's FLOPs per image
    next to the model's count (they agree: the model count leaves out only norms, softmax and GELU)."""
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "teacher.py"), "--teacher", "tiny", "--topology", "v5p-8",
         "--batch", "64", "--json", str(tmp_path / "plan.json")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "XLA_FLAGS": ""},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["chips"] == 4 and "v5" in plan["device"].lower() and plan["memory_per_chip_bytes"] > 0
    assert 1.0 <= plan["xla_flops_per_image"] / plan["model_flops_per_image"] < 1.3


@needs_libtpu
@pytest.mark.plan  # 4-15 min each on 2 cores: the paper's models at the paper's batch
@pytest.mark.parametrize("name", ["vitb32", "vitb16", "vitl14", "vitl14_336", "vitbigg14"])
def test_each_paper_config_as_shipped_fits_the_papers_batch_on_its_slice(tmp_path, name):
    """`python -m mlcd_jax.aot --config=configs/NAME.py --topology=SLICE`, nothing else: the paper's batch of
    32,768 with k = 1M prototypes fits the slice the config names, and the head scores under 40 % of
    each shard's rows."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    out = subprocess.run([sys.executable, "-m", "mlcd_jax.aot", f"--config=configs/{name}.py",
                          f"--topology={module.SLICE}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert module.get_config().batch_size == 32_768 and result["fits"] is True, result["per_chip"]
    head = result["head"]
    assert head["capacity"] < 0.4 * head["rows_per_shard"] == 0.4 * head["exact_capacity"]


@needs_libtpu
@pytest.mark.plan  # two L/14 compiles for 32 chips, 3-7 min each on 2 cores
def test_fsdp_as_shipped_needs_no_more_temporaries_than_data_parallelism():
    """configs/vitl14.py as shipped (FSDP over all 32 chips, scanned blocks) at batch 1,024 on v5p-64: its
    per-chip temporaries are within 1.3x of pure data parallelism's (mesh.data=32), and FSDP's state per
    chip is far smaller, so in total it needs less memory: FSDP pays for itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}

    def per_chip(*overrides: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "mlcd_jax.aot", "--config=configs/vitl14.py", "--topology=v5p-64",
                              "--config.batch_size=1024", *overrides], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout)["per_chip"]

    fsdp, data = per_chip(), per_chip("--config.mesh.data=32", "--config.mesh.fsdp=1")
    assert fsdp["temp_bytes"] <= 1.3 * data["temp_bytes"], (fsdp, data)
    assert fsdp["argument_bytes"] < data["argument_bytes"] / 4 and fsdp["total_bytes"] < data["total_bytes"]
