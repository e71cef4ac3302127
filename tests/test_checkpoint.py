"""Checkpoint folders: published atomically, pruned to the last K, damage reported clearly."""

import hashlib
import json

import numpy as np
import pytest
import torch

from metagan_dist.checkpoint import (
    CHECKPOINT_VERSION, CheckpointStore, fingerprint, load_trainer_state, resolve_checkpoint, save_file_atomic,
)


def write_checkpoint(store: CheckpointStore, step: int) -> None:
    folder = store.begin(step)
    save_file_atomic({"version": CHECKPOINT_VERSION, "step": step}, folder / "trainer.pt")
    store.publish(step)


def test_publish_moves_latest_and_keeps_the_last_k(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    assert store.latest() is None
    for step in (10, 20, 30):
        write_checkpoint(store, step)
        assert store.latest() == tmp_path / "checkpoints" / CheckpointStore.tag(step)
    assert sorted(p.name for p in store.dir.iterdir()) == ["LATEST", "step-00000020", "step-00000030"]
    assert load_trainer_state(store.latest())["step"] == 30
    assert resolve_checkpoint(tmp_path) == store.latest()


def test_the_best_checkpoint_survives_pruning_and_a_run_folder_means_it(tmp_path):
    store = CheckpointStore(tmp_path, keep=1)
    write_checkpoint(store, 10)
    assert store.best() is None and resolve_checkpoint(tmp_path) == store.latest()
    store.mark_best(10, 0.5)
    for step in (20, 30):
        write_checkpoint(store, step)
    assert sorted(p.name for p in store.dir.iterdir()) == ["BEST", "LATEST", "step-00000010", "step-00000030"]
    assert store.best() == (tmp_path / "checkpoints" / "step-00000010", 0.5)
    assert resolve_checkpoint(tmp_path) == store.dir / "step-00000010"
    assert resolve_checkpoint(store.dir / "step-00000030") == store.dir / "step-00000030"
    store.mark_best(30, 0.75)
    write_checkpoint(store, 40)  # step 10 is no longer the best: pruned like any other
    assert sorted(p.name for p in store.dir.iterdir()) == ["BEST", "LATEST", "step-00000030", "step-00000040"]
    with pytest.raises(FileNotFoundError, match="step 50"):
        store.mark_best(50, 1.0)


def test_a_damaged_best_pointer_is_named(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    write_checkpoint(store, 10)
    (store.dir / "BEST").write_text("{not json")
    with pytest.raises(ValueError, match="BEST is damaged"):
        resolve_checkpoint(tmp_path)
    (store.dir / "BEST").write_text('{"checkpoint": "step-00000099", "step": 99, "score": 0.1}')
    with pytest.raises(FileNotFoundError, match="step-00000099, which holds no trainer.pt"):
        store.best()


def test_a_crash_mid_write_leaves_latest_on_the_previous_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    write_checkpoint(store, 10)
    staging = store.begin(20)  # the crash: files half written, never published
    (staging / "trainer.pt").write_bytes(b"half a pickle")
    assert store.latest().name == "step-00000010"
    assert load_trainer_state(store.latest())["step"] == 10
    write_checkpoint(store, 20)  # the restarted run writes the same step again, from scratch
    assert load_trainer_state(store.latest())["step"] == 20
    assert not any(p.name.endswith(".tmp") for p in store.dir.iterdir())


def test_atomic_file_write_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "x.pt"
    save_file_atomic({"a": torch.ones(3)}, target)
    save_file_atomic({"a": torch.zeros(3)}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]
    assert torch.equal(torch.load(target)["a"], torch.zeros(3))


def test_a_failed_save_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "cache.pt"
    target.write_bytes(b"previous cache")

    def failing_save(obj, file):
        file.write(b"half a fi")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_file_atomic({"x": 1}, target)
    assert target.read_bytes() == b"previous cache"
    assert [p.name for p in tmp_path.iterdir()] == ["cache.pt"]


def test_a_cache_fingerprint_changes_with_every_byte_dtype_shape_and_setting():
    images = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    reference = hashlib.sha256()
    reference.update(json.dumps(["|u1", [2, 3, 4]]).encode())
    reference.update(bytes(range(24)))
    reference.update(b'{"epochs": 8, "seed": 0}')
    assert fingerprint([images], {"seed": 0, "epochs": 8}) == reference.hexdigest()
    changed = images.copy()
    changed[1, 2, 3] += 1
    settings = {"seed": 0, "epochs": 8}
    others = [
        fingerprint([changed], settings), fingerprint([images.astype(np.int16)], settings),
        fingerprint([images.reshape(4, 3, 2)], settings), fingerprint([images], {"seed": 1, "epochs": 8}),
        fingerprint([images, np.zeros(2)], settings),
    ]
    assert len({reference.hexdigest(), *others}) == 6


def test_damage_and_other_versions_are_named(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    write_checkpoint(store, 10)
    (store.dir / "LATEST").write_text("step-00000099")
    with pytest.raises(FileNotFoundError, match="step-00000099, which holds no trainer.pt"):
        store.latest()
    folder = tmp_path / "old"
    folder.mkdir()
    save_file_atomic({"version": CHECKPOINT_VERSION + 1}, folder / "trainer.pt")
    with pytest.raises(ValueError, match=f"format version {CHECKPOINT_VERSION + 1}"):
        load_trainer_state(folder)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder"):
        resolve_checkpoint(tmp_path / "nowhere")


def test_an_older_format_is_read_for_evaluation_but_not_resumed(tmp_path):
    folder = tmp_path / "v1"
    folder.mkdir()
    save_file_atomic({"version": 1, "step": 5}, folder / "trainer.pt")
    assert load_trainer_state(folder)["step"] == 5
    with pytest.raises(ValueError, match=r"format version 1, written by an older metagan_dist; training resumes only "
                                         rf"version {CHECKPOINT_VERSION}: train into a new run.out_dir"):
        load_trainer_state(folder, resume=True)
