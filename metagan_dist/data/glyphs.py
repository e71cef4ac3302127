"""The embedded `glyphs` pool: one task per character, rendered from matplotlib's bundled fonts.

An Omniglot-like pool that needs no download. Characters are Unicode letters and digits without
a canonical decomposition (no accented variants); a font "covers" a character when its cmap maps
it and the rendering has ink and differs from the font's missing-glyph box. Characters covered
by fewer than MIN_FONTS fonts are left out, and so are homoglyphs (a character whose DejaVu Sans
rendering equals an earlier one's, e.g. Greek Alpha after Latin A). Each task has
IMAGES_PER_TASK 32x32 grayscale images (white on black), cycling over its covering fonts with
seeded random affine jitter and stroke width. The meta-test split is the whole Georgian script.
Tasks are written in a seeded random order, so every shard mixes scripts (in code point order a
shard would hold one script's range).
"""

from __future__ import annotations

import os
import string
import unicodedata
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from metagan_dist.data.manifest import MANIFEST_NAME, Manifest, PoolError
from metagan_dist.data.writer import Task, TaskSource, WriteSummary, write_pool

GLYPHS_VERSION = 2  # bump when the pool changes: the cache folder is per version, so a new one is built
# Versions: 1 code point order; 2 the same tasks in a seeded random order.
IMAGE_SIZE = 32
IMAGES_PER_TASK = 32
MIN_FONTS = 8
TEST_SCRIPT = "GEORGIAN"  # meta-test: every character whose Unicode name starts with this
SHARD_TASKS = 24  # tasks per shard: 28 train and 5 test shards
LETTERS_AND_DIGITS = ("Lu", "Ll", "Lt", "Lo", "Nd")
# Computer Modern uses TeX's OT1 encoding: only ASCII letters and digits sit at their Unicode code points.
ASCII_ONLY_FONTS = ("cmr10.ttf", "cmb10.ttf", "cmti10.ttf", "cmss10.ttf", "cmtt10.ttf")
TEXT_FONT_PREFIXES = ("DejaVu", "STIXGeneral")  # left out: LastResort, STIX size/non-Unicode, TeX symbol fonts
REFERENCE_FONT = "DejaVuSans.ttf"
RENDER_CANVAS, RENDER_SIZE, GLYPH_BOX, WORK_SIZE = 128, 44, 52, 64  # pixels; WORK_SIZE = 2 x IMAGE_SIZE


def default_data_root() -> Path:
    """$METAGAN_DATA, or ~/.cache/metagan_dist when unset."""
    return Path(os.environ.get("METAGAN_DATA") or Path.home() / ".cache" / "metagan_dist")


