"""fastbridge.data: the synthetic captioning + VQA set, the COCO / VQAv2 loaders and the tokenizer.

Everything runs offline on tiny sets in tmp_path (datasets caches go there too).
"""
from __future__ import annotations

import collections
import json
import os
import re
import socket
import subprocess
import sys

import pytest

pytest.importorskip("datasets")
pytest.importorskip("transformers")

from fastbridge.data import (  # noqa: E402
    ANSWER_TYPES, CAPTION_COLUMNS, VQA_COLUMNS, build_tokenizer, caption_features, caption_view,
    load_coco_captions, load_synthetic, load_vqav2, make_synthetic, most_common_answer, read_metadata,
    render_example, synthetic_texts, vqa_features, vqa_view,
)
from fastbridge.data import synthetic as syn  # noqa: E402

N = {"n_train": 12, "n_val": 4, "n_test": 4}
SIZE = 32


def _files(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("synth") / "set", image_size=SIZE, progress=False, **N)


@pytest.fixture
def offline(monkeypatch):
    """No sockets: anything reaching for the network fails the test (HF_HUB_OFFLINE left as it is; the
    subprocess test below sets it)."""
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


@pytest.fixture(scope="module")
def loaded(synth, tmp_path_factory):
    return load_synthetic(synth, cache_dir=tmp_path_factory.mktemp("hf_cache"))


# ------------------------------------------------------------------------------------ synthetic set
def test_layout_and_manifest(synth):
    manifest = json.loads((synth / "fastbridge_synthetic.json").read_text())
    assert {k: manifest[k] for k in N} == N and manifest["image_size"] == SIZE and manifest["seed"] == 0
    for split, key in (("train", "n_train"), ("validation", "n_val"), ("test", "n_test")):
        rows = read_metadata(synth, split)
        assert len(rows) == N[key]
        assert sorted(p.name for p in (synth / split).glob("*.png")) == sorted(r["file_name"] for r in rows)
        for r in rows:
            assert r["file_name"] == f"{r['image_id']:08d}.png"


def test_deterministic_and_independent_of_n(synth, tmp_path):
    again = make_synthetic(tmp_path / "again", image_size=SIZE, progress=False, **N)
    assert _files(again) == _files(synth)  # byte-identical images, metadata and manifest

    fewer = make_synthetic(tmp_path / "fewer", n_train=5, n_val=0, n_test=2, image_size=SIZE, progress=False)
    assert not (fewer / "validation").exists()  # n=0: not written
    full, part = _files(synth), _files(fewer)
    for split, n in (("train", 5), ("test", 2)):
        rows = read_metadata(fewer, split)
        assert rows == read_metadata(synth, split)[:n]
        for r in rows:
            key = os.path.join(split, r["file_name"])
            assert part[key] == full[key]

    other = make_synthetic(tmp_path / "seed1", seed=1, image_size=SIZE, progress=False, **N)
    assert read_metadata(other) != read_metadata(synth)
    diff = _files(other)
    assert sum(diff[k] != full[k] for k in full if k.endswith(".png")) >= len(full) - 8


def test_scene_text_does_not_depend_on_image_size():
    row32, img32 = render_example(3, "train", 7, 32)
    row96, img96 = render_example(3, "train", 7, 96)
    assert row32 == row96 and img32.size == (32, 32) and img96.size == (96, 96)


