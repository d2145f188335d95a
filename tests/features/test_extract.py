import json
import shutil
import warnings

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from offroad_seg.cli import cli
from offroad_seg.data.classes import ClassMap
from offroad_seg.data.dataset import list_samples
from offroad_seg.data.images import read_image, read_mask
from offroad_seg.errors import CacheError
from offroad_seg.features.cache import FeatureCache
from offroad_seg.features.cache_format import FORMAT
from offroad_seg.features.extract import extract
from offroad_seg.models.preprocess import Preprocessing, image_to_tensor, preprocess
from tests.conftest import SIZE, extract_config


def test_cache_layout_readable_with_plain_zarr(caches, dataset):
    g = zarr.open_group(str(caches["train"]), mode="r")
    n = len(list_samples(dataset / "train"))
    assert g.attrs["format"] == FORMAT and g.attrs["version"] == 2
    assert g.attrs["complete"] is True
    assert g.attrs["views"] == ["identity", "hflip"]
    assert g.attrs["backbone"]["channels"] == 384 and g.attrs["backbone"]["layers"] == 1
    assert g.attrs["preprocessing"]["size"] == list(SIZE)
    assert len(g.attrs["fingerprint"]) == 64
    assert g["features"].shape == (n, 2, 384, 4, 7) and g["features"].dtype == np.float16
    k = g.attrs["images_per_chunk"]
    assert g["features"].chunks == (k, 1, 384, 4, 7)
    shard = k * g.attrs["chunks_per_shard"]  # format 2: chunks packed in shards
    assert g["features"].shards == (shard, 1, 384, 4, 7) and g["done"].shards == (shard,)
    assert g["labels"].shape == (n, 2, *SIZE) and g["labels"].dtype == np.uint8
    assert g["done"].shape == (n,) and bool(g["done"][:].all())
    assert [str(s) for s in g["names"][:]] == [s.name for s in list_samples(dataset / "train")]
    assert g["class_pixels"].shape == (11,) and g["class_pixels"].dtype == np.int64
    (sharding,) = g["features"].metadata.codecs
    codecs = [type(c).__name__ for c in sharding.codecs]  # each inner chunk's
    assert codecs == ["BytesCodec", "BloscCodec", "Crc32cCodec"]
    # nothing but zarr's own files: listing members raises no "not recognized" warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sorted(g.array_keys()) == [
            "chunk_checksums",
            "class_pixels",
            "done",
            "features",
            "hackathon_labels",
            "labels",
            "names",
        ]


def test_streaming_reader_equals_whole_cache(dataset, tmp_path):
    path = tmp_path / "c.zarr"
    extract(
        extract_config(dataset / "train", path, images_per_chunk=2, views=("identity", "hflip"))
    )
    cache = FeatureCache.open(path)
    assert cache.num_chunks > 1
    features, labels = cache.load()
    order = list(reversed(range(cache.num_chunks)))
    seen = []
    for start, f, lab in cache.iter_chunks(order):
        np.testing.assert_array_equal(f, features[start : start + len(f)])
        np.testing.assert_array_equal(lab, labels[start : start + len(lab)])
        seen += range(start, start + len(f))
    assert sorted(seen) == list(range(cache.num_images))
    assert seen[0] == cache.chunk_range(order[0])[0]  # in the order asked


def test_cached_features_equal_backbone_output(caches, dataset, backbone):
    g = zarr.open_group(str(caches["train"]), mode="r")
    prep = Preprocessing(size=SIZE)
    cm = ClassMap.default()
    samples = list_samples(dataset / "train")
    counts = np.zeros(11, np.int64)
    for i, s in enumerate(samples):
        x = preprocess(image_to_tensor(read_image(s.image)), prep)
        with torch.no_grad():
            expected = backbone(torch.cat([x, x.flip(-1)]))
        np.testing.assert_allclose(
            g["features"][i].astype(np.float32), expected.numpy(), rtol=2e-3, atol=2e-3
        )
        # labels: raw codes -> ids by direct lookup, nearest at pixel centres
        codes = read_mask(s.mask)
        code_to_id = {int(c): j for j, c in enumerate(cm.codes)}
        ids = np.vectorize(code_to_id.get)(codes).astype(np.uint8)
        rows = ((np.arange(SIZE[0]) + 0.5) * codes.shape[0] / SIZE[0]).astype(int)
        cols = ((np.arange(SIZE[1]) + 0.5) * codes.shape[1] / SIZE[1]).astype(int)
        small = ids[rows][:, cols]
        np.testing.assert_array_equal(g["labels"][i, 0], small)
        np.testing.assert_array_equal(g["labels"][i, 1], small[:, ::-1])
        counts += np.bincount(small.ravel(), minlength=11)
    np.testing.assert_array_equal(g["class_pixels"][:], counts)


def test_interrupted_extract_resumes_to_identical_cache(dataset, tmp_path, caches, monkeypatch):
    cache = tmp_path / "train.zarr"
    cfg = extract_config(  # format 1: a unit is a chunk (format 2's kill test: test_crash_safety)
        dataset / "train",
        cache,
        views=("identity", "hflip"),
        batch_size=2,
        images_per_chunk=1,
        cache_version=1,
    )
    original = FeatureCache.write_unit_data
    calls = {"n": 0}

    def crash_after_two(self, chunk, *arrays):
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        calls["n"] += 1
        original(self, chunk, *arrays)

    monkeypatch.setattr(FeatureCache, "write_unit_data", crash_after_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract(cfg)
    monkeypatch.setattr(FeatureCache, "write_unit_data", original)
    partial = FeatureCache.open(cache)
    assert not partial.complete and partial.done().sum() == 2
    with pytest.raises(CacheError, match="unfinished"):
        partial.load()

    summary = extract(cfg)
    assert summary.extracted == 4
    full = tmp_path / "full.zarr"
    extract(
        extract_config(
            dataset / "train", full, views=("identity", "hflip"), batch_size=2, images_per_chunk=1
        )
    )
    a, b = zarr.open_group(str(cache), mode="r"), zarr.open_group(str(full), mode="r")
    for name in ("features", "labels", "done", "names", "class_pixels"):
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)
    assert a.attrs["fingerprint"] == b.attrs["fingerprint"]
    # and equal to the session cache made with other batch and chunk sizes
    c = zarr.open_group(str(caches["train"]), mode="r")
    np.testing.assert_array_equal(a["features"][:], c["features"][:])


