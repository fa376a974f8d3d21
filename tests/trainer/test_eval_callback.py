"""The trainer's eval option (--eval.*): a fixed eval set scored every N steps, CLIP-T /
CLIP-I / DINO logged beside the loss, equal to scoring the saved images with the score step."""
import math
import os

import pytest

from tests.eval import eval_models as em
from tests.eval.conftest import DREAMBENCH
from tests.trainer.test_trainer_cli import column, files, make_config, read_metrics  # noqa: F401 (fixture)
from trainer.cli import main
from trainer.evaluation.benches import load_bench
from trainer.evaluation.loaders import load_clip, load_dino
from trainer.evaluation.metrics import summarize
from trainer.evaluation.scoring import ScoringModels, score_images


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_scorers")
    em.write_open_clip(str(root / "clip.safetensors"), seed=1)
    em.write_dino_hub(str(root / "dino.pth"), seed=2)
    return str(root / "clip.safetensors"), str(root / "dino.pth")


def test_eval_scores_are_logged_every_n_steps(files, tiny_jsonl, scorers, tmp_path):  # noqa: F811
    clip, dino = scorers
    config = make_config(
        files, tmp_path, {"train_jsonl": str(tiny_jsonl.jsonl), "image_root": str(tiny_jsonl.image_root)},
        trainer={"max_steps": 2}, export={"every_n_steps": 0}, checkpoint={"every_n_train_steps": 0},
        eval={"every_n_steps": 1, "bench": DREAMBENCH, "clip": clip, "dino": dino, "num_subjects": 1,
              "num_prompts": 1, "steps": 1, "height": 64, "width": 64})
    cli = main(["fit", "--config", config])
    log_dir = cli.trainer.log_dir
    rows = read_metrics(log_dir)
    for name in ("eval/clip_t", "eval/clip_i", "eval/dino"):
        values = column(rows, name)
        assert len(values) == 2 and all(math.isfinite(v) and -1 <= v <= 1 for v in values), name
    assert len(column(rows, "train/loss")) == 2
    # The logged value at step 2 = the score step on the images the callback saved.
    folder = os.path.join(log_dir, "eval", "step0000002")
    assert sorted(os.listdir(os.path.join(folder, "backpack"))) == ["00_seed0.png"]
    bench = load_bench(DREAMBENCH)
    bench.subjects = bench.subjects[:1]
    expected = summarize(score_images(bench, folder, ScoringModels(load_clip(clip), load_dino(dino))))
    assert column(rows, "eval/clip_i")[-1] == pytest.approx(expected["clip_i"], abs=1e-5)
    assert column(rows, "eval/dino")[-1] == pytest.approx(expected["dino"], abs=1e-5)
    # The eval images changed with the weights between the two evaluations.
    step1 = os.path.join(log_dir, "eval", "step0000001", "backpack", "00_seed0.png")
    assert open(step1, "rb").read() != open(os.path.join(folder, "backpack", "00_seed0.png"), "rb").read()


def test_eval_option_needs_its_models():
    from trainer.evaluation.training_callback import EvalScores

    with pytest.raises(ValueError, match="eval.bench, eval.clip and eval.dino are required"):
        EvalScores(every_n_steps=10, bench=DREAMBENCH)
    assert not EvalScores().enabled