def test_metadata_schema_and_ids(synth):
    image_ids, question_ids = [], []
    for split in ("train", "validation", "test"):
        for r in read_metadata(synth, split):
            assert set(r) == {"file_name", "image_id", "captions", "objects", "background", "questions"}
            assert isinstance(r["image_id"], int)
            image_ids.append(r["image_id"])
            assert len(r["captions"]) == 5 and len(set(r["captions"])) == 5
            assert all(isinstance(c, str) and c == c.strip() and c for c in r["captions"])
            assert 1 <= len(r["objects"]) <= 3
            assert len({o["position"] for o in r["objects"]}) == len(r["objects"])  # one object per cell
            for o in r["objects"]:
                assert set(o) == {"shape", "color", "size", "position"}
                assert o["shape"] in syn.SHAPES and o["color"] in syn.COLORS
                assert o["size"] in syn.SIZES and o["position"] in syn.POSITIONS
            assert len(r["questions"]) >= 5
            assert {q["answer_type"] for q in r["questions"]} >= {"number", "yes/no"}
            for q in r["questions"]:
                assert set(q) == {"question_id", "question", "answers", "multiple_choice_answer", "answer_type"}
                question_ids.append(q["question_id"])
                assert q["question"].endswith("?") and q["answer_type"] in ANSWER_TYPES
                assert len(q["answers"]) == 10 and all(isinstance(a, str) and a for a in q["answers"])
                assert q["multiple_choice_answer"] == most_common_answer(q["answers"])
                assert q["answers"].count(q["multiple_choice_answer"]) >= 5
    assert len(set(image_ids)) == len(image_ids) == sum(N.values())
    assert len(set(question_ids)) == len(question_ids)


_COLOR_WORDS = set(syn.COLORS)
_SHAPE_WORDS = {**{s: s for s in syn.SHAPES}, **{p: s for s, p in syn.PLURAL.items()}}
_SIZE_WORDS = {"small": "small", "little": "small", "large": "large", "big": "large"}
_COUNT_WORDS = {"one": 1, "two": 2, "three": 3}


def _answer_of(question, objs, bg):
    """The right answer, recomputed from the objects, for the questions a scene can be checked on."""
    m = re.fullmatch(r"how many (shapes|objects) (are there|are in the image|are in the picture|can you see)\?",
                     question)
    if m:
        return str(len(objs))
    m = re.fullmatch(r"how many (\w+)s are (there|in the image|there in the picture)\?", question)
    if m and m.group(1) in syn.SHAPES:
        return str(sum(o["shape"] == m.group(1) for o in objs))
    m = re.fullmatch(r"how many (\w+) (shapes|objects) are (there|in the image)\?|how many shapes are (\w+)\?",
                     question)
    if m:
        color = m.group(1) or m.group(4)
        return str(sum(o["color"] == color for o in objs))
    m = re.fullmatch(r"(?:is there|do you see) an? (\w+) (\w+)(?: in the image)?\?", question)
    if m:
        return "yes" if any((o["color"], o["shape"]) == m.groups() for o in objs) else "no"
    if question in ("what color is the background?", "what colour is the background?"):
        return bg
    return None


def test_captions_and_answers_are_true_of_the_scene():
    checked = collections.Counter()
    for i in range(400):
        row = syn.make_example(0, "train", i)
        objs = row["objects"]
        colors = {o["color"] for o in objs}
        shapes = {o["shape"] for o in objs}
        sizes = {o["size"] for o in objs}
        named_colors, named_shapes = set(), set()
        for cap in row["captions"]:
            words = re.findall(r"[a-z]+", cap.lower())
            for w in words:
                if w in _COLOR_WORDS:
                    assert w in colors, (cap, objs)
                    named_colors.add(w)
                if w in _SHAPE_WORDS:
                    assert _SHAPE_WORDS[w] in shapes, (cap, objs)
                    named_shapes.add(_SHAPE_WORDS[w])
                if w in _SIZE_WORDS:
                    assert _SIZE_WORDS[w] in sizes, (cap, objs)
            # "two red circles": exactly that many objects of that colour and shape
            for count, color, plural in re.findall(r"\b(two|three) (?:\w+ )?(\w+) (\w+s)\b", cap.lower()):
                if color in colors and plural in _SHAPE_WORDS:
                    n = sum((o["color"], o["shape"]) == (color, _SHAPE_WORDS[plural]) for o in objs)
                    assert n == _COUNT_WORDS[count], (cap, objs)
        assert named_colors == colors and named_shapes == shapes, (row["captions"], objs)
        text = " ".join(row["captions"]).lower()
        assert any(w in text for w in ("small", "little", "large", "big"))  # sizes are mentioned
        assert any(p in text for p in ("left", "right", "top", "bottom", "center", "centre", "middle",
                                       "above", "below"))
        for q in row["questions"]:
            expected = _answer_of(q["question"], objs, row["background"])
            if expected is not None:
                assert q["multiple_choice_answer"] == expected, (q, objs)
                checked[q["answer_type"]] += 1
    assert checked["number"] > 200 and checked["yes/no"] > 100  # the checks above did run
    balance = collections.Counter(q["multiple_choice_answer"] for i in range(400)
                                  for q in syn.make_example(0, "train", i)["questions"]
                                  if q["answer_type"] == "yes/no")
    assert 0.35 < balance["yes"] / (balance["yes"] + balance["no"]) < 0.65


