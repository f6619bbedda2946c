"""Pictures: everything about one picture, from the file to the pixels the processor sees.

A dataset row names its pictures (data.py); this module opens, checks and converts each of them,
and scales it into the pixel budget. It reads top to bottom in four parts:

    1. Modes          any PIL mode -> 8-bit RGB (to_rgb), or why not (picture_mode_problem)
    2. Opening        the size guard (--max-image-pixels), EXIF orientation, frames: load_picture
    3. The check      what validation runs on every picture before training: check_picture,
                      PictureChecker (each file once), MAX_ASPECT_RATIO
    4. The budget     budget_size, budget_resize (--min-pixels, --max-pixels)

It knows nothing of rows, prompts or models, and imports no deep-learning library.
"""
from __future__ import annotations

import contextlib
import io
import math
import threading
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


# =============================================================================================
# 1. Modes: from any PIL mode to 8-bit RGB
# =============================================================================================
# How each PIL mode becomes 8-bit RGB (to_rgb), and which modes are refused (picture_mode_problem,
# which validation calls, so that load_picture never meets a picture it cannot map):
#   RGB, L, 1, P, RGBX, CMYK, YCbCr, LAB, HSV   PIL's convert("RGB") (1: 0/1 -> 0/255; P: its
#       palette; CMYK, YCbCr, LAB, HSV: PIL's colour conversions)
#   16-bit grey (I;16, I;16L, I;16B, I;16N)   the high byte, v >> 8 = floor(v / 256), so
#       0..65535 -> 0..255 and 32768 -> 128 (the reduction of libpng's png_set_strip_16). PIL's
#       own convert clips at 255 instead, which turns a 16-bit picture almost entirely white.
#   F (32-bit float)   values all in [0, 1]: round(255 v) (the float convention of numpy,
#       scikit-image, torchvision); otherwise values all in [0, 255]: round(v). Anything else
#       (negative, over 255, NaN, inf) is refused: nothing says where white is. [0, 1] wins when
#       both fit, as in the [0, 255] reading such a picture would be black to the eye.
#   I (32-bit integer)   refused: white may be 255, 65535 or 2^31 - 1, and the file does not say.
#       Except from a PNG file: Pillow before 10.3 opens 16-bit grey PNGs as mode I, and a PNG
#       holds at most 16 bits, so that is 16-bit grey (the rule above).
#   transparency (RGBA, LA, PA, RGBa, La, and any mode with a "transparency" entry: P with a
#       transparent index, L/RGB/16-bit grey with a colour key)   composited over WHITE. Qwen's
#       processor does exactly this itself (transformers' image_transforms.convert_to_rgb,
#       do_convert_rgb=True), so a picture means the same whether it reaches the model through us
#       or directly; merely dropping the alpha channel would show whatever colour the
#       transparent pixels happen to store (often black), which is arbitrary.
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N")
CONVERTIBLE_MODES = ("RGB", "L", "1", "P", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def _is_16bit_png(image: Image.Image) -> bool:
    """A mode-I picture read from a PNG file (Pillow < 10.3's mode for 16-bit grey PNGs)."""
    return image.mode == "I" and getattr(image, "format", None) == "PNG"


def picture_mode_problem(image: Image.Image) -> str | None:
    """Why to_rgb cannot map this picture to 8-bit RGB (naming its mode), or None when it can.

    Reads only the mode, except for a float picture (mode F), whose pixels are decoded to find
    their range - such pictures are rare, so validation stays a header read for the rest."""
    mode = image.mode
    if (mode in CONVERTIBLE_MODES or mode in ALPHA_MODES or mode in SIXTEEN_BIT_GREY
            or _is_16bit_png(image)):
        return None
    if mode == "F":
        values = np.asarray(image)
        if not np.isfinite(values).all():
            return "a float picture (mode F) with NaN or infinite values"
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 255:
            return (f"a float picture (mode F) with values in [{low:g}, {high:g}]: only values "
                    "in [0, 1] or [0, 255] map to 8-bit RGB unambiguously")
        return None
    if mode == "I":
        return ("a 32-bit integer picture (mode I): its white level (255? 65535? 2^31 - 1?) is "
                "not defined; save it as an 8- or 16-bit picture")
    return f"a picture of mode {mode}, which cannot be mapped to RGB"


def to_rgb(image: Image.Image) -> Image.Image:
    """The picture as 8-bit RGB, by the rule of its mode (the table above); ValueError, naming
    the mode, for a picture that picture_mode_problem refuses.

    >>> to_rgb(Image.new("I;16", (1, 1), 32768)).getpixel((0, 0))       # 32768 >> 8 = 128
    (128, 128, 128)
    >>> to_rgb(Image.new("RGBA", (1, 1), (255, 0, 0, 128))).getpixel((0, 0))   # over white
    (255, 127, 127)
    """
    if (why := picture_mode_problem(image)):
        raise ValueError(why)
    transparency = image.info.get("transparency")
    if image.mode in SIXTEEN_BIT_GREY or _is_16bit_png(image):
        values = np.asarray(image)                                   # [H, W] uint16, any byte order
        grey = (values >> 8).astype(np.uint8)                        # [H, W] the high byte
        alpha = np.where(values == transparency, 0, 255).astype(np.uint8) \
            if isinstance(transparency, int) else np.full_like(grey, 255)
        image = Image.fromarray(np.stack([grey, grey, grey, alpha], axis=-1), "RGBA")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)                 # [H, W]
        scale = 255.0 if values.max() <= 1 else 1.0
        image = Image.fromarray(np.rint(values * scale).astype(np.uint8), "L")
    if image.mode == "La":      # premultiplied grey: PIL converts it to RGBA only through LA
        image = image.convert("LA")
    if image.mode in ALPHA_MODES or transparency is not None:
        rgba = image.convert("RGBA")     # applies a palette's or a colour key's transparency
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


