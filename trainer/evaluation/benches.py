"""Benches: which subjects to generate, with which prompts, scored against which references.

Two formats, both read into the same ``Bench``:

- **DreamBench** in its published layout (google/dreambooth ``dataset/``): one folder of
  photos per subject and ``prompts_and_classes.txt`` with the subject classes and the 25
  object / 25 live-subject prompt templates. SSR-Encoder needs no unique token, so the
  class noun stands in for "{0} {1}" ("a sks dog in the snow" -> "a dog in the snow").
- **Multi-subject JSONL** (ours; docs/evaluation.md has an example): one row per reference
  image holding 2-3 subjects, each with its query text and/or mask and its prompts.

Generated images of a subject live in ``<images>/<subject.key>/<NN>_<anything>.<ext>``, NN
being the index of the prompt in ``subject.prompts`` (see ``image_prompt_index``).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional

DREAMBENCH_INDEX = "prompts_and_classes.txt"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
# prompts_and_classes.txt lists classes but not which subjects are live; in DreamBooth's
# benchmark the live subjects are exactly its cats and dogs (9 of 30), which get the
# live-subject prompts (outfits, hats) instead of the object prompts.
LIVE_CLASSES = ("cat", "dog")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class BenchError(ValueError):
    """A bench file or folder is malformed; the message names the file, line and field."""


@dataclass
class BenchSubject:
    """One subject to generate and score.

    key: folder of its generated images below the images folder ("dog" or "row_id/name").
    source_image: the image given to SSR-Encoder when generating.
    references: images the generations are compared with (CLIP-I, DINO).
    query: the text query for SSR-Encoder ("" when only a mask selects the subject).
    mask: optional mask file over ``source_image`` (white = the subject); DINO-M needs it.
    label: words naming the subject ("dog"); CLIP-ES scores other subjects' images against it.
    prompts: the prompts, in order (an image's file name starts with its prompt index).
    group: the multi-subject image it belongs to (None for DreamBench): subjects sharing a
        group are each other's "other subjects" for CLIP-ES.
    """

    key: str
    source_image: str
    references: List[str]
    query: str
    label: str
    prompts: List[str]
    mask: Optional[str] = None
    group: Optional[str] = None


@dataclass
class Bench:
    kind: str  # "dreambench" or "multi_subject"
    source: str  # the folder or JSONL file it was read from
    subjects: List[BenchSubject] = field(default_factory=list)

    def subject(self, key: str) -> BenchSubject:
        for s in self.subjects:
            if s.key == key:
                return s
        raise KeyError(key)

    def others(self, subject: BenchSubject) -> List[BenchSubject]:
        """The other subjects of the same multi-subject image (empty for DreamBench)."""
        if subject.group is None:
            return []
        return [s for s in self.subjects if s.group == subject.group and s.key != subject.key]


def load_bench(path: str) -> Bench:
    """A DreamBench folder (holding prompts_and_classes.txt) or a multi-subject .jsonl file."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, DREAMBENCH_INDEX)):
            raise BenchError(f"{path}: a bench folder must be DreamBench's published layout with "
                             f"{DREAMBENCH_INDEX} in it; for a multi-subject bench pass the .jsonl file")
        return load_dreambench(path)
    if os.path.isfile(path):
        return load_multi_subject(path)
    raise BenchError(f"{path}: bench not found (expected a DreamBench folder or a multi-subject .jsonl file)")


# ----------------------------------------------------------------------------- DreamBench

def _parse_prompts_and_classes(path: str):
    """-> ({subject: class}, object templates, live templates), from the published file."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    classes, sections = {}, {"object": [], "live": []}
    mode = None
    for number, line in enumerate(lines, 1):
        low = line.lower()
        if low == "subject_name,class":
            mode = "classes"
        elif low.startswith("object prompts"):
            mode = "object"
        elif low.startswith("live subject prompts"):
            mode = "live"
        elif low in ("prompts", "classes") or not line:
            if mode == "classes" and not line and classes:
                mode = None
        elif mode == "classes":
            name, _, noun = line.partition(",")
            if not noun.strip():
                raise BenchError(f"{path} line {number}: expected 'subject_name,class', got {line!r}")
            classes[name.strip()] = noun.strip()
        elif mode in ("object", "live"):
            m = re.match(r"""^'(.*)'\s*\.format\(""", line)
            if m:
                sections[mode].append(m.group(1))
    if not classes:
        raise BenchError(f"{path}: no 'subject_name,class' table found (is this DreamBench's prompts_and_classes.txt?)")
    for mode, templates in sections.items():
        if not templates:
            raise BenchError(f"{path}: no {mode} prompts found (expected lines like "
                             "\"'a {0} {1} in the jungle'.format(unique_token, class_token),\")")
    return classes, sections["object"], sections["live"]


def class_prompt(template: str, noun: str) -> str:
    """A DreamBench template with the class noun and no unique token:
    'a {0} {1} in the snow' -> 'a dog in the snow'."""
    return " ".join(template.format("", noun).split())


def load_dreambench(folder: str, reference_index: int = 0) -> Bench:
    """DreamBench's published layout -> Bench (subjects in the file's order). Every photo of
    a subject is a reference; photo ``reference_index`` (sorted by name) is the one
    SSR-Encoder is given; the query is the class noun."""
    classes, object_templates, live_templates = _parse_prompts_and_classes(os.path.join(folder, DREAMBENCH_INDEX))
    bench = Bench("dreambench", folder)
    for name, noun in classes.items():
        sub = os.path.join(folder, name)
        if not os.path.isdir(sub):
            raise BenchError(f"{os.path.join(folder, DREAMBENCH_INDEX)}: subject {name!r} is listed but "
                             f"its folder {sub} does not exist")
        photos = sorted(os.path.join(sub, f) for f in os.listdir(sub) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not photos:
            raise BenchError(f"{sub}: no reference photos ({', '.join(IMAGE_EXTENSIONS)}) in the subject folder")
        templates = live_templates if noun in LIVE_CLASSES else object_templates
        bench.subjects.append(BenchSubject(
            key=name, source_image=photos[min(reference_index, len(photos) - 1)], references=photos,
            query=noun, label=noun, prompts=[class_prompt(t, noun) for t in templates]))
    return bench


# ----------------------------------------------------------------------------- multi-subject JSONL

def _field(row: dict, name: str, where: str, kind: type, required: bool = True):
    if name not in row:
        if required:
            raise BenchError(f"{where}: missing field {name!r}")
        return None
    value = row[name]
    if not isinstance(value, kind):
        raise BenchError(f"{where}: field {name!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _file(root: str, value: str, where: str, name: str) -> str:
    path = value if os.path.isabs(value) else os.path.join(root, value)
    if not os.path.isfile(path):
        raise BenchError(f"{where}: field {name!r}: file {path} not found (relative paths are relative to the "
                         "JSONL file's folder)")
    return path


def load_multi_subject(path: str) -> Bench:
    """Our multi-subject JSONL -> Bench. One object per line (blank lines allowed):

        {"id": "dog_cat", "image": "images/dog_cat.jpg",
         "prompts": ["a {label} on the beach"],                     # optional, for every subject
         "subjects": [{"name": "dog", "query": "the dog", "mask": "masks/dog_cat_dog.png",
                       "label": "dog", "prompts": ["a dog wearing a red hat"]},
                      {"name": "cat", "query": "the cat"}]}

    Per subject: ``name`` (folder name), ``query`` and/or ``mask`` (at least one), ``label``
    (default: the query; required without one), ``prompts`` (added after the row's
    templates, in which "{label}" is filled in). 2-3 subjects per row.
    """
    root = os.path.dirname(os.path.abspath(path))
    bench = Bench("multi_subject", path)
    seen_ids = set()
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise BenchError(f"{where}: expected a JSON object, got {type(row).__name__}")
        row_id = _field(row, "id", where, str)
        if not _NAME.match(row_id):
            raise BenchError(f"{where}: field 'id' {row_id!r} must be usable as a folder name (letters, digits, _ . -)")
        if row_id in seen_ids:
            raise BenchError(f"{where}: id {row_id!r} is used twice")
        seen_ids.add(row_id)
        image = _file(root, _field(row, "image", where, str), where, "image")
        templates = _field(row, "prompts", where, list, required=False) or []
        subjects = _field(row, "subjects", where, list)
        if not 2 <= len(subjects) <= 3:
            raise BenchError(f"{where}: field 'subjects' must list 2 or 3 subjects, got {len(subjects)}")
        names = set()
        for i, item in enumerate(subjects):
            at = f"{where} subject {i}"
            if not isinstance(item, dict):
                raise BenchError(f"{at}: expected a JSON object, got {type(item).__name__}")
            name = _field(item, "name", at, str)
            if not _NAME.match(name) or name in names:
                raise BenchError(f"{at}: field 'name' {name!r} must be unique in the row and usable as a folder name")
            names.add(name)
            query = (_field(item, "query", at, str, required=False) or "").strip()
            mask_value = _field(item, "mask", at, str, required=False)
            mask = _file(root, mask_value, at, "mask") if mask_value else None
            if not query and mask is None:
                raise BenchError(f"{at}: give a 'query' text, a 'mask' file, or both")
            label = (_field(item, "label", at, str, required=False) or query).strip()
            if not label:
                raise BenchError(f"{at}: field 'label' (words naming the subject, for CLIP-ES) is required "
                                 "when there is no query")
            prompts = [t.replace("{label}", label) for t in templates]
            own = _field(item, "prompts", at, list, required=False) or []
            for j, p in enumerate(own):
                if not isinstance(p, str) or not p.strip():
                    raise BenchError(f"{at}: prompts[{j}] must be a non-empty string")
            prompts += [p.strip() for p in own]
            if not prompts:
                raise BenchError(f"{at}: no prompts (give 'prompts' in the subject or the row)")
            bench.subjects.append(BenchSubject(
                key=f"{row_id}/{name}", source_image=image, references=[image], query=query, label=label,
                prompts=prompts, mask=mask, group=row_id))
    if not bench.subjects:
        raise BenchError(f"{path}: no rows")
    return bench


# ----------------------------------------------------------------------------- generated images

def image_prompt_index(file_name: str) -> Optional[int]:
    """'03_seed1.png' -> 3: generated images are named '<prompt index>_<anything>.<ext>';
    None for files that do not follow the pattern (they are not scored)."""
    stem, ext = os.path.splitext(file_name)
    if ext.lower() not in IMAGE_EXTENSIONS:
        return None
    m = re.match(r"^(\d+)_", stem)
    return int(m.group(1)) if m else None


def generated_file_name(prompt_index: int, seed: int) -> str:
    return f"{prompt_index:02d}_seed{seed}.png"