# area of each shape in units of r^2 (r: the drawn radius)
_AREA = {"circle": 3.1416, "square": 4 * 0.85 ** 2, "triangle": 0.5 * 2.1 * 1.85, "diamond": 1.5}


def test_pixels_show_the_objects():
    """Each object's grid cell holds a blob of its colour with the area of its size; empty cells are
    background (every pixel classified by its nearest palette colour)."""
    np = pytest.importorskip("numpy")
    size, cell = 96, 32
    names = list(syn.COLORS)
    for i in range(40):
        row, img = render_example(0, "validation", i, size)
        palette = np.array([syn.COLORS[n] for n in names] + [syn.BACKGROUNDS[row["background"]]], dtype=np.int64)
        pixels = np.asarray(img, dtype=np.int64)
        label = ((pixels[:, :, None, :] - palette) ** 2).sum(-1).argmin(-1)  # (H, W): index into palette
        at = {o["position"]: o for o in row["objects"]}
        for k, pos in enumerate(syn.POSITIONS):
            r, c = divmod(k, 3)
            counts = np.bincount(label[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].ravel(),
                                 minlength=len(palette))
            shape_px = counts[:len(names)]
            if pos not in at:
                assert shape_px.sum() == 0, (row, pos, counts)
                continue
            o = at[pos]
            mine = shape_px[names.index(o["color"])]
            assert mine >= 0.6 * shape_px.sum(), (row, pos, counts)  # others: anti-aliased edges only
            # large radius 0.36 cell, small 0.21: split at 0.285 cell
            assert (mine > _AREA[o["shape"]] * (0.285 * cell) ** 2) == (o["size"] == "large"), (row, pos, counts)


