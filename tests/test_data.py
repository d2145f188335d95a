import json

import numpy as np
import pytest
from PIL import Image

from offroad_seg.cache import digest
from offroad_seg.data import (
    BUILTIN_CLASS_MAPS,
    IGNORE_ID,
    ClassMap,
    list_images,
    list_samples,
    read_image,
    read_labels,
    read_mask,
    resolve_class_map,
    write_mask,
)
from offroad_seg.errors import DataError


def make_pair(root, name, codes, rgb=None):
    (root / "Color_Images").mkdir(parents=True, exist_ok=True)
    (root / "Segmentation").mkdir(parents=True, exist_ok=True)
    h, w = codes.shape
    rgb = np.zeros((h, w, 3), np.uint8) if rgb is None else rgb
    Image.fromarray(rgb).save(root / "Color_Images" / name)
    write_mask(root / "Segmentation" / name, codes)


def test_default_class_map_is_the_design_table():
    cm = ClassMap.default()
    assert cm.codes.tolist() == [0, 100, 200, 300, 500, 550, 600, 700, 800, 7100, 10000]
    assert cm.names[1] == "Trees" and cm.names[-1] == "Sky"
    assert cm.num_classes == 11


def test_16bit_mask_decodes_raw_codes_and_maps_to_ids(tmp_path):
    codes = np.array([[0, 100, 10000], [7100, 550, 800]], dtype=np.uint16)
    write_mask(tmp_path / "m.png", codes)
    assert Image.open(tmp_path / "m.png").mode == "I;16"
    raw = read_mask(tmp_path / "m.png")
    np.testing.assert_array_equal(raw, codes)
    ids = read_labels(tmp_path / "m.png", ClassMap.default())
    np.testing.assert_array_equal(ids, [[0, 1, 10], [9, 5, 8]])
    assert ids.dtype == np.uint8


def test_8bit_mask_accepted(tmp_path):
    codes = np.array([[0, 100], [200, 0]], dtype=np.uint8)
    Image.fromarray(codes).save(tmp_path / "m.png")
    np.testing.assert_array_equal(
        read_labels(tmp_path / "m.png", ClassMap.default()), [[0, 1], [2, 0]]
    )


def test_unknown_codes_error_names_file_and_codes(tmp_path):
    write_mask(tmp_path / "m.png", np.array([[100, 4242], [9999, 4242]], dtype=np.uint16))
    with pytest.raises(DataError) as err:
        read_labels(tmp_path / "m.png", ClassMap.default())
    msg = str(err.value)
    assert "m.png" in msg and "4242" in msg and "9999" in msg and "\n" not in msg


def test_unknown_codes_ignored_on_request(tmp_path):
    write_mask(tmp_path / "m.png", np.array([[100, 4242]], dtype=np.uint16))
    ids = read_labels(tmp_path / "m.png", ClassMap.default(), ignore_unknown=True)
    np.testing.assert_array_equal(ids, [[1, IGNORE_ID]])


def test_ids_to_codes_round_trip_and_colorize():
    cm = ClassMap.default()
    ids = np.arange(cm.num_classes, dtype=np.uint8).reshape(1, -1)
    np.testing.assert_array_equal(cm.ids_to_codes(ids)[0], cm.codes)
    np.testing.assert_array_equal(cm.colorize(ids)[0], cm.palette)


def test_class_map_json(tmp_path):
    path = tmp_path / "classes.json"
    path.write_text(
        json.dumps(
            [
                {"code": 5, "name": "A", "color": [1, 2, 3]},
                {"code": 9, "name": "B", "color": [4, 5, 6]},
            ]
        )
    )
    cm = ClassMap.from_json(path)
    assert cm.names == ["A", "B"] and cm.codes.tolist() == [5, 9]
    assert ClassMap.from_dict(cm.to_dict()) == cm
    path.write_text(json.dumps([{"code": 5, "name": "A"}]))
    with pytest.raises(DataError, match="classes.json|color"):
        ClassMap.from_json(path)


def test_default_class_map_dict_and_fingerprint_unchanged():
    """Caches and heads on users' disks hold the default map's fingerprint: its dict form must
    stay the plain list it was before class maps had a fallback."""
    d = ClassMap.default().to_dict()
    assert isinstance(d, list) and len(d) == 11
    assert d[6] == {"code": 600, "name": "Flowers", "color": [255, 105, 180]}
    assert digest(d) == "b1684c415f6d4b53610e7c85d07977b75fa2a7a6c043be2ac543b26be80930b0"


def test_hackathon_class_map_maps_flowers_and_unknown_codes_to_background(tmp_path):
    cm = ClassMap.hackathon()
    assert cm.codes.tolist() == [0, 100, 200, 300, 500, 550, 700, 800, 7100, 10000]
    assert cm.names == [
        "Background", "Trees", "Lush Bushes", "Dry Grass", "Dry Bushes",
        "Ground Clutter", "Logs", "Rocks", "Landscape", "Sky",
    ]  # fmt: skip
    assert cm.fallback_id == 0 and cm.num_classes == 10
    codes = np.array([[600, 4242, 10000], [700, 0, 7100]], dtype=np.uint16)
    write_mask(tmp_path / "m.png", codes)
    np.testing.assert_array_equal(read_labels(tmp_path / "m.png", cm), [[0, 0, 9], [6, 0, 8]])
    # a fallback wins over ignore: the map says what unknown codes are
    np.testing.assert_array_equal(
        read_labels(tmp_path / "m.png", cm, ignore_unknown=True), [[0, 0, 9], [6, 0, 8]]
    )
    assert cm.lookup_table()[[600, 65535, 800]].tolist() == [0, 0, 7]


