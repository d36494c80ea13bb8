"""Odd and oversized input at library level: limits, guarded image and volume reading, validated audit.json and
policy files, text from data in rich and matplotlib, quiet third-party imports, and the cache's own check.

Every hostile file is made here, small on disk; the CLI-level cases are in test_hostile_robust_cli.py.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

from privaudit import limits
from privaudit.errors import ConfigError, DataError
from test_audit_engine import make_predictions

ROOT = Path(__file__).parents[1]


# ---- helpers that make hostile files ------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(path: Path, width: int, height: int, *, rows: int | None = None) -> Path:
    """A grey 8-bit PNG whose header declares width x height; its data holds ``rows`` zero rows (default all),
    compressed in a stream, so the file stays small whatever it declares."""
    rows = height if rows is None else rows
    comp = zlib.compressobj(9)
    line = b"\x00" * (width + 1)   # filter byte + pixels
    idat = bytearray()
    block = line * max(1, (1 << 20) // len(line))
    per = len(block) // len(line)
    done = 0
    while done < rows:
        k = min(per, rows - done)
        idat += comp.compress(block[:k * len(line)])
        done += k
    idat += comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", bytes(idat)) + _chunk(b"IEND", b""))
    return path


def tiny_dicom(path: Path, *, rows=8, cols=8, frames=1, samples=1, pixels: bytes | None = None,
               deflated: bool = False) -> Path:
    """A DICOM image written with pydicom: ``frames`` frames of rows x cols x samples 8-bit pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, SecondaryCaptureImageStorage,
                             generate_uid)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, samples
    ds.PhotometricInterpretation = "RGB" if samples == 3 else "MONOCHROME2"
    if samples == 3:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    n = rows * cols * frames * samples
    ds.PixelData = pixels if pixels is not None else bytes(n + (n % 2))
    ds.save_as(str(path), enforce_file_format=True)
    return path


@pytest.fixture
def cohort_copy(cohort, tmp_path, monkeypatch):
    """A private copy of the tiny cohort (tests change its files), with no image cache named in the environment."""
    monkeypatch.delenv("PRIVAUDIT_IMAGE_CACHE", raising=False)
    folder = tmp_path / "cohort"
    shutil.copytree(cohort.parent, folder)
    shutil.rmtree(folder / ".privaudit-cache", ignore_errors=True)
    return folder / "manifest.csv"


def _manifest(path):
    from privaudit.data.presets import load_data
    from privaudit.tasks import create_task

    return load_data(path, task=create_task("cxr"))


def _one_line(e: BaseException, *needles: str) -> str:
    text = str(e)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)
    return text


# ---- numeric limits -------------------------------------------------------------------------------------------
def test_check_limit_names_the_parameter_the_value_and_the_limit():
    with pytest.raises(ConfigError) as e:
        limits.check_limit("n_boot", 10_000_000)
    assert str(e.value).startswith(f"n_boot 10000000 is above the limit {limits.MAX_N_BOOT}; ")
    assert "privaudit.limits.MAX_N_BOOT" in str(e.value)
    limits.check_limit("n_boot", limits.MAX_N_BOOT)        # the limit itself is allowed
    with pytest.raises(ConfigError, match="whole number"):
        limits.check_limit("shadows", 2.5)
    with pytest.raises(ConfigError) as e:    # the CLI may pass its flag: the message uses it
        limits.check_limit("--n-boot", 200_000)
    assert str(e.value).startswith("--n-boot 200000 is above the limit") and "MAX_N_BOOT" in str(e.value)


def test_limits_are_read_when_checked(monkeypatch):
    monkeypatch.setattr(limits, "MAX_SHADOWS", 4)
    with pytest.raises(ConfigError, match="shadows 5 is above the limit 4"):
        limits.check_limit("shadows", 5)