def test_reuse_mismatch_and_overwrite(tmp_path):
    root = make_synthetic(tmp_path / "s", n_train=3, n_val=1, n_test=0, image_size=SIZE, progress=False)
    png = next((root / "train").glob("*.png"))
    stamp = png.stat().st_mtime_ns
    assert make_synthetic(root, n_train=3, n_val=1, n_test=0, image_size=SIZE, progress=False) == root
    assert png.stat().st_mtime_ns == stamp  # reused, not re-rendered
    with pytest.raises(ValueError, match=r"image_size=32, but image_size=48 .*overwrite=True"):
        make_synthetic(root, n_train=3, n_val=1, n_test=0, image_size=48, progress=False)
    with pytest.raises(ValueError, match=r"n_train=3, seed=0, but n_train=4, seed=2"):
        make_synthetic(root, n_train=4, n_val=1, n_test=0, image_size=SIZE, seed=2, progress=False)
    make_synthetic(root, n_train=2, n_val=0, n_test=1, image_size=48, overwrite=True, progress=False)
    assert json.loads((root / "fastbridge_synthetic.json").read_text())["image_size"] == 48
    assert not (root / "validation").exists() and len(list((root / "train").glob("*.png"))) == 2
    # files lost: re-rendered even though the manifest matches
    for p in (root / "test").glob("*.png"):
        p.unlink()
    make_synthetic(root, n_train=2, n_val=0, n_test=1, image_size=48, progress=False)
    assert len(list((root / "test").glob("*.png"))) == 1

    # an interrupted run (split folders, no manifest) is replaced only when asked
    (root / "fastbridge_synthetic.json").unlink()
    with pytest.raises(ValueError, match=r"holds \['test', 'train'\] but no fastbridge_synthetic.json"):
        make_synthetic(root, n_train=2, n_val=0, n_test=1, image_size=48, progress=False)
    make_synthetic(root, n_train=2, n_val=0, n_test=1, image_size=48, progress=False, overwrite=True)
    assert (root / "fastbridge_synthetic.json").is_file()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        make_synthetic(foreign, n_train=2, progress=False, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("kwargs, message", [
    ({"image_size": 8}, r"make_synthetic: image_size must be an int in \[16, 1024\], got 8"),
    ({"image_size": 64.0}, r"image_size must be an int"),
    ({"n_train": -1}, r"n_train must be an int in \[0, "),
    ({"n_val": True}, r"n_val must be an int"),
    ({"seed": "0"}, r"seed must be an int"),
    ({"n_train": 0, "n_val": 0, "n_test": 0}, r"all 0"),
    ({"num_workers": -2}, r"num_workers must be an int >= 0"),
])
def test_make_synthetic_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_synthetic(tmp_path / "x", progress=False, **kwargs)
    assert not (tmp_path / "x").exists()


def test_make_synthetic_worker_pool_matches_serial(tmp_path):
    serial = make_synthetic(tmp_path / "a", n_train=70, n_val=0, n_test=0, image_size=16, progress=False,
                            num_workers=0)
    pooled = make_synthetic(tmp_path / "b", n_train=70, n_val=0, n_test=0, image_size=16, progress=True,
                            num_workers=2)  # 2 processes (>= 32 images each), with a progress bar
    assert _files(serial) == _files(pooled)


def test_load_synthetic_offline_and_views(synth, tmp_path, offline, monkeypatch):
    dd = load_synthetic(synth, cache_dir=tmp_path / "cache")
    assert set(dd) == {"train", "validation", "test"}
    assert [len(dd[s]) for s in ("train", "validation", "test")] == [N["n_train"], N["n_val"], N["n_test"]]
    assert not any((tmp_path / "cache").glob("**/*.incomplete"))
    rows = read_metadata(synth, "validation")
    first = dd["validation"][0]
    assert first["image"].size == (SIZE, SIZE) and first["image"].mode == "RGB"
    assert first["image_id"] == rows[0]["image_id"] and first["captions"] == rows[0]["captions"]
    assert first["questions"][0]["answers"] == rows[0]["questions"][0]["answers"]

    caps = caption_view(dd["validation"])
    assert tuple(caps.column_names) == CAPTION_COLUMNS and caps.features == caption_features()
    assert len(caps) == N["n_val"] and caps[1]["captions"] == rows[1]["captions"]

    import PIL.Image

    opened = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    qa = vqa_view(dd)  # a DatasetDict: one view per split
    assert not opened  # no image decoded to build the view
    assert set(qa) == set(dd)
    val = qa["validation"]
    assert tuple(val.column_names) == VQA_COLUMNS and val.features == vqa_features()
    assert len(val) == sum(len(r["questions"]) for r in rows)
    flat = [(r["image_id"], q) for r in rows for q in r["questions"]]
    for k in (0, len(val) - 1):
        row = val[k]
        image_id, q = flat[k]
        assert row["image_id"] == image_id and row["question_id"] == q["question_id"]
        assert row["question"] == q["question"] and row["answers"] == q["answers"]
        assert row["multiple_choice_answer"] == q["multiple_choice_answer"]
        assert row["answer_type"] == q["answer_type"]
        assert row["image"].size == (SIZE, SIZE)


def test_load_synthetic_and_views_errors(tmp_path, loaded):
    with pytest.raises(ValueError, match=r"load_synthetic: root .*holds no synthetic set.*make_synthetic\(root\)"):
        load_synthetic(tmp_path)
    with pytest.raises(ValueError, match=r"caption_view: ds must be a datasets.Dataset"):
        caption_view([1, 2])
    with pytest.raises(ValueError, match=r"vqa_view: ds lacks column\(s\) \['questions'\]"):
        vqa_view(caption_view(loaded["train"]))


def test_synthetic_texts(synth, loaded):
    from_files = list(synthetic_texts(synth))
    assert from_files == list(synthetic_texts(loaded)) == list(synthetic_texts(loaded["train"]))
    rows = read_metadata(synth)
    assert len(from_files) == sum(5 + sum(1 + len(q["answers"]) for q in r["questions"]) for r in rows)
    # the task views give the same words
    view_texts = set(synthetic_texts(caption_view(loaded["train"]))) | set(synthetic_texts(vqa_view(loaded["train"])))
    assert view_texts == set(from_files)
    assert set(synthetic_texts(synth, split="test")) != set(from_files)


def test_light_import_and_offline_env(synth, tmp_path):
    """In a fresh process with HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1: importing fastbridge.data
    imports neither datasets nor transformers, and load_synthetic works."""
    code = ("import sys, fastbridge.data as d; "
            "print(sorted(m for m in ('datasets', 'transformers') if m in sys.modules)); "
            f"dd = d.load_synthetic({str(synth)!r}, cache_dir={str(tmp_path / 'cache')!r}); "
            "print({k: len(v) for k, v in dd.items()}, len(d.vqa_view(dd['test'])))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    n_questions = sum(len(r["questions"]) for r in read_metadata(synth, "test"))
    assert out.stdout.split("\n")[:2] == [
        "[]", f"{{'train': {N['n_train']}, 'validation': {N['n_val']}, 'test': {N['n_test']}}} {n_questions}"]


# ------------------------------------------------------------------------------------ COCO / VQAv2
def _jpeg(path, color=(200, 30, 30)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), color).save(path, format="JPEG")


def _karpathy(tmp_path):
    images = []
    for cocoid, split, sub in ((1, "train", "train2014"), (2, "restval", "val2014"), (3, "val", "val2014"),
                               (4, "test", "val2014")):
        name = f"COCO_{sub}_{cocoid:012d}.jpg"
        _jpeg(tmp_path / "coco" / sub / name)
        images.append({"filepath": sub, "filename": name, "split": split, "cocoid": cocoid, "imgid": cocoid - 1,
                       "sentences": [{"raw": f"A photo number {cocoid}. ", "tokens": ["a"]},
                                     {"raw": "Another caption\n", "tokens": ["another"]}]})
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_coco_karpathy(tmp_path):
    ann = _karpathy(tmp_path)
    train = load_coco_captions(ann, tmp_path / "coco", split="train")
    assert train.features == caption_features() and tuple(train.column_names) == CAPTION_COLUMNS
    assert train["image_id"] == [1, 2]  # restval counts as train
    assert train[0]["captions"] == ["A photo number 1.", "Another caption"]
    assert train[1]["image"].size == (12, 10)
    assert load_coco_captions(ann, tmp_path / "coco", split="val")["image_id"] == [3]
    assert load_coco_captions(ann, tmp_path / "coco", split="restval")["image_id"] == [2]
    assert load_coco_captions(ann, tmp_path / "coco")["image_id"] == [1, 2, 3, 4]

    flat = tmp_path / "flat"  # all images in one folder also works
    for p in (tmp_path / "coco").glob("*/*.jpg"):
        _jpeg(flat / p.name)
    assert load_coco_captions(ann, flat, split="test")["image_id"] == [4]

    with pytest.raises(ValueError, match=r"split must be one of \('train', 'restval', 'val', 'test'\)"):
        load_coco_captions(ann, tmp_path / "coco", split="dev")
    (tmp_path / "coco" / "val2014" / "COCO_val2014_000000000003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 4 images are missing under images_dir .*000000000003"):
        load_coco_captions(ann, tmp_path / "coco")


def test_coco_official(tmp_path):
    images = [{"id": 9, "file_name": "COCO_val2014_000000000009.jpg"},
              {"id": 5, "file_name": "COCO_val2014_000000000005.jpg"},
              {"id": 7, "file_name": "COCO_val2014_000000000007.jpg"}]  # 7 has no caption: left out
    for img in images[:2]:
        _jpeg(tmp_path / "val2014" / img["file_name"])
    anns = [{"image_id": 5, "id": 1, "caption": "a cat "}, {"image_id": 9, "id": 2, "caption": "a dog"},
            {"image_id": 5, "id": 3, "caption": "A CAT."}]
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": anns}))
    ds = load_coco_captions(str(path), str(tmp_path / "val2014"))
    assert ds.features == caption_features()
    assert ds["image_id"] == [9, 5] and ds["captions"] == [["a dog"], ["a cat", "A CAT."]]
    assert ds[0]["image"].mode == "RGB"
    with pytest.raises(ValueError, match=r"split='train' applies only to the Karpathy"):
        load_coco_captions(path, tmp_path / "val2014", split="train")
    with pytest.raises(FileNotFoundError, match=r"images_dir must be the folder holding the file_name"):
        load_coco_captions(path, tmp_path)


def test_coco_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"load_coco_captions: annotations file .*nope.json"):
        load_coco_captions(tmp_path / "nope.json", tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"questions": []}))
    with pytest.raises(ValueError, match=r"annotations is neither a Karpathy split file"):
        load_coco_captions(bad, tmp_path)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"annotations file .* is not valid json"):
        load_coco_captions(bad, tmp_path)
    ann = _karpathy(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"images_dir .* is not a directory"):
        load_coco_captions(ann, tmp_path / "missing")