def test_fallback_in_dict_json_equality_and_hash(tmp_path):
    hack = ClassMap.hackathon()
    d = hack.to_dict()
    assert d["fallback_id"] == 0 and d["classes"] == ClassMap(hack.classes).to_dict()
    assert ClassMap.from_dict(d) == hack
    no_fallback = ClassMap(hack.classes)
    assert no_fallback != hack and len({no_fallback, hack, ClassMap.from_dict(d)}) == 2
    assert ClassMap(hack.classes, fallback_id=3) != hack
    path = tmp_path / "classes.json"
    path.write_text(json.dumps(d))
    assert ClassMap.from_json(path) == hack
    path.write_text(json.dumps({"classes": d["classes"]}))  # the dict form, no fallback
    assert ClassMap.from_json(path) == no_fallback
    path.write_text(json.dumps({"fallback_id": 0}))
    with pytest.raises(DataError, match=r"classes.json: .*classes"):
        ClassMap.from_json(path)
    for bad in (10, -1, True, "0", 1.5):
        with pytest.raises(DataError, match="fallback_id"):
            ClassMap(hack.classes, fallback_id=bad)
        path.write_text(json.dumps({**d, "fallback_id": bad}))
        with pytest.raises(DataError, match="classes.json: .*fallback_id") as err:
            ClassMap.from_json(path)
        assert "\n" not in str(err.value)


def test_resolve_class_map_by_name_or_file(tmp_path, monkeypatch):
    assert resolve_class_map(None) == ClassMap.default() == resolve_class_map("default")
    assert resolve_class_map("hackathon") == ClassMap.hackathon()
    assert set(BUILTIN_CLASS_MAPS) == {"default", "hackathon"}
    custom = ClassMap.from_dict([{"code": 5, "name": "A", "color": [1, 2, 3]}])
    path = tmp_path / "classes.json"
    path.write_text(json.dumps(custom.to_dict()))
    assert resolve_class_map(path) == custom == resolve_class_map(str(path))
    with pytest.raises(DataError, match=r"'hackathn'.*built-in: default, hackathon"):
        resolve_class_map("hackathn")
    with pytest.raises(DataError, match="missing.json"):
        resolve_class_map(tmp_path / "missing.json")
    # a built-in name wins over a file of that name; ./name (or a Path) is the file
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hackathon").write_text(json.dumps(custom.to_dict()))
    assert resolve_class_map("hackathon") == ClassMap.hackathon()
    assert resolve_class_map("./hackathon") == custom


def test_rgb_mask_refused(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(DataError, match="m.png.*RGB mask"):
        read_mask(tmp_path / "m.png")


def test_corrupt_png_named(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match="x.png: not a readable image"):
        read_image(tmp_path / "x.png")


def test_pairs_by_name_sorted_and_skips_system_files(tmp_path):
    for name in ("b.png", "a.png"):
        make_pair(tmp_path, name, np.zeros((2, 2), np.uint16))
    (tmp_path / "Color_Images" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "Segmentation" / "Thumbs.db").write_bytes(b"x")
    samples = list_samples(tmp_path)
    assert [s.name for s in samples] == ["a.png", "b.png"]
    assert samples[0].mask == tmp_path / "Segmentation" / "a.png"


def test_missing_mask_and_orphan_mask(tmp_path):
    make_pair(tmp_path, "a.png", np.zeros((2, 2), np.uint16))
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "Color_Images" / "b.png")
    with pytest.raises(DataError, match=r"b.png: no mask"):
        list_samples(tmp_path)
    (tmp_path / "Color_Images" / "b.png").unlink()
    write_mask(tmp_path / "Segmentation" / "c.png", np.zeros((2, 2), np.uint16))
    with pytest.raises(DataError, match=r"c.png: mask without an image"):
        list_samples(tmp_path)


def test_layout_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list_samples(tmp_path / "nope")
    with pytest.raises(DataError, match="no Color_Images"):
        list_samples(tmp_path)
    (tmp_path / "Color_Images").mkdir()
    with pytest.raises(DataError, match="no PNG images"):
        list_samples(tmp_path)
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "Color_Images" / "a.jpg")
    with pytest.raises(DataError, match=r"a.jpg: unexpected image"):
        list_samples(tmp_path)


def test_list_images_mixes_files_and_folders(tmp_path):
    make_pair(tmp_path / "ds", "a.png", np.zeros((2, 2), np.uint16))
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "z.png")
    found = list_images([tmp_path / "ds", tmp_path / "z.png"])
    assert found == [tmp_path / "ds" / "Color_Images" / "a.png", tmp_path / "z.png"]
    with pytest.raises(DataError, match="no such file"):
        list_images([tmp_path / "missing.png"])
