"""Checkpoints of a sweep (gdlr_jax.engine._checkpoint, sweep(checkpoint_dir=...)): chunk files round
trip, a resumed sweep equals an uninterrupted one bit for bit, unusable files are recomputed,
a folder of another sweep is refused, writes are atomic."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gdlr_jax
from gdlr_jax.engine import SweepPlan
from gdlr_jax.engine._checkpoint import (
    CheckpointMismatchError,
    ChunkStore,
    sweep_fingerprint,
    write_atomically,
)


def two_neuron(p):
    """``1/2 (1 - x y)^2`` with parameters ``{"x": x, "y": y}`` (a pytree of two leaves)."""
    return 0.5 * (1.0 - p["x"] * p["y"]) ** 2


def regression(w, batch):
    return 0.5 * jnp.mean(jnp.square(batch[0] @ w - batch[1]))


# every status (see tests/test_sweep.py); 15 trajectories in chunks of 4: the last one is short
INITS = np.array([[0.5, 1.5], [0.0, 0.0], [1.2, 1.1], [1e3, 1e3], [-0.7, 0.4]])
GD = dict(
    loss_fn=two_neuron,
    params0={"x": INITS[:, 0], "y": INITS[:, 1]},
    etas=[0.4, 1.05, 1.5],
    steps=300,
    min_loss_value=0.0,
    record_every=7,
    record_params=True,
    chunk_size=4,
    dtype=jnp.float64,
)
_X = jax.random.normal(jax.random.key(3), (40, 3))
SGD = dict(  # minibatches, a key per initialisation, an optax optimiser, float32
    loss_fn=regression,
    params0=0.3 * jnp.ones((3, 3)),
    etas=[0.1, 0.3, 5.0],
    steps=40,
    batch_source=((_X, _X @ jnp.array([1.0, -2.0, 0.5])), 8),
    key=jax.random.key(1),
    same_batches=False,
    optimizer=functools.partial(optax.sgd, momentum=0.9),
    chunk_size=2,
    dtype=jnp.float32,
)


def assert_identical(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(x, y)


@pytest.fixture
def run_chunk_calls(monkeypatch):
    """The chunk indices that SweepPlan.run_chunk computes (rather than loads)."""
    calls: list[int] = []
    original = SweepPlan.run_chunk

    def spy(self, index):
        calls.append(index)
        return original(self, index)

    monkeypatch.setattr(SweepPlan, "run_chunk", spy)
    return calls


def test_chunk_files_round_trip_pytrees_none_fields_and_float64(tmp_path):
    plan = gdlr_jax.plan_sweep(**GD)
    store = ChunkStore(tmp_path / "ck", plan)
    for index in (0, plan.num_chunks - 1):
        chunk = plan.run_chunk(index)
        store.save(index, chunk)
        assert_identical(store.load(index), chunk)
    assert chunk.final_params["x"].dtype == np.float64 and chunk.recorded_params is not None
    assert store.load(1) is None  # not saved
    plain = gdlr_jax.plan_sweep(**{**GD, "record_every": None, "record_params": False})
    chunk = plain.run_chunk(0)
    assert chunk.recorded_loss is None
    other = ChunkStore(tmp_path / "plain", plain)
    other.save(0, chunk)
    assert_identical(other.load(0), chunk)
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["chunk-00000.npz", "chunk-00003.npz", "sweep.json"]  # no temp files


@pytest.mark.parametrize(
    "case", [GD, pytest.param(SGD, marks=pytest.mark.slow)], ids=["gd-pytree-recordings", "sgd-optax"]
)
def test_resumed_sweep_equals_uninterrupted_bit_for_bit(tmp_path, run_chunk_calls, case):
    reference = gdlr_jax.sweep(**case)

    class Crash(Exception):
        pass

    def crash_after_chunk_1(index, chunk):
        if index == 1:
            raise Crash

    with pytest.raises(Crash):
        gdlr_jax.sweep(**case, checkpoint_dir=tmp_path, on_chunk=crash_after_chunk_1)
    assert sorted(p.name for p in tmp_path.glob("chunk-*")) == [
        "chunk-00000.npz",
        "chunk-00001.npz",
    ]
    run_chunk_calls.clear()
    seen = []
    resumed = gdlr_jax.sweep(
        **case,
        checkpoint_dir=tmp_path,
        progress=True,
        on_chunk=lambda index, chunk: seen.append((index, chunk.start, chunk.stop)),
    )
    plan = gdlr_jax.plan_sweep(**case)
    assert run_chunk_calls == list(range(2, plan.num_chunks))  # only the missing chunks ran
    assert seen == [(i, *plan.chunk_bounds(i)) for i in range(plan.num_chunks)]
    assert_identical(resumed, reference)
    run_chunk_calls.clear()
    assert_identical(gdlr_jax.sweep(**case, checkpoint_dir=tmp_path), reference)
    assert run_chunk_calls == []  # everything loaded


def _drop_field(path, name):
    with np.load(path) as data:
        arrays = dict(data)
    layout = json.loads(str(arrays["__layout__"]))
    del layout["fields"][name]
    arrays["__layout__"] = np.array(json.dumps(layout))
    np.savez(path, **arrays)


def _flip_a_byte_of(path, name):
    with np.load(path) as data:
        values = data[name].tobytes()
    raw = bytearray(path.read_bytes())
    raw[raw.index(values) + 3] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_unusable_chunk_files_are_recomputed_with_a_warning(tmp_path, run_chunk_calls):
    kwargs = {**GD, "chunk_size": 3}  # 5 chunks
    reference = gdlr_jax.sweep(**kwargs, checkpoint_dir=tmp_path)
    chunk0 = (tmp_path / "chunk-00000.npz").read_bytes()
    (tmp_path / "chunk-00000.npz").write_bytes(chunk0[: len(chunk0) // 2])  # truncated
    (tmp_path / "chunk-00001.npz").write_bytes(b"not a chunk")
    (tmp_path / "chunk-00002.npz").write_bytes(chunk0)  # another chunk's trajectories
    _drop_field(tmp_path / "chunk-00003.npz", "period")
    _flip_a_byte_of(tmp_path / "chunk-00004.npz", "final_loss.0")
    (tmp_path / ".chunk-00001.npz.x1y2.tmp").write_bytes(b"left by a killed writer")
    run_chunk_calls.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = gdlr_jax.sweep(**kwargs, checkpoint_dir=tmp_path)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    reasons = [
        "BadZipFile",
        "ValueError",
        "it holds trajectories 0..3, the plan's chunk 6..9",
        "fields missing: ['period'], unknown: []",
        "Bad CRC-32 for file 'final_loss.0.npy'",
    ]
    assert len(messages) == len(reasons)
    for index, why in enumerate(reasons):
        assert f"chunk-{index:05d}.npz is unusable" in messages[index]
        assert why in messages[index] and f"recomputing chunk {index}" in messages[index]
    assert run_chunk_calls == [0, 1, 2, 3, 4]
    assert_identical(resumed, reference)
    assert not list(tmp_path.glob(".*.tmp"))
    plan = gdlr_jax.plan_sweep(**kwargs)
    store = ChunkStore(tmp_path, plan)
    assert all(store.load(i) is not None for i in range(plan.num_chunks))  # rewritten


def _make_target_loss(target):
    def loss(p):
        return 0.5 * (target - p["x"] * p["y"]) ** 2

    return loss


def test_a_folder_of_another_sweep_is_refused_naming_what_differs(tmp_path):
    folder = tmp_path / "ck"
    gdlr_jax.sweep(**{**GD, "loss_fn": _make_target_loss(jnp.ones(()))}, checkpoint_dir=folder)
    changes = {
        "engine.steps: saved \"300\", now \"301\"": {"steps": 301},
        "etas: saved ": {"etas": [0.4, 1.05, 1.6]},
        "params0: saved ": {"params0": {"x": INITS[:, 0], "y": INITS[:, 1] + 1e-12}},
        "chunk_size: saved 4, now 8": {"chunk_size": 8},
        "engine.criteria": {"criteria": gdlr_jax.ConvergenceCriteria(grad_tol=1e-4)},
        # same function name, another closed-over constant: only the jaxpr digest differs
        "(loss_jaxpr: saved ": {"loss_fn": _make_target_loss(2 * jnp.ones(()))},
    }
    for expected, change in changes.items():
        kwargs = {**GD, "loss_fn": _make_target_loss(jnp.ones(())), **change}
        with pytest.raises(CheckpointMismatchError) as info:
            gdlr_jax.sweep(**kwargs, checkpoint_dir=folder)
        message = str(info.value)
        assert isinstance(info.value, ValueError)
        assert message.startswith(f"checkpoint folder {folder} holds chunks of a different sweep")
        assert expected in message, message
        assert message.endswith(f"pass another checkpoint folder, or delete {folder} to start over")
    # the same arguments (new but equal arrays and loss) are accepted
    gdlr_jax.sweep(**{**GD, "loss_fn": _make_target_loss(jnp.ones(()))}, checkpoint_dir=folder)
    (folder / "sweep.json").unlink()
    with pytest.raises(CheckpointMismatchError, match="holds chunk files but no sweep.json"):
        gdlr_jax.sweep(**GD, checkpoint_dir=folder)


def test_step_block_is_not_in_the_fingerprint():
    # step_block changes the speed, never the chunks (test_sweep_layouts.py): a folder resumes
    one, three = (sweep_fingerprint(gdlr_jax.plan_sweep(**GD, step_block=k)) for k in (1, 3))
    assert one == three and "engine.step_block" not in one
    assert "engine.pack_pairs" not in one  # nor the packing of the columns


def test_with_an_optimiser_step_block_is_in_the_fingerprint_and_defaults_to_one_on_cpu():
    """An optax update unrolled in blocks can round differently (momentum did): the block
    length is then part of the fingerprint, and on CPU its default is 1."""
    one, three = (sweep_fingerprint(gdlr_jax.plan_sweep(**SGD, step_block=k)) for k in (1, 3))
    assert one["engine.step_block"] == "1" and three["engine.step_block"] == "3"
    assert gdlr_jax.plan_sweep(**SGD)._config.step_block == 1
    assert gdlr_jax.plan_sweep(**GD)._config.step_block == gdlr_jax.engine._problem.STEP_BLOCK["cpu"]


@pytest.mark.slow
def test_a_resume_with_another_step_block_loads_every_chunk(tmp_path, run_chunk_calls):
    folder = tmp_path / "ck"
    first = gdlr_jax.sweep(**GD, step_block=1, checkpoint_dir=folder)
    assert run_chunk_calls == [0, 1, 2, 3]
    resumed = gdlr_jax.sweep(**GD, step_block=3, checkpoint_dir=folder)
    assert run_chunk_calls == [0, 1, 2, 3]  # nothing recomputed
    assert_identical(first, resumed)


def test_fingerprint_holds_the_devices_and_the_dtype():
    one = sweep_fingerprint(gdlr_jax.plan_sweep(**GD, devices=jax.local_devices()[:1]))
    assert one["devices"] == 1 and one["device_kind"] == jax.local_devices()[0].device_kind
    f32 = sweep_fingerprint(gdlr_jax.plan_sweep(**{**GD, "dtype": jnp.float32}))
    assert {k for k in one if one[k] != f32[k]} == {"etas", "params0", "loss_jaxpr"}
    json.dumps(one)  # JSON-compatible


_DEVICES_SCRIPT = """
import json, sys
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
import gdlr_jax
from gdlr_jax.engine._checkpoint import ChunkStore, CheckpointMismatchError, sweep_fingerprint
loss = lambda p: 0.5 * (1.0 - p[0] * p[1]) ** 2
kwargs = dict(params0=np.ones((8, 2)) * 0.5, etas=[0.4, 1.0], steps=50, chunk_size=4)
plans = [gdlr_jax.plan_sweep(loss, **kwargs, devices=jax.devices()[:n]) for n in (1, 2)]
one, two = (sweep_fingerprint(p) for p in plans)
ChunkStore(sys.argv[1], plans[0])
try:
    ChunkStore(sys.argv[1], plans[1])
    refused = ""
