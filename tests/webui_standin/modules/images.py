"""Mirrors the parts of modules/images.py used here: read() (open + EXIF transpose), image_grid(), resize_image()."""
import math

from PIL import Image, ImageOps


def fix_image(image: Image.Image):
    if image is None:
        return None
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:
        pass
    return image


def read(fp, **kwargs):
    image = Image.open(fp, **kwargs)
    image = fix_image(image)
    return image


def image_grid(imgs, batch_size=1, rows=None):
    if rows is None:
        rows = math.floor(math.sqrt(len(imgs)))
        while len(imgs) % rows != 0:
            rows -= 1
    cols = math.ceil(len(imgs) / rows)
    w, h = imgs[0].size
    grid = Image.new('RGB', size=(cols * w, rows * h), color='black')
    for i, img in enumerate(imgs):
        grid.paste(img, box=(i % cols * w, i // cols * h))
    return grid


def resize_image(resize_mode, im, width, height, upscaler_name=None):
    """Only resize_mode 0 ("Just resize") is reproduced."""
    return im.resize((width, height), resample=Image.LANCZOS)