@pytest.mark.parametrize("make, needle", [
    (lambda: __import__("privaudit.config").config.AuditConfig(n_boot=10**7), "n_boot 10000000"),
    (lambda: __import__("privaudit.config").config.TrainConfig(image_size=100_000), "image_size 100000"),
    (lambda: __import__("privaudit.config").config.TrainConfig(task="pdac", image_size=1024), "limit 256"),
    (lambda: __import__("privaudit.config").config.TrainConfig(epochs=10**9), "epochs"),
    (lambda: __import__("privaudit.config").config.TrainConfig(batch_size=10**9, physical_batch_size=64),
     "batch_size"),
    (lambda: __import__("privaudit.config").config.TrainConfig(physical_batch_size=10**7), "physical_batch_size"),
    (lambda: __import__("privaudit.config").config.TrainConfig(width=10**6), "width"),
    (lambda: __import__("privaudit.config").config.TrainConfig(canaries=10**9), "canaries"),
])
def test_configs_refuse_absurd_values(make, needle):
    with pytest.raises(ConfigError) as e:
        make()
    _one_line(e.value, needle, "above the limit")


@pytest.mark.parametrize("kw, needle", [
    (dict(max_grad_norm=float("inf")), "max_grad_norm"),   # the parameter; the CLI writes it as its flag
    (dict(epsilon=None, noise_multiplier=float("inf")), "noise_multiplier"),
    (dict(epsilon=None, noise_multiplier=float("nan")), "noise_multiplier"),
])
def test_dp_settings_must_be_finite(kw, needle):
    from privaudit.config import DPConfig

    with pytest.raises(ConfigError) as e:
        DPConfig(**kw)
    _one_line(e.value, needle, "finite")


def test_synthetic_cohorts_refuse_absurd_sizes_before_writing(tmp_path):
    from privaudit.data.synth_ct import synthesize_ct
    from privaudit.data.synth_cxr import synthesize_cxr

    with pytest.raises(ConfigError, match="n 100000000 is above the limit"):
        synthesize_cxr(tmp_path / "a", n=10**8, image_size=32)
    with pytest.raises(ConfigError, match="image_size 5000 is above the limit"):
        synthesize_cxr(tmp_path / "b", n=20, image_size=5000)
    with pytest.raises(ConfigError, match="image_size 512 is above the limit 256"):
        synthesize_ct(tmp_path / "c", n=20, image_size=512)
    assert not any(tmp_path.iterdir())


def test_bootstrap_refuses_a_weight_matrix_beyond_memory(monkeypatch):
    from privaudit.audit.utility import Resampler

    monkeypatch.setattr(limits, "MAX_BOOTSTRAP_CELLS", 10_000)
    with pytest.raises(ConfigError) as e:
        Resampler(1000, n_boot=100, seed=0)
    _one_line(e.value, "n_boot 100", "1000 test samples", "at most 10")
    assert Resampler(1000, n_boot=10, seed=0).weights.shape == (10, 1000)


