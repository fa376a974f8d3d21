"""Configuration problems are found before any model is loaded, all at once, each named
(issue 11 item 5); a JSONL file without a usable row says why."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_trainer_cli import files, make_config  # noqa: E402,F401  (files: a fixture)

import trainer.module  # noqa: E402
from trainer.cli import main  # noqa: E402
from trainer.jsonl_dataset import JsonlImageTextDataset  # noqa: E402
from trainer.preflight import prompt_template_problem  # noqa: E402
from trainer.samples import SampleTransform  # noqa: E402


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was checked")

    monkeypatch.setattr(trainer.module, "load_stable_diffusion", refuse)


def test_every_problem_is_named_before_a_model_loads(files, tiny_jsonl, tmp_path, no_model_loading):
    short_val = tmp_path / "val.jsonl"
    short_val.write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n"
                         + json.dumps({"file_name": "b.png", "text": "y"}) + "\n")
    not_a_folder = tmp_path / "a_file"
    not_a_folder.write_text("export cannot go below a file")
    config = make_config(files, tmp_path / "out", {
        "train_jsonl": str(tiny_jsonl.jsonl), "image_root": str(tmp_path / "no_images"),
        "val_jsonl": str(short_val), "val_image_root": str(tiny_jsonl.image_root)},
        model={"init_weights": str(tmp_path / "missing_weights")},
        samples={"prompts": ["{caption}", "a photo of {subject}"]},
        export={"dirpath": str(not_a_folder / "export")})
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", config])
    message = str(stopped.value.code)
    assert "model.init_weights: " + str(tmp_path / "missing_weights") + " does not exist" in message
    assert "data.image_root: " + str(tmp_path / "no_images") + " does not exist" in message
    assert "samples.prompts[1] 'a photo of {subject}' uses {subject}; only {caption} and {query}" in message
    assert f"none of its 2 rows is usable (missing_file x2)" in message and "val.jsonl" in message
    assert f"export.dirpath: {not_a_folder} is a file, not a folder" in message


def test_wrong_image_root_empty_val_file_and_positional_placeholder(files, tiny_jsonl, tmp_path, no_model_loading):
    """A wrong image_root shows through the training file's first rows."""
    empty_val = tmp_path / "val.jsonl"
    empty_val.write_text("\n")
    config = make_config(files, tmp_path / "out", {
        "train_jsonl": str(tiny_jsonl.jsonl), "image_root": str(tmp_path),
        "val_jsonl": str(empty_val)}, samples={"prompts": ["{query} {}"]})
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", config])
    message = str(stopped.value.code)
    assert "data.train_jsonl (training data): " in message and "file_name is relative to image_root" in message
    assert "data.val_jsonl: " in message and "no rows" in message
    assert "samples.prompts[0] '{query} {}' uses {}" in message


def test_prompt_templates():
    assert prompt_template_problem(0, "a photo of {query} on the beach, {caption}") is None
    assert "uses {subject}, {x}" in prompt_template_problem(2, "{subject} {x}")
    assert "literal braces" in prompt_template_problem(0, "a {broken")


def test_a_short_file_without_a_usable_row_says_what_is_wrong(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not an image")
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n"
                    + json.dumps({"file_name": "gone.png", "text": "y"}) + "\n")
    dataset = JsonlImageTextDataset(str(path), None, SampleTransform(8, 8, 0, 0, 0), seed=0, max_image_pixels=10**8)
    with pytest.raises(RuntimeError) as failed:
        dataset[0]
    message = str(failed.value)
    assert "none of its 2 rows is usable (corrupt_image x1, missing_file x1)" in message
    assert "the first: corrupt_image: " in message and "a.png" in message
    assert sum(dataset.skip_counter.totals().values()) == 2  # each row tried once, not 32 times