def test_rerun_on_complete_cache_does_nothing(caches, dataset):
    summary = extract(
        extract_config(dataset / "train", caches["train"], views=("identity", "hflip"))
    )
    assert summary.extracted == 0


def test_rerun_with_other_settings_refused(caches, dataset):
    expected = r"other settings \(the cache vs this run: views identity,hflip vs identity\)"
    with pytest.raises(CacheError, match=expected):
        extract(extract_config(dataset / "train", caches["train"]))


def test_spec_differences_say_how_and_which_matter(caches):
    from dataclasses import replace

    from offroad_seg.data.classes import ClassInfo

    spec = FeatureCache.open(caches["train"]).spec
    classes = spec.class_map.classes
    renamed = ClassMap((*classes[:3], ClassInfo(classes[3].code, "Grass", classes[3].color),
                        *classes[4:]))  # fmt: skip
    assert spec.differences(replace(spec, class_map=renamed)) == [
        f"class map: class 3 is {classes[3].name} vs Grass"
    ]
    assert spec.differences(replace(spec, class_map=ClassMap.hackathon())) == [
        "class map: 11 classes vs 10"
    ]
    # the storage layout is named alone, as storage only; beside a real difference it follows
    k = spec.images_per_chunk
    assert spec.differences(replace(spec, images_per_chunk=k + 1)) == [
        f"storage only: {k} vs {k + 1} images per chunk (--images-per-chunk; the features are "
        "the same)"
    ]
    assert spec.differences(replace(spec, images_per_chunk=k + 1, dtype="int8")) == [
        "dtype float16 vs int8"
    ]


def test_verify_detects_flipped_byte(caches, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(caches["train"], copy)
    assert FeatureCache.open(copy).verify(progress=False).ok
    chunk = copy / "features" / "c.0.1.0.0.0"  # view 1's shard: one chunk here
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the chunk, before the shard's index
    chunk.write_bytes(bytes(data))
    report = FeatureCache.open(copy).verify(progress=False)
    assert not report.ok
    assert len(report.problems) == 1
    assert "features chunk (0, 1, 0, 0, 0)" in report.problems[0]
    assert "features/c.0.1.0.0.0, inner chunk 0" in report.problems[0]


def test_cli_synth_extract_info_verify(tmp_path):
    runner = CliRunner()
    d, c = tmp_path / "d", tmp_path / "c"

    def run(*args: object, options: str = ""):
        return runner.invoke(cli, [*map(str, args), *options.split()])

    r = run("synth", d, options="--train 3 --val 2 --width 196 --height 112")
    assert r.exit_code == 0, r.output
    assert r.output == f"wrote 3 train and 2 val scenes (196x112) to {d}/train and {d}/val\n"
    assert len(list((d / "train" / "Color_Images").glob("*.png"))) == 3
    assert len(list((d / "val" / "Segmentation").glob("*.png"))) == 2
    cache = c / "train.zarr"
    r = run("extract", d / "train", cache, options="--weights random --size 56x98 --workers 0")
    assert r.exit_code == 0, r.output
    assert "extracted 3 of 3 images" in r.output and "images/s" in r.output
    r = run("extract", d / "train", cache, options="--weights random --size 56x98 --workers 0")
    said = [line for line in r.output.splitlines() if "already" in line]  # once, by the summary
    assert r.exit_code == 0 and len(said) == 1 and "resuming" not in r.output
    assert said[0].startswith(f"all 3 images were already extracted; cache {cache}")
    r = run("cache", "info", cache)
    assert r.exit_code == 0 and "complete (3/3 images)" in r.output
    assert "(3, 1, 384, 4, 7) float16" in r.output
    # the whole preprocessing and every label array, as docs/commands.md says (#27 item 7)
    assert "hackathon    (3, 266, 476) uint8" in r.output
    assert "size         56x98 -> 4x7 tokens of 14x14 px" in r.output
    assert "resize       images bilinear-antialias-uint8, labels nearest" in r.output
    assert "normalise    mean 0.485, 0.456, 0.406, std 0.229, 0.224, 0.225" in r.output
    r = run("cache", "info", "--json", cache)
    info = json.loads(r.output)
    assert info["images"] == 3 and info["bytes_on_disk"] > 0
    assert info["hackathon_labels"] == {"shape": [3, 266, 476], "dtype": "uint8"}
    assert info["preprocessing"] == {
        **FeatureCache.open(cache).spec.preprocessing.to_dict(),
        "grid": [4, 7],
    }
    assert info["bytes_per_image"] == pytest.approx(info["bytes_on_disk"] / 3)
    r = run("cache", "verify", cache)
    assert r.exit_code == 0 and r.stdout.startswith("ok:")

    next((d / "train" / "Segmentation").glob("*.png")).unlink()
    r = run("extract", d / "train", c / "x.zarr", options="--weights random --size 56x98")
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error:") and "no mask" in r.stderr
    r = run("extract", d / "val", c / "y.zarr", options="--weights random --size 50x98")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "multiples of 14" in r.stderr
    assert not (c / "y.zarr").exists()