def _vqa_files(tmp_path, subtype="val2014"):
    sub = "test2015" if subtype.startswith("test") else subtype
    for image_id in (42, 43):
        _jpeg(tmp_path / sub / f"COCO_{sub}_{image_id:012d}.jpg")
    questions = {"data_subtype": subtype, "task_type": "Open-Ended", "questions": [
        {"image_id": 42, "question": "What color is it?", "question_id": 42000},
        {"image_id": 42, "question": "Is it red?", "question_id": 42001},
        {"image_id": 43, "question": "How many?", "question_id": 43000}]}
    answers = {"42000": ["red"] * 9 + ["maroon"], "42001": ["yes"] * 10, "43000": ["2"] * 8 + ["two", "3"]}
    types = {"42000": "other", "42001": "yes/no", "43000": "number"}
    annotations = {"annotations": [
        {"question_id": q["question_id"], "image_id": q["image_id"], "question_type": "what",
         "answer_type": types[str(q["question_id"])], "multiple_choice_answer": answers[str(q["question_id"])][0],
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                     for i, a in enumerate(answers[str(q["question_id"])])]}
        for q in questions["questions"]]}
    qpath, apath = tmp_path / "questions.json", tmp_path / "annotations.json"
    qpath.write_text(json.dumps(questions))
    apath.write_text(json.dumps(annotations))
    return qpath, apath, tmp_path / sub


