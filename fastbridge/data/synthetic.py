"""Deterministic synthetic captioning + VQA set: rendered scenes of coloured shapes.

Every image is a pure function of (seed, split, index): 1-3 objects (shape, colour, size, one cell of a
3x3 grid) on a plain or lightly noised background, with 5 COCO-style reference captions and VQAv2-style
questions (10 human-style answers each). The scene, captions and questions do not depend on the image
size; the pixels do. Written as a Hugging Face ``imagefolder``::

    root/fastbridge_synthetic.json            parameters (reused when they match)
    root/{train,validation,test}/<image_id>.png
    root/{train,validation,test}/metadata.jsonl

Loaded with ``load_synthetic`` and turned into task rows with ``caption_view`` / ``vqa_view`` (the same
schema as the COCO / VQAv2 loaders in ``fastbridge.data.coco``).
"""
from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import random
import sys
from pathlib import Path
from typing import Iterator

from .schema import CAPTION_COLUMNS, require_datasets, vqa_features

VERSION = 1  # bump when the scenes, captions, questions or pixels change: old manifests stop matching
MANIFEST = "fastbridge_synthetic.json"
SPLITS = ("train", "validation", "test")
SPLIT_ARGS = {"train": "n_train", "validation": "n_val", "test": "n_test"}
# image_id = base + index + 1: unique over splits and independent of the other splits' sizes.
ID_BASE = {"train": 0, "validation": 10_000_000, "test": 20_000_000}
MAX_PER_SPLIT = 10_000_000 - 1
QUESTIONS_PER_ID = 100  # question_id = image_id * 100 + k (VQAv2 uses image_id * 1000 + k)
MIN_SIZE, MAX_SIZE = 16, 1024

SHAPES = ("circle", "square", "triangle", "diamond")
PLURAL = {s: s + "s" for s in SHAPES}
COLORS = {  # name -> base RGB (jittered a little per object)
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215),
    "yellow": (235, 205, 35), "purple": (135, 55, 175), "orange": (240, 135, 25),
}
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
BACKGROUNDS = {"white": (246, 246, 246), "grey": (196, 196, 196), "beige": (236, 224, 196)}
NUMBER_WORDS = ("zero", "one", "two", "three", "four")

# Caption wording: true of the cell, possibly loose ("on the left" for the middle-left cell).
_CAPTION_POS = {
    "top left": ("in the top left corner", "in the top left", "at the top left", "in the upper left corner"),
    "top": ("at the top", "at the top of the image", "near the top edge", "in the top middle"),
    "top right": ("in the top right corner", "in the top right", "at the top right", "in the upper right corner"),
    "left": ("on the left", "on the left side", "near the left edge", "at the left"),
    "center": ("in the center", "in the middle", "in the centre", "in the middle of the image"),
    "right": ("on the right", "on the right side", "near the right edge", "at the right"),
    "bottom left": ("in the bottom left corner", "in the bottom left", "at the bottom left",
                    "in the lower left corner"),
    "bottom": ("at the bottom", "at the bottom of the image", "near the bottom edge", "in the bottom middle"),
    "bottom right": ("in the bottom right corner", "in the bottom right", "at the bottom right",
                     "in the lower right corner"),
}
# Question wording: unambiguous (the middle-left cell is never just "on the left").
_QUESTION_POS = {
    "top left": ("in the top left corner", "in the upper left corner", "at the top left"),
    "top": ("at the top middle", "in the top middle", "at the top center"),
    "top right": ("in the top right corner", "in the upper right corner", "at the top right"),
    "left": ("in the middle of the left side", "at the left middle", "on the left in the middle"),
    "center": ("in the center", "in the middle", "in the centre"),
    "right": ("in the middle of the right side", "at the right middle", "on the right in the middle"),
    "bottom left": ("in the bottom left corner", "in the lower left corner", "at the bottom left"),
    "bottom": ("at the bottom middle", "in the bottom middle", "at the bottom center"),
    "bottom right": ("in the bottom right corner", "in the lower right corner", "at the bottom right"),
}
_SIZE_WORDS = {"small": ("small", "small", "little"), "large": ("large", "large", "big")}
# Annotator variation: other spellings of the right answer (never counted as the majority).
_ANSWER_VARIANTS = {
    "0": ("zero", "none"), "1": ("one",), "2": ("two",), "3": ("three",),
    "grey": ("gray",), "purple": ("violet",), "diamond": ("rhombus",), "square": ("box",),
    "large": ("big",), "small": ("little", "tiny"),
    "center": ("middle", "centre"), "top": ("top middle", "top center"), "bottom": ("bottom middle",),
    "left": ("middle left", "left side"), "right": ("middle right", "right side"),
    "top left": ("upper left", "top left corner"), "top right": ("upper right", "top right corner"),
    "bottom left": ("lower left", "bottom left corner"), "bottom right": ("lower right", "bottom right corner"),
}


