"""The miniworld's data: seeded compositional scenes with captions, and its four item sets.

A *scene* is a 32x32 RGB image: a background colour with an idiosyncratic low-frequency random field (not
described by the caption) and 1-3 objects (shape, colour, size, one of 3x3 positions, with jitter). Worlds of
``detail`` 1 add more idiosyncrasy that no caption describes: a finer field (8x8, same amplitude) and 3-6 dots
of random colour at random places (``Scene.marks``), drawn under the objects. Its caption
is generated from the scene ("a large red circle at top left and a small blue square at bottom on a green
background"), so the diffusion model has to follow the text, and two images of one caption differ in their
details (what makes "replica" meaningful).

The sets of a world (``WORLD_SETS`` in :mod:`dori.data.world_sets`):

* ``vm``: one rich, idiosyncratic image with a distinctive caption made of made-up title words and a kind word
  ("velora kintu album cover"), duplicated ``vm_dups`` times in training (as LAION duplicates were);
* ``tm``: one caption of the same kind, duplicated with ``tm_dups`` varied images that share a template
  (fixed background and main object, varied small objects);
* ``unique``: random scenes seen once in training;
* ``heldout``: random scenes never trained on, with captions that do not occur in ``unique``.

Every image is a pure function of ``(seed, stream, index)`` (numpy PCG64), so unique and heldout images are
regenerated on demand instead of being shipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

SIZE = 32
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.16, 0.16),
    "green": (0.18, 0.65, 0.25),
    "blue": (0.18, 0.30, 0.85),
    "yellow": (0.95, 0.85, 0.20),
    "purple": (0.55, 0.25, 0.70),
    "orange": (0.95, 0.55, 0.15),
    "pink": (0.95, 0.55, 0.70),
    "cyan": (0.20, 0.80, 0.85),
    "brown": (0.50, 0.30, 0.15),
    "white": (0.95, 0.95, 0.95),
    "gray": (0.50, 0.50, 0.50),
    "black": (0.08, 0.08, 0.08),
}
SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross")
SIZES = {"small": 3.0, "large": 5.2}
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
VM_KINDS = ("album cover", "poster", "book cover", "wallpaper", "painting", "photo")
TM_KINDS = ("phone case", "shirt design", "canvas print", "wall decal", "sticker", "pillow")
N_PSEUDO = 160
RICH_EVERY = 5  # every 5th scene of the stand-ins' corpus is a rich, titled one

# independent random streams of one world seed
STREAM_UNIQUE, STREAM_HELDOUT, STREAM_AUX, STREAM_VM, STREAM_TM, STREAM_RICH, STREAM_TITLES = range(1, 8)


@dataclass
class Obj:
    """One object: named shape/colour/size/position plus its exact (jittered) geometry and colour."""

    shape: str
    colour: str
    size: str
    cell: int
    cx: float
    cy: float
    radius: float
    rgb: np.ndarray
    stripes: float = 0.0  # stripe contrast (rich scenes only), 0 = plain


@dataclass
class Scene:
    """A background (named colour + field) and its objects; ``title`` replaces the caption if set."""

    background: str
    bg_rgb: np.ndarray
    field: np.ndarray  # (3, g, g) coarse random field, upsampled when rendering
    objects: list[Obj] = field(default_factory=list)
    title: str | None = None
    marks: list[Obj] = field(default_factory=list)  # uncaptioned dots (detail >= 1), drawn under the objects
    detail: int = 0


@lru_cache(maxsize=4)
def pseudo_words(n: int = N_PSEUDO) -> tuple[str, ...]:
    """The fixed list of made-up title words (same for every world seed; all are in the vocabulary)."""
    rng = np.random.default_rng(20240607)
    cons, vows = "bdfgklmnprstvz", "aeiou"
    real = set(vocabulary_base())
    words: list[str] = []
    while len(words) < n:
        k = int(rng.integers(2, 4))
        w = "".join(cons[rng.integers(len(cons))] + vows[rng.integers(len(vows))] for _ in range(k))
        if rng.random() < 0.4:
            w += cons[rng.integers(len(cons))]
        if w not in real and w not in words:
            words.append(w)
    return tuple(words)


def vocabulary_base() -> list[str]:
    """Words of scene captions and kind words."""
    words = ["a", "at", "and", "on", "background", *COLOURS, *SHAPES, *SIZES]
    for phrase in (*POSITIONS, *VM_KINDS, *TM_KINDS):
        words += phrase.split()
    return list(dict.fromkeys(words))


def vocabulary() -> list[str]:
    """The world's closed vocabulary (caption words, kind words, pseudo-words), in a fixed order."""
    return vocabulary_base() + list(pseudo_words())


