"""Each metric against an independent computation on the same model (torchmetrics' CLIP
score, cosines written out by hand on the reference modules' raw outputs) and against
properties that must hold."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.eval.conftest import DREAMBENCH, pattern_image
from tests.eval.test_loaders import CLIP_T, DINO_T
from trainer.evaluation import metrics as M
from trainer.evaluation.benches import load_bench, load_dreambench
from trainer.evaluation.loaders import load_aesthetic, load_clip, load_dino
from trainer.evaluation.scoring import ScoringModels, score_images

PROMPTS = ["a dog on the beach", "a red backpack in the snow", "a cat", "a teapot on a wooden floor",
           "a shiny sneaker", "a toy with a city in the background"]


class FeaturesAsTensors:
    """The same CLIPModel, with get_*_features returning the projected tensor as
    transformers 4 did (torchmetrics 1.9 expects that; transformers 5 returns an output
    object whose pooler_output is that tensor). Everything else is the model's own."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def to(self, device):
        self.model.to(device)
        return self

    def get_image_features(self, *args, **kwargs):
        out = self.model.get_image_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_text_features(self, *args, **kwargs):
        out = self.model.get_text_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


def tm_factory(folder):
    """torchmetrics' CLIP score on our folder (slow image processor: PIL resizing)."""
    from transformers import CLIPModel, CLIPProcessor

    loaded = (FeaturesAsTensors(CLIPModel.from_pretrained(folder).eval()),
              CLIPProcessor.from_pretrained(folder, use_fast=False))
    return lambda: loaded


def as_uint8_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


def test_clip_t_and_clip_i_match_torchmetrics_clip_score(model_files):
    """torchmetrics reports 100 * max(cos, 0) averaged over its batch; scored one pair at a
    time it is 100 * max(cos, 0) of that pair. Ours is the plain cosine."""
    from torchmetrics.functional.multimodal.clip_score import clip_score

    factory = tm_factory(model_files.hf_clip)
    clip = load_clip(model_files.hf_clip)
    images = [pattern_image(20 + i, (90 + 7 * i, 70 + 11 * i)) for i in range(len(PROMPTS))]
    ours_t = M.clip_t(clip.embed_images(images), clip.embed_texts(PROMPTS))
    assert (ours_t > 0).any(), "no positive CLIP-T: the clamped comparison would be vacuous"
    for image, prompt, ours in zip(images, PROMPTS, ours_t):
        ref = clip_score(as_uint8_tensor(image), prompt, model_name_or_path=factory)
        assert float(ref) == pytest.approx(100 * max(float(ours), 0.0), abs=2e-3)
    # CLIP-I: image-image mode; our mean over references = the mean of torchmetrics' pairs
    refs = images[3:]
    ours_i = M.clip_i(clip.embed_images(images[:2]), clip.embed_images(refs))
    for k, g in enumerate(images[:2]):
        pairs = [float(clip_score(as_uint8_tensor(g), as_uint8_tensor(r), model_name_or_path=factory)) for r in refs]
        assert all(p > 0 for p in pairs)
        assert float(ours_i[k]) * 100 == pytest.approx(np.mean(pairs), abs=2e-3)


@pytest.fixture
def small_dreambench():
    """The first three DreamBench subjects (read from ../shared/data/dreambench)."""
    bench = load_dreambench(DREAMBENCH)
    bench.subjects = bench.subjects[:3]
    return bench


def copy_as_generated(bench, images_dir, pick):
    """Generated-image folder where subject s's image for prompt i is ``pick(s, i)`` (a path)."""
    for s in bench.subjects:
        os.makedirs(os.path.join(images_dir, s.key), exist_ok=True)
        for i in range(2):
            Image.open(pick(s, i)).convert("RGB").save(os.path.join(images_dir, s.key, f"{i:02d}_seed0.png"))


def test_dreambench_scores_match_hand_computed_cosines(model_files, small_dreambench, tmp_path):
    """CLIP-T, CLIP-I (mean over all of a subject's photos), DINO and the aesthetic score of
    every row, recomputed from open_clip's and timm's raw outputs with F.cosine_similarity."""
    import open_clip

    bench = small_dreambench
    copy_as_generated(bench, tmp_path / "gen", lambda s, i: s.references[-1 - i])
    models = ScoringModels(load_clip(model_files.open_clip_pt), load_dino(model_files.dino_hub),
                           load_aesthetic(model_files.aesthetic_mlp, model_files.open_clip_pt))
    rows = score_images(bench, str(tmp_path / "gen"), models)
    assert len(rows) == 6
    oc, dino = model_files.open_clip_model, model_files.dino_hub_model
    head = torch.load(model_files.aesthetic_mlp, weights_only=True)
    with torch.no_grad():
        for row in rows:
            s = bench.subject(row["subject"])
            gen = Image.open(tmp_path / "gen" / row["file"]).convert("RGB")
            refs = [Image.open(r).convert("RGB") for r in s.references]
            g_clip = oc.encode_image(CLIP_T(gen)[None])
            r_clip = oc.encode_image(torch.stack([CLIP_T(r) for r in refs]))
            text = oc.encode_text(open_clip.tokenize([s.prompts[row["prompt_index"]]]))
            assert row["clip_t"] == pytest.approx(float(F.cosine_similarity(g_clip, text)), abs=1e-5)
            assert row["clip_i"] == pytest.approx(float(F.cosine_similarity(g_clip, r_clip).mean()), abs=1e-5)
            g_dino = dino(DINO_T(gen)[None])
            r_dino = dino(torch.stack([DINO_T(r) for r in refs]))
            assert row["dino"] == pytest.approx(float(F.cosine_similarity(g_dino, r_dino).mean()), abs=1e-5)
            h = F.normalize(g_clip, dim=-1)
            for i in (0, 2, 4, 6, 7):
                h = h @ head[f"layers.{i}.weight"].T + head[f"layers.{i}.bias"]
            assert row["aesthetic"] == pytest.approx(float(h), abs=1e-4)
            assert row["clip_es"] is None and row["dino_m"] is None  # no other subjects, no mask


