"""Both bench formats: DreamBench as published (read from ../shared/data/dreambench) and our
multi-subject JSONL, with errors that name the file, line and field."""
from __future__ import annotations

import json
import os

import pytest

from tests.eval.conftest import DREAMBENCH
from trainer.evaluation.benches import (BenchError, class_prompt, image_prompt_index, load_bench,
                                        load_multi_subject)


def test_dreambench_as_published():
    bench = load_bench(DREAMBENCH)
    assert bench.kind == "dreambench" and len(bench.subjects) == 30
    assert sum(len(s.references) for s in bench.subjects) == 158  # the dataset's photo count
    by_key = {s.key: s for s in bench.subjects}
    assert by_key["bear_plushie"].label == "stuffed animal" and by_key["bear_plushie"].query == "stuffed animal"
    for s in bench.subjects:
        assert len(s.prompts) == 25 and len(set(s.prompts)) == 25
        assert all(s.label in p and "{" not in p and "  " not in p for p in s.prompts)
        assert s.source_image == s.references[0] and os.path.basename(s.source_image) == "00.jpg"
        assert s.group is None and bench.others(s) == []
    live = [s.key for s in bench.subjects if "a {} wearing a red hat".format(s.label) in s.prompts]
    assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
    assert by_key["backpack"].prompts[0] == "a backpack in the jungle"
    assert by_key["backpack"].prompts[10] == "a backpack with a wheat field in the background"
    assert by_key["dog"].prompts[10] == "a dog wearing a red hat"
    assert by_key["teapot"].prompts[-1] == "a cube shaped teapot"


def test_class_noun_replaces_the_unique_token():
    assert class_prompt("a {0} {1} in the snow", "dog") == "a dog in the snow"
    assert class_prompt("a red {0} {1}", "stuffed animal") == "a red stuffed animal"


def test_dreambench_errors(tmp_path):
    with pytest.raises(BenchError, match="prompts_and_classes.txt"):
        load_bench(str(tmp_path))
    (tmp_path / "prompts_and_classes.txt").write_text("Classes\n\nsubject_name,class\nghost,ghost\n\n"
                                                     "Object Prompts\n'a {0} {1} in the snow'.format(u, c),\n"
                                                     "Live Subject Prompts\n'a {0} {1}'.format(u, c)\n")
    with pytest.raises(BenchError, match="subject 'ghost' is listed but its folder"):
        load_bench(str(tmp_path))
    (tmp_path / "ghost").mkdir()
    with pytest.raises(BenchError, match="no reference photos"):
        load_bench(str(tmp_path))
    with pytest.raises(BenchError, match="bench not found"):
        load_bench(str(tmp_path / "nothing.jsonl"))


def test_multi_subject_jsonl(multi_bench):
    bench = load_bench(str(multi_bench.jsonl))
    assert bench.kind == "multi_subject"
    assert [s.key for s in bench.subjects] == ["pets/dog", "pets/cat", "desk/mug", "desk/lamp", "desk/book"]
    dog, cat, mug, lamp, book = bench.subjects
    assert dog.mask.endswith("pets_dog.png") and dog.query == "the dog" and dog.label == "dog"
    assert cat.label == "the cat" and cat.mask is None  # label defaults to the query
    assert lamp.query == "" and lamp.label == "lamp"    # a mask-only subject
    assert mug.prompts == ["a mug in a kitchen"] and lamp.prompts == ["a lamp in a kitchen", "a lamp at night"]
    assert book.prompts == ["a book in a kitchen"]
    assert [o.key for o in bench.others(lamp)] == ["desk/mug", "desk/book"]
    assert [o.key for o in bench.others(dog)] == ["pets/cat"]
    assert dog.references == [dog.source_image] and os.path.isabs(dog.source_image)


@pytest.mark.parametrize("row, message", [
    ({"image": "images/pets.png", "subjects": []}, "line 1: missing field 'id'"),
    ({"id": "a b", "image": "images/pets.png", "subjects": []}, "usable as a folder name"),
    ({"id": "x", "image": "images/none.png", "subjects": []}, "field 'image': file .*none.png not found"),
    ({"id": "x", "image": "images/pets.png", "subjects": [{"name": "a", "query": "q", "prompts": ["p"]}]},
     "2 or 3 subjects, got 1"),
    ({"id": "x", "image": "images/pets.png", "subjects": [{"name": "a", "prompts": ["p"]},
                                                          {"name": "b", "query": "q", "prompts": ["p"]}]},
     "subject 0: give a 'query' text, a 'mask' file, or both"),
    ({"id": "x", "image": "images/pets.png", "subjects": [{"name": "a", "mask": "masks/pets_dog.png", "prompts": ["p"]},
                                                          {"name": "b", "query": "q", "prompts": ["p"]}]},
     "field 'label' .* is required"),
    ({"id": "x", "image": "images/pets.png", "subjects": [{"name": "a", "query": "q"},
                                                          {"name": "b", "query": "q", "prompts": ["p"]}]},
     "subject 0: no prompts"),
    ({"id": "x", "image": "images/pets.png", "subjects": [{"name": "a", "query": "q", "prompts": ["p"]},
                                                          {"name": "a", "query": "q", "prompts": ["p"]}]},
     "must be unique"),
    ({"id": "x", "image": "images/pets.png", "subjects": "dog"}, "field 'subjects' must be a list"),
])
def test_multi_subject_errors_name_line_and_field(multi_bench, row, message):
    path = multi_bench.root / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(BenchError, match=message) as info:
        load_multi_subject(str(path))
    assert str(path) in str(info.value)


def test_malformed_json_line_is_named(multi_bench):
    path = multi_bench.root / "broken.jsonl"
    path.write_text(multi_bench.jsonl.read_text() + '{"id": "x", \n')
    with pytest.raises(BenchError, match=r"line 4: not valid JSON"):
        load_multi_subject(str(path))


def test_generated_image_names():
    assert image_prompt_index("03_seed1.png") == 3
    assert image_prompt_index("12_ip-adapter.JPG") == 12
    assert image_prompt_index("notes.txt") is None and image_prompt_index("seed_03.png") is None
