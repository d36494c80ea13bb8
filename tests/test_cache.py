"""The preprocessed image cache: built once, used by training while valid, ignored with a warning when stale."""

from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import invoke


@pytest.fixture
def data(cohort, tmp_path, monkeypatch):
    """A private copy of the tiny cohort (the tests change its files), with no cache named in the environment."""
    monkeypatch.delenv("PRIVAUDIT_IMAGE_CACHE", raising=False)
    folder = tmp_path / "cohort"
    shutil.copytree(cohort.parent, folder)
    shutil.rmtree(folder / ".privaudit-cache", ignore_errors=True)
    return folder / "manifest.csv"


def _manifest(path):
    from privaudit.data.presets import load_data
    from privaudit.tasks import create_task

    return load_data(path, task=create_task("cxr"))


def _decoded(manifest, size):
    from privaudit.data.images import load_images

    return load_images(manifest.image_paths(), size)


def test_cache_round_trip_and_cli(data):
    from privaudit.data.inputs import load_inputs
    from privaudit.tasks import create_task

    res = invoke("data", "cache", data, "--image-size", "24", "--quiet", "--jobs", "2")
    assert res.exit_code == 0, res.output + (res.stderr or "")
    folder = data.parent / ".privaudit-cache" / "images-24px"
    assert {p.name for p in folder.iterdir()} == {"images.npy", "index.csv", "cache.json", ".privaudit"}
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    m = _manifest(data)
    x, y = load_inputs(m, create_task("cxr"), 24)
    assert isinstance(x, np.memmap) and x.shape == (len(m.frame), 1, 24, 24)
    np.testing.assert_array_equal(np.asarray(x), _decoded(m, 24))   # exactly what decoding the files gives
    assert y.shape == (len(m.frame), len(m.labels)) and y.flags.writeable
    index = pd.read_csv(folder / "index.csv", dtype={"sample_id": str})
    assert index["sample_id"].tolist() == m.frame["sample_id"].tolist()
    # a second run finds it valid and leaves it alone
    before = (folder / "images.npy").stat().st_mtime_ns
    res = invoke("data", "cache", data, "--image-size", "24", "--quiet")
    assert res.exit_code == 0 and "already up to date" in res.output
    assert (folder / "images.npy").stat().st_mtime_ns == before
    # another image size has no cache: the files are read, silently
    x32, _ = load_inputs(m, create_task("cxr"), 32)
    assert not isinstance(x32, np.memmap)


def test_subset_manifest_reads_rows_by_sample_id(data, tmp_path):
    from privaudit.data.cache import build_cache, open_cache

    m = _manifest(data)
    build_cache(m, 20)
    frame = pd.read_csv(data, dtype=str)
    sub = frame.iloc[::-3]                      # a third of the rows, in reverse order
    sub.to_csv(data.parent / "subset.csv", index=False)
    ms = _manifest(data.parent / "subset.csv")
    x = open_cache(ms, 20)
    assert x is not None and not isinstance(x, np.memmap) and len(x) == len(sub)
    np.testing.assert_array_equal(x, _decoded(ms, 20))


def test_stale_cache_is_ignored_with_a_warning(data):
    from PIL import Image

    from privaudit.data.cache import StaleCacheWarning, build_cache, open_cache
    from privaudit.data.inputs import load_inputs
    from privaudit.tasks import create_task

    m = _manifest(data)
    build_cache(m, 20)
    changed = m.image_paths()[4]
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(changed)
    with pytest.warns(StaleCacheWarning, match=r"is stale \(image images/.*\.png changed since the cache was built"):
        x, _ = load_inputs(m, create_task("cxr"), 20)
    np.testing.assert_array_equal(x, _decoded(m, 20))       # the new file's pixels, not the cached ones
    assert x[4].min() == 1.0
    # rebuilding replaces the outdated cache without --force, and it is valid again
    res = invoke("data", "cache", data, "--image-size", "20", "--quiet")
    assert res.exit_code == 0, res.output + (res.stderr or "")
    assert open_cache(m, 20)[4].min() == 1.0
    # a manifest row the cache has never seen makes it stale too
    frame = pd.read_csv(data, dtype=str)
    extra = frame.iloc[[0]].assign(sample_id="NEW_1", patient_id="NEWP")
    pd.concat([frame, extra]).to_csv(data, index=False)
    with pytest.warns(StaleCacheWarning, match="sample_id 'NEW_1' of the manifest is not in it"):
        assert open_cache(_manifest(data), 20) is None


def test_named_cache_folder_and_off(data, tmp_path, monkeypatch):
    from privaudit.data.cache import StaleCacheWarning, build_cache, open_cache

    m = _manifest(data)
    out = tmp_path / "elsewhere"
    res = invoke("data", "cache", data, "--image-size", "20", "--out", out, "--quiet")
    assert res.exit_code == 0 and "PRIVAUDIT_IMAGE_CACHE=" in res.output
    assert open_cache(m, 20) is None                          # not found without the variable
    monkeypatch.setenv("PRIVAUDIT_IMAGE_CACHE", str(out))
    np.testing.assert_array_equal(open_cache(m, 20), _decoded(m, 20))
    with pytest.warns(StaleCacheWarning, match="is stale \\(it was built with size 20, not 28\\)"):
        assert open_cache(m, 28) is None
    monkeypatch.setenv("PRIVAUDIT_IMAGE_CACHE", str(tmp_path / "caches"))   # a folder of per-size caches
    build_cache(m, 28, tmp_path / "caches" / "images-28px")
    assert open_cache(m, 28).shape[-1] == 28
    with pytest.warns(StaleCacheWarning, match="holds no image cache for 20 px"):
        assert open_cache(m, 20) is None
    monkeypatch.setenv("PRIVAUDIT_IMAGE_CACHE", "off")
    build_cache(m, 20)
    assert open_cache(m, 20) is None


