"""The tiny shapes world: scenes of 1-3 coloured shapes on a 3x3 grid, a renderer, and a pixel-level reader.

A scene is pure data (`Scene`); `render` draws it on a white canvas at any resolution and `read_scene`
reads a picture back into a scene, tolerating the blur, noise, compression and colour drift of a learned
image decoder. Hue is the colour cue because mixing a colour with white (blur, resizing, anti-aliasing)
leaves its hue unchanged; the shape cue is the moments of the blob's ink inside its cell, which blur
barely moves.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from runtime.errors import RuntimeErrorBase

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
CELLS: tuple[str, ...] = (
    "top-left", "top", "top-right",
    "left", "center", "right",
    "bottom-left", "bottom", "bottom-right",
)
MAX_SHAPES = 3

# Saturated colours whose hues sit at least 30 degrees apart (red 0, orange 30, yellow 60, green 120,
# blue 240, purple 278), so the reader separates orange from red and yellow by hue alone.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 176, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (160, 0, 255),
    "orange": (255, 128, 0),
}

# A shape spans this fraction of its cell's side, leaving a white margin so cells never touch.
SHAPE_FRACTION = 0.7

# Reader thresholds. A pixel is "coloured" when its chroma (max - min channel, in [0, 1]) reaches
# MIN_CHROMA: white, grey, and white-tinted noise stay below it. A cell holds a shape when its largest
# coloured blob covers MIN_COVERAGE of the cell (a rendered triangle covers ~0.245).
MIN_CHROMA = 0.3
MIN_COVERAGE = 0.06
# Shape cues, from the moments of the blob's ink (blur adds no third moment and keeps x and y independent):
# an upward triangle's vertical skewness is -0.57 (mass low, apex tail up), circles and squares have 0;
# E[x^2 y^2] / (E[x^2] E[y^2]) is 1 for a square (x and y independent) and 2/3 for a disc.
TRIANGLE_MAX_SKEW = -0.1
SQUARE_MIN_CROSS = 0.82
# Ink counts within this many pixels of the coloured blob: enough for blurred edges, not stray noise.
BLOB_MARGIN = 2
# Larger pictures are box-reduced to at most this side before reading: the cues need no finer detail, and
# box averaging only blends shapes with white, which keeps hue and the ink moments.
READ_MAX_SIDE = 128


class SceneError(RuntimeErrorBase, ValueError):
    """A scene or shape is invalid: unknown name, repeated cell, or a shape count outside 1-3."""


class SceneReadError(SceneError):
    """A picture does not read back as a valid scene (no shapes, or more than three)."""


@dataclass(frozen=True, order=True)
class Shape:
    """One coloured shape in one grid cell."""

    shape: str
    color: str
    cell: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise SceneError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color not in COLORS:
            raise SceneError(f"unknown color {self.color!r}; expected one of {COLORS}")
        if self.cell not in CELLS:
            raise SceneError(f"unknown cell {self.cell!r}; expected one of {CELLS}")


@dataclass(frozen=True)
class Scene:
    """1-3 shapes in distinct cells, kept in grid order (by cell index) so equal content compares equal."""

    shapes: tuple[Shape, ...]

    def __post_init__(self) -> None:
        shapes = tuple(self.shapes)
        if not all(isinstance(s, Shape) for s in shapes):
            raise SceneError("a scene holds Shape objects only")
        if not 1 <= len(shapes) <= MAX_SHAPES:
            raise SceneError(f"a scene holds 1-{MAX_SHAPES} shapes, got {len(shapes)}")
        cells = [s.cell for s in shapes]
        if len(set(cells)) != len(cells):
            raise SceneError(f"two shapes share a cell: {sorted(cells)}")
        object.__setattr__(self, "shapes", tuple(sorted(shapes, key=lambda s: CELLS.index(s.cell))))

    @classmethod
    def of(cls, *shapes: Shape) -> Scene:
        """Return the scene holding these shapes."""
        return cls(tuple(shapes))

    def __len__(self) -> int:
        return len(self.shapes)

    def __iter__(self) -> Iterator[Shape]:
        return iter(self.shapes)

    @property
    def cells(self) -> tuple[str, ...]:
        """The occupied cells, in grid order."""
        return tuple(s.cell for s in self.shapes)

    def empty_cells(self) -> tuple[str, ...]:
        """The free cells, in grid order."""
        return tuple(c for c in CELLS if c not in self.cells)

    def at(self, cell: str) -> Shape | None:
        """Return the shape in `cell`, or None when the cell is empty."""
        return next((s for s in self.shapes if s.cell == cell), None)

    def added(self, shape: Shape) -> Scene:
        """Return this scene with `shape` added (its cell must be free)."""
        return Scene(self.shapes + (shape,))

    def removed(self, cell: str) -> Scene:
        """Return this scene without the shape in `cell`."""
        self._require(cell)
        return Scene(tuple(s for s in self.shapes if s.cell != cell))

    def recolored(self, cell: str, color: str) -> Scene:
        """Return this scene with the shape in `cell` painted `color`."""
        self._require(cell)
        return Scene(tuple(Shape(s.shape, color, cell) if s.cell == cell else s for s in self.shapes))

    def moved(self, cell: str, to: str) -> Scene:
        """Return this scene with the shape in `cell` moved to the free cell `to`."""
        old = self._require(cell)
        rest = tuple(s for s in self.shapes if s.cell != cell)
        return Scene(rest + (Shape(old.shape, old.color, to),))

    def _require(self, cell: str) -> Shape:
        shape = self.at(cell)
        if shape is None:
            raise SceneError(f"no shape at {cell!r} in {describe(self)!r}")
        return shape


def cell_position(cell: str) -> tuple[int, int]:
    """Return (row, column) of `cell`, each in 0..2, row 0 at the top."""
    if cell not in CELLS:
        raise SceneError(f"unknown cell {cell!r}; expected one of {CELLS}")
    return divmod(CELLS.index(cell), 3)


def cell_at(row: int, col: int) -> str | None:
    """Return the cell at (row, column), or None off the grid."""
    if 0 <= row < 3 and 0 <= col < 3:
        return CELLS[3 * row + col]
    return None


def opposite(cell: str) -> str | None:
    """Return the cell mirrored through the center, or None for the center itself."""
    row, col = cell_position(cell)
    mirrored = cell_at(2 - row, 2 - col)
    return None if mirrored == cell else mirrored


def article(word: str) -> str:
    """Return "an" before a vowel sound ("an orange"), else "a"."""
    return "an" if word[0] in "aeiou" else "a"


def shape_phrase(shape: Shape, preposition: str = "at") -> str:
    """Return e.g. "a red circle at the top-left"."""
    return f"{article(shape.color)} {shape.color} {shape.shape} {preposition} the {shape.cell}"


def join_phrases(phrases: Sequence[str]) -> str:
    """Return phrases joined as "x", "x and y" or "x, y and z"."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def describe(scene: Scene) -> str:
    """Return the canonical caption: shapes in grid order, no final full stop.

    Example: "a red circle at the top-left, a green square at the center and a blue triangle at the bottom".
    """
    return join_phrases([shape_phrase(s) for s in scene.shapes])


