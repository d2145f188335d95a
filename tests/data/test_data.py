import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from offroad_seg.data.classes import BUILTIN_CLASS_MAPS, IGNORE_ID, ClassMap, resolve_class_map
from offroad_seg.data.dataset import check_headers, list_samples, output_name
from offroad_seg.data.digest import digest
from offroad_seg.data.images import read_image, read_labels, read_mask, write_mask
from offroad_seg.data.inputs import input_warnings, list_images, list_inputs
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
    # JPEG images are a valid dataset format now; other image formats still are not
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "Color_Images" / "a.bmp")
    with pytest.raises(DataError, match=r"a.bmp: unexpected image"):
        list_samples(tmp_path)


def test_list_images_mixes_files_and_folders(tmp_path):
    make_pair(tmp_path / "ds", "a.png", np.zeros((2, 2), np.uint16))
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "z.png")
    found = list_images([tmp_path / "ds", tmp_path / "z.png"])
    assert found == [tmp_path / "ds" / "Color_Images" / "a.png", tmp_path / "z.png"]
    with pytest.raises(DataError, match="no such file"):
        list_images([tmp_path / "missing.png"])


# ----------------------------------------------------------------------------- JPEG, globs, video


def save_image(path, rgb=None, size=(4, 6), mode="RGB", **kw):
    """An image file of `size` (rows, cols); the format follows the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.full((*size, 3), (200, 120, 40), np.uint8) if rgb is None else rgb
    Image.fromarray(rgb).convert(mode).save(path, **kw)
    return path


def save_mask(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mask(path, np.zeros((2, 2), np.uint16))


def test_jpeg_dataset_pairs_with_png_masks_by_stem(tmp_path):
    for name in ("b.jpg", "a.JPEG"):
        save_image(tmp_path / "Color_Images" / name, size=(2, 2))
        save_mask(tmp_path / "Segmentation" / (Path(name).stem + ".png"))
    (tmp_path / "Color_Images" / ".DS_Store").write_bytes(b"x")
    samples = list_samples(tmp_path)
    assert [(s.name, s.mask.name, s.output_name) for s in samples] == [
        ("a.JPEG", "a.png", "a.png"),
        ("b.jpg", "b.png", "b.png"),
    ]
    assert samples[0].image == tmp_path / "Color_Images" / "a.JPEG"
    check_headers(samples)
    unlabelled = list_samples(tmp_path, require_masks=False)
    assert [s.mask for s in unlabelled] == [s.mask for s in samples]
    (tmp_path / "Segmentation" / "b.png").unlink()
    with pytest.raises(DataError, match=r"b.jpg: no mask .*Segmentation/b.png"):
        list_samples(tmp_path)
    save_mask(tmp_path / "Segmentation" / "b.png")
    save_mask(tmp_path / "Segmentation" / "c.png")
    with pytest.raises(DataError, match=r"c.png: mask without an image .*Color_Images/c\.\*"):
        list_samples(tmp_path)


def test_png_dataset_output_names_are_its_file_names(dataset):
    samples = list_samples(dataset / "val")
    assert [s.output_name for s in samples] == [s.name for s in samples]


def test_jpeg_masks_refused_as_lossy(tmp_path):
    save_image(tmp_path / "Color_Images" / "a.jpg", size=(2, 2))
    save_image(tmp_path / "Segmentation" / "a.jpg", size=(2, 2), mode="L")
    with pytest.raises(
        DataError, match=r"Segmentation/a.jpg: JPEG mask; masks must be PNG .*lossy"
    ):
        list_samples(tmp_path)


def test_dataset_stays_strict(tmp_path):
    for i in range(3):
        make_pair(tmp_path, f"p{i}.png", np.zeros((2, 2), np.uint16))
    save_image(tmp_path / "Color_Images" / "odd.jpg", size=(2, 2))
    with pytest.raises(DataError, match=r"odd.jpg: unexpected image; .* mixes 3 PNG and 1 JPEG"):
        list_samples(tmp_path)
    (tmp_path / "Color_Images" / "odd.jpg").unlink()
    (tmp_path / "Color_Images" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"notes.txt: unexpected file; dataset folders hold only"):
        list_samples(tmp_path)
    (tmp_path / "Color_Images" / "notes.txt").unlink()
    (tmp_path / "Segmentation" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"Segmentation/notes.txt: unexpected file"):
        list_samples(tmp_path)


def test_dataset_same_stem_twice_names_both(tmp_path):
    save_image(tmp_path / "Color_Images" / "a.jpg", size=(2, 2))
    save_image(tmp_path / "Color_Images" / "a.jpeg", size=(2, 2))
    save_mask(tmp_path / "Segmentation" / "a.png")
    with pytest.raises(DataError, match=r"a.jpg: same name as .*a.jpeg"):
        list_samples(tmp_path)


def test_dataset_jpeg_content_checked_against_its_name(tmp_path):
    save_image(tmp_path / "Color_Images" / "a.jpg", size=(2, 2), format="PNG")
    save_mask(tmp_path / "Segmentation" / "a.png")
    with pytest.raises(DataError, match=r"a.jpg: a PNG file with a .jpg name; expected JPEG"):
        check_headers(list_samples(tmp_path))


def test_camera_multi_picture_jpeg_counts_as_jpeg(tmp_path):
    image = Image.fromarray(np.zeros((2, 2, 3), np.uint8))
    (tmp_path / "Color_Images").mkdir()
    path = tmp_path / "Color_Images" / "a.jpg"
    image.save(path, format="MPO", save_all=True, append_images=[image])  # two pictures
    save_mask(tmp_path / "Segmentation" / "a.png")
    assert Image.open(tmp_path / "Color_Images" / "a.jpg").format == "MPO"
    check_headers(list_samples(tmp_path))
    assert read_image(tmp_path / "Color_Images" / "a.jpg").shape == (2, 2, 3)


def test_read_image_decodes_jpeg_to_rgb(tmp_path):
    rgb = np.full((8, 16, 3), (200, 120, 40), np.uint8)  # flat: JPEG keeps it within a level
    out = read_image(save_image(tmp_path / "a.jpg", rgb, quality=95))
    assert out.shape == (8, 16, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb).max() <= 2
    gray = read_image(save_image(tmp_path / "g.jpg", rgb, mode="L"))
    assert gray.shape == (8, 16, 3)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    expected = np.asarray(Image.fromarray(rgb).convert("L"), dtype=int)
    assert np.abs(gray[..., 1].astype(int) - expected).max() <= 2
    cmyk = read_image(save_image(tmp_path / "c.jpg", rgb, mode="CMYK", quality=95))
    assert cmyk.shape == (8, 16, 3) and np.abs(cmyk.astype(int) - rgb).max() <= 3


def test_predict_folder_of_jpegs_skips_and_counts_other_files(tmp_path):
    d = tmp_path / "test_jpg"
    for name in ("cc0000001.jpg", "cc0000000.JPG", "b.jpeg", "a.png"):
        save_image(d / name)
    (d / "notes.txt").write_text("x")
    (d / "scan.bmp").write_bytes(b"x")
    (d / ".DS_Store").write_bytes(b"x")
    (d / "sub").mkdir()
    save_image(d / "sub" / "deeper.png")  # folders are not recursed
    found = list_inputs([d])
    assert found.images == [d / n for n in ("a.png", "b.jpeg", "cc0000000.JPG", "cc0000001.jpg")]
    assert found.videos == [] and found.skipped == [d / "notes.txt", d / "scan.bmp"]
    assert found.skipped_note() == (
        "skipped 2 files that are not PNG/JPEG images or videos (e.g. notes.txt, scan.bmp)"
    )
    assert list_inputs([d / "a.png"]).skipped_note() == ""


def test_list_images_logs_what_it_skipped(tmp_path, caplog):
    save_image(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("x")
    with caplog.at_level("WARNING", logger="offroad_seg.data.inputs"):
        assert list_images([tmp_path]) == [tmp_path / "a.jpg"]
    assert "skipped 1 file that is not a PNG/JPEG image or a video (notes.txt)" in caplog.text
    (tmp_path / "d.mp4").write_bytes(b"x")
    with pytest.raises(DataError, match=r"d.mp4: a video; this command reads PNG/JPEG"):
        list_images([tmp_path])


def test_predict_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"no PNG/JPEG images or videos \(1 other file\)"):
        list_inputs([tmp_path])
    with pytest.raises(DataError, match="notes.txt: not a PNG/JPEG image or a video"):
        list_inputs([tmp_path / "notes.txt"])
    with pytest.raises(DataError, match="no input images given"):
        list_inputs([])


def test_globs_expand_sorted(tmp_path):
    for drive in ("d2", "d1"):
        for name in ("f1.jpg", "f0.jpg"):
            save_image(tmp_path / f"drive_{drive}" / f"{drive}_{name}")
        (tmp_path / f"drive_{drive}" / "notes.txt").write_text("x")
    found = list_inputs([f"{tmp_path}/drive_*/"])
    assert [p.relative_to(tmp_path).as_posix() for p in found.images] == [
        "drive_d1/d1_f0.jpg",
        "drive_d1/d1_f1.jpg",
        "drive_d2/d2_f0.jpg",
        "drive_d2/d2_f1.jpg",
    ]
    assert len(found.skipped) == 2
    # a glob's file matches are like a folder's files: non-images skipped, not an error
    found = list_inputs([str(tmp_path / "drive_d2" / "*")])
    assert found.images == [tmp_path / "drive_d2" / n for n in ("d2_f0.jpg", "d2_f1.jpg")]
    assert found.skipped == [tmp_path / "drive_d2" / "notes.txt"]
    found = list_inputs([str(tmp_path / "**" / "*_f1.jpg")])  # ** recurses
    assert found.images == [
        tmp_path / "drive_d1" / "d1_f1.jpg",
        tmp_path / "drive_d2" / "d2_f1.jpg",
    ]
    with pytest.raises(DataError, match=r"frames/\*.png: no files match this pattern"):
        list_inputs([str(tmp_path / "frames" / "*.png")])


def test_existing_path_with_glob_characters_is_a_path(tmp_path):
    d = tmp_path / "run[1]"
    save_image(d / "a.jpg")
    save_image(tmp_path / "run1" / "b.jpg")  # what the pattern run[1] would match
    assert list_inputs([d]).images == [d / "a.jpg"]


def test_videos_returned_separately(tmp_path):
    save_image(tmp_path / "d" / "a.jpg")
    for name in ("drive01.MP4", "drive02.mkv"):
        (tmp_path / "d" / name).write_bytes(b"x")
    (tmp_path / "clip.webm").write_bytes(b"x")
    found = list_inputs([tmp_path / "d", tmp_path / "clip.webm"])
    assert found.images == [tmp_path / "d" / "a.jpg"]
    assert found.videos == [
        tmp_path / "d" / "drive01.MP4",
        tmp_path / "d" / "drive02.mkv",
        tmp_path / "clip.webm",
    ]
    assert list_inputs([tmp_path / "clip.webm"]).images == []


def test_output_name_collisions_name_both(tmp_path):
    a = save_image(tmp_path / "a" / "x.jpg")
    b = save_image(tmp_path / "b" / "x.png")
    with pytest.raises(
        DataError, match=rf"{b}: outputs would have the same file name \(x.png\) as those of {a};"
    ):
        list_inputs([a, b])
    (tmp_path / "a" / "drive.mp4").write_bytes(b"x")
    (tmp_path / "b" / "drive.mov").write_bytes(b"x")
    frames = r"b/drive.mov: .*same file name \(drive_f\*.png\) .*a/drive.mp4"
    with pytest.raises(DataError, match=frames):
        list_inputs([tmp_path / "a" / "drive.mp4", tmp_path / "b" / "drive.mov"])
    assert output_name("dir/x.jpeg") == "x.png" and output_name(Path("y.PNG")) == "y.png"


def test_same_file_twice_is_a_collision(tmp_path):
    a = save_image(tmp_path / "a.jpg")
    with pytest.raises(DataError, match=r"a.jpg: outputs would have the same file name"):
        list_inputs([tmp_path, a])


WORKING = (266, 476)


def test_input_warnings_grayscale(tmp_path):
    gray = [
        save_image(tmp_path / "g.png", size=(27, 48), mode="L"),
        save_image(tmp_path / "g.jpg", size=(27, 48), mode="L"),
        save_image(tmp_path / "ga.png", size=(27, 48), mode="LA"),
        tmp_path / "gp.png",
    ]
    grey_palette = Image.fromarray(np.zeros((27, 48), np.uint8), mode="P")
    grey_palette.putpalette([v for i in range(256) for v in (i, i, i)])
    grey_palette.save(tmp_path / "gp.png")
    colour_palette = Image.fromarray(np.zeros((27, 48), np.uint8), mode="P")
    colour_palette.putpalette([0, 0, 0, 255, 0, 0])
    colour_palette.save(tmp_path / "cp.png")
    colour = [save_image(tmp_path / "c.jpg", size=(27, 48)), tmp_path / "cp.png"]
    warnings = input_warnings(colour + gray, WORKING)
    assert len(warnings) == 1
    assert warnings[0].startswith(
        f"4 grayscale inputs ({gray[0]}, {gray[1]}, {gray[2]} and 1 more)"
    )
    assert "trained on colour images; they are read as RGB" in warnings[0]
    assert input_warnings(colour, WORKING) == []
    one = input_warnings(gray[1:2], WORKING)[0]
    assert one.startswith(f"1 grayscale input ({gray[1]})") and "; it is read as RGB" in one


def test_input_warnings_aspect_ratio(tmp_path):
    vga = save_image(tmp_path / "vga.jpg", size=(480, 640))
    fine = [
        save_image(tmp_path / "hd.png", size=(540, 960)),  # 16:9, the working size's 1.79
        save_image(tmp_path / "wide.png", size=(100, 160)),  # 16:10, 11% off: within 15%
    ]
    tall = save_image(tmp_path / "tall.png", size=(100, 150))  # 3:2, 19% off
    [warning] = input_warnings([vga, *fine, tall], WORKING)
    assert warning.startswith(
        f"2 inputs with an aspect ratio more than 15% off the working size 266x476 (1.79:1): "
        f"{vga} (640x480), {tall} (150x100); "
    )
    assert "resized to 266x476 without keeping the aspect ratio, as in training" in warning
    assert input_warnings(fine, WORKING) == []


def test_input_warnings_exif_rotation_and_refusals(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    rotated = save_image(tmp_path / "r.jpg", size=(27, 48), exif=exif)
    upright = save_image(tmp_path / "u.jpg", size=(27, 48))
    [warning] = input_warnings([rotated, upright], WORKING)
    assert warning.startswith(f"1 JPEG image with an EXIF rotation ({rotated})")
    Image.fromarray(np.zeros((27, 48), np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(DataError, match="deep.png: I;16 image; expected 8-bit RGB"):
        input_warnings([upright, tmp_path / "deep.png"], WORKING)
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="bad.jpg: not a readable image"):
        input_warnings([tmp_path / "bad.jpg"], WORKING)


def test_input_warnings_read_video_headers(tmp_path):
    pytest.importorskip("av")
    from offroad_seg.data.video import VideoWriter

    with VideoWriter(tmp_path / "vga.mp4", 10, 64, 48) as video:
        video.write(np.zeros((48, 64, 3), np.uint8))
    [warning] = input_warnings([tmp_path / "vga.mp4"], WORKING)
    assert f"{tmp_path / 'vga.mp4'} (64x48)" in warning