def test_identical_images_give_one_and_shuffled_pairs_score_lower(model_files, small_dreambench, tmp_path):
    bench = small_dreambench
    for s in bench.subjects:
        s.references = s.references[:1]
    models = ScoringModels(load_clip(model_files.hf_clip), load_dino(model_files.hf_dino))
    copy_as_generated(bench, tmp_path / "same", lambda s, i: s.references[0])
    keys = [s.key for s in bench.subjects]
    other = {k: bench.subject(keys[(j + 1) % len(keys)]) for j, k in enumerate(keys)}
    copy_as_generated(bench, tmp_path / "shuffled", lambda s, i: other[s.key].references[0])
    same = score_images(bench, str(tmp_path / "same"), models)
    shuffled = score_images(bench, str(tmp_path / "shuffled"), models)
    for row in same:
        assert row["clip_i"] == pytest.approx(1.0, abs=1e-5)
        assert row["dino"] == pytest.approx(1.0, abs=1e-5)
    for a, b in zip(same, shuffled):
        assert b["clip_i"] < a["clip_i"] - 1e-3 and b["dino"] < a["dino"] - 1e-3
    assert M.summarize(shuffled)["clip_i"] < M.summarize(same)["clip_i"]


def test_clip_es_and_dino_m_match_hand_computation(model_files, multi_bench, tmp_path):
    """CLIP-ES: mean cosine between the image made for subject A and the labels of the other
    subjects of A's image. DINO-M: the reference with everything outside the mask painted
    white and cropped to the mask's box (built here with numpy), against the whole image."""
    import open_clip

    bench = load_bench(str(multi_bench.jsonl))
    gen = tmp_path / "gen"
    for s in bench.subjects:
        os.makedirs(gen / s.key)
        for i in range(len(s.prompts)):
            pattern_image(300 + i + 10 * len(s.key), (80, 80)).save(gen / s.key / f"{i:02d}_x.png")
    models = ScoringModels(load_clip(model_files.open_clip_safetensors), load_dino(model_files.dino_hub))
    rows = score_images(bench, str(gen), models)
    oc, dino = model_files.open_clip_model, model_files.dino_hub_model
    checked_m = 0
    with torch.no_grad():
        for row in rows:
            s = bench.subject(row["subject"])
            image = Image.open(gen / row["file"]).convert("RGB")
            others = [o.label for o in bench.subjects if o.group == s.group and o.key != s.key]
            g = oc.encode_image(CLIP_T(image)[None])
            texts = oc.encode_text(open_clip.tokenize(others))
            assert row["clip_es"] == pytest.approx(float(F.cosine_similarity(g, texts).mean()), abs=1e-5)
            if s.mask:
                pixels = np.asarray(Image.open(s.source_image).convert("RGB")).copy()
                keep = np.asarray(Image.open(s.mask).convert("L")) > 127
                pixels[~keep] = 255
                ys, xs = np.where(keep)
                masked = Image.fromarray(pixels[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
                ref = F.cosine_similarity(dino(DINO_T(image)[None]), dino(DINO_T(masked)[None]))
                assert row["dino_m"] == pytest.approx(float(ref), abs=1e-5)
                checked_m += 1
            else:
                assert row["dino_m"] is None
    assert checked_m == 2 + 2  # pets/dog (2 prompts) and desk/lamp (2 prompts)


def test_dino_m_is_one_for_the_masked_subject_itself(model_files, multi_bench, tmp_path):
    bench = load_bench(str(multi_bench.jsonl))
    dog = bench.subject("pets/dog")
    with Image.open(dog.source_image) as image, Image.open(dog.mask) as mask:
        subject = M.masked_subject(image, mask)
    assert subject.size == (50, 50)  # the mask's box
    os.makedirs(tmp_path / "gen" / "pets" / "dog")
    subject.save(tmp_path / "gen" / "pets" / "dog" / "00_seed0.png")
    models = ScoringModels(load_clip(model_files.open_clip_pt), load_dino(model_files.hf_dinov2))
    (row,) = score_images(bench, str(tmp_path / "gen"), models)
    assert row["dino_m"] == pytest.approx(1.0, abs=1e-5)
    assert row["dino"] < 0.999  # the whole multi-subject image is something else
    with pytest.raises(ValueError, match="mask is empty"):
        M.masked_subject(Image.new("RGB", (8, 8)), Image.new("L", (8, 8)))


def test_cosine_helpers_on_known_vectors():
    a = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=-1)
    b = F.normalize(torch.tensor([[0.0, 1.0], [1.0, 1.0]]), dim=-1)
    torch.testing.assert_close(M.clip_t(a, b), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(M.clip_i(a, b), torch.tensor([(0 + 2 ** -0.5) / 2, (2 ** -0.5 + 1) / 2]))
    assert M.summarize([{"clip_t": 0.2}, {"clip_t": 0.4}, {"clip_t": None}])["clip_t"] == pytest.approx(0.3)
    assert M.summarize([{"dino_m": None}])["dino_m"] is None
