"""The generate step (fixed seeds, resume, settings guard), the reports and the command line,
end to end with tiny random models written in the real formats."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.tiny_models import tiny_ssr_weights
from tests.trainer.tiny_sd import tiny_core
from trainer.evaluation.benches import load_bench
from trainer.evaluation.cli import build_parser, main
from trainer.evaluation.generate import GenerationSettings, generation_jobs, run_generation

TINY = dict(steps=1, height=64, width=64)  # the CPU is shared: as few UNet calls as possible


def small_bench(multi_bench):
    """pets/dog alone (mask + query, 2 prompts)."""
    bench = load_bench(str(multi_bench.jsonl))
    bench.subjects = [bench.subject("pets/dog")]
    return bench


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_generate_is_seeded_and_resumes(multi_bench, tmp_path):
    bench = small_bench(multi_bench)
    core = tiny_core(seed=0)
    out = str(tmp_path / "gen")
    settings = GenerationSettings(seeds=[0, 1], **TINY)
    result = run_generation(core, bench, out, settings, progress=False)
    jobs = generation_jobs(bench, out, [0, 1])
    assert result == {"generated": 4, "skipped": 0, "total": 4} and all(os.path.isfile(j.path) for j in jobs)
    assert os.path.basename(jobs[0].path) == "00_seed0.png" and jobs[0].path.startswith(os.path.join(out, "pets", "dog"))
    assert pixels(jobs[0].path).shape == (64, 64, 3)
    assert not np.array_equal(pixels(jobs[0].path), pixels(jobs[1].path))  # seeds differ
    # Resume: one image removed, one interrupted write left behind; only that image is made
    # again, with the same pixels, and the finished ones are not touched.
    lost = jobs[2]
    before = pixels(lost.path)
    os.remove(lost.path)
    with open(lost.path + ".part", "wb") as f:
        f.write(b"half a png")
    mtimes = {j.path: os.path.getmtime(j.path) for j in jobs if j is not lost}
    result = run_generation(core, bench, out, settings, progress=False)
    assert result == {"generated": 1, "skipped": 3, "total": 4}
    np.testing.assert_array_equal(pixels(lost.path), before)
    assert all(os.path.getmtime(p) == t for p, t in mtimes.items())
    assert not os.path.exists(lost.path + ".part")
    # More seeds later add images; other settings in the same folder are refused.
    assert run_generation(core, bench, out, GenerationSettings(seeds=[2], **TINY), progress=False)["generated"] == 2
    with open(os.path.join(out, "generation.json")) as f:
        assert json.load(f)["seeds"] == [0, 1, 2]
    with pytest.raises(ValueError, match="generation.json: this folder holds images made with other settings .*steps: 1 -> 3"):
        run_generation(core, bench, out, GenerationSettings(seeds=[0], steps=3, height=64, width=64), progress=False)
    # The mask reaches the aligner: the same subject without its mask makes another image.
    bench.subjects[0].mask = None
    bench.subjects[0].prompts = bench.subjects[0].prompts[:1]
    run_generation(core, bench, str(tmp_path / "plain"), GenerationSettings(seeds=[0], **TINY), progress=False)
    assert not np.array_equal(pixels(jobs[0].path), pixels(tmp_path / "plain" / "pets" / "dog" / "00_seed0.png"))


@pytest.fixture(scope="module")
def generation_files(tmp_path_factory):
    """SD (diffusers folder), CLIP vision (HF folder) and SSR weights (our .safetensors), tiny."""
    from ssr import save_ssr_weights
    from trainer.smoke_assets import write_tiny_clip_vision, write_tiny_sd

    root = tmp_path_factory.mktemp("gen_models")
    write_tiny_sd(str(root / "sd"))
    write_tiny_clip_vision(str(root / "clip_vision"))
    save_ssr_weights(tiny_ssr_weights(3, context_dim=32, image_dim=64), str(root / "ssr.safetensors"))
    return root


def test_cli_all_then_score_with_compare(multi_bench, generation_files, model_files, tmp_path, capsys):
    bench_file = multi_bench.root / "two.jsonl"
    first = multi_bench.jsonl.read_text().split("\n")[0]
    bench_file.write_text(first + "\n")
    out = tmp_path / "ssr"
    gen_args = ["--pretrained-model", str(generation_files / "sd"), "--clip-vision", str(generation_files / "clip_vision"),
                "--ssr-weights", str(generation_files / "ssr.safetensors"), "--no-clip-width-check", "--seeds", "0",
                "--steps", "1", "--height", "64", "--width", "64", "--device", "cpu", "--no-progress"]
    score_args = ["--clip", model_files.open_clip_pt, "--dino", model_files.dino_hub,
                  "--aesthetic-head", model_files.aesthetic_mlp, "--aesthetic-clip", model_files.hf_clip]
    assert main(["all", "--bench", str(bench_file), "--out", str(out)] + gen_args + score_args) == 0
    text = capsys.readouterr().out
    assert "generate: 3 made, 0 already there, 3 in all" in text
    report = out / "report"
    data = json.loads((report / "metrics.json").read_text())
    assert data["images"] == 3 and data["bench"]["kind"] == "multi_subject"
    assert set(data["per_subject"]) == {"pets/dog", "pets/cat"} and data["per_subject"]["pets/dog"]["images"] == 2
    assert data["models"]["clip"].startswith("CLIP (open_clip/OpenAI state dict") and model_files.dino_hub in data["models"]["dino"]
    assert "LAION aesthetic head (MLP" in data["models"]["aesthetic"]
    with open(report / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and rows[0]["file"] == os.path.join("pets", "dog", "00_seed0.png")
    assert all(r["clip_t"] and r["clip_es"] and r["aesthetic"] for r in rows)
    assert [bool(r["dino_m"]) for r in rows] == [True] * 2 + [False]  # the cat has no mask
    mean_t = np.mean([float(r["clip_t"]) for r in rows])
    assert data["overall"]["clip_t"] == pytest.approx(mean_t, abs=1e-6)
    table = (report / "table.md").read_text()
    assert table.splitlines()[0].startswith("| Method | Multi-subject CLIP-T ↑ | Multi-subject CLIP-ES ↓ | Multi-subject DINO-M ↑ | "
                                            "DreamBench CLIP-T ↑ | DreamBench CLIP-I ↑ | DreamBench DINO ↑ | Aesthetic ↑ |")
    ssr_row = table.splitlines()[2].split(" | ")
    assert ssr_row[0] == "| SSR-Encoder" and ssr_row[1] == f"{data['overall']['clip_t']:.3f}" and ssr_row[4] == "–"
    assert "clip: CLIP (open_clip/OpenAI state dict" in table and "dino: DINO (torch.hub" in table
    page = (report / "contact_sheet.html").read_text()
    assert page.count("<h2>") == 2 and page.count("reference ") >= 2 and "masked reference (DINO-M)" in page
    assert page.count("<figure>") == 3 and "a dog on the beach" in page and "data:image/jpeg;base64," in page
    with Image.open(report / "contact_sheet.png") as sheet:
        assert sheet.width >= 2 * 128 and sheet.height >= 2 * 2 * 128  # 2 subjects, each a reference and an image row
    # Resume through the CLI: nothing to make. Then another method's images (copies of ours
    # named differently) scored alone and compared in one table.
    assert main(["generate", "--bench", str(bench_file), "--out", str(out)] + gen_args) == 0
    assert "generate: 0 made, 3 already there" in capsys.readouterr().out
    other = tmp_path / "other_method"
    for row in rows:
        target = other / os.path.dirname(row["file"])
        target.mkdir(parents=True, exist_ok=True)
        Image.open(out / row["file"]).rotate(90).save(target / (os.path.basename(row["file"])[:3] + "ipadapter.jpg"))
    assert main(["score", "--bench", str(bench_file), "--images", str(other), "--clip", model_files.open_clip_pt,
                 "--dino", model_files.dino_hub, "--method", "Rotated", "--compare", str(report / "metrics.json"),
                 "--device", "cpu"]) == 0
    table = (other / "report" / "table.md").read_text().splitlines()
    assert table[2].startswith("| Rotated |") and table[3].startswith("| SSR-Encoder |")


def test_cli_errors_are_one_line_naming_the_file(multi_bench, model_files, tmp_path, capsys):
    assert main(["score", "--bench", str(tmp_path / "missing.jsonl"), "--images", str(tmp_path),
                 "--clip", model_files.open_clip_pt, "--dino", model_files.dino_hub]) == 2
    assert "missing.jsonl: bench not found" in capsys.readouterr().err
    assert main(["score", "--bench", str(multi_bench.jsonl), "--images", str(tmp_path), "--clip", model_files.dino_hub,
                 "--dino", model_files.dino_hub]) == 2
    assert "no generated images found" in capsys.readouterr().err
    (tmp_path / "pets" / "dog").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "pets" / "dog" / "00_a.png")
    assert main(["score", "--bench", str(multi_bench.jsonl), "--images", str(tmp_path), "--clip", model_files.dino_hub,
                 "--dino", model_files.dino_hub]) == 2
    err = capsys.readouterr().err
    assert model_files.dino_hub in err and "open_clip/OpenAI layout" in err


def test_help_documents_both_steps_and_every_metric():
    text = build_parser().format_help()
    for word in ("generate", "score", "resumable", "DDIM 30 steps, CFG 7.5", "metrics.json", "per_image.csv",
                 "table.md", "contact_sheet.html", "CLIP-T", "CLIP-I", "DINO ", "CLIP-ES", "DINO-M", "aesthetic",
                 "ViT-B/32", "ViT-S/16", "prompts_and_classes.txt", "weights_only"):
        assert word in text, word


def test_mask_bias_reaches_the_aligner_as_in_the_core_library(multi_bench):
    """subject_tokens with a mask's logit bias = ssr's SubjectEncoder given the same bias
    (ssr.mask_logit_bias of the bench's mask over its image), and differs from no bias."""
    import torch

    from trainer.evaluation.generate import subject_inputs

    core = tiny_core(seed=0)
    dog = small_bench(multi_bench).subjects[0]
    pixels_in, bias = subject_inputs(dog, mask_weight=5.0)
    assert pixels_in.shape == (1, 3, 224, 224) and bias.shape == (1, 257)
    z_q = core.encode_texts([dog.query])
    with torch.no_grad():
        tokens, _ = core.subject_tokens(z_q, pixels_in, logit_bias=bias)
        expected, _ = core.ssr.encoder(z_q, core.image_encoder(pixels_in), logit_bias=bias)
        plain, _ = core.subject_tokens(z_q, pixels_in)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)
    assert not torch.allclose(tokens, plain)