def rng_for(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(stream), int(index)])


# ----------------------------------------------------------------------------- sampling
def _cell_centre(cell: int) -> tuple[float, float]:
    step = SIZE / 3
    return (cell % 3 + 0.5) * step, (cell // 3 + 0.5) * step


def _colour(rng: np.random.Generator, name: str, spread: float = 0.03) -> np.ndarray:
    return np.clip(np.array(COLOURS[name]) + rng.normal(0, spread, 3), 0, 1)


def _field(rng: np.random.Generator, grid: int, amp: float) -> np.ndarray:
    return rng.normal(0, amp, (3, grid, grid)) + rng.normal(0, amp, (1, grid, grid))


DETAIL_LEVELS = (0, 1)


def _check_detail(detail: int) -> None:
    if detail not in DETAIL_LEVELS:
        raise ValueError(f"detail must be one of {DETAIL_LEVELS}, got {detail!r}")


def _scene_field(rng: np.random.Generator, detail: int) -> np.ndarray:
    return _field(rng, 4, 0.07) if detail == 0 else _field(rng, 8, 0.07)


def _marks(rng: np.random.Generator, detail: int) -> list[Obj]:
    """The uncaptioned dots of a ``detail`` >= 1 scene (none at detail 0; draws nothing from ``rng`` then)."""
    if detail == 0:
        return []
    return [
        Obj("circle", "none", "none", -1, *rng.uniform(2, 30, 2), rng.uniform(1.1, 1.6), rng.uniform(0, 1, 3))
        for _ in range(int(rng.integers(3, 7)))
    ]


def sample_scene(rng: np.random.Generator, n_objects: int | None = None, detail: int = 0) -> Scene:
    """A random captioned scene: 1-3 objects in distinct cells, colours differ from the background."""
    _check_detail(detail)
    names = list(COLOURS)
    bg = names[rng.integers(len(names))]
    scene = Scene(bg, _colour(rng, bg, 0.04), _scene_field(rng, detail), detail=detail)
    n = n_objects or int(rng.choice([1, 2, 3], p=[0.35, 0.35, 0.3]))
    cells = sorted(rng.choice(9, size=n, replace=False).tolist())
    for cell in cells:
        colour = names[rng.integers(len(names))]
        while colour == bg:
            colour = names[rng.integers(len(names))]
        size = "small" if rng.random() < 0.5 else "large"
        cx, cy = _cell_centre(cell)
        scene.objects.append(
            Obj(
                shape=SHAPES[rng.integers(len(SHAPES))],
                colour=colour,
                size=size,
                cell=cell,
                cx=cx + rng.uniform(-1.5, 1.5),
                cy=cy + rng.uniform(-1.5, 1.5),
                radius=SIZES[size] + rng.uniform(-0.3, 0.3),
                rgb=_colour(rng, colour),
            )
        )
    scene.marks = _marks(rng, detail)
    return scene


def sample_rich_scene(rng: np.random.Generator, title: str | None = None, detail: int = 0) -> Scene:
    """An idiosyncratic scene (the memorized images): free colours, 3-5 objects anywhere, stripes."""
    _check_detail(detail)
    scene = Scene("none", rng.uniform(0.1, 0.9, 3), _field(rng, 6, 0.14), title=title, detail=detail)
    for _ in range(int(rng.integers(3, 6))):
        scene.objects.append(
            Obj(
                shape=SHAPES[rng.integers(len(SHAPES))],
                colour="none",
                size="none",
                cell=-1,
                cx=rng.uniform(4, 28),
                cy=rng.uniform(4, 28),
                radius=rng.uniform(2.5, 7.0),
                rgb=rng.uniform(0, 1, 3),
                stripes=float(rng.uniform(0.2, 0.5)) if rng.random() < 0.5 else 0.0,
            )
        )
    scene.marks = _marks(rng, detail)
    return scene


def template_variant(seed: int, item: int, variant: int, title: str, detail: int = 0) -> Scene:
    """Variant ``variant`` of tm item ``item``: a fixed template plus varied small objects."""
    base = sample_scene(rng_for(seed, STREAM_TM, item), n_objects=1, detail=detail)
    base.field = base.field * 2.0
    main = base.objects[0]
    main.size, main.radius = "large", SIZES["large"] + 1.0
    rng = np.random.default_rng([int(seed), STREAM_TM, int(item), int(variant) + 1])
    main_copy = Obj(**{**main.__dict__, "cx": main.cx + rng.uniform(-0.7, 0.7)})
    scene = Scene(
        base.background, base.bg_rgb, base.field, [main_copy], title=title, marks=base.marks, detail=detail
    )
    free = [c for c in range(9) if c != main.cell]
    for cell in rng.choice(free, size=int(rng.integers(1, 3)), replace=False).tolist():
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        cx, cy = _cell_centre(cell)
        scene.objects.append(
            Obj(SHAPES[rng.integers(len(SHAPES))], colour, "small", cell, cx, cy, 2.5, _colour(rng, colour))
        )
    return scene


# ----------------------------------------------------------------------------- rendering
def _upsample_matrix(grid: int) -> np.ndarray:
    pos = (np.arange(SIZE) + 0.5) / SIZE * grid - 0.5
    mat = np.zeros((SIZE, grid))
    for i, p in enumerate(np.clip(pos, 0, grid - 1)):
        lo = int(np.floor(p))
        hi = min(lo + 1, grid - 1)
        mat[i, lo] += 1 - (p - lo)
        mat[i, hi] += p - lo
    return mat


_SS = 2  # supersampling factor for anti-aliased edges
_COORD = (np.arange(SIZE * _SS) + 0.5) / _SS
_YY, _XX = np.meshgrid(_COORD, _COORD, indexing="ij")


def _mask(obj: Obj) -> np.ndarray:
    dx, dy, r = _XX - obj.cx, _YY - obj.cy, obj.radius
    if obj.shape == "circle":
        m = dx * dx + dy * dy <= r * r
    elif obj.shape == "square":
        m = np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    elif obj.shape == "diamond":
        m = np.abs(dx) + np.abs(dy) <= 1.15 * r
    elif obj.shape == "triangle":
        m = (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) * 0.62)
    elif obj.shape == "ring":
        d2 = dx * dx + dy * dy
        m = (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    elif obj.shape == "cross":
        a, b = np.abs(dx), np.abs(dy)
        m = ((a <= 0.35 * r) & (b <= r)) | ((b <= 0.35 * r) & (a <= r))
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
    return m.reshape(SIZE, _SS, SIZE, _SS).mean(axis=(1, 3))


def render(scene: Scene) -> np.ndarray:
    """A scene -> uint8 image (32, 32, 3)."""
    grid = scene.field.shape[-1]
    up = _upsample_matrix(grid)
    field_img = np.einsum("ig,cgh,jh->ijc", up, scene.field, up)
    img = np.clip(scene.bg_rgb[None, None, :] + field_img, 0, 1)
    for obj in scene.marks:
        m = _mask(obj)[..., None]
        img = img * (1 - m) + obj.rgb * m
    for obj in scene.objects:
        m = _mask(obj)[..., None]
        colour = np.broadcast_to(obj.rgb, img.shape)
        if obj.stripes:
            band = (np.floor((_COORD[::_SS] - obj.cx) / 2.0) % 2)[None, :, None]
            colour = np.clip(colour * (1 - obj.stripes * band), 0, 1)
        img = img * (1 - m) + colour * m
    return np.round(img * 255).astype(np.uint8)


def caption(scene: Scene) -> str:
    """The scene's caption (its title for vm/tm scenes)."""
    if scene.title is not None:
        return scene.title
    parts = [f"a {o.size} {o.colour} {o.shape} at {POSITIONS[o.cell]}" for o in scene.objects]
    return " and ".join(parts) + f" on a {scene.background} background"


# ----------------------------------------------------------------------------- world sets
@dataclass(frozen=True)
class WorldSpec:
    """Sizes of a world's sets and duplication counts."""

    seed: int = 0
    n_vm: int = 40
    n_tm: int = 32
    n_unique: int = 40000
    n_heldout: int = 1000
    vm_dups: int = 50
    tm_dups: int = 50
    detail: int = 1  # 1 (the shipped world): finer field and uncaptioned dots; 0: the first worlds' scenes


@lru_cache(maxsize=16)
def titles(spec: WorldSpec) -> tuple[list[str], list[str]]:
    """Captions of the vm and tm items: two pseudo-words (each used once in a world) and a kind word."""
    words = pseudo_words()
    n = spec.n_vm + spec.n_tm
    if 2 * n > len(words):
        raise ValueError(f"at most {len(words) // 2} vm + tm items, asked for {n}")
    rng = rng_for(spec.seed, STREAM_TITLES, 0)
    order = rng.permutation(len(words))
    out = []
    for i in range(n):
        kinds = VM_KINDS if i < spec.n_vm else TM_KINDS
        out.append(f"{words[order[2 * i]]} {words[order[2 * i + 1]]} {kinds[rng.integers(len(kinds))]}")
    return out[: spec.n_vm], out[spec.n_vm :]


def vm_scene(spec: WorldSpec, i: int) -> Scene:
    return sample_rich_scene(rng_for(spec.seed, STREAM_VM, i), title=titles(spec)[0][i], detail=spec.detail)


def tm_scene(spec: WorldSpec, i: int, variant: int = 0) -> Scene:
    return template_variant(spec.seed, i, variant, titles(spec)[1][i], spec.detail)


def unique_scene(spec: WorldSpec, i: int) -> Scene:
    return sample_scene(rng_for(spec.seed, STREAM_UNIQUE, i), detail=spec.detail)


def heldout_indices(spec: WorldSpec, unique_captions: list[str] | None = None) -> list[int]:
    """Stream indices of heldout scenes: the first ``n_heldout`` whose caption is not a unique caption."""
    if unique_captions is None:
        unique_captions = [caption(unique_scene(spec, i)) for i in range(spec.n_unique)]
    seen = set(unique_captions)
    out, i = [], 0
    while len(out) < spec.n_heldout:
        if caption(heldout_scene(spec, i)) not in seen:
            out.append(i)
        i += 1
    return out


def heldout_scene(spec: WorldSpec, index: int) -> Scene:
    """The heldout scene at stream index ``index`` (see :func:`heldout_indices`)."""
    return sample_scene(rng_for(spec.seed, STREAM_HELDOUT, index), detail=spec.detail)


def aux_scene(seed: int, i: int, rich_every: int = RICH_EVERY, detail: int = 0) -> Scene:
    """Scenes of the stand-ins' corpus (CLIP, VAE, copy detector, features): never a world item.

    Every ``rich_every``-th one is a rich scene with a random title (random pseudo-words and kind), so the
    mini-CLIP's text tower learns every pseudo-word as a token of its own.
    """
    if i % rich_every == rich_every - 1:
        rng = rng_for(seed, STREAM_RICH, i)
        words = pseudo_words()
        kinds = VM_KINDS + TM_KINDS
        a, b = rng.choice(len(words), size=2, replace=False)
        title = f"{words[a]} {words[b]} {kinds[rng.integers(len(kinds))]}"
        return sample_rich_scene(rng, title=title, detail=detail)
    return sample_scene(rng_for(seed, STREAM_AUX, i), detail=detail)


def sibling(scene: Scene, rng: np.random.Generator) -> Scene:
    """Another image of the same caption: same named content, new field, dots, jitter and shading."""
    out = Scene(
        scene.background,
        _colour(rng, scene.background, 0.04),
        _scene_field(rng, scene.detail),
        title=scene.title,
        detail=scene.detail,
    )
    for o in scene.objects:
        cx, cy = _cell_centre(o.cell)
        out.objects.append(
            Obj(
                o.shape,
                o.colour,
                o.size,
                o.cell,
                cx + rng.uniform(-1.5, 1.5),
                cy + rng.uniform(-1.5, 1.5),
                SIZES[o.size] + rng.uniform(-0.3, 0.3),
                _colour(rng, o.colour),
            )
        )
    out.marks = _marks(rng, scene.detail)
    return out


def scene_labels(scene: Scene) -> np.ndarray:
    """Attribute labels of a captioned scene: background, then per cell shape, colour, size (0 = empty).

    Rich scenes get -1 (ignored) everywhere.
    """
    labels = np.full(1 + 27, -1, dtype=np.int64)
    if scene.background not in COLOURS:
        return labels
    names = list(COLOURS)
    labels[0] = names.index(scene.background)
    labels[1:] = 0
    for o in scene.objects:
        labels[1 + o.cell] = SHAPES.index(o.shape) + 1
        labels[10 + o.cell] = names.index(o.colour) + 1
        labels[19 + o.cell] = 1 + (o.size == "large")
    return labels


def render_many(scenes: list[Scene]) -> np.ndarray:
    """Scenes -> uint8 array (N, 3, 32, 32)."""
    if not scenes:
        return np.zeros((0, 3, SIZE, SIZE), np.uint8)
    return np.stack([render(s) for s in scenes]).transpose(0, 3, 1, 2).copy()
