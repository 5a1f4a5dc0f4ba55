"""tiny-scenes: a seeded Sort-of-CLEVR-like VQA task where the answer depends on WHICH patch a word is about.

Each 64x64 image holds 2-4 shapes (circle, square, triangle) of distinct colours on a light background.
easy-vqa has one shape per image, so "what color is the triangle?" is answered by any coloured pixel;
here the colour must be bound to the right shape, which is what AttAnchor's copies next to the patches
are for. Question kinds (one word answers):

    color     what color is the triangle?                    (the shape occurs once)
    shape     what shape is the red one?
    yes/no    is there a blue circle?                        (half are "no" with blue and a circle both
                                                              present but not together: binding needed)
    relation  what color is the shape left of the circle?    (exactly one shape is left of it)
              what color is the shape closest to the red one?
    count     how many squares are there?                    (zero .. four)

Splits come from fixed seeds (train 6,000 scenes, validation 300, test 600), each scene from its own
generator seeded by (split seed, index), so any scene can be rebuilt alone and the splits never share
one. Everything is drawn here with Pillow: no third-party data, licence-clean (Apache-2.0, this
project). Images for validation and test are written once as PNGs under the attanchor-export cache
(`attanchor-export eval DIR --data tiny-scenes` reads them like any image); training renders in memory.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

NAME = "tiny-scenes"
VERSION = 1  # bump when the drawing or the questions change: the PNG cache is keyed by it
SIZE = 64
COLORS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 225),
    "yellow": (235, 200, 20), "orange": (245, 125, 20), "purple": (140, 50, 185),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("zero", "one", "two", "three", "four")
KINDS = ("color", "shape", "yes/no", "relation", "count")
SPLITS = {"train": (6000, 1000), "validation": (300, 2000), "test": (600, 3000)}  # (scenes, seed)
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}


@dataclass(frozen=True)
class Item:
    colour: str
    shape: str
    x: int  # centre, pixels
    y: int
    r: int  # half the size


@dataclass(frozen=True)
class Scene:
    split: str
    index: int
    background: tuple[int, int, int]
    items: tuple[Item, ...]


@dataclass(frozen=True)
class Question:  # the fields of attanchor_export.load.easy_vqa.Question
    image: str  # PNG path ("" for training scenes, which are rendered in memory)
    image_id: int  # scene index within its split
    question: str
    answer: str
    kind: str


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"{NAME} has splits {', '.join(SPLITS)}, not {split!r}")


def scene(split: str, index: int) -> Scene:
    """Scene `index` of `split`: 2-4 non-overlapping shapes, distinct colours, x centres >= 6 px apart."""
    _check_split(split)
    rng = np.random.default_rng([SPLITS[split][1], index])
    n = int(rng.integers(2, 5))
    colours = rng.choice(list(COLORS), size=n, replace=False)
    items: list[Item] = []
    while len(items) < n:
        r = int(rng.integers(6, 10))
        x, y = (int(v) for v in rng.integers(r + 1, SIZE - r - 1, size=2))
        if all((x - o.x) ** 2 + (y - o.y) ** 2 >= (r + o.r + 3) ** 2 and abs(x - o.x) >= 6 for o in items):
            items.append(Item(str(colours[len(items)]), str(rng.choice(SHAPES)), x, y, r))
    grey = int(rng.integers(225, 250))
    return Scene(split, index, (grey, grey, grey), tuple(items))


def _draw(draw, item: Item, fill) -> None:
    x, y, r = item.x, item.y, item.r
    if item.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif item.shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)


def render(sc: Scene) -> np.ndarray:
    """uint8 [64, 64, 3]: flat fills in exact palette colours, no anti-aliasing."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), sc.background)
    draw = ImageDraw.Draw(image)
    for item in sc.items:
        _draw(draw, item, COLORS[item.colour])
    return np.asarray(image)


def masks(sc: Scene) -> np.ndarray:
    """bool [n_items, 64, 64]: each item's pixels."""
    from PIL import Image, ImageDraw

    out = []
    for item in sc.items:
        image = Image.new("L", (SIZE, SIZE), 0)
        _draw(ImageDraw.Draw(image), item, 255)
        out.append(np.asarray(image) > 0)
    return np.stack(out)


def patch_overlap(sc: Scene, patch: int) -> np.ndarray:
    """float [n_items, (64/patch)^2]: share of each patch covered by each item, row-major like ViT patches."""
    m = masks(sc)
    g = SIZE // patch
    return m.reshape(len(m), g, patch, g, patch).mean(axis=(2, 4)).reshape(len(m), -1)


