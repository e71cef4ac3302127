"""The embedded glyphs pool: character selection, determinism (same seed, same bytes), counts, caching."""

from __future__ import annotations

import subprocess
import sys
import time
import unicodedata

import numpy as np
import pytest
from test_data_pool import random_tasks

from metagan_dist.data import Pool, PoolError, ensure_glyphs_pool, write_pool
from metagan_dist.data.glyphs import (
    ASCII_ONLY_FONTS,
    GLYPHS_VERSION,
    IMAGES_PER_TASK,
    MIN_FONTS,
    TEST_SCRIPT,
    glyph_source,
    glyph_tasks,
    glyphs_pool_path,
    select_characters,
)
from metagan_dist.data.writer import TaskSource


@pytest.fixture(scope="module")
def characters() -> list[tuple[str, list[str]]]:
    return select_characters()


def in_test_split(char: str) -> bool:
    return unicodedata.name(char).startswith(TEST_SCRIPT)


def test_selection_meets_the_counts(characters):
    assert len(characters) >= 500 and IMAGES_PER_TASK >= 20
    assert all(len(fonts) >= MIN_FONTS for _, fonts in characters)
    test = [char for char, _ in characters if in_test_split(char)]
    assert 0.10 <= len(test) / len(characters) <= 0.20
    used = {font for _, fonts in characters for font in fonts}
    assert not any(font.startswith(("LastResort", "STIXSiz", "STIXNonUni", "cmex", "cmsy")) for font in used)
    for char, fonts in characters:
        if not (char.isascii() and char.isalnum()):
            assert not set(fonts) & set(ASCII_ONLY_FONTS), char
    chars = [char for char, _ in characters]
    assert "A" in chars and "\u0391" not in chars  # Greek Alpha renders like Latin A: a homoglyph, left out
    assert len(set(chars)) == len(chars) and not any(unicodedata.decomposition(char) for char in chars)


def test_same_seed_same_bytes(characters, tmp_path):
    train = [pair for pair in characters if not in_test_split(pair[0])]
    subset = train[::40] + [pair for pair in characters if in_test_split(pair[0])][:2]
    folders = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_pool(glyph_source(seed, subset), tmp_path / name, command="same command", maxcount=6)
        folders[name] = {path.name: path.read_bytes() for path in sorted((tmp_path / name).iterdir())}
    assert folders["a"] == folders["b"]  # shards, index.json and contact sheet
    shards = [name for name in folders["a"] if name.endswith(".tar")]
    assert shards and all(folders["a"][name] != folders["c"].get(name) for name in shards)
    pool = Pool(tmp_path / "a")
    assert pool.manifest.splits["test"]["tasks"] == 2 and pool.image_shape == (1, 32, 32)


def test_a_stale_cached_pool_is_refused(tmp_path):
    source = TaskSource(random_tasks(3, 2, shape=(1, 32, 32)), 3, (1, 32, 32), {"kind": "glyphs", "glyphs_version": 0})
    write_pool(source, glyphs_pool_path(tmp_path), command="old build")
    with pytest.raises(
        PoolError,
        match=r"the cached pool .*glyphs-v\d+ was built as 'glyphs' version 0 seed None; this code "
        r"builds glyphs version \d+ seed 0: delete .*glyphs-v\d+ to rebuild it",
    ):
        ensure_glyphs_pool(tmp_path)


def script(key: str) -> str:
    """The script of a glyph task: the first word of its character's Unicode name (LATIN, GREEK, ...)."""
    return unicodedata.name(chr(int(key[1:], 16))).split()[0]


@pytest.mark.slow
def test_two_processes_build_the_full_pool_once(characters, tmp_path):
    old = write_pool(TaskSource(random_tasks(3, 2, shape=(1, 32, 32)), 3, (1, 32, 32), {"kind": "glyphs",
                     "glyphs_version": 1, "seed": 0}), tmp_path / "glyphs", command="version 1").path
    code = (
        "import sys; from metagan_dist.data import ensure_glyphs_pool; print('POOL', ensure_glyphs_pool(sys.argv[1]))"
    )
    started = time.perf_counter()
    processes = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    build_s = time.perf_counter() - started
    assert [process.returncode for process in processes] == [0, 0]
    new = glyphs_pool_path(tmp_path)
    assert new.name == f"glyphs-v{GLYPHS_VERSION}" and new != old
    assert [line for out in outputs for line in out.splitlines() if line.startswith("POOL")] == [f"POOL {new}"] * 2
    assert sum("wrote pool" in out for out in outputs) == 1  # one built, the other waited on the lock
    assert build_s < 120
    assert sorted(path.name for path in tmp_path.iterdir() if not path.name.endswith(".lock")) == ["glyphs", new.name]
    assert Pool(old).manifest.command == "version 1"  # the old version's cache is left alone, not replaced

    started = time.perf_counter()
    assert ensure_glyphs_pool(tmp_path) == new
    assert time.perf_counter() - started < 1.0

    pool = Pool(new)
    train, test = pool.keys("train"), pool.keys("test")
    assert len(train) + len(test) == len(characters) >= 500 and not set(train) & set(test)
    assert all(in_test_split(chr(int(key[1:], 16))) for key in test)
    assert not any(in_test_split(chr(int(key[1:], 16))) for key in train)
    assert pool.manifest.splits["test"]["images"] == IMAGES_PER_TASK * len(test)
    assert (new / "contact_sheet.png").is_file()
    assert train != sorted(train)  # written in a shuffled order: every shard mixes scripts
    for shard in pool.shards("train"):
        assert len({script(key) for key in shard.keys}) >= 3, shard.file
    sample = [pair for pair in characters if not in_test_split(pair[0])][::97]
    stored = pool.load_tasks("train", [f"u{ord(char):04x}" for char, _ in sample])
    for task in glyph_tasks(0, sample):  # the cached bytes are what the builder renders for seed 0
        assert np.array_equal(stored[task.key], task.images)