def test_vqav2(tmp_path):
    qpath, apath, images = _vqa_files(tmp_path)
    ds = load_vqav2(qpath, apath, images)
    assert ds.features == vqa_features() and tuple(ds.column_names) == VQA_COLUMNS
    assert ds["question_id"] == [42000, 42001, 43000] and ds["image_id"] == [42, 42, 43]
    row = ds[2]
    assert row["question"] == "How many?" and row["answers"] == ["2"] * 8 + ["two", "3"]
    assert row["multiple_choice_answer"] == "2" and row["answer_type"] == "number"
    assert row["image"].size == (12, 10)

    ann = json.loads(apath.read_text())
    ann["annotations"].pop()
    apath.write_text(json.dumps(ann))
    with pytest.raises(ValueError, match=r"annotations has no entry for question_id 43000"):
        load_vqav2(qpath, apath, images)
    with pytest.raises(ValueError, match=r"image_pattern must use \{image_id\}"):
        load_vqav2(qpath, None, images, image_pattern="{id}.jpg")
    with pytest.raises(FileNotFoundError, match=r"2 of 2 images are missing under images_dir .*image_pattern"):
        load_vqav2(qpath, None, images, image_pattern="{image_id}.png")
    with pytest.raises(ValueError, match=r"questions is not a VQAv2 questions file"):
        load_vqav2(apath, None, images)