def _ref(sc: Scene, item: Item) -> str:
    """How a question names an item: by shape when it is the only one, else by colour."""
    same = sum(o.shape == item.shape for o in sc.items)
    return f"the {item.shape}" if same == 1 else f"the {item.colour} one"


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def questions_for(sc: Scene) -> list[tuple[str, str, str]]:
    """(question, answer, kind): at most one of each kind, drawn with the scene's own generator."""
    rng = np.random.default_rng([SPLITS[sc.split][1], sc.index, 1])
    items = list(sc.items)
    out = []
    unique = [it for it in items if sum(o.shape == it.shape for o in items) == 1]
    if unique:
        it = unique[int(rng.integers(len(unique)))]
        out.append((f"what color is the {it.shape}?", it.colour, "color"))
    it = items[int(rng.integers(len(items)))]
    out.append((f"what shape is the {it.colour} one?", it.shape, "shape"))
    present = {(o.colour, o.shape) for o in items}
    # "no" pairs whose colour and shape are both in the scene, on different items: binding decides.
    swapped = [(a.colour, b.shape) for a in items for b in items if (a.colour, b.shape) not in present]
    if rng.random() < 0.4 or not swapped:  # 0.4: "no" is not always possible; this about evens them
        c, s = sorted(present)[int(rng.integers(len(present)))]
        out.append((f"is there {_a(c)} {c} {s}?", "yes", "yes/no"))
    else:
        c, s = swapped[int(rng.integers(len(swapped)))]
        out.append((f"is there {_a(c)} {c} {s}?", "no", "yes/no"))
    relations = []
    for ref in items:
        left = [o for o in items if o.x < ref.x]
        if len(left) == 1:
            relations.append((f"what color is the shape left of {_ref(sc, ref)}?", left[0].colour))
        others = sorted((o for o in items if o is not ref), key=lambda o: (o.x - ref.x) ** 2 + (o.y - ref.y) ** 2)
        d = [(o.x - ref.x) ** 2 + (o.y - ref.y) ** 2 for o in others]
        if len(others) == 1 or d[1] ** 0.5 - d[0] ** 0.5 >= 4:  # a clear nearest one
            relations.append((f"what color is the shape closest to {_ref(sc, ref)}?", others[0].colour))
    if relations:
        q, a = relations[int(rng.integers(len(relations)))]
        out.append((q, a, "relation"))
    s = SHAPES[int(rng.integers(len(SHAPES)))]
    out.append((f"how many {_PLURAL[s]} are there?", COUNTS[sum(o.shape == s for o in items)], "count"))
    return out


def scenes(split: str) -> tuple[Scene, ...]:
    _check_split(split)
    return tuple(scene(split, i) for i in range(SPLITS[split][0]))


@lru_cache(maxsize=4)
def questions(split: str = "test", with_images: bool = True) -> tuple[Question, ...]:
    """Every question of the split. with_images: PNGs written to the cache (validation/test for eval)."""
    folder = image_folder(split) if with_images else None
    return tuple(
        Question(str(folder / f"{sc.index:05d}.png") if folder else "", sc.index, q, a, kind)
        for sc in scenes(split) for q, a, kind in questions_for(sc)
    )


def images(split: str) -> np.ndarray:
    """uint8 [N, 64, 64, 3], scene order (training renders these instead of reading PNGs)."""
    return np.stack([render(sc) for sc in scenes(split)])


def _digest() -> str:
    """Changes whenever this file does, so a cached PNG folder never outlives the code that drew it."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def image_folder(split: str) -> Path:
    """The split's PNGs under the attanchor-export cache, written once (atomically) and reused."""
    from PIL import Image

    from attanchor_export.load.tiny_vqa import _publish, cache_root

    _check_split(split)
    final = cache_root() / f"{NAME}-v{VERSION}-{_digest()}" / split
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{split}-"))
    try:
        for sc in scenes(split):
            Image.fromarray(render(sc)).save(tmp / f"{sc.index:05d}.png")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _publish(tmp, final)


def word_patches(sc: Scene, patch: int, threshold: float = 0.0) -> dict[str, np.ndarray]:
    """word -> bool [(64/patch)^2]: the patches overlapping an item that word describes (its colour or
    shape), for scoring where colour/shape words were anchored."""
    overlap = patch_overlap(sc, patch) > threshold
    out: dict[str, np.ndarray] = {}
    for item, on in zip(sc.items, overlap, strict=True):
        for word in (item.colour, item.shape):
            out[word] = out.get(word, np.zeros_like(on)) | on
    return out