# =============================================================================================
# 2. Opening a picture: a size guard, its EXIF orientation, one frame
# =============================================================================================
# The largest picture a row may have, in pixels (--max-image-pixels), read from the file header
# before a pixel is decoded. A 12,000 x 12,000 picture costs 432 MB as RGB, once per rollout
# that loads it, and budget_resize would shrink it to ~1M pixels anyway; a larger one is more
# likely a decompression bomb or a mistake than a picture worth training on.
MAX_IMAGE_PIXELS = 50_000_000

# PIL has a guard of its own: Image.open warns when a picture has more than Image.MAX_IMAGE_PIXELS
# pixels (89.5M by default) and raises DecompressionBombError above twice that, and some formats
# check again while decoding. Its message names neither the row nor an option, and its limit is
# not ours: a 144M-pixel picture would print PIL's warning before our reason, a 400M one would be
# reported as "not a readable image", and a --max-image-pixels above 89.5M could never be used.
# Catching PIL's warning and error would keep the last two problems (the error does not say the
# size). So while one of OUR opens runs, PIL's guard is lifted and ours is applied to the header
# size in its place; PIL's setting is restored as soon as that picture is done, under a lock (two
# threads restoring each other's saved value could otherwise leave the guard off), and every
# other Image.open in the process keeps PIL's protection.
_PIL_GUARD_LOCK = threading.Lock()


class _PictureTooLarge(ValueError):
    """A picture over the --max-image-pixels guard; the message is the row's reason."""


def _size_problem(size: tuple[int, int], max_image_pixels: int) -> str | None:
    width, height = size
    if width * height > max_image_pixels:
        return (f"picture of {width}x{height} px ({width * height:,} pixels) is over "
                f"--max-image-pixels {max_image_pixels:,}")
    return None


@contextlib.contextmanager
def _open_picture(ref, max_image_pixels: int):
    """Image.open(ref) for the `with` block, with our size guard in place of PIL's (see above):
    _PictureTooLarge is raised from the header size, before any pixel is decoded."""
    with _PIL_GUARD_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as im:
                if (why := _size_problem(im.size, max_image_pixels)):
                    raise _PictureTooLarge(why)
                yield im
        finally:
            Image.MAX_IMAGE_PIXELS = saved


# EXIF orientations that turn a picture by 90 degrees (5-8): a viewer shows it with width and
# height swapped. Phones store photos this way; load_picture turns them as a viewer does.
_TURNED = (5, 6, 7, 8)