def test_check_out_parent_refuses_a_file_in_the_way(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(ConfigError) as e:
        limits.check_out_parent(blocker / "sub" / "run")
    _one_line(e.value, str(blocker), "is a file")
    limits.check_out_parent(tmp_path / "new" / "run")    # folders that do not exist yet are fine


# ---- images -----------------------------------------------------------------------------------------------------
def test_a_png_declaring_a_huge_canvas_is_refused_before_decoding(tmp_path):
    from privaudit.data.images import read_image

    f = png_declaring(tmp_path / "huge.png", 100_000, 100_000, rows=1)   # 10 gigapixels, a few bytes on disk
    assert f.stat().st_size < 2000
    with pytest.raises(DataError) as e:
        read_image(f, 32)
    _one_line(e.value, str(f), "pixels")
    # between privaudit's limit and PIL's: refused by the header check
    g = png_declaring(tmp_path / "big.png", 9000, 8000, rows=1)
    with pytest.raises(DataError) as e:
        read_image(g, 32)
    _one_line(e.value, str(g), "9000 x 8000", "MAX_IMAGE_PIXELS")


@pytest.mark.parametrize("width, height", [(10_500, 10_000), (20_000, 20_000)])
def test_pil_decompression_bomb_warning_and_error_become_one_data_error(tmp_path, monkeypatch, width, height):
    """With privaudit's own limit lifted, PIL's guard (a warning past 89 MP, an error past twice that) still
    gives one DataError, not a warning on the console or a traceback."""
    from privaudit.data.images import read_image

    monkeypatch.setattr(limits, "MAX_IMAGE_PIXELS", 10**12)
    f = png_declaring(tmp_path / "bomb.png", width, height, rows=1)
    with pytest.raises(DataError) as e:
        read_image(f, 16)
    _one_line(e.value, str(f), "decompression bomb")


def test_a_real_decompression_bomb_takes_no_memory(tmp_path):
    """A valid 72-megapixel PNG of zeros (about 70 kB on disk) would take over a gigabyte to decode into a
    16-pixel image; it is refused from its header, and the process's peak memory barely moves."""
    f = png_declaring(tmp_path / "zeros.png", 9000, 8000)
    assert f.stat().st_size < 200_000
    code = textwrap.dedent(f"""
        import resource
        from privaudit.data.images import read_image
        from privaudit.errors import DataError
        import PIL.Image, PIL.PngImagePlugin
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            read_image({str(f)!r}, 16)
        except DataError as e:
            print("refused", e)
        print("grew_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert "refused" in out.stdout and "zeros.png" in out.stdout
    grew = int(out.stdout.split("grew_kb")[1])
    assert grew < 50_000, f"reading the bomb grew the peak memory by {grew} kB"


def test_a_png_holding_postscript_never_reaches_the_eps_plugin(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    from privaudit.data.images import read_image

    called = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: called.append(1))
    f = tmp_path / "ps.png"
    f.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto 16 16 lineto stroke\nshowpage\n")
    with pytest.raises(DataError) as e:
        read_image(f, 16)
    _one_line(e.value, str(f), "PNG")
    assert called == []


def test_formats_outside_the_list_are_refused_whatever_their_name(tmp_path):
    from PIL import Image

    from privaudit.data.images import read_image

    f = tmp_path / "gif.png"
    Image.new("L", (20, 20), 128).save(f, format="GIF")
    with pytest.raises(DataError) as e:
        read_image(f, 16)
    _one_line(e.value, str(f), "not a readable image", "not a PNG, JPEG, TIFF or BMP file")


def test_big_endian_16_bit_tiff_keeps_its_range(tmp_path):
    from PIL import Image

    from privaudit.data.images import read_image

    a = np.linspace(0, 60000, 20 * 30).reshape(20, 30).astype(">u2")
    f = tmp_path / "be.tif"
    Image.fromarray(a).save(f)
    np.testing.assert_allclose(read_image(f), a.astype(np.float32) / 65535.0, atol=1e-6)


def test_multi_frame_rgb_dicom_gives_its_first_frame(tmp_path):
    from privaudit.data.images import read_image

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(3, 6, 5, 3), dtype=np.uint8)
    f = tiny_dicom(tmp_path / "mf.dcm", rows=6, cols=5, frames=3, samples=3, pixels=frames.tobytes())
    got = read_image(f)
    first = frames[0].astype(np.float32).mean(axis=-1)
    want = (first - first.min()) / (first.max() - first.min())
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert read_image(f, 16).shape == (16, 16)


def test_a_dicom_declaring_a_huge_image_is_refused_before_decoding(tmp_path):
    from privaudit.data.images import read_image

    f = tiny_dicom(tmp_path / "huge.dcm", rows=60000, cols=60000, pixels=b"\x00" * 64)
    with pytest.raises(DataError) as e:
        read_image(f, 16)
    _one_line(e.value, str(f), "60000 x 60000")


def test_a_deflated_dicom_that_inflates_past_the_limit_is_refused(tmp_path, monkeypatch):
    from privaudit.data.images import read_image

    f = tiny_dicom(tmp_path / "zip.dcm", rows=1000, cols=2000, deflated=True)
    assert f.stat().st_size < 20_000
    assert read_image(f, 16).shape == (16, 16)          # a valid deflated DICOM reads
    monkeypatch.setattr(limits, "MAX_IMAGE_PIXELS", 1000)   # an inflate budget of 8 kB plus 1 MiB
    with pytest.raises(DataError) as e:
        read_image(f, 16)
    _one_line(e.value, str(f), "inflates to more than")


def test_not_a_dicom_is_one_line(tmp_path):
    from privaudit.data.images import read_image

    f = tmp_path / "x.dcm"
    f.write_bytes(b"\x00" * 300)
    with pytest.raises(DataError) as e:
        read_image(f, 16)
    _one_line(e.value, str(f), "DICOM")


def test_cache_jobs_refuse_a_bomb_before_any_worker_decodes_it(cohort_copy):
    from privaudit.data.cache import build_cache

    m = _manifest(cohort_copy)
    victim = m.image_paths()[5]
    png_declaring(Path(victim), 9000, 8000)
    with pytest.raises(DataError) as e:
        build_cache(m, 16, jobs=2)
    _one_line(e.value, Path(victim).name, "MAX_IMAGE_PIXELS")
    assert not (cohort_copy.parent / ".privaudit-cache").exists()


def test_cache_refuses_absurd_options_and_an_out_below_a_file(cohort_copy, tmp_path):
    from privaudit.data.cache import build_cache

    m = _manifest(cohort_copy)
    with pytest.raises(ConfigError, match="jobs 100000 is above the limit"):
        build_cache(m, 16, jobs=100_000)
    with pytest.raises(ConfigError, match="image_size 100000 is above the limit"):
        build_cache(m, 100_000)
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(ConfigError) as e:
        build_cache(m, 16, blocker / "cache")
    _one_line(e.value, str(blocker), "is a file")


# ---- the cache's own check ------------------------------------------------------------------------------------
def test_verify_cache_finds_what_size_and_time_do_not(cohort_copy, tmp_path):
    """The cache is trusted by size and modification time; a file rewritten with both kept fools that check,
    and verify_cache finds it, as it finds a tampered cache row and a file that no longer decodes."""
    from PIL import Image

    from privaudit.data.cache import build_cache, check_cache, verify_cache

    m = _manifest(cohort_copy)
    folder, _ = build_cache(m, 16)
    rep = verify_cache(m, 16)
    assert rep.ok and rep.n_checked == len(m.frame) and rep.folder == folder
    assert "all" in rep.summary()

    paths = [Path(p) for p in m.image_paths()]
    st = paths[3].stat()
    raw = tmp_path / "flat.png"
    Image.new("L", (32, 32), 128).save(raw)   # a flat image: smaller than the original, padded after IEND
    data = raw.read_bytes()
    assert len(data) < st.st_size
    paths[3].write_bytes(data + b"\x00" * (st.st_size - len(data)))
    os.utime(paths[3], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert check_cache(folder, m, 16).valid        # the trust check does not notice
    st7 = paths[7].stat()
    paths[7].write_bytes(b"\x00" * st7.st_size)
    os.utime(paths[7], ns=(st7.st_atime_ns, st7.st_mtime_ns))

    rep = verify_cache(m, 16, folder, jobs=2)
    assert not rep.ok and rep.n_checked == len(m.frame)
    assert [d["path"] for d in rep.mismatches] == [str(paths[3])]
    assert [d["path"] for d in rep.unreadable] == [str(paths[7])]
    assert "\n" not in rep.summary() and "rebuild" in rep.summary()


def test_verify_cache_reports_a_tampered_cache_and_a_missing_one(cohort_copy, tmp_path):
    from privaudit.data.cache import build_cache, verify_cache

    m = _manifest(cohort_copy)
    with pytest.raises(DataError) as e:
        verify_cache(m, 16)
    _one_line(e.value, "no image cache at 16 px", "privaudit data cache")
    folder, _ = build_cache(m, 16)
    arr = np.load(folder / "images.npy", mmap_mode="r+")
    arr[2, 0, 0, 0] = 1.0 - arr[2, 0, 0, 0]
    arr.flush()
    del arr
    rep = verify_cache(m, 16)
    assert [d["sample_id"] for d in rep.mismatches] == [str(m.frame["sample_id"].iloc[2])]
    assert rep.mismatches[0]["max_abs_diff"] > 0


# ---- NIfTI ----------------------------------------------------------------------------------------------------
def _nifti(path: Path, shape, *, dtype=np.int16, zooms=(1.0, 1.0, 1.0), data: bool = True) -> Path:
    """A NIfTI file whose header declares ``shape``; with data=False only the header (and no voxels) is
    written, so a file declaring a huge volume stays tiny."""
    import warnings

    import nibabel as nib

    affine = np.diag([*zooms, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # nibabel warns on the degenerate affines made here
        hdr = nib.Nifti1Header()
        hdr.set_data_dtype(dtype)
        hdr.set_data_shape(shape)
        degenerate = min(zooms) <= 0
        hdr.set_zooms(tuple(z if z > 0 else 1.0 for z in zooms)[:len(shape)])
        if degenerate:   # a valid pixdim and qform, but an sform (which wins) that flattens an axis
            hdr.set_qform(None, code=0)
            hdr.set_sform(affine, code=1)
        else:
            hdr.set_qform(affine, code=1)
            hdr.set_sform(affine, code=1)
        if data:
            nib.save(nib.Nifti1Image(np.zeros(shape, dtype=dtype), None, hdr), str(path))
        else:
            hdr["vox_offset"] = 352
            path.write_bytes(hdr.binaryblock + b"\x00" * 4 + b"\x00" * 64)
    return path


def test_a_nifti_declaring_a_huge_volume_is_refused_from_its_header(tmp_path):
    from privaudit.data.volumes import load_volumes, volume_shape

    f = _nifti(tmp_path / "huge.nii", (30000, 30000, 30000), data=False)
    assert f.stat().st_size < 1000
    with pytest.raises(DataError) as e:
        volume_shape(f)
    _one_line(e.value, str(f), "30000x30000x30000", "MAX_VOLUME_VOXELS")
    with pytest.raises(DataError):
        load_volumes([f], 16, cache=False)


def test_a_nifti_over_the_byte_limit_is_refused(tmp_path, monkeypatch):
    from privaudit.data.volumes import volume_shape

    f = _nifti(tmp_path / "f64.nii", (20, 20, 20), dtype=np.float64)
    assert volume_shape(f) == (20, 20, 20)
    monkeypatch.setattr(limits, "MAX_VOLUME_BYTES", 20 * 20 * 20 * 4)
    with pytest.raises(DataError) as e:
        volume_shape(f)
    _one_line(e.value, str(f), "float64", "MAX_VOLUME_BYTES")


@pytest.mark.parametrize("zooms, needle", [((0.0, 1.0, 1.0), "spacing"), ((1e-6, 1.0, 1.0), "spacing")])
def test_a_nifti_with_a_degenerate_spacing_is_refused(tmp_path, zooms, needle):
    from privaudit.data.volumes import volume_shape

    f = _nifti(tmp_path / "z.nii", (20, 20, 20), zooms=zooms)
    with pytest.raises(DataError) as e:
        volume_shape(f)
    _one_line(e.value, str(f), needle)


def test_a_nifti_whose_resampling_would_blow_up_is_refused(tmp_path):
    from privaudit.data.volumes import Preprocessing, preprocess_volume

    f = _nifti(tmp_path / "wide.nii", (40, 40, 40), zooms=(5000.0, 5000.0, 5000.0))   # 200 m voxels
    with pytest.raises(DataError) as e:
        preprocess_volume(f, Preprocessing(size=16))
    _one_line(e.value, str(f), "resampled", "limit")


# ---- audit.json ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def audit_doc(tmp_path_factory) -> dict:
    from privaudit.audit import run_audit
    from privaudit.config import AuditConfig

    run = {"dp": True, "epsilon": 3.0, "delta": 1e-5, "accountant": "rdp", "noise_multiplier": 1.0,
           "sample_rate": 0.01, "steps": 100, "max_grad_norm": 1.0, "poisson_sampling": True,
           "backend": "opacus", "architecture": "resnet9-gn", "seed": 0}
    rep = run_audit({"eps3": make_predictions(n=300, seed=2), "non_private": make_predictions(n=300, seed=2)},
                    runs={"eps3": run}, config=AuditConfig(n_boot=20))
    path = tmp_path_factory.mktemp("audit") / "audit.json"
    rep.to_json(path)   # validated against the (tightened) schema on write
    return json.loads(path.read_text())


@pytest.mark.parametrize("mutate, path", [
    (lambda d: d.pop("models"), "$"),
    (lambda d: d.__setitem__("models", []), "$.models"),
    (lambda d: d["models"]["eps3"]["utility"].pop("macro_auroc"), "$.models.eps3.utility"),
    (lambda d: d["models"]["eps3"]["privacy"]["accountant"].__setitem__("epsilon", "three"),
     "$.models.eps3.privacy.accountant.epsilon"),
    (lambda d: d["models"]["eps3"]["privacy"]["attacks"].__setitem__("loss", 5),
     "$.models.eps3.privacy.attacks.loss"),
    (lambda d: d["models"]["eps3"]["privacy"]["attacks"]["loss"]["tpr_at_fpr"].pop("0.01"),
     "$.models.eps3.privacy.attacks.loss.tpr_at_fpr"),
    (lambda d: d["models"]["eps3"]["fairness"]["sex"]["macro"]["groups"].__setitem__("F", "x"),
     "$.models.eps3.fairness.sex.macro.groups.F"),
    (lambda d: d["models"]["eps3"].__setitem__("curves", {"a": {"roc": {"fpr": [0, 1], "tpr": [0]}}}),
     "$.models.eps3.curves.a.roc"),
    (lambda d: d["models"]["eps3"]["privacy"].__setitem__("soundness", {"violated": "yes"}),
     "$.models.eps3.privacy.soundness"),
])
def test_valid_json_that_is_not_an_audit_names_the_file_and_the_first_failing_path(audit_doc, tmp_path, mutate,
                                                                                      path):
    from privaudit.audit.results import AuditReport

    doc = json.loads(json.dumps(audit_doc))
    mutate(doc)
    f = tmp_path / "audit.json"
    f.write_text(json.dumps(doc))
    with pytest.raises(DataError) as e:
        AuditReport.from_json(f)
    text = _one_line(e.value, str(f), "not a valid audit.json")
    assert f"at {path}:" in text
    assert len(text) < 400


@pytest.mark.parametrize("content", [b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe\x00garbage", b"[1, 2]",
                                     b'{"schema_version": true}'])
def test_odd_audit_files_are_one_line(tmp_path, content):
    from privaudit.audit.results import AuditReport

    f = tmp_path / "audit.json"
    f.write_bytes(content)
    with pytest.raises(DataError) as e:
        AuditReport.from_json(f)
    _one_line(e.value, str(f))
    with pytest.raises(DataError) as e:
        AuditReport.from_json(tmp_path)
    _one_line(e.value, "folder")


# ---- policies -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, needle", [
    ("policy = 5\n", "'policy' must be a table"),
    ("[policy]\nmodels = 3\nmin_auroc = 0.5\n", "'models' must be a list"),
    ("[policy]\nmodels = [1, 2]\nmin_auroc = 0.5\n", "'models' must be a list"),
    ("[policy]\nmodels = 'private'\nmin_auroc = 0.5\n", "'models' must be a list"),
    ("[policy]\nmin_auroc = 'x'\n", "must be a number"),
    ("[policy]\nmin_auroc = 2.0\n", "in [0, 1]"),
    ("[policy]\nmax_epsilon = -1\n", "above 0"),
    ("[policy]\nmax_epsilon = nan\n", "finite"),
    ("[policy]\nno_soundness_violation = 1\n", "true or false"),
    ("[policy]\nmax_parity_gap_by_attribute = 3\n", "table of attribute"),
    ("[policy]\n[policy.max_parity_gap_by_attribute]\nsex = 'a'\n", "sex must be a number"),
    ("[policy]\n", "no rules"),
    ("[policy]\nmin_auroc = 0.5\n[other]\nx = 1\n", "beside [policy]"),
    ("[policy]\nmin_auroc = { value = 0.5, models = 'zz' }\n", "min_auroc.models"),
    ("[policy]\nmin_auroc = { models = 'dp' }\n", "takes 'value'"),
    ("[policy\nmin_auroc = 0.5\n", "not valid TOML"),
])
def test_a_policy_of_the_wrong_shape_is_one_line(tmp_path, text, needle):
    from privaudit.reports.policy import Policy

    f = tmp_path / "p.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        Policy.load(f)
    _one_line(e.value, str(f), needle)


def test_a_policy_folder_or_a_non_utf8_policy_is_one_line(tmp_path):
    from privaudit.reports.policy import Policy

    with pytest.raises(ConfigError) as e:
        Policy.load(tmp_path)
    _one_line(e.value, str(tmp_path), "a folder")
    f = tmp_path / "latin1.toml"
    f.write_bytes("[policy]\n# r\xe9sum\xe9\nmin_auroc = 0.5\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        Policy.load(f)
    _one_line(e.value, str(f), "UTF-8")


def test_the_example_policy_applies_to_the_dp_models_of_a_run_and_of_a_study(audit_doc):
    from privaudit.reports.policy import Policy, evaluate

    policy = Policy.load(ROOT / "examples" / "policy.toml")
    single = {**audit_doc, "models": {"eps3": audit_doc["models"]["eps3"]}}   # privaudit audit runs/eps3
    checks = evaluate(single, policy)
    assert {c.model for c in checks} == {"eps3"} and any(c.check == "epsilon" and c.status == "pass" for c in checks)
    study = {**audit_doc, "models": {"private": audit_doc["models"]["eps3"],
                                     "non_private": audit_doc["models"]["non_private"]}}
    assert {c.model for c in evaluate(study, policy)} == {"private"}   # the baseline is not to be released
    with pytest.raises(ConfigError, match="the DP models, and the audit has none"):
        evaluate({**audit_doc, "models": {"base": audit_doc["models"]["non_private"]}}, policy)


def test_a_rule_can_name_its_own_models(audit_doc, tmp_path):
    from privaudit.reports.policy import Policy, evaluate

    f = tmp_path / "p.toml"
    f.write_text('[policy]\nmodels = "dp"\nmax_epsilon = 10\nmin_auroc = { value = 0.0, models = "all" }\n'
                 "max_attack_tpr_at_1pct_fpr = { value = 1.0, models = ['non_private'] }\n")
    checks = evaluate(audit_doc, Policy.load(f))
    by = {(c.model, c.check) for c in checks}
    assert by == {("eps3", "epsilon"), ("eps3", "macro AUROC"), ("non_private", "macro AUROC"),
                  ("non_private", "attack TPR at 1% FPR")}
    f.write_text("[policy]\nmodels = ['nope']\nmin_auroc = 0.5\n")
    with pytest.raises(ConfigError, match="'nope'"):
        evaluate(audit_doc, Policy.load(f))


def test_policy_names_from_data_do_not_break_the_parity_check(audit_doc, tmp_path):
    """A parity CI with a missing bound (hand-edited, or an older writer) is read as the estimate, not a crash."""
    from privaudit.reports.policy import Policy, evaluate

    doc = json.loads(json.dumps(audit_doc))
    parity = doc["models"]["eps3"]["fairness"]["sex"]["macro"]["performance_parity"]
    for est in parity.values():
        est["ci_low"] = None
    f = tmp_path / "p.toml"
    f.write_text("[policy]\nmax_parity_gap = 0.9\n")
    assert all(c.status in ("pass", "fail", "inconclusive") for c in evaluate(doc, Policy.load(f)))


# ---- model cards ----------------------------------------------------------------------------------------------
def test_a_model_card_that_is_not_utf8_or_a_folder_is_one_line(tmp_path):
    from privaudit.reports.render import load_model_card

    f = tmp_path / "card.toml"
    f.write_bytes('description = "r\xe9sum\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_model_card(f)
    _one_line(e.value, str(f), "UTF-8")
    with pytest.raises(ConfigError) as e:
        load_model_card(tmp_path)
    _one_line(e.value, str(tmp_path), "folder")


# ---- names from data in figures and on the console --------------------------------------------------------------
ODD_NAMES = ["$\\foo$", "_hidden", "a^b_c", "$x$ and $y", "[/x]", "[bold]b", "\\", "line\nbreak"]


def test_groups_named_in_mathtext_and_markup_survive_a_full_audit_and_render(tmp_path, monkeypatch):
    import matplotlib

    from privaudit.audit import run_audit
    from privaudit.audit.results import AuditReport
    from privaudit.config import AuditConfig
    from privaudit.reports import write_report

    monkeypatch.setitem(matplotlib.rcParams, "text.usetex", True)   # a user's matplotlibrc: no TeX here
    df = make_predictions(n=800, seed=4)
    df["site"] = [ODD_NAMES[i % 4] for i in range(len(df))]
    df["ward"] = [ODD_NAMES[4 + i % 4] for i in range(len(df))]
    # ward is no known attribute column, so it is audited only when named (issue 14)
    rep = run_audit({"$\\alpha$": df, "_base": df.assign(p_a=df["p_b"])},
                    config=AuditConfig(n_boot=20, attributes=("site", "ward")))
    f = tmp_path / "audit.json"
    rep.to_json(f)
    assert set(ODD_NAMES[:4]) <= set(rep.models["$\\alpha$"]["fairness"]["site"]["macro"]["groups"])
    [html] = write_report(f, tmp_path / "r.html")
    text = html.read_text()
    assert "$\\foo$" in text and "a^b_c" in text and "[/x]" in text
    assert "\u200b_hidden" in text or "_hidden" in text
    assert AuditReport.from_json(f).models   # the audit survived


def test_mpl_text_and_figures_draw_odd_names_as_typed():
    from privaudit.reports.figures import forest_figure, mpl_text

    assert mpl_text("_x") == "\u200b_x" and mpl_text("$\\foo$") == "$\\foo$" and mpl_text("a\nb") == "a\\nb"
    groups = {g: {"n": 50, "auroc": {"estimate": 0.7, "ci_low": 0.75, "ci_high": 0.8}} for g in ODD_NAMES}
    doc = {"models": {"m": {"fairness": {"site": {"macro": {"groups": groups}}}}}}
    svg = forest_figure(doc, "site")   # a CI that misses its estimate is drawn, not an error
    assert "$\\foo$" in svg and "a^b_c" in svg


def test_console_helpers_print_data_as_typed_on_one_line():
    from rich.console import Console
    from rich.table import Table

    from privaudit._console import error_line, one_line, plain, safe

    console = Console(record=True, width=200, color_system=None)
    for name in ODD_NAMES + ["\x1b[2J", "a\u2028b"]:
        console.print(f"model [bold]{safe(name)}[/] done")
        console.print(error_line(f"group {name!r} is bad"))
        table = Table(title=plain(name))
        table.add_column(plain(name))
        table.add_row(plain(name))
        console.print(table)
    out = console.export_text()
    for name in ODD_NAMES:
        assert f"model {one_line(name)} done" in out
    assert "\x1b" not in out and "\u2028" not in out
    assert "line\\nbreak" in out


# ---- noise ---------------------------------------------------------------------------------------------------
def test_quiet_imports_drop_third_party_noise_but_keep_privaudit_and_other_lines():
    code = textwrap.dedent("""
        import logging, os, warnings
        from privaudit._quiet import quiet_imports
        with quiet_imports():
            import aif360.sklearn.metrics
            os.write(2, b"a line that is not noise\\n")
        warnings.warn_explicit("privaudit's own warning", UserWarning, "privaudit/x.py", 1, module="privaudit.x")
        logging.getLogger("privaudit.test").warning("privaudit's own log line")
        logging.getLogger("aif360.later").warning("a third-party warning after the import")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**{k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
                              "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    err = out.stderr
    for noise in ("inFairness", "oneDNN", "cpu_feature_guard", "absl::InitializeLog", "No module named"):
        assert noise not in err, err
    for kept in ("a line that is not noise", "privaudit's own warning", "privaudit's own log line",
                 "a third-party warning after the import"):
        assert kept in err, err