except CheckpointMismatchError as err:
    refused = str(err)
print(json.dumps([sorted(k for k in one if one[k] != two[k]), refused]))
"""


def test_a_resume_on_another_device_count_is_refused(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT, str(tmp_path / "ck")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    differ, refused = json.loads(done.stdout.strip().splitlines()[-1])
    assert differ == ["devices"]
    assert "holds chunks of a different sweep (devices: saved 1, now 2)" in refused


def _crafted(chunk, name, change):
    return chunk._replace(**{name: change(getattr(chunk, name))})


@pytest.mark.slow
def test_crafted_chunk_files_are_checked_against_the_plan(tmp_path, run_chunk_calls):
    kwargs = {**GD, "chunk_size": 3}  # 5 chunks
    reference = gdlr_jax.sweep(**kwargs, checkpoint_dir=tmp_path)
    plan = gdlr_jax.plan_sweep(**kwargs)
    store = ChunkStore(tmp_path, plan)
    crafted = {
        "field final_loss holds float16 (), the plan makes float64 ()":
            ("final_loss", lambda x: x.astype(np.float16)),
        "field final_params holds float64 (2,), float64 (), the plan makes float64 (), "
        "float64 ()": ("final_params", lambda p: {**p, "x": np.stack([p["x"]] * 2, 1)}),
        "field status holds codes outside": ("status", lambda x: x + 100),
        "field steps_taken holds counts outside 0..300": ("steps_taken", lambda x: x + 1000),
        "field final_sharpness is not planned": ("final_sharpness", lambda _: np.zeros(3)),
    }
    for index, (name, change) in enumerate(crafted.values()):
        store.save(index, _crafted(store.load(index), name, change))
    run_chunk_calls.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = gdlr_jax.sweep(**kwargs, checkpoint_dir=tmp_path)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == len(crafted)
    for index, why in enumerate(crafted):
        assert f"chunk-{index:05d}.npz is unusable (ValueError: {why}" in messages[index]
    assert run_chunk_calls == [0, 1, 2, 3, 4]
    assert_identical(resumed, reference)


def test_damaged_checkpoint_folders_are_refused_in_one_line(tmp_path):
    plan = gdlr_jax.plan_sweep(**GD)
    (tmp_path / "checkpoints").write_text("a file")
    with pytest.raises(CheckpointMismatchError, match=r"^checkpoint folder .*checkpoints/sweep "
                       r"cannot be made: .*; pass another checkpoint folder, or delete"):
        ChunkStore(tmp_path / "checkpoints" / "sweep", plan)
    folder = tmp_path / "ck"
    ChunkStore(folder, plan)
    for text in (b"[1, 2]", b'{"format": 1, "fingerprint": [1]}', b"\xff\xfe{", b'{"form'):
        (folder / "sweep.json").write_bytes(text)
        with pytest.raises(CheckpointMismatchError, match=r"^cannot read .*sweep.json \("):
            ChunkStore(folder, plan)
    (folder / "sweep.json").unlink()
    store = ChunkStore(folder, plan)
    store.path(0).mkdir()
    with pytest.raises(CheckpointMismatchError, match=r"chunk-00000.npz is a folder, not a "
                       r"chunk file, so chunk 0 cannot be saved; remove it"):
        gdlr_jax.sweep(**GD, checkpoint_dir=folder)


def test_write_atomically_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    write_atomically(target, lambda handle: handle.write(b"old"))

    def half_then(error):
        def write(handle):
            handle.write(b"half of the new")
            raise error

        return write

    for error in (OSError("disk full"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            write_atomically(target, half_then(error))
        assert target.read_bytes() == b"old"
        assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