def test_vqav2_test_dev_without_annotations(tmp_path):
    qpath, _, images = _vqa_files(tmp_path, subtype="test-dev2015")
    ds = load_vqav2(qpath, None, images)  # test-dev questions use the test2015 images
    assert len(ds) == 3 and ds["answers"] == [[], [], []]
    assert ds["multiple_choice_answer"] == [None] * 3 and ds["answer_type"] == [None] * 3
    assert ds[0]["image"].size == (12, 10)


# ------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_from_synthetic_texts(synth, tmp_path, offline):
    texts = list(synthetic_texts(synth))
    tok = build_tokenizer(texts, extra_tokens=["<image>"])
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<bos>", "<eos>", "<unk>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids("<image>") == 4
    vocab = tok.get_vocab()
    assert build_tokenizer(iter(texts), extra_tokens=["<image>"]).get_vocab() == vocab  # deterministic
    # every word of the corpus is known; ids follow frequency, then the alphabet
    counts = collections.Counter(w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower()))
    assert set(counts) <= set(vocab)
    words = sorted(counts, key=lambda w: vocab[w])
    assert words == sorted(counts, key=lambda w: (-counts[w], w))
    for t in set(texts):  # every synthetic text round-trips, lower-cased, punctuation attached
        ids = tok(t).input_ids
        assert tok.unk_token_id not in ids and tok.decode(ids, skip_special_tokens=True) == t.lower()

    enc = tok("A Large red circle.")
    assert tok.convert_ids_to_tokens(enc.input_ids) == ["<bos>", "a", "large", "red", "circle", ".", "<eos>"]
    assert tok.decode(enc.input_ids, skip_special_tokens=True) == "a large red circle."
    assert tok.decode(tok("<image> what color is the circle?").input_ids, skip_special_tokens=True) == \
        "what color is the circle?"
    assert tok("a zebra", add_special_tokens=False).input_ids == [vocab["a"], tok.unk_token_id]
    batch = tok(["a red circle", "two"], padding=True)
    assert batch.input_ids[1][-1] == tok.pad_token_id and batch.attention_mask[1][-1] == 0

    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again.get_vocab() == vocab and again.pad_token == "<pad>" and again.bos_token_id == 1
    for t in texts[:20]:
        assert again(t).input_ids == tok(t).input_ids
        assert again.decode(again(t).input_ids, skip_special_tokens=True) == \
            tok.decode(tok(t).input_ids, skip_special_tokens=True)


def test_tokenizer_min_freq_and_errors():
    tok = build_tokenizer(["red red blue", "red green"], min_freq=2)
    assert set(tok.get_vocab()) == {"<pad>", "<bos>", "<eos>", "<unk>", "red"}
    with pytest.raises(ValueError, match=r"build_tokenizer: min_freq must be an int >= 1, got 0"):
        build_tokenizer(["a"], min_freq=0)
    with pytest.raises(ValueError, match=r"texts must be an iterable of str .* got one str"):
        build_tokenizer("a red circle")
    with pytest.raises(ValueError, match=r"texts must yield str, item 1 is int"):
        build_tokenizer(["a", 3])
    with pytest.raises(ValueError, match=r"extra_tokens must be non-empty str without whitespace"):
        build_tokenizer(["a"], extra_tokens=["<im age>"])
    with pytest.raises(ValueError, match=r"no word seen at least min_freq=5"):
        build_tokenizer(["a b"], min_freq=5)