# --------------------------------------------------------------------------------------------- scenes
def _rng(seed: int, split: str, index: int, stream: str) -> random.Random:
    """An independent, platform-stable random stream for one (seed, split, index, purpose)."""
    digest = hashlib.blake2b(f"fastbridge-synthetic|{seed}|{split}|{index}|{stream}".encode(), digest_size=8)
    return random.Random(int.from_bytes(digest.digest(), "little"))


def image_id_of(split: str, index: int) -> int:
    """The image_id of image ``index`` of ``split`` (unique over splits)."""
    return ID_BASE[split] + index + 1


def make_scene(seed: int, split: str, index: int) -> dict:
    """The objects and background of one image: a pure function of (seed, split, index)."""
    rng = _rng(seed, split, index, "scene")
    n = rng.choices((1, 2, 3), weights=(35, 35, 30))[0]
    objects = []
    for cell in sorted(rng.sample(range(9), n)):
        r = rng.random()
        if objects and r < 0.25:  # same shape and colour as an earlier object ("two red circles")
            ref = rng.choice(objects)
            shape, color = ref["shape"], ref["color"]
        elif objects and r < 0.4:  # same shape, any colour
            shape, color = rng.choice(objects)["shape"], rng.choice(tuple(COLORS))
        else:
            shape, color = rng.choice(SHAPES), rng.choice(tuple(COLORS))
        objects.append({"shape": shape, "color": color, "size": rng.choice(SIZES), "position": POSITIONS[cell]})
    return {"objects": objects, "background": rng.choice(tuple(BACKGROUNDS))}


# ------------------------------------------------------------------------------------------ rendering
def _jitter(rgb, rng: random.Random, amount: int) -> tuple:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)


def _rotate(points, cx, cy, degrees):
    import math

    a = math.radians(degrees)
    ca, sa = math.cos(a), math.sin(a)
    return [(cx + (x - cx) * ca - (y - cy) * sa, cy + (x - cx) * sa + (y - cy) * ca) for x, y in points]