def test_training_uses_the_cache(data, tmp_path):
    """With the cache built, an image file whose bytes are garbage (size and time kept) is never decoded."""
    from privaudit.data.images import load_images
    from privaudit.errors import DataError

    res = invoke("data", "cache", data, "--image-size", "32", "--quiet")
    assert res.exit_code == 0
    m = _manifest(data)
    victim = m.image_paths()[0]
    st = victim.stat()
    victim.write_bytes(b"\0" * st.st_size)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DataError, match="not a readable image"):
        load_images([victim], 32)
    out = tmp_path / "run"
    res = invoke("train", "cxr", "--data", data, "--image-size", "32", "--epochs", "1", "--width", "4",
                 "--batch-size", "4", "--epsilon", "8", "--quiet", "--out", out)
    assert res.exit_code == 0, res.output + (res.stderr or "")
    assert (out / "predictions.csv").is_file()


def test_array_dataset_batches_workers_and_pickling(data):
    import torch
    from torch.utils.data import DataLoader

    from privaudit.data.cache import ArrayDataset, build_cache, open_cache

    m = _manifest(data)
    build_cache(m, 16)
    x = open_cache(m, 16)
    y = np.arange(len(x) * 2, dtype=np.float32).reshape(-1, 2)
    rows = np.array([9, 2, 40, 5, 5])
    extra = (np.full((2, 1, 16, 16), 0.5, np.float32), np.full((2, 2), -1, np.float32))
    ds = ArrayDataset(x, y, rows, extra=extra, mean=0.5, std=0.25)
    assert len(ds) == 7
    xi, yi = ds[2]
    torch.testing.assert_close(xi, (torch.from_numpy(np.array(x[40])) - 0.5) / 0.25)
    assert yi.tolist() == [80.0, 81.0]
    batch = ds.__getitems__([6, 0, 2, 5])
    torch.testing.assert_close(torch.stack([b[0] for b in batch]), torch.stack([ds[i][0] for i in (6, 0, 2, 5)]))
    assert batch[0][1].tolist() == [-1.0, -1.0] and batch[3][0].abs().sum() == 0    # a canary: (0.5 - 0.5) / 0.25
    assert ds.__getitems__([]) == []
    # worker processes reopen the memory map by file name instead of receiving a copy of it
    blob = pickle.dumps(ds)
    assert len(blob) < x.nbytes // 4
    again = pickle.loads(blob)
    assert isinstance(again.x, np.memmap)
    torch.testing.assert_close(again[3][0], ds[3][0])
    plain = [b for b in DataLoader(ds, batch_size=3)]
    workers = [b for b in DataLoader(ds, batch_size=3, num_workers=2)]
    for a, b in zip(plain, workers):
        torch.testing.assert_close(a, b)


def test_bad_input(data, tmp_path, monkeypatch):
    from privaudit.data.cache import loader_options
    from privaudit.errors import ConfigError

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    res = invoke("data", "cache", data, "--image-size", "20", "--out", busy, "--quiet")
    assert res.exit_code == 2 and "not a privaudit image cache" in res.stderr and res.stderr.count("\n") == 1
    assert (busy / "notes.txt").read_text() == "mine"
    res = invoke("data", "cache", data, "--image-size", "20", "--task", "pdac", "--quiet")
    assert res.exit_code == 2 and "3D volumes" in res.stderr
    # an unreadable image: one line naming it, and nothing left behind
    bad = _manifest(data).image_paths()[3]
    bad.write_bytes(b"not a png")
    res = invoke("data", "cache", data, "--image-size", "20", "--quiet", "--jobs", "2")   # raised in a worker
    assert res.exit_code == 2 and bad.name in res.stderr and res.stderr.count("\n") == 1
    assert not (data.parent / ".privaudit-cache").exists()
    monkeypatch.setenv("PRIVAUDIT_LOADER_WORKERS", "many")
    with pytest.raises(ConfigError, match="PRIVAUDIT_LOADER_WORKERS='many'"):
        loader_options("cpu")
    monkeypatch.setenv("PRIVAUDIT_LOADER_WORKERS", "3")
    assert loader_options("cpu") == {"num_workers": 3, "pin_memory": False}
    monkeypatch.delenv("PRIVAUDIT_LOADER_WORKERS")
    assert loader_options("cpu") == {"num_workers": 0, "pin_memory": False}
    opts = loader_options(type("D", (), {"type": "cuda"})())
    assert opts["pin_memory"] and opts["num_workers"] >= 1


def test_help():
    res = invoke("data", "cache", "--help")
    assert res.exit_code == 0 and "Usage" in res.output and "Example" in res.output and "--image-size" in res.output