def _shown_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as a viewer shows the picture, its EXIF orientation applied."""
    width, height = image.size
    orientation = image.getexif().get(0x0112, 1)
    return (height, width) if orientation in _TURNED else (width, height)


def _upright(image: Image.Image) -> Image.Image:
    """The picture turned as its EXIF orientation says (itself when it says nothing)."""
    if image.getexif().get(0x0112, 1) in (0, 1):
        return image
    return ImageOps.exif_transpose(image)


def _frames_problem(image: Image.Image) -> str | None:
    """An animated GIF or a multi-page TIFF is refused: which frame would be the question's
    picture is not ours to guess (taking the first one silently hid the rest)."""
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        return (f"a picture of {frames} frames (an animation or a multi-page file): save the "
                "frame the question is about as a picture of its own")
    return None


def load_picture(ref, max_image_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """One picture - a path, encoded bytes or a PIL image - as 8-bit RGB (to_rgb), turned as
    a viewer shows it (a phone photo is stored sideways). ValueError, saying why, for a picture
    that validation would have refused; the size guard applies to files and bytes only."""
    if isinstance(ref, Image.Image):
        return to_rgb(_upright(ref))
    with _open_picture(ref, max_image_pixels) as im:   # closes the file: runs open many
        if (why := _frames_problem(im)):
            raise ValueError(why)
        return to_rgb(_upright(im))


# =============================================================================================
# 3. The check before training
# =============================================================================================
# Qwen2.5-VL's processor refuses pictures whose longer side is over 200 times the shorter one.
MAX_ASPECT_RATIO = 200


def check_picture(ref, max_image_pixels: int = MAX_IMAGE_PIXELS,
                  ) -> tuple[tuple[int, int] | None, str | None]:
    """((width, height), None) for a picture that load_picture can use, else (None, reason).

    The size guard reads the header only. PIL's verify() then checks the file's structure
    (headers, chunk checksums), and the picture is decoded in full: a file cut short (a JPEG
    whose last bytes are missing) passes verify(), and would otherwise fail only when a training
    step draws it. Each file is decoded once (PictureChecker), and the pixels let go at once."""
    if isinstance(ref, Image.Image):
        size = ref.size
        why = _size_problem(size, max_image_pixels) or picture_mode_problem(ref)
    else:
        name = "picture bytes" if isinstance(ref, bytes) else str(ref)
        if isinstance(ref, Path) and not ref.is_file():
            return None, f"image not found: {ref}"
        try:
            with _open_picture(ref, max_image_pixels) as im:
                mode = im.mode
                if mode != "F":         # a float picture is decoded below, which checks it fully
                    im.verify()         # (verify must come straight after opening)
            with _open_picture(ref, max_image_pixels) as im:
                size = _shown_size(im)
                why = picture_mode_problem(im) or _frames_problem(im)
                if not why:
                    # every pixel: raises on a truncated or damaged stream. A JPEG is decoded at
                    # 1/8 scale (draft), which reads the whole stream at a fraction of the cost
                    if im.format == "JPEG":
                        im.draft(im.mode, (1, 1))
                    im.load()
        except _PictureTooLarge as err:
            return None, str(err)
        except Exception as err:  # PIL raises many types (UnidentifiedImageError, OSError, ...)
            return None, f"not a readable image: {name} ({type(err).__name__}: {err})"
    if why:
        return None, why
    if max(size) > MAX_ASPECT_RATIO * max(min(size), 1):
        return None, (f"picture of {size[0]}x{size[1]} px: an aspect ratio over "
                      f"{MAX_ASPECT_RATIO}, which Qwen2.5-VL's processor refuses")
    return size, None


class PictureChecker:
    """Checks pictures, each file only once (datasets often reuse a picture)."""

    def __init__(self, max_image_pixels: int = MAX_IMAGE_PIXELS):
        self.max_image_pixels = max_image_pixels
        self.seen: dict[Path, tuple] = {}

    def __call__(self, refs: list) -> tuple[list, list[str]]:
        sizes, reasons = [], []
        for ref in refs:
            if isinstance(ref, Path):
                if ref not in self.seen:
                    self.seen[ref] = check_picture(ref, self.max_image_pixels)
                size, why = self.seen[ref]
            else:
                size, why = check_picture(ref, self.max_image_pixels)
            sizes.append(size)
            if why:
                reasons.append(why)
        return sizes, reasons


# =============================================================================================
# 4. The pixel budget
# =============================================================================================

def budget_size(width: int, height: int, min_pixels: int | None,
                max_pixels: int | None) -> tuple[int, int]:
    """The (width, height) that budget_resize gives a picture of this size (see there).

    >>> budget_size(2000, 1000, 200_704, 1_003_520), budget_size(112, 112, 200_704, 1_003_520)
    ((1416, 708), (448, 448))
    >>> budget_size(640, 480, 200_704, 1_003_520)    # inside the budget: unchanged
    (640, 480)
    """
    for limit, too_far in ((max_pixels, lambda a: a > max_pixels),
                           (min_pixels, lambda a: a < min_pixels)):
        if limit and too_far(width * height):
            f = math.sqrt(limit / (width * height))
            width, height = max(1, int(width * f)), max(1, int(height * f))
    return width, height


def budget_resize(image: Image.Image, min_pixels: int | None, max_pixels: int | None,
                  ) -> Image.Image:
    """Scale a RAW picture, keeping its aspect ratio, so that its area lies in the pixel budget.

    The official recipe masks the raw picture first (14 x 14-pixel squares of it blacked out),
    then does this to the original and to its masked copy alike, before the processor's own
    resize: so both branches of PAPO (original and masked) see the same picture size and
    therefore the same image-token grid, and a large picture cannot blow up the prompt
    (Qwen2.5-VL's processor alone allows 12.8M pixels: 16,384 tokens). With area A >
    max_pixels, the factor is f = sqrt(max_pixels / A) and the new size (int(W f), int(H f));
    then, with area < min_pixels, the same with min_pixels (upscaling). int() rounds down, so
    the result can fall a few pixels short of min_pixels, as in the official code. Resampling:
    bicubic (PIL's default for Image.resize). None disables that side of the budget; a picture
    already inside the budget is returned as it is.
    """
    size = budget_size(image.width, image.height, min_pixels, max_pixels)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)