def parse_description(text: str) -> Scene:
    """The scene a caption in `describe`'s words names, its inverse: "a red circle at the top-left and a blue
    square at the center." Reads "the" where `describe` writes "a"/"an" (a plan may conclude either way) and
    ignores a final full stop. Raises SceneError for any other text."""
    phrases = text.strip().removesuffix(".").replace(" and ", ", ").split(", ")
    shapes = []
    for phrase in phrases:
        words = phrase.split(" ")
        if len(words) != 6 or words[0] not in ("a", "an", "the") or words[3:5] != ["at", "the"]:
            raise SceneError(f"{text!r} is not a description of a scene ({phrase!r} is not 'a <color> <shape> "
                             f"at the <cell>')")
        shapes.append(Shape(words[2], words[1], words[5]))
    return Scene(tuple(shapes))


def same_scene_described(first: str, second: str) -> bool:
    """Whether two texts describe the same scene (`parse_description`); False when either describes none."""
    try:
        return parse_description(first) == parse_description(second)
    except SceneError:
        return False


def is_holdout_scene(scene: Scene) -> bool:
    """Return whether the scene is held out of training: it contains a purple triangle."""
    return any(s.shape == "triangle" and s.color == "purple" for s in scene.shapes)


def sample_scene(
    rng: random.Random,
    n_shapes: int | None = None,
    allow: Callable[[Scene], bool] | None = None,
    include: Iterable[Shape] = (),
    max_tries: int = 10_000,
) -> Scene:
    """Return a uniformly drawn scene with `n_shapes` shapes (1-3 at random when None).

    `include` lists shapes that must appear (their cells must differ); `allow` rejects draws it returns
    False for. Deterministic given the state of `rng`.
    """
    include = tuple(include)
    for _ in range(max_tries):
        n = rng.randint(max(1, len(include)), MAX_SHAPES) if n_shapes is None else n_shapes
        if not max(1, len(include)) <= n <= MAX_SHAPES:
            raise SceneError(f"cannot draw {n} shapes including {len(include)} fixed ones")
        taken = [s.cell for s in include]
        free = [c for c in CELLS if c not in taken]
        cells = rng.sample(free, n - len(include))
        shapes = include + tuple(Shape(rng.choice(SHAPES), rng.choice(COLORS), c) for c in cells)
        scene = Scene(shapes)
        if allow is None or allow(scene):
            return scene
    raise SceneError(f"no scene passed `allow` in {max_tries} draws")


