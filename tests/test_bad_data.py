"""Data that is wrong in ways a header check or a casual read misses: image modes and orientation, list and
class files (encoding, absolute, escaping and repeated paths, labels that skip classes), truncated, empty,
unreadable and misplaced files, and YAML that bounds what a config may cost."""

import os
import shutil
import struct
import time
import tracemalloc
import warnings
import zlib
from pathlib import Path

import selfprompt.data.images as images
from selfprompt.data import build_transform, data_config, load_split, write_image_folder
from selfprompt.data.check import check_task
from selfprompt.data.datasets import read_classes
from selfprompt.data.images import load_rgb, to_rgb, unreadable
from selfprompt.data.registry import TaskInfo
from selfprompt.safe_yaml import load_yaml

import numpy as np
import pytest
import yaml
from conftest import tiny_vit
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ORIENTATION = 0x0112
GENERATED = TaskInfo(
    "gen", "vtab-mini", "natural", 3, "", "data", splits=("train", "val", "trainval", "test")
)


@pytest.fixture
def data(tmp_path) -> Path:
    return write_image_folder(tmp_path / "data", num_classes=3, per_class={"train": 4, "val": 2, "test": 2})


def raises(error: type[Exception], call, *fragments: str) -> str:
    with pytest.raises(error) as caught:
        call()
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def picture(h: int = 48, w: int = 64) -> np.ndarray:
    """A smooth RGB picture (JPEG keeps it within a few levels) that no flip or rotation maps onto itself."""
    y, x = np.mgrid[0:h, 0:w]
    channels = [x * 255 // (w - 1), y * 255 // (h - 1), (x + 2 * y) * 255 // (w + 2 * h - 3)]
    return np.stack(channels, -1).astype(np.uint8)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(load_rgb(path)).astype(np.int64)


def png_16bit_rgb(path: Path, values: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), chunk by chunk."""
    h, w, _ = values.shape
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


# 1. one image reader -------------------------------------------------------------------------------------


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    gray = picture()[..., 0]
    rng = np.random.default_rng(0)
    sixteen = (gray.astype(np.int64) * 257 + rng.integers(-128, 129, gray.shape)).clip(0, 65535)
    Image.fromarray(sixteen.astype(np.uint16)).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    # round(v / 257) recovers the 8-bit value exactly for |noise| <= 128: max abs difference 0
    assert np.array_equal(pixels(tmp_path / "gray16.png"), np.repeat(gray[..., None], 3, -1))
    Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(tmp_path / "mid.png")
    assert pixels(tmp_path / "mid.png").max() == 128  # PIL's own conversion gives 255 (white)
    # PGM with maxval 65535 opens as mode "I"; big-endian 16-bit as "I;16B"
    (tmp_path / "mid.pgm").write_bytes(b"P5 2 1 65535\n" + np.array([0, 32768], ">u2").tobytes())
    assert Image.open(tmp_path / "mid.pgm").mode == "I"
    assert pixels(tmp_path / "mid.pgm")[0, :, 0].tolist() == [0, 128]
    big_endian = Image.frombytes("I;16B", (2, 1), np.array([65535, 257], ">u2").tobytes())
    assert np.asarray(to_rgb(big_endian))[0, :, 0].tolist() == [255, 1]


def test_16_bit_rgb_matches_its_8_bit_equivalent(tmp_path):
    eight = picture()
    rng = np.random.default_rng(1)
    sixteen = (eight.astype(np.int64) * 257 + rng.integers(-128, 129, eight.shape)).clip(0, 65535)
    png_16bit_rgb(tmp_path / "rgb16.png", sixteen)
    assert Image.open(tmp_path / "rgb16.png").mode == "RGB"  # PIL keeps each sample's high byte
    # high byte (floor(v / 256)) against round(v / 257): at most 1 level apart
    assert np.abs(pixels(tmp_path / "rgb16.png") - eight).max() <= 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    upright = Image.fromarray(picture())
    undo = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,  # stored turned left; the tag says: turn it right
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }
    stored = upright.transpose(undo[orientation]) if orientation in undo else upright
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    stored.save(tmp_path / "a.png", exif=exif)  # lossless: exact
    assert np.array_equal(pixels(tmp_path / "a.png"), picture())
    stored.save(tmp_path / "a.jpg", quality=95, subsampling=0, exif=exif)
    upright.save(tmp_path / "upright.jpg", quality=95, subsampling=0)
    # the same picture through JPEG, stored in two orientations: within 4 levels (measured 3)
    assert np.abs(pixels(tmp_path / "a.jpg") - pixels(tmp_path / "upright.jpg")).max() <= 4


def test_cmyk_jpeg_matches_the_rgb_picture(tmp_path):
    rgb = picture()
    cmyk = Image.fromarray(rgb).convert("CMYK")  # PIL: C = 255 - R, M = 255 - G, Y = 255 - B, K = 0
    cmyk.save(tmp_path / "a.jpg", quality=95)
    assert Image.open(tmp_path / "a.jpg").mode == "CMYK"
    # back through PIL's R = (255 - C)(255 - K) / 255: only JPEG's loss remains, within 2 levels (measured 1)
    assert np.abs(pixels(tmp_path / "a.jpg") - rgb).max() <= 2
    cmyk.save(tmp_path / "a.tif")
    assert np.array_equal(pixels(tmp_path / "a.tif"), rgb)  # lossless: exact
    with_black = Image.new("CMYK", (1, 1), (128, 0, 0, 128))
    assert to_rgb(with_black).getpixel((0, 0)) == (63, 127, 127)  # (255-128)(255-128)/255 = 63.25


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGBA", "RGB"])
def test_8_bit_modes_read_as_pil_converts_them(tmp_path, mode):
    image = Image.fromarray(picture()).convert(mode)
    if mode == "P":
        image.info["transparency"] = 0
    image.save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as opened:
        expected = np.asarray(opened.convert("RGBA").convert("RGB") if mode == "P" else opened.convert("RGB"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning about palette transparency
        got = load_rgb(tmp_path / "a.png")
    assert got.mode == "RGB" and np.array_equal(np.asarray(got), expected)


def test_the_dataset_reads_with_load_rgb(data):
    sixteen = data / "train" / "class0" / "0.png"
    Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(sixteen)
    dataset = load_split(data, "folder", "train")
    index = [path for path, _ in dataset.samples].index(sixteen)
    assert np.asarray(dataset[index][0]).max() == 128


# 2. list and class files --------------------------------------------------------------------------------


def test_absolute_escaping_and_repeated_paths_are_named(data):
    val = data / "val.txt"
    lines = val.read_text().splitlines()
    cases = [
        (str(data / lines[0].split()[0]) + " 0", ["absolute path", "relative"]),
        ("../elsewhere/x.png 0", [f"../elsewhere/x.png leaves {data} (the list's folder)", "move the image"]),
        ("val/class1/../../../x.png 1", ["../x.png leaves"]),
        (lines[0], ["listed twice in one split (also on line 1)", "remove one"]),
        (lines[0].replace(" 0", " 2"), ["with labels 0 and 2"]),
        ("./" + lines[0], ["listed twice"]),  # ./a is a
        (lines[0].split()[0] + " 1_0", ["cannot parse"]),  # int() would read 10
    ]
    for line, fragments in cases:
        val.write_text("\n".join([*lines, line]) + "\n")
        raises(ValueError, lambda: load_split(data, "list", "val"), f"{val}:{len(lines) + 1}: ", *fragments)
    val.write_text("\n".join(["./" + lines[0], *lines[1:]]) + "\n")
    assert load_split(data, "list", "val").samples == load_split(data, "folder", "val").samples


def test_lists_may_share_one_base_folder_above_them(data):
    """Lists kept beside the images (data prepare fgvc): all lines climb the same number of folders."""
    lists = data / "splits"
    lists.mkdir()
    lines = (data / "train.txt").read_text().splitlines()
    (lists / "train.txt").write_text("".join(f"../{line}\n" for line in lines))
    assert load_split(lists, "list", "train").samples == load_split(data, "list", "train").samples
    (lists / "train.txt").write_text(
        "".join(f"../{line}\n" for line in lines) + "../../data/val/class0/0.png 0\n"
    )
    raises(
        ValueError,
        lambda: load_split(lists, "list", "train"),
        f"train.txt:{len(lines) + 1}: ../../data/val/class0/0.png leaves {data} (where this list's other "
        "images lie: their paths climb 1 folder(s) up)",
    )


def test_byte_order_mark_is_not_part_of_a_path_or_class(data):
    for name in ("val.txt", "classes.txt"):
        (data / name).write_bytes(b"\xef\xbb\xbf" + (data / name).read_bytes())
    dataset = load_split(data, "list", "val")
    assert dataset.samples == load_split(data, "folder", "val").samples
    assert dataset.classes == ["class0", "class1", "class2"]


@pytest.mark.parametrize("name", ["val.txt", "classes.txt"])
def test_a_file_that_is_not_utf8_is_named_with_line_and_byte(data, name):
    path = data / name
    text = path.read_text().splitlines()
    text[1] = text[1].replace("class", "cl\u00e4ss")  # ä in Latin-1 is one byte that UTF-8 cannot start with
    path.write_bytes(("\n".join(text) + "\n").encode("latin-1"))
    column = text[1].index("\u00e4") + 1
    at = len(text[0]) + 1 + column - 1
    raises(
        ValueError,
        lambda: load_split(data, "list", "val"),
        f"{path}:2:{column}: byte {at} (0xe4)",
        "UTF-8",
        "iconv",
    )
    path.write_bytes(("\n".join(text) + "\n").encode("utf-16"))
    raises(
        ValueError,
        lambda: read_classes(path) if name == "classes.txt" else load_split(data, "list", "val"),
        "UTF-16",
    )


def test_data_check_names_bad_lines_and_encoding(data):
    lines = (data / "val.txt").read_text().splitlines()
    (data / "val.txt").write_text("\n".join([*lines, lines[0], "/abs/x.png 0"]) + "\n")
    (data / "test.txt").write_bytes(
        (data / "test.txt").read_bytes() + "t\u00e9st/x.png 0\n".encode("latin-1")
    )
    found = [str(p) for p in check_task(data, GENERATED) if p.kind == "list"]
    assert len(found) == 3, found
    assert f"list: val.txt:{len(lines) + 1}: {lines[0].split()[0]} is listed twice" in found[0]
    assert f"list: val.txt:{len(lines) + 2}: '/abs/x.png' is an absolute path" in found[1]
    assert f"{data / 'test.txt'}:7:2: byte" in found[2] and "UTF-8" in found[2]


# 3. labels that skip classes ------------------------------------------------------------------------------


def test_labels_must_cover_their_range_without_classes_txt(data):
    (data / "classes.txt").unlink()
    lines = (data / "val.txt").read_text().splitlines()
    lines[-1] = lines[-1].rsplit(maxsplit=1)[0] + " 7"
    (data / "val.txt").write_text("\n".join(lines) + "\n")
    raises(
        ValueError,
        lambda: load_split(data, "list", "val"),
        f"{data / 'val.txt'}:{len(lines)}: label 7 makes 8 classes",
        "labels 3, 4, 5, 6 never occur",
        "write classes.txt",
    )
    names = [f"c{k}" for k in range(8)]
    assert load_split(data, "list", "val", classes=names).num_classes == 8  # given classes: the range check
    raises(
        ValueError, lambda: load_split(data, "list", "val", classes=names[:3]), "label 7 is outside", "0..2"
    )
    (data / "classes.txt").write_text("\n".join(names) + "\n")
    assert load_split(data, "list", "val").classes == names
    assert (
        load_split(data, "list", "train").num_classes == 8
    )  # classes.txt: classes may be absent from a split


# 4. truncated and other unreadable images ---------------------------------------------------------------


def test_truncated_image_stops_the_load_and_the_check(data):
    image = data / "test" / "class1" / "1.png"
    jpeg = image.with_suffix(".jpg")
    Image.fromarray(picture(96, 96)).save(jpeg, quality=90)
    image.unlink()
    (data / "test.txt").write_text((data / "test.txt").read_text().replace("class1/1.png", "class1/1.jpg"))
    assert len(load_split(data, "list", "test")) == 6  # decoded once: the next load skips it
    jpeg.write_bytes(jpeg.read_bytes()[:-200])
    with Image.open(jpeg) as opened:
        assert opened.size == (96, 96)  # the header alone passes
    before = sorted(p for p in data.rglob("*"))
    raises(
        ValueError,
        lambda: load_split(data, "list", "test"),
        str(jpeg),
        "cut short",
        "truncated",
        "re-download",
    )
    raises(ValueError, lambda: load_split(data, "folder", "test"), str(jpeg))
    assert sorted(p for p in data.rglob("*")) == before
    found = {p.kind: p.detail for p in check_task(data, GENERATED)}
    assert found == {"corrupt": "1 images do not decode: test/class1/1.jpg"}


def test_unreadable_files_say_why(data, tmp_path, monkeypatch):
    folder = data / "train" / "class2"
    (folder / "0.png").write_bytes(b"")
    (folder / "1.png").unlink()
    (folder / "1.png").mkdir()  # a folder named like an image: not a sample of the folder layout
    (folder / "2.png").unlink()
    (folder / "2.png").symlink_to(tmp_path / "gone.png")
    found = dict(unreadable([folder / "0.png", folder / "2.png", folder / "3.png"]))
    assert "the file is empty (0 bytes)" in found[folder / "0.png"]
    assert f"broken symbolic link (to {tmp_path / 'gone.png'})" in found[folder / "2.png"]
    assert folder / "3.png" not in found
    raises(
        ValueError,
        lambda: load_split(data, "folder", "train"),
        "1 image(s) cannot be read",
        "empty (0 bytes)",
    )
    lines = (data / "train.txt").read_text()
    (folder / "0.png").write_bytes((folder / "3.png").read_bytes())
    raises(FileNotFoundError, lambda: load_split(data, "list", "train"), "is a folder, not an image file")
    (folder / "1.png").rmdir()
    (data / "train.txt").write_text(lines.replace("train/class2/1.png 2\n", ""))
    raises(FileNotFoundError, lambda: load_split(data, "list", "train"), "is a broken symbolic link")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(images.Image, "open", denied)
    raises(ValueError, lambda: load_rgb(folder / "3.png"), "permission denied", "chmod a+r")


def test_a_changed_file_is_checked_again(data):
    image = data / "val" / "class0" / "0.png"
    assert unreadable([image]) == []
    stat = image.stat()
    image.write_bytes(image.read_bytes()[:40])
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same time, other size
    assert [path for path, _ in unreadable([image])] == [image]


def test_tiny_images_and_stray_files_in_class_folders(data):
    folder = data / "train" / "class0"
    Image.new("RGB", (1, 1), (255, 0, 0)).save(folder / "0.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\x00")
    (folder / "loop").symlink_to(folder, target_is_directory=True)  # a loop: not followed
    dataset = load_split(data, "folder", "train")
    assert len(dataset) == 12 and all(path.suffix == ".png" for path, _ in dataset.samples)
    cfg = data_config(tiny_vit())
    for train in (False, True):
        dataset.transform = build_transform(cfg, train=train, augment="crop-flip")
        assert dataset[0][0].shape == (3, 32, 32)


def test_images_the_folder_layout_would_leave_out_are_named(data):
    train = data / "train"
    gif = train / "class1" / "extra.gif"
    Image.new("P", (8, 8)).save(gif)
    raises(ValueError, lambda: load_split(data, "folder", "train"), str(gif), ".gif file", "convert it")
    gif.unlink()
    nested = train / "class1" / "more"
    nested.mkdir()
    shutil.copy(train / "class1" / "0.png", nested / "0.png")
    raises(ValueError, lambda: load_split(data, "folder", "train"), str(nested), "folder of images inside")
    shutil.rmtree(nested)
    shutil.copy(train / "class1" / "0.png", train / "loose.png")
    raises(
        ValueError,
        lambda: load_split(data, "folder", "train"),
        str(train / "loose.png"),
        "split folder itself",
    )
    (train / "loose.png").unlink()
    (train / "class1" / ".hidden").mkdir()
    shutil.copy(train / "class1" / "0.png", train / "class1" / ".hidden" / "0.png")
    (train / "class1" / "notes").mkdir()  # no images in it
    assert len(load_split(data, "folder", "train")) == 12


def test_windows_separators_in_a_list_are_explained(data):
    (data / "val.txt").write_text("val\\class0\\0.png 0\n")
    raises(FileNotFoundError, lambda: load_split(data, "list", "val"), "write '/' between folders")


def test_data_check_finds_images_shared_by_splits(data):
    (data / "test.txt").write_text((data / "test.txt").read_text() + "train/class0/0.png 0\n")
    found = {p.kind: p for p in check_task(data, GENERATED)}
    assert found["overlap"].detail == "1 images are in both train.txt and test.txt: train/class0/0.png"


# 5. bounded YAML ---------------------------------------------------------------------------------------


def billion_laughs(levels: int = 9) -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_billion_laughs_is_refused_fast_and_cheaply():
    tracemalloc.start()
    start = time.perf_counter()
    raises(ValueError, lambda: load_yaml(billion_laughs(), "laughs.yaml"), "laughs.yaml", "aliases", "expand")
    seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 1 and peak < 5_000_000
    assert load_yaml(billion_laughs(1), "small.yaml")["a1"] == [["lol"] * 9] * 9  # 90 extra nodes: fine
    raises(ValueError, lambda: load_yaml("a: &a [*a]\n", "loop.yaml"), "loop.yaml:1:4", "recursive")
    raises(ValueError, lambda: load_yaml("x" * 1_000_001, "big.yaml"), "big.yaml", "1,000,001 characters")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("a: [1, 2\n", ["r.yaml:2:1: expected ',' or ']'", "flow sequence at line 1"]),
        ("a: 1\n  b: 2\n", ["r.yaml:2:4: mapping values are not allowed here"]),
        ("a: 1\nb: \x07\n", ["r.yaml:2:4: character #x0007 is not allowed"]),
        ("a: !!python/object:os.system x\n", ["r.yaml:1:4:", "constructor", "python/object"]),
        ("a: 1\n---\nb: 2\n", ["r.yaml:2:1: but found another document", "single document"]),
        ("lr: 1\nmodel:\n  x: 2\nlr: 3\n", ["r.yaml:4:1: key 'lr' is given twice", "first on line 1"]),
    ],
)
def test_yaml_errors_are_one_line_with_position(text, fragments):
    message = raises(ValueError, lambda: load_yaml(text, "r.yaml"), *fragments)
    assert "\n" not in message


def test_shipped_yaml_loads_as_safe_load():
    files = sorted(p for p in REPO.rglob("*.y*ml") if not {".git", ".venv"} & set(p.parts))
    assert len([p for p in files if "recipes" in p.parts]) >= 40
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert load_yaml(text, str(path)) == yaml.safe_load(text), path
    assert load_yaml("", "empty.yaml") is None
    merged = load_yaml("base: &b {x: 1}\nrun: {<<: *b, y: 2}\n", "merge.yaml")
    assert merged == {"base": {"x": 1}, "run": {"x": 1, "y": 2}}


def test_copy_of_data_is_untouched_by_checks(data, tmp_path):
    copy = Path(shutil.copytree(data, tmp_path / "copy"))
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert check_task(copy, GENERATED) == []
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before