def font_folder() -> Path:
    """The TrueType folder that ships with matplotlib."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def glyph_fonts() -> list[str]:
    """File names of the fonts the pool renders with, sorted."""
    names = sorted(path.name for path in font_folder().glob("*.ttf"))
    return [name for name in names if name.startswith(TEXT_FONT_PREFIXES) or name in ASCII_ONLY_FONTS]


@cache
def _font(name: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_folder() / name), RENDER_SIZE)


def _draw(font: str, char: str, stroke: int = 0) -> Image.Image:
    """The character's ink cropped from a large canvas (an empty image when it has none)."""
    canvas = Image.new("L", (RENDER_CANVAS, RENDER_CANVAS), 0)
    centre = (RENDER_CANVAS // 2, RENDER_CANVAS // 2)
    ImageDraw.Draw(canvas).text(
        centre, char, font=_font(font), fill=255, anchor="mm", stroke_width=stroke, stroke_fill=255
    )
    box = canvas.getbbox()
    return canvas.crop(box) if box else Image.new("L", (0, 0))


def _covers(font: str, char: str, cmap: dict[int, str], missing_glyph: bytes) -> bool:
    if ord(char) not in cmap or (font in ASCII_ONLY_FONTS and char not in string.ascii_letters + string.digits):
        return False
    ink = _draw(font, char)
    return ink.size != (0, 0) and ink.tobytes() != missing_glyph


def select_characters() -> list[tuple[str, list[str]]]:
    """(character, covering fonts) for every character of the pool, in code point order."""
    from fontTools.ttLib import TTFont  # ships with matplotlib

    fonts = glyph_fonts()
    cmaps = {font: TTFont(font_folder() / font, lazy=True).getBestCmap() for font in fonts}
    candidates = sorted({code for cmap in cmaps.values() for code in cmap})
    selected, renderings = [], set()
    for code in candidates:
        char = chr(code)
        if unicodedata.category(char) not in LETTERS_AND_DIGITS or unicodedata.decomposition(char):
            continue
        covering = [font for font in fonts if _covers(font, char, cmaps[font], _missing_glyph(font))]
        if len(covering) < MIN_FONTS:
            continue
        reference = _draw(REFERENCE_FONT if REFERENCE_FONT in covering else covering[0], char)
        signature = (reference.size, reference.tobytes())
        if signature in renderings:  # a homoglyph of an earlier character
            continue
        renderings.add(signature)
        selected.append((char, covering))
    return selected


@cache
def _missing_glyph(font: str) -> bytes:
    return _draw(font, "\U0010fffd").tobytes()  # a private-use code point no font maps


def render_glyph(font: str, char: str, rng: np.random.Generator) -> np.ndarray:
    """One 32x32 uint8 image of `char` in `font` with random stroke width, rotation, scale, shear, shift."""
    from torchvision.transforms.functional import InterpolationMode, affine

    ink = _draw(font, char, stroke=int(rng.integers(0, 3)))
    if max(ink.size) > GLYPH_BOX:
        ratio = GLYPH_BOX / max(ink.size)
        ink = ink.resize(
            (max(1, round(ink.width * ratio)), max(1, round(ink.height * ratio))), Image.Resampling.LANCZOS
        )
    work = Image.new("L", (WORK_SIZE, WORK_SIZE), 0)
    work.paste(ink, ((WORK_SIZE - ink.width) // 2, (WORK_SIZE - ink.height) // 2))
    jittered = affine(
        work,
        angle=float(rng.uniform(-12, 12)),
        translate=[int(rng.integers(-5, 6)), int(rng.integers(-5, 6))],
        scale=float(rng.uniform(0.8, 1.05)),
        shear=[float(rng.uniform(-12, 12))],
        interpolation=InterpolationMode.BILINEAR,
        fill=0,
    )
    return np.asarray(jittered.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS), dtype=np.uint8)


def glyph_tasks(seed: int, characters: list[tuple[str, list[str]]]) -> Iterator[Task]:
    """One task per character: IMAGES_PER_TASK renderings cycling over its fonts, seeded per character."""
    for char, fonts in characters:
        rng = np.random.default_rng([seed, ord(char)])
        images = np.stack([render_glyph(fonts[i % len(fonts)], char, rng) for i in range(IMAGES_PER_TASK)])
        name = unicodedata.name(char)
        yield Task(
            key=f"u{ord(char):04x}",
            images=images[:, None],
            split="test" if name.startswith(TEST_SCRIPT) else "train",
            name=name,
            info={"char": char, "fonts": fonts},
        )


def shuffled(characters: list[tuple[str, list[str]]], seed: int) -> list[tuple[str, list[str]]]:
    """The characters in a random order drawn from `seed`: shards then mix scripts."""
    order = np.random.default_rng([seed, GLYPHS_VERSION]).permutation(len(characters))
    return [characters[i] for i in order]


def glyph_source(seed: int = 0, characters: list[tuple[str, list[str]]] | None = None) -> TaskSource:
    """The glyphs pool's tasks (all selected characters unless given) in a seeded random order, rendered lazily."""
    import matplotlib
    import PIL

    characters = shuffled(select_characters() if characters is None else characters, seed)
    info = {
        "kind": "glyphs",
        "seed": seed,
        "glyphs_version": GLYPHS_VERSION,
        "fonts": glyph_fonts(),
        "min_fonts": MIN_FONTS,
        "images_per_task": IMAGES_PER_TASK,
        "test_split": f"every character whose Unicode name starts with {TEST_SCRIPT}",
        "order": "seeded random (shards mix scripts)",
        "matplotlib": matplotlib.__version__,
        "pillow": PIL.__version__,
        "freetype": ImageFont.core.freetype2_version,
    }
    return TaskSource(glyph_tasks(seed, characters), len(characters), (1, IMAGE_SIZE, IMAGE_SIZE), info)


def build_glyphs_pool(out: str | Path, seed: int = 0, *, command: str, overwrite: bool = False) -> WriteSummary:
    """Render the glyphs pool into `out`: same seed, same bytes (for given matplotlib, Pillow, FreeType)."""
    return write_pool(glyph_source(seed), out, command=command, maxcount=SHARD_TASKS, overwrite=overwrite)


def glyphs_pool_path(root: str | Path | None = None, seed: int = 0) -> Path:
    """Where the glyphs pool of `seed` lives: root/glyphs-v<GLYPHS_VERSION> (seed 0), or with -seed<seed>.

    One folder per version: a new version is built beside the old one, never over it, so a job still
    reading the old pool keeps its files.
    """
    root = default_data_root() if root is None else Path(root)
    return root / (f"glyphs-v{GLYPHS_VERSION}" + ("" if seed == 0 else f"-seed{seed}"))


def ensure_glyphs_pool(root: str | Path | None = None, seed: int = 0) -> Path:
    """The glyphs pool folder, built on first use under `root` (default $METAGAN_DATA); safe across processes.

    One process builds while the others wait on a file lock; the build lands by an atomic rename.
    """
    from filelock import FileLock

    path = glyphs_pool_path(root, seed)
    if not (path / MANIFEST_NAME).is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path.parent / f".{path.name}.lock")):
            if not (path / MANIFEST_NAME).is_file():
                build_glyphs_pool(path, seed, command=f"metagan_dist.data.ensure_glyphs_pool(seed={seed})")
    source = Manifest.read(path).source
    if source.get("kind") != "glyphs" or source.get("glyphs_version") != GLYPHS_VERSION or source.get("seed") != seed:
        raise PoolError(
            f"the cached pool {path} was built as {source.get('kind')!r} version {source.get('glyphs_version')} "
            f"seed {source.get('seed')}; this code builds glyphs version {GLYPHS_VERSION} seed {seed}: "
            f"delete {path} to rebuild it"
        )
    return path