def _cell_bounds(size: int) -> list[int]:
    """Pixel edges of the three grid bands: band k covers pixels whose centre lies in [k/3, (k+1)/3)."""
    return [int(np.ceil(k * size / 3 - 0.5)) for k in range(4)]


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Return the scene drawn as a size x size RGB picture on white; the same scene always gives the same pixels.

    Each shape fills a whole-pixel box of the same side in every cell, centred in its cell to the nearest
    pixel, so shapes are mirror-symmetric on the pixel grid. A pixel takes the colour of the shape containing
    its centre (no anti-aliasing): pixels hold only palette colours and white.
    """
    if size < 6:
        raise SceneError(f"render size must be at least 6 pixels, got {size}")
    canvas = np.full((size, size, 3), 255, dtype=np.uint8)
    side = max(1, round(SHAPE_FRACTION * size / 3))
    offsets = np.arange(side) + 0.5 - side / 2  # pixel centres relative to the box centre
    dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
    half = side / 2
    masks = {
        "circle": dx * dx + dy * dy <= half * half,
        "square": np.ones((side, side), dtype=bool),
        # Upward triangle: apex at the top centre, base along the bottom edge.
        "triangle": np.abs(dx) <= (dy + half) / 2,
    }
    for s in scene.shapes:
        row, col = cell_position(s.cell)
        top = round((row + 0.5) * size / 3 - half)
        left = round((col + 0.5) * size / 3 - half)
        canvas[top: top + side, left: left + side][masks[s.shape]] = PALETTE[s.color]
    return Image.fromarray(canvas, "RGB")


def _hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees [0, 360) of float RGB values in [0, 1] along the last axis."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    chroma = np.where(hi - lo > 0, hi - lo, 1.0)
    hue = np.where(hi == r, ((g - b) / chroma) % 6, np.where(hi == g, (b - r) / chroma + 2, (r - g) / chroma + 4))
    return hue * 60.0


_COLOR_HUES = _hue_degrees(np.array([PALETTE[c] for c in COLORS], dtype=np.float64) / 255.0)


def _nearest_color_index(hue: np.ndarray) -> np.ndarray:
    """Index into COLORS of the palette hue nearest to each hue (on the colour wheel)."""
    diff = np.abs(hue[..., None] - _COLOR_HUES)
    return np.minimum(diff, 360.0 - diff).argmin(axis=-1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of `mask`, so stray coloured specks do not distort the shape."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_size, label = 0, 0, 0
    height, width = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0] = label
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = label
                        stack.append((ny, nx))
        if size > best_size:
            best_label, best_size = label, size
    return labels == best_label if best_size else np.zeros_like(mask)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """`mask` grown by `steps` pixels in the four axis directions."""
    for _ in range(steps):
        padded = np.pad(mask, 1)
        mask = (padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1]
                | padded[1:-1, :-2] | padded[1:-1, 2:])
    return mask


def _classify_ink(weights: np.ndarray) -> str:
    """Name the shape whose ink (non-negative weights over a cell) has these moments."""
    ys, xs = np.indices(weights.shape, dtype=np.float64)
    total = weights.sum()
    dy = ys - (weights * ys).sum() / total
    dx = xs - (weights * xs).sum() / total
    var_y = (weights * dy**2).sum() / total
    var_x = (weights * dx**2).sum() / total
    if min(var_x, var_y) <= 0.0:  # a one-pixel bar has no shape worth the name; call it a flat square
        return "square"
    skew_y = (weights * dy**3).sum() / total / var_y**1.5
    if skew_y <= TRIANGLE_MAX_SKEW:
        return "triangle"
    cross = (weights * dx**2 * dy**2).sum() / total / (var_x * var_y)
    return "square" if cross >= SQUARE_MIN_CROSS else "circle"


def read_shapes(image: Image.Image) -> tuple[Shape, ...]:
    """Return every shape found in the picture, one per grid cell at most, in grid order (possibly none)."""
    if not isinstance(image, Image.Image):
        raise SceneReadError(f"expected a PIL image, got {type(image).__name__}")
    if min(image.size) < 6:
        raise SceneReadError(f"picture of {image.size} is too small to hold a 3x3 grid")
    image = image.convert("RGB")
    factor = -(-max(image.size) // READ_MAX_SIDE)
    if factor > 1:
        image = image.reduce(factor)
    rgb = np.asarray(image, dtype=np.float64) / 255.0
    chroma = rgb.max(axis=-1) - rgb.min(axis=-1)
    # Every palette colour has a zero channel, so 1 - min(channel) is the shape's coverage of a pixel, even
    # where it is blended with white; JPEG also keeps it sharper than chroma, which it subsamples.
    ink = 1.0 - rgb.min(axis=-1)
    color_index = _nearest_color_index(_hue_degrees(rgb))
    ys, xs = _cell_bounds(rgb.shape[0]), _cell_bounds(rgb.shape[1])
    found = []
    for k, cell in enumerate(CELLS):
        row, col = divmod(k, 3)
        window = (slice(ys[row], ys[row + 1]), slice(xs[col], xs[col + 1]))
        blob = _largest_component(chroma[window] >= MIN_CHROMA)
        if blob.sum() < MIN_COVERAGE * blob.size:
            continue
        # Chroma-weighted vote: the saturated interior outvotes hue errors at blurred or compressed edges.
        votes = np.bincount(color_index[window][blob], weights=chroma[window][blob], minlength=len(COLORS))
        # Ink scaled from the cell's background (its border pixels) to the blob's typical interior.
        cell_ink = ink[window]
        background = np.median(np.concatenate([cell_ink[0], cell_ink[-1], cell_ink[:, 0], cell_ink[:, -1]]))
        interior = np.percentile(cell_ink[blob], 90)
        weights = np.clip((cell_ink - background) / max(interior - background, 1e-6), 0.0, 1.0)
        weights *= _dilate(blob, BLOB_MARGIN)
        found.append(Shape(_classify_ink(weights), COLORS[int(votes.argmax())], cell))
    return tuple(found)


def read_scene(image: Image.Image) -> Scene:
    """Return the scene a picture shows; raises SceneReadError when it shows no shape or more than three."""
    shapes = read_shapes(image)
    if not 1 <= len(shapes) <= MAX_SHAPES:
        raise SceneReadError(f"picture shows {len(shapes)} shapes; a scene holds 1-{MAX_SHAPES}")
    return Scene(shapes)
