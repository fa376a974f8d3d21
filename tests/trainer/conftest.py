"""Tiny image-caption datasets for the trainer's data tests: one JSONL + image folder and two
img2dataset-style WebDataset shards, each with a corrupt image, an empty caption, an RGBA
and a grayscale image among ordinary ones."""
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from PIL import Image


def asymmetric_image(width: int = 48, height: int = 40) -> Image.Image:
    """RGB image whose left and right halves differ everywhere: red ramps up left to right,
    green top to bottom, and a blue block sits in the top-left corner."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    blue = np.zeros((height, width))
    blue[: height // 3, : width // 3] = 255
    return Image.fromarray(np.stack([x, y, blue], axis=2).astype(np.uint8), "RGB")


def rgba_cutout(size: int = 40) -> Image.Image:
    """Left half fully transparent (RGB underneath is black), right half opaque red."""
    a = np.zeros((size, size, 4), np.uint8)
    a[:, size // 2:] = (255, 0, 0, 255)
    return Image.fromarray(a, "RGBA")


def grayscale_image(width: int = 36, height: int = 50) -> Image.Image:
    return Image.fromarray(np.linspace(0, 255, width * height).reshape(height, width).astype(np.uint8), "L")


def plain_image(index: int, width: int = 30, height: int = 20) -> Image.Image:
    rng = np.random.default_rng(index)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


CORRUPT_BYTES = b"this is not an image file " * 8


@dataclass
class TinyJsonl:
    jsonl: Path
    image_root: Path
    rows: List[Dict]            # the JSON objects written (None for the malformed line)
    valid_rows: List[int]       # row numbers that yield a sample
    skips_per_pass: Dict[str, int]  # skip counts when every row is visited once
    images: Dict[str, Image.Image] = field(default_factory=dict)  # file_name -> the image written


@dataclass
class TinyShards:
    pattern: str
    valid_keys: List[str]       # "shard/key" of samples that yield a sample
    skips_per_pass: Dict[str, int]
    captions: Dict[str, str]    # "shard/key" -> caption
    queries: Dict[str, str]     # "shard/key" -> expected query


@pytest.fixture(scope="session")
def tiny_jsonl(tmp_path_factory) -> TinyJsonl:
    """14 rows; bad rows (3, 5, 7, 9, 11) are each followed by a good one, so one pass over
    the rows counts each bad row exactly once. A blank line sits between rows 4 and 5."""
    root = tmp_path_factory.mktemp("jsonl_data")
    images = root / "images"
    images.mkdir()
    written: Dict[str, Image.Image] = {}

    def save(name: str, image: Image.Image, fmt: str) -> str:
        image.save(images / name, format=fmt)
        written[name] = image
        return name

    truncated = encode(plain_image(99, 64, 64), "JPEG")
    rows = [
        {"file_name": save("asym.png", asymmetric_image(), "PNG"), "text": "an asymmetric picture",
         "query": "the blue block"},
        {"file_name": save("rgba.png", rgba_cutout(), "PNG"), "text": "a cut-out"},
        {"file_name": save("gray.jpg", grayscale_image(), "JPEG"), "text": "a grayscale photo"},
        {"file_name": "corrupt.jpg", "text": "a broken file"},
        {"file_name": save("plain_0.png", plain_image(0), "PNG"), "text": "picture 0"},
        {"file_name": save("blank.png", plain_image(10), "PNG"), "text": "   "},
        {"file_name": save("plain_1.png", plain_image(1), "PNG"), "text": "picture 1", "query": ""},
        {"file_name": "missing.png", "text": "gone"},
        {"file_name": save("plain_2.png", plain_image(2), "PNG"), "text": "picture 2"},
        None,  # malformed JSON line
        {"file_name": save("plain_3.png", plain_image(3), "PNG"), "text": "picture 3"},
        {"file_name": "truncated.jpg", "text": "half a jpeg"},
        {"file_name": save("plain_4.png", plain_image(4), "PNG"), "text": "picture 4"},
        {"file_name": save("plain_5.png", plain_image(5), "PNG"), "text": "picture 5"},
    ]
    (images / "corrupt.jpg").write_bytes(CORRUPT_BYTES)
    (images / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    lines = [json.dumps(r) if r is not None else '{"file_name": "plain_0.png", "text": ' for r in rows]
    lines.insert(5, "")
    jsonl = root / "train.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    return TinyJsonl(
        jsonl=jsonl, image_root=images, rows=rows, valid_rows=[0, 1, 2, 4, 6, 8, 10, 12, 13],
        skips_per_pass={"corrupt_image": 2, "empty_caption": 1, "missing_file": 1, "bad_row": 1},
        images=written)


def write_shard(path: Path, samples: List[Dict[str, bytes]]) -> None:
    """img2dataset layout: members key.ext in key order."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> TinyShards:
    """Shards 00000.tar and 00001.tar with 10 samples, 7 usable."""
    root = tmp_path_factory.mktemp("wds_data")

    def meta(caption=None, **extra) -> bytes:
        record = {"url": "http://example.invalid/x.jpg", "status": "success", **extra}
        if caption is not None:
            record["caption"] = caption
        return json.dumps(record).encode()

    shard0 = [
        {"__key__": "000000000", "jpg": encode(asymmetric_image(), "JPEG"), "txt": b"an asymmetric picture",
         "json": meta("an asymmetric picture", query="the blue block")},
        {"__key__": "000000001", "png": encode(rgba_cutout(), "PNG"), "txt": b"a cut-out", "json": meta()},
        {"__key__": "000000002", "jpg": CORRUPT_BYTES, "txt": b"a broken file", "json": meta()},
        {"__key__": "000000003", "jpg": encode(plain_image(3), "JPEG"), "txt": b"  ", "json": meta()},
        {"__key__": "000000004", "jpg": encode(plain_image(4), "JPEG"), "json": meta("caption from json")},
    ]
    shard1 = [
        {"__key__": "000010000", "jpg": encode(grayscale_image(), "JPEG"), "txt": b"a grayscale photo"},
        {"__key__": "000010001", "txt": b"no image here", "json": meta()},
        {"__key__": "000010002", "jpg": encode(plain_image(5), "JPEG"), "txt": b"picture 5"},
        {"__key__": "000010003", "webp": encode(plain_image(6), "WEBP"), "txt": b"picture 6"},
        {"__key__": "000010004", "jpg": encode(plain_image(7), "JPEG"), "txt": b"picture 7"},
    ]
    write_shard(root / "00000.tar", shard0)
    write_shard(root / "00001.tar", shard1)
    captions = {}
    for shard, samples in (("00000.tar", shard0), ("00001.tar", shard1)):
        for s in samples:
            text = s["txt"].decode() if "txt" in s else json.loads(s["json"])["caption"]
            captions[f"{root / shard}/{s['__key__']}"] = text.strip()
    valid = [k for k in captions if not k.endswith(("000000002", "000000003", "000010001"))]
    queries = {k: captions[k] for k in valid}
    queries[f"{root / '00000.tar'}/000000000"] = "the blue block"
    return TinyShards(
        pattern=str(root / "{00000..00001}.tar"), valid_keys=valid,
        skips_per_pass={"corrupt_image": 1, "empty_caption": 1, "missing_image": 1},
        captions={k: captions[k] for k in valid}, queries=queries)