def render_scene(scene: dict, image_size: int, rng: random.Random):
    """Draw a scene as an RGB PIL image (supersampled for smooth edges, then box-filtered)."""
    from PIL import Image, ImageChops, ImageDraw

    k = max(2, min(4, 256 // image_size))  # supersampling factor
    big = image_size * k
    noisy = rng.random() < 0.5
    img = Image.new("RGB", (big, big), _jitter(BACKGROUNDS[scene["background"]], rng, 6))
    draw = ImageDraw.Draw(img)
    cell = big / 3
    for obj in scene["objects"]:
        row, col = divmod(POSITIONS.index(obj["position"]), 3)
        # jitter + radius keep every shape inside its own cell (the largest reach is ~0.46 cell)
        cx = (col + 0.5 + rng.uniform(-0.06, 0.06)) * cell
        cy = (row + 0.5 + rng.uniform(-0.06, 0.06)) * cell
        r = (0.36 if obj["size"] == "large" else 0.21) * cell * rng.uniform(0.93, 1.05)
        fill = _jitter(COLORS[obj["color"]], rng, 14)
        tilt = rng.uniform(-10, 10)
        shape = obj["shape"]
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape == "square":
            h = 0.85 * r
            draw.polygon(_rotate([(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)],
                                 cx, cy, tilt), fill=fill)
        elif shape == "triangle":
            top, base, half = cy - 1.05 * r, cy + 0.8 * r, 1.05 * r
            draw.polygon(_rotate([(cx, top), (cx + half, base), (cx - half, base)], cx, cy, tilt), fill=fill)
        else:  # diamond: a rhombus, taller than wide
            draw.polygon(_rotate([(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)],
                                 cx, cy, tilt * 0.5), fill=fill)
    img = img.resize((image_size, image_size), Image.Resampling.BOX)
    if noisy:  # light luminance noise of +-amp grey levels
        amp = rng.randint(5, 12)
        noise = Image.frombytes("L", img.size, rng.randbytes(image_size * image_size))
        noise = noise.point([v * (2 * amp + 1) // 256 for v in range(256)]).convert("RGB")
        img = ImageChops.add(img, noise, scale=1.0, offset=-amp)
    return img


# ------------------------------------------------------------------------------------------- captions
def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: list) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _desc(obj: dict, rng: random.Random, *, size: bool = True) -> str:
    words = ([rng.choice(_SIZE_WORDS[obj["size"]])] if size else []) + [obj["color"], obj["shape"]]
    return _a(" ".join(words))


def _bg_word(bg: str, rng: random.Random) -> str:
    return rng.choice(("grey", "gray")) if bg == "grey" else bg


def _cap_listing(objs, bg, rng):
    items = [f"{_desc(o, rng)} {rng.choice(_CAPTION_POS[o['position']])}" for o in objs]
    return rng.choice(("", "", "there is ", "the image shows ", "this picture shows ")) + _join(items)


def _grouped(objs, rng, size_prob: float) -> str:
    """"a small green triangle and two blue squares": objects grouped by (colour, shape); a group's size
    is named (with probability ``size_prob``) only when all its objects share it."""
    groups: dict = {}
    for o in objs:
        groups.setdefault((o["color"], o["shape"]), []).append(o)
    parts = []
    for (color, shape), group in groups.items():
        same_size = len({o["size"] for o in group}) == 1
        size = rng.choice(_SIZE_WORDS[group[0]["size"]]) + " " if same_size and rng.random() < size_prob else ""
        parts.append(_a(f"{size}{color} {shape}") if len(group) == 1
                     else f"{NUMBER_WORDS[len(group)]} {size}{color} {PLURAL[shape]}")
    return _join(parts)


def _cap_counted(objs, bg, rng):
    return _grouped(objs, rng, 0.7) + rng.choice(("", "", f" on a {_bg_word(bg, rng)} background", " in the image"))


def _cap_total(objs, bg, rng):
    n = len(objs)
    if n == 1:
        o = objs[0]
        return rng.choice((
            f"there is one {o['color']} {o['shape']} in the image",
            f"only one shape: {_desc(o, rng)}",
            f"a single {rng.choice(_SIZE_WORDS[o['size']])} {o['color']} {o['shape']}",
            f"one {o['color']} {o['shape']} on a {_bg_word(bg, rng)} background",
        ))
    listed = _grouped(objs, rng, 0.0)
    word = NUMBER_WORDS[n]
    return rng.choice((
        f"there are {word} shapes in the image: {listed}",
        f"{word} shapes on a {_bg_word(bg, rng)} background: {listed}",
        f"{word} objects: {listed}",
        f"a picture of {word} shapes",
    ))


def _cap_focus(objs, bg, rng):
    o = rng.choice(objs)
    lead = rng.choice(("a picture showing", "an image of", "a drawing of", "a simple picture with"))
    text = f"{lead} {_desc(o, rng, size=rng.random() < 0.5)} {rng.choice(_CAPTION_POS[o['position']])}"
    rest = len(objs) - 1
    if rest:
        text += rng.choice((f" and {NUMBER_WORDS[rest]} other shape{'s' if rest > 1 else ''}",
                            " and another shape" if rest == 1 else " and two other shapes", ""))
    return text


def _relations(a: dict, b: dict) -> list:
    ra, ca = divmod(POSITIONS.index(a["position"]), 3)
    rb, cb = divmod(POSITIONS.index(b["position"]), 3)
    rels = []
    if ca != cb:
        rels.append("to the left of" if ca < cb else "to the right of")
    if ra != rb:
        rels.append("above" if ra < rb else "below")
    return rels


def _cap_relation(objs, bg, rng):
    pairs = [(a, b) for a in objs for b in objs if a is not b]
    distinct = [(a, b) for a, b in pairs if (a["color"], a["shape"]) != (b["color"], b["shape"])]
    a, b = rng.choice(distinct or pairs)
    rel = rng.choice(_relations(a, b))
    verb = rng.choice(("", "", " is"))
    lead = "there is " if not verb and rng.random() < 0.3 else ""
    return f"{lead}{_desc(a, rng, size=rng.random() < 0.4)}{verb} {rel} {_desc(b, rng, size=rng.random() < 0.4)}"


def _cap_where(objs, bg, rng):
    o = rng.choice(objs)
    same = sum((p["color"], p["shape"]) == (o["color"], o["shape"]) for p in objs)
    subject = f"the {o['color']} {o['shape']}" if same == 1 else _desc(o, rng, size=False)
    return f"{subject} is {rng.choice(_CAPTION_POS[o['position']])}"


_CAPTION_FAMILIES = {"listing": _cap_listing, "counted": _cap_counted, "total": _cap_total,
                     "focus": _cap_focus, "relation": _cap_relation, "where": _cap_where}


def make_captions(scene: dict, rng: random.Random, n: int = 5) -> list:
    """``n`` distinct captions, all true of the scene. Together they name every object's colour,
    shape, size and position, and the number of objects."""
    objs, bg = scene["objects"], scene["background"]
    extra = ["total", "focus", "where"] + (["relation"] if len(objs) > 1 else [])
    families = ["listing", "counted"] + rng.sample(extra, 3)
    captions: list = []
    seen = set()
    tries = 0
    while len(captions) < n:
        family = families[len(captions)] if len(captions) < len(families) else rng.choice(tuple(_CAPTION_FAMILIES))
        text = _CAPTION_FAMILIES[family](objs, bg, rng)
        tries += 1
        if text in seen and tries < 100:
            continue
        seen.add(text)
        if rng.random() < 0.6:
            text = text[0].upper() + text[1:]
        if rng.random() < 0.55:
            text += "."
        captions.append(text)
    rng.shuffle(captions)
    return captions


# ------------------------------------------------------------------------------------------ questions
def _ref(o: dict, objs: list, rng: random.Random, *, color: bool = True, position: bool = True):
    """A phrase (without "the") that singles out ``o``, or None when none can without the banned parts."""
    def unique(pred):
        return sum(pred(p) for p in objs) == 1

    options = []
    if unique(lambda p: p["shape"] == o["shape"]):
        options.append(o["shape"])
    if color and unique(lambda p: (p["color"], p["shape"]) == (o["color"], o["shape"])):
        options.append(f"{o['color']} {o['shape']}")
    if color and unique(lambda p: p["color"] == o["color"]):
        options.append(f"{o['color']} shape")
    if position and not options:
        options.append(f"{o['shape']} {rng.choice(_QUESTION_POS[o['position']])}")
    return rng.choice(options) if options else None


def _q_count_all(objs, bg, rng):
    q = rng.choice(("how many shapes are there?", "how many shapes are in the image?", "how many objects are there?",
                    "how many objects are in the picture?", "how many shapes can you see?"))
    return q, str(len(objs)), "number", "number"


def _q_count_shape(objs, bg, rng):
    shape = rng.choice([o["shape"] for o in objs]) if rng.random() < 0.85 else rng.choice(SHAPES)
    q = rng.choice((f"how many {PLURAL[shape]} are there?", f"how many {PLURAL[shape]} are in the image?",
                    f"how many {PLURAL[shape]} are there in the picture?"))
    return q, str(sum(o["shape"] == shape for o in objs)), "number", "number"


def _q_count_color(objs, bg, rng):
    color = rng.choice([o["color"] for o in objs]) if rng.random() < 0.85 else rng.choice(tuple(COLORS))
    q = rng.choice((f"how many {color} shapes are there?", f"how many {color} objects are in the image?",
                    f"how many shapes are {color}?"))
    return q, str(sum(o["color"] == color for o in objs)), "number", "number"


def _q_exists(objs, bg, rng):
    present = {(o["color"], o["shape"]) for o in objs}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
        answer = "yes"
    else:  # a hard negative where possible: right shape, wrong colour (or the reverse)
        base_color, base_shape = rng.choice(sorted(present))
        candidates = ([(c, base_shape) for c in COLORS] if rng.random() < 0.5 else [(base_color, s) for s in SHAPES])
        candidates = [c for c in candidates if c not in present] or \
                     [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        color, shape = rng.choice(candidates)
        answer = "no"
    thing = _a(f"{color} {shape}")
    q = rng.choice((f"is there {thing}?", f"is there {thing} in the image?", f"do you see {thing}?"))
    return q, answer, "yes/no", "yes/no"


def _q_occupied(objs, bg, rng):
    occupied = [o["position"] for o in objs]
    answer = "yes" if rng.random() < 0.5 else "no"
    pos = rng.choice(occupied if answer == "yes" else [p for p in POSITIONS if p not in occupied])
    where = rng.choice(_QUESTION_POS[pos])
    q = rng.choice((f"is there a shape {where}?", f"is there anything {where}?", f"is there an object {where}?"))
    return q, answer, "yes/no", "yes/no"


def _q_is_color(objs, bg, rng):
    o = rng.choice(objs)
    ref = _ref(o, objs, rng, color=False)
    color = o["color"] if rng.random() < 0.5 else rng.choice([c for c in COLORS if c != o["color"]])
    return f"is the {ref} {color}?", "yes" if color == o["color"] else "no", "yes/no", "yes/no"


def _q_color_of(objs, bg, rng):
    o = rng.choice(objs)
    ref = _ref(o, objs, rng, color=False)
    q = rng.choice((f"what color is the {ref}?", f"what colour is the {ref}?", f"which color is the {ref}?"))
    return q, o["color"], "other", "color"


def _q_shape_of(objs, bg, rng):
    o = rng.choice(objs)
    if rng.random() < 0.5 and sum(p["color"] == o["color"] for p in objs) == 1:
        q = rng.choice((f"what shape is the {o['color']} object?", f"what is the shape of the {o['color']} object?"))
    else:
        where = rng.choice(_QUESTION_POS[o["position"]])
        q = rng.choice((f"what shape is {where}?", f"which shape is {where}?", f"what is the shape {where}?"))
    return q, o["shape"], "other", "shape"


def _q_size_of(objs, bg, rng):
    o = rng.choice(objs)
    ref = _ref(o, objs, rng)
    q = rng.choice((f"what size is the {ref}?", f"is the {ref} small or large?", f"how big is the {ref}?"))
    return q, o["size"], "other", "size"


def _q_where(objs, bg, rng):
    o = rng.choice(objs)
    ref = _ref(o, objs, rng, position=False)
    if ref is None:
        return None
    question = rng.choice((f"where is the {ref}?", f"where is the {ref} in the image?"))
    return question, o["position"], "other", "position"


def _q_background(objs, bg, rng):
    q = rng.choice(("what color is the background?", "what colour is the background?"))
    return q, bg, "other", "background"


_NUMBER_QS = (_q_count_all, _q_count_shape, _q_count_color)
_YESNO_QS = (_q_exists, _q_occupied, _q_is_color)
_OTHER_QS = (_q_color_of, _q_shape_of, _q_size_of, _q_where)
_ANY_QS = _NUMBER_QS + _YESNO_QS + 2 * _OTHER_QS + (_q_background,)  # the draw after the first two
_ONCE = {_q_count_all, _q_background}  # asked at most once per image (their wordings mean the same)
_WRONG = {"number": ("0", "1", "2", "3", "4"), "yes/no": ("yes", "no"), "color": tuple(COLORS), "shape": SHAPES,
          "size": SIZES, "position": POSITIONS, "background": tuple(BACKGROUNDS)}


def _annotate(answer: str, domain: str, rng: random.Random) -> list:
    """10 human-style answers: mostly ``answer``, a few other spellings, now and then a wrong one."""
    n_wrong = rng.choices((0, 1, 2), weights=(70, 24, 6))[0]
    variants = _ANSWER_VARIANTS.get(answer, ())
    n_var = rng.choices((0, 1, 2, 3), weights=(50, 30, 15, 5))[0] if variants else 0
    wrong = [w for w in _WRONG[domain] if w != answer]
    answers = ([answer] * (10 - n_wrong - n_var) + [rng.choice(variants) for _ in range(n_var)]
               + [rng.choice(wrong) for _ in range(n_wrong)])
    rng.shuffle(answers)
    return answers


def most_common_answer(answers: list) -> str:
    """The most frequent answer (ties: the one given first), as VQAv2's multiple_choice_answer."""
    counts = collections.Counter(answers)
    return max(answers, key=lambda a: (counts[a], -answers.index(a)))


def make_questions(scene: dict, image_id: int, rng: random.Random) -> list:
    """5-6 VQAv2-style questions: at least one counting and one yes/no question, no repeats."""
    objs, bg = scene["objects"], scene["background"]
    want = rng.choice((5, 6))
    first = [rng.choice(_NUMBER_QS), rng.choice(_YESNO_QS)]
    out, seen, used, tries = [], set(), set(), 0
    while len(out) < want and tries < 200:
        gen = first[tries] if tries < len(first) else rng.choice(_ANY_QS)
        tries += 1
        if gen in _ONCE and gen in used:
            continue
        made = gen(objs, bg, rng)
        if made is None or made[0] in seen:
            continue
        question, answer, answer_type, domain = made
        seen.add(question)
        used.add(gen)
        answers = _annotate(answer, domain, rng)
        out.append({"question_id": image_id * QUESTIONS_PER_ID + len(out), "question": question,
                    "answers": answers, "multiple_choice_answer": most_common_answer(answers),
                    "answer_type": answer_type})
    return out


def make_example(seed: int, split: str, index: int) -> dict:
    """The metadata row of one image (everything but the pixels)."""
    scene = make_scene(seed, split, index)
    image_id = image_id_of(split, index)
    return {
        "file_name": f"{image_id:08d}.png",
        "image_id": image_id,
        "captions": make_captions(scene, _rng(seed, split, index, "captions")),
        "objects": scene["objects"],
        "background": scene["background"],
        "questions": make_questions(scene, image_id, _rng(seed, split, index, "questions")),
    }


def render_example(seed: int, split: str, index: int, image_size: int = 64):
    """(metadata row, PIL image) of one image, without touching the disk."""
    row = make_example(seed, split, index)
    scene = {"objects": row["objects"], "background": row["background"]}
    return row, render_scene(scene, image_size, _rng(seed, split, index, "pixels"))


def _write_one(task) -> str:
    seed, split, index, image_size, split_dir = task
    row, img = render_example(seed, split, index, image_size)
    # compress_level 1: 5x faster than the default 6 at 384 px, files ~9% larger
    img.save(os.path.join(split_dir, row["file_name"]), format="PNG", compress_level=1)
    return json.dumps(row, separators=(",", ":"))


# ------------------------------------------------------------------------------------------ make / load
def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"make_synthetic: {name} must be an int {rng}, got {value!r}")
    return value


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _complete(root: Path, params: dict) -> bool:
    for split in SPLITS:
        n = params[SPLIT_ARGS[split]]
        d = root / split
        if n == 0:
            if d.exists():
                return False
            continue
        meta = d / "metadata.jsonl"
        if not meta.is_file() or _count_lines(meta) != n:
            return False
        if sum(1 for e in os.scandir(d) if e.name.endswith(".png")) != n:
            return False
    return True


def make_synthetic(root, *, n_train: int = 2000, n_val: int = 200, n_test: int = 200, image_size: int = 64,
                   seed: int = 0, overwrite: bool = False, progress: bool = True,
                   num_workers: int | None = None) -> Path:
    """Render the synthetic set into ``root`` (an imagefolder) and return ``root`` as a Path.

    Reuses ``root`` when its manifest has the same parameters and all files are there (re-renders when
    files are missing); raises ValueError when it holds a set made with other parameters (or split
    folders without a manifest), unless ``overwrite=True``, and always when it holds anything else
    (nothing but the split folders and the manifest is ever deleted). Splits with n=0 are not written. ``num_workers``: processes to render with (None: half the logical CPUs
    for >= 1024 images; 0 or 1: this process). The output does not depend on it.
    """
    if not isinstance(root, (str, os.PathLike)):
        raise ValueError(f"make_synthetic: root must be a str or os.PathLike directory, got {type(root).__name__}")
    counts = {"n_train": n_train, "n_val": n_val, "n_test": n_test}
    for name, value in counts.items():
        _check_int(name, value, 0, MAX_PER_SPLIT)
    if not any(counts.values()):
        raise ValueError("make_synthetic: n_train, n_val and n_test are all 0; nothing to make")
    _check_int("image_size", image_size, MIN_SIZE, MAX_SIZE)
    _check_int("seed", seed, -(2**63))
    if num_workers is not None:
        _check_int("num_workers", num_workers, 0)
    root = Path(root)
    params = {"n_train": n_train, "n_val": n_val, "n_test": n_test, "image_size": image_size, "seed": seed}
    manifest = root / MANIFEST
    if root.exists() and not root.is_dir():
        raise ValueError(f"make_synthetic: root {str(root)!r} exists and is not a directory")

    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"make_synthetic: root {str(root)!r} has an unreadable {MANIFEST} ({e}); "
                             "pass overwrite=True to re-render") from e
        old_params = {k: old.get(k) for k in params}
        if old.get("version") != VERSION and not overwrite:
            raise ValueError(f"make_synthetic: root {str(root)!r} holds a synthetic set made by generator version "
                             f"{old.get('version')!r}, this is version {VERSION}; pass overwrite=True to re-render it")
        if old_params != params and not overwrite:
            diff = [k for k in params if old_params[k] != params[k]]
            held = ", ".join(f"{k}={old_params[k]!r}" for k in diff)
            asked = ", ".join(f"{k}={params[k]!r}" for k in diff)
            raise ValueError(f"make_synthetic: root {str(root)!r} holds a synthetic set made with {held}, but "
                             f"{asked} was requested; pass overwrite=True to re-render it, or use another root")
        if old.get("version") == VERSION and old_params == params and _complete(root, params):
            return root
    elif root.is_dir():
        entries = sorted(e.name for e in os.scandir(root))
        foreign = [e for e in entries if e not in SPLITS]
        if foreign:  # never delete what make_synthetic did not write
            raise ValueError(f"make_synthetic: root {str(root)!r} is not empty and holds no {MANIFEST} (found "
                             f"{foreign[:3]}); pass a new or empty directory")
        if entries and not overwrite:
            raise ValueError(f"make_synthetic: root {str(root)!r} holds {entries} but no {MANIFEST} (an interrupted "
                             "make_synthetic?); pass overwrite=True to replace them")

    # (Re-)render: remove what a previous set left, write the splits, the manifest last.
    import shutil

    if manifest.exists():
        manifest.unlink()
    for split in SPLITS:
        if (root / split).exists():
            shutil.rmtree(root / split)
    tasks = []
    for split in SPLITS:
        n = params[SPLIT_ARGS[split]]
        if n:
            (root / split).mkdir(parents=True)
            tasks.append((split, n))
    total = sum(n for _, n in tasks)
    if num_workers is None:  # one process per physical core (SMT siblings barely help PIL), big sets only
        num_workers = (os.cpu_count() or 2) // 2 if total >= 1024 else 0
    num_workers = min(num_workers, max(1, total // 32))  # at least a chunk of 32 images per worker

    pool = bar = None
    if num_workers > 1:
        # fork where available: workers then need not re-import fastbridge (and torch); they only use PIL.
        # Forked before tqdm starts its monitor thread.
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods and sys.platform != "darwin" else None)
        pool = ctx.Pool(num_workers)
    try:
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="fastbridge synthetic", unit="img")
        for split, n in tasks:
            split_dir = str(root / split)
            jobs = ((seed, split, i, image_size, split_dir) for i in range(n))
            lines = pool.imap(_write_one, jobs, chunksize=32) if pool else map(_write_one, jobs)
            tmp = root / split / "metadata.jsonl.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                for line in lines:
                    f.write(line + "\n")
                    if bar is not None:
                        bar.update(1)
            tmp.replace(root / split / "metadata.jsonl")
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
    manifest.write_text(json.dumps({"format": "fastbridge-synthetic", "version": VERSION, **params,
                                    "splits": {s: params[SPLIT_ARGS[s]] for s in SPLITS}}, indent=2) + "\n")
    return root


def _check_root(fn: str, root) -> Path:
    if not isinstance(root, (str, os.PathLike)):
        raise ValueError(f"{fn}: root must be a str or os.PathLike directory, got {type(root).__name__}")
    root = Path(root)
    if not (root / MANIFEST).is_file():
        raise ValueError(f"{fn}: root {str(root)!r} holds no synthetic set ({MANIFEST} missing); "
                         "make one with fastbridge.data.make_synthetic(root)")
    return root


def read_metadata(root, split: str = "train") -> list:
    """The metadata rows of one split of a synthetic set, straight from its metadata.jsonl."""
    root = _check_root("read_metadata", root)
    if split not in SPLITS:
        raise ValueError(f"read_metadata: split must be one of {SPLITS}, got {split!r}")
    path = root / split / "metadata.jsonl"
    if not path.is_file():
        raise ValueError(f"read_metadata: split {split!r} was not written in {str(root)!r} (made with n=0?)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def synthetic_features():
    """datasets.Features of the rows ``load_synthetic`` returns."""
    from datasets import Features, Image, List, Value

    question = vqa_features()
    return Features({
        "image": Image(), "image_id": Value("int64"), "captions": List(Value("string")),
        "objects": List({k: Value("string") for k in ("shape", "color", "size", "position")}),
        "background": Value("string"),
        "questions": List({k: question[k] for k in ("question_id", "question", "answers",
                                                    "multiple_choice_answer", "answer_type")}),
    })


def load_synthetic(root, *, cache_dir=None):
    """Load a set made by ``make_synthetic`` as a datasets.DatasetDict (imagefolder; no network).

    Columns: image, image_id, captions, objects, background, questions (see ``synthetic_features``).
    """
    root = _check_root("load_synthetic", root)
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise ValueError("load_synthetic: cache_dir must be a str, os.PathLike or None, "
                         f"got {type(cache_dir).__name__}")
    # "imagefolder" is packaged with datasets and the files are local: nothing reaches for the Hub, with or
    # without HF_HUB_OFFLINE / HF_DATASETS_OFFLINE (the tests check both).
    datasets = require_datasets("load_synthetic")
    return datasets.load_dataset("imagefolder", data_dir=str(root), features=synthetic_features(),
                                 cache_dir=None if cache_dir is None else str(cache_dir))


# ------------------------------------------------------------------------------------------ task views
def _view_input(fn: str, ds, required):
    """``ds`` checked for ``required`` columns, or None when it is a DatasetDict (the caller maps per split)."""
    datasets = require_datasets(fn)
    if isinstance(ds, datasets.DatasetDict):
        return None
    if not isinstance(ds, datasets.Dataset):
        raise ValueError(f"{fn}: ds must be a datasets.Dataset or DatasetDict, got {type(ds).__name__}")
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        raise ValueError(f"{fn}: ds lacks column(s) {missing} (has {ds.column_names}); "
                         "pass a split of load_synthetic(root)")
    return ds


def caption_view(ds):
    """Caption rows (image, image_id, captions) of a synthetic split; a DatasetDict gives one per split."""
    checked = _view_input("caption_view", ds, CAPTION_COLUMNS)
    if checked is None:
        return type(ds)({name: caption_view(split) for name, split in ds.items()})
    return checked.select_columns(list(CAPTION_COLUMNS))


def _explode_questions(batch):
    out = {k: [] for k in ("image", "image_id", "question_id", "question", "answers", "multiple_choice_answer",
                           "answer_type")}
    for image, image_id, questions in zip(batch["image"], batch["image_id"], batch["questions"]):
        for q in questions:
            out["image"].append(image)
            out["image_id"].append(image_id)
            for k in ("question_id", "question", "answers", "multiple_choice_answer", "answer_type"):
                out[k].append(q[k])
    return out


def vqa_view(ds):
    """VQA rows, one per question (image, image_id, question_id, question, answers,
    multiple_choice_answer, answer_type); images are not decoded to build it."""
    checked = _view_input("vqa_view", ds, ("image", "image_id", "questions"))
    if checked is None:
        return type(ds)({name: vqa_view(split) for name, split in ds.items()})
    from datasets import Image

    raw = checked.select_columns(["image", "image_id", "questions"]).cast_column("image", Image(decode=False))
    out = raw.map(_explode_questions, batched=True, remove_columns=raw.column_names,
                  features=vqa_features(decode=False), desc="vqa_view")
    return out.cast_column("image", Image())


def synthetic_texts(data, *, split: str = "train") -> Iterator[str]:
    """Every caption, question and answer of one split, to build a vocabulary from.

    ``data``: a synthetic root directory (read from metadata.jsonl, no images), a DatasetDict
    (``data[split]``), or a Dataset: a load_synthetic split, a caption_view or a vqa_view (images are
    never decoded).
    """
    if isinstance(data, (str, os.PathLike)):
        for row in read_metadata(data, split):
            yield from row["captions"]
            for q in row["questions"]:
                yield q["question"]
                yield from q["answers"]
        return
    datasets = require_datasets("synthetic_texts")
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"synthetic_texts: split {split!r} not in data (has {list(data)})")
        data = data[split]
    if not isinstance(data, datasets.Dataset):
        raise ValueError(f"synthetic_texts: data must be a root directory, DatasetDict or Dataset, "
                         f"got {type(data).__name__}")
    cols = [c for c in ("captions", "questions", "question", "answers") if c in data.column_names]
    if not cols:
        raise ValueError(f"synthetic_texts: data has none of the columns captions, questions, question, answers "
                         f"(has {data.column_names})")
    for batch in data.select_columns(cols).iter(batch_size=1000):
        for i in range(len(batch[cols[0]])):
            if "captions" in batch:
                yield from batch["captions"][i]
            for q in batch["questions"][i] if "questions" in batch else ():
                yield q["question"]
                yield from q["answers"]
            if "question" in batch:
                yield batch["question"][i]
            if "answers" in batch:
                yield from batch["answers"][i]

