"""Tests for the training data (trainer/data.py and the modules it builds on): batch layout
of both sources, the two image views against a direct computation, flip consistency,
dropouts, skipping, determinism and mid-epoch resume."""
import warnings
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data import SubjectDataModule

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
# The loader resizes the crop's pre-image in one step; that may round differently from
# resize-then-crop by one 8-bit level: 2/255 in [-1, 1], 1/255/std in CLIP space.
SD_TOL = 2.0 / 255 + 1e-6
CLIP_TOL = 1.0 / 255 / CLIP_STD.min() + 1e-5


def direct_views(image: Image.Image, resolution: int, clip_resolution: int, flip: bool):
    """Method doc section 8, written out: shortest side resized (bilinear for SD, bicubic
    for CLIP, long side truncated), centred crop (SD: offset rounded as torchvision's
    CenterCrop; CLIP: rounded down as CLIPImageProcessor), SD -> [-1, 1], CLIP -> (x - mean) / std."""
    image = image.convert("RGB")

    def resize_crop(size, resample, offset):
        w, h = image.size
        nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        left, top = offset(nw - size), offset(nh - size)
        return np.asarray(image.resize((nw, nh), resample).crop((left, top, left + size, top + size)),
                          dtype=np.float32) / 255.0

    sd = resize_crop(resolution, Image.BILINEAR, lambda excess: int(round(excess / 2))) * 2 - 1
    clip = (resize_crop(clip_resolution, Image.BICUBIC, lambda excess: excess // 2) - CLIP_MEAN) / CLIP_STD
    if flip:
        sd, clip = sd[:, ::-1], clip[:, ::-1]
    return (torch.from_numpy(np.ascontiguousarray(sd)).permute(2, 0, 1),
            torch.from_numpy(np.ascontiguousarray(clip)).permute(2, 0, 1))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def make_dm(**overrides) -> SubjectDataModule:
    args = dict(batch_size=3, num_workers=0, resolution=32, clip_resolution=24, seed=7)
    args.update(overrides)
    return SubjectDataModule(**args)


def one_epoch(loader):
    return [batch for batch in loader]


def check_batch_layout(batch, batch_size, resolution, clip_resolution):
    assert set(batch) == {"pixel_values", "clip_pixel_values", "prompt", "query", "subject_dropped", "key"}
    assert batch["pixel_values"].shape == (batch_size, 3, resolution, resolution)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["clip_pixel_values"].shape == (batch_size, 3, clip_resolution, clip_resolution)
    assert batch["clip_pixel_values"].dtype == torch.float32
    assert batch["subject_dropped"].shape == (batch_size,) and batch["subject_dropped"].dtype == torch.bool
    assert len(batch["prompt"]) == len(batch["query"]) == len(batch["key"]) == batch_size
    assert batch["pixel_values"].min() >= -1.0 and batch["pixel_values"].max() <= 1.0
    low = torch.from_numpy((0 - CLIP_MEAN) / CLIP_STD).view(1, 3, 1, 1) - 1e-5
    high = torch.from_numpy((1 - CLIP_MEAN) / CLIP_STD).view(1, 3, 1, 1) + 1e-5
    assert (batch["clip_pixel_values"] >= low).all() and (batch["clip_pixel_values"] <= high).all()


# ----------------------------------------------------------------------------- both sources


def test_jsonl_batches_layout_captions_and_skip_counts(tiny_jsonl):
    dm = make_dm(train_jsonl=str(tiny_jsonl.jsonl), image_root=str(tiny_jsonl.image_root),
                 prompt_dropout=0.0, subject_dropout=0.0)
    dm.setup("fit")
    assert len(dm.train_dataset) == 14  # the blank line is not a row
    batches = one_epoch(dm.train_dataloader())
    assert len(batches) == 14 // 3  # drop_last
    by_name = {r["file_name"]: r for r in tiny_jsonl.rows if r is not None}
    for batch in batches:
        check_batch_layout(batch, 3, 32, 24)
        assert not batch["subject_dropped"].any()
        for key, prompt, query in zip(batch["key"], batch["prompt"], batch["query"]):
            row = by_name[key]
            assert prompt == row["text"]
            assert query == (row.get("query") or row["text"])
    keys = {k for b in batches for k in b["key"]}
    assert keys <= {tiny_jsonl.rows[r]["file_name"] for r in tiny_jsonl.valid_rows}
    # 12 of the 14 rows were drawn, so at least 3 of the 5 bad ones; each was counted.
    assert set(dm.skipped) <= set(tiny_jsonl.skips_per_pass) and sum(dm.skipped.values()) >= 3


def test_jsonl_full_pass_counts_each_bad_row_once(tiny_jsonl):
    dm = make_dm(train_jsonl=str(tiny_jsonl.jsonl), image_root=str(tiny_jsonl.image_root))
    dm.setup("fit")
    keys = [dm.train_dataset[(0, row)]["key"] for row in range(len(dm.train_dataset))]
    assert dm.skipped == tiny_jsonl.skips_per_pass
    # A bad row is replaced by the next one, so that one comes twice.
    assert set(keys) == {tiny_jsonl.rows[r]["file_name"] for r in tiny_jsonl.valid_rows}
    assert keys[3] == keys[4] == "plain_0.png" and keys[9] == keys[10] == "plain_3.png"


def test_webdataset_batches_layout_and_skip_counts(tiny_shards):
    dm = make_dm(train_shards=tiny_shards.pattern, batch_size=2, shuffle_buffer=4,
                 prompt_dropout=0.0, subject_dropout=0.0)
    dm.setup("fit")
    batches = one_epoch(dm.train_dataloader())
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(tiny_shards.valid_keys)  # one pass: every usable sample once
    for batch in batches:
        check_batch_layout(batch, len(batch["key"]), 32, 24)
        for key, prompt, query in zip(batch["key"], batch["prompt"], batch["query"]):
            assert prompt == tiny_shards.captions[key]
            assert query == tiny_shards.queries[key]
    assert dm.skipped == tiny_shards.skips_per_pass


def test_webdataset_two_workers_share_shards_and_counts(tiny_shards):
    dm = make_dm(train_shards=tiny_shards.pattern, batch_size=2, num_workers=2)
    dm.setup("fit")
    keys = [k for b in one_epoch(dm.train_dataloader()) for k in b["key"]]
    assert sorted(keys) == sorted(tiny_shards.valid_keys)
    assert dm.skipped == tiny_shards.skips_per_pass  # counted in the workers, read here


def test_webdataset_samples_per_epoch_cycles_and_reshuffles(tiny_shards):
    dm = make_dm(train_shards=tiny_shards.pattern, batch_size=2, train_samples_per_epoch=10, shuffle_buffer=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 5
    epoch0 = [k for b in one_epoch(loader) for k in b["key"]]
    epoch1 = [k for b in one_epoch(loader) for k in b["key"]]
    assert len(epoch0) == len(epoch1) == 10  # more than the 7 usable samples: shards are re-read
    assert set(epoch0) <= set(tiny_shards.valid_keys)
    assert epoch0 != epoch1


# ----------------------------------------------------------------------------- views


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_views_match_direct_computation(tiny_jsonl, flip_prob):
    dm = make_dm(train_jsonl=str(tiny_jsonl.jsonl), image_root=str(tiny_jsonl.image_root), resolution=32,
                 clip_resolution=24, flip_prob=flip_prob, prompt_dropout=0.0, subject_dropout=0.0)
    dm.setup("fit")
    for name, row in (("asym.png", 0), ("gray.jpg", 2), ("plain_1.png", 6)):
        sample = dm.train_dataset[(3, row)]
        sd, clip = direct_views(Image.open(tiny_jsonl.image_root / name), 32, 24, flip=flip_prob == 1.0)
        assert max_diff(sample["pixel_values"], sd) <= SD_TOL, name
        assert max_diff(sample["clip_pixel_values"], clip) <= CLIP_TOL, name
        assert (sample["pixel_values"] - sd).abs().mean() < 1e-3
    # The asymmetric image tells the orientations apart by far more than the tolerance.
    sd, clip = direct_views(tiny_jsonl.images["asym.png"], 32, 24, flip=False)
    assert max_diff(sd, sd.flip(-1)) > 100 * SD_TOL and max_diff(clip, clip.flip(-1)) > 20 * CLIP_TOL


def test_random_flip_is_the_same_for_both_views(tiny_jsonl):
    dm = make_dm(train_jsonl=str(tiny_jsonl.jsonl), image_root=str(tiny_jsonl.image_root),
                 flip_prob=0.5, prompt_dropout=0.0, subject_dropout=0.0)
    dm.setup("fit")
    image = tiny_jsonl.images["asym.png"]
    views = {flip: direct_views(image, 32, 24, flip) for flip in (False, True)}
    seen = []
    for epoch in range(16):
        sample = dm.train_dataset[(epoch, 0)]
        sd_flipped = max_diff(sample["pixel_values"], views[True][0]) <= SD_TOL
        assert sd_flipped or max_diff(sample["pixel_values"], views[False][0]) <= SD_TOL
        assert max_diff(sample["clip_pixel_values"], views[sd_flipped][1]) <= CLIP_TOL
        seen.append(sd_flipped)
    assert any(seen) and not all(seen)


def test_rgba_is_composited_over_white_and_grayscale_becomes_rgb(tiny_jsonl):
    dm = make_dm(train_jsonl=str(tiny_jsonl.jsonl), image_root=str(tiny_jsonl.image_root),
                 flip_prob=0.0, prompt_dropout=0.0, subject_dropout=0.0)
    dm.setup("fit")
    rgba = dm.train_dataset[1]["pixel_values"]  # 40x40 -> 32x32, left half was transparent black
    assert torch.allclose(rgba[:, :, :14], torch.ones(3, 32, 14))
    assert torch.allclose(rgba[:, :, 18:], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 32, 14))
    gray = dm.train_dataset[2]
    assert torch.equal(gray["pixel_values"][0], gray["pixel_values"][1])
    assert torch.equal(gray["pixel_values"][1], gray["pixel_values"][2])


# ----------------------------------------------------------------------------- dropout


def samples_over_epochs(tiny_jsonl, epochs, **overrides):
    dm = make_dm(train_jsonl=str(tiny_jsonl.jsonl), image_root=str(tiny_jsonl.image_root),
                 resolution=8, clip_resolution=8, **overrides)
    dm.setup("fit")
    return [dm.train_dataset[(e, r)] for e in range(epochs) for r in tiny_jsonl.valid_rows]


def captions_of(tiny_jsonl):
    rows = {r["file_name"]: r for r in tiny_jsonl.rows if r is not None}
    return {k: (r["text"], r.get("query") or r["text"]) for k, r in rows.items()}


def test_dropout_probability_zero_never_fires(tiny_jsonl):
    texts = captions_of(tiny_jsonl)
    for s in samples_over_epochs(tiny_jsonl, 6, prompt_dropout=0.0, subject_dropout=0.0):
        assert (s["prompt"], s["query"]) == texts[s["key"]]
        assert not s["subject_dropped"] and s["clip_pixel_values"].abs().sum() > 0


def test_dropout_probability_one_always_fires(tiny_jsonl):
    for s in samples_over_epochs(tiny_jsonl, 6, prompt_dropout=1.0, subject_dropout=1.0):
        assert s["prompt"] == "" and s["query"] == "" and s["subject_dropped"]
        assert torch.equal(s["clip_pixel_values"], torch.zeros(3, 8, 8))
        assert s["pixel_values"].abs().sum() > 0  # the SD target is never dropped
    texts = captions_of(tiny_jsonl)
    for s in samples_over_epochs(tiny_jsonl, 2, prompt_dropout=1.0, subject_dropout=0.0):
        assert s["prompt"] == "" and s["query"] == texts[s["key"]][1]


def test_dropout_rates_and_subject_dropout_content(tiny_jsonl):
    samples = samples_over_epochs(tiny_jsonl, 50, prompt_dropout=0.3, subject_dropout=0.2, flip_prob=0.5)
    n = len(samples)  # 450
    prompt = np.array([s["prompt"] == "" for s in samples])
    subject = np.array([s["subject_dropped"] for s in samples])

    def within(count, p, sigmas=4.5):
        return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p))

    assert within(prompt.sum(), 0.3) and within(subject.sum(), 0.2)
    assert within((prompt & subject).sum(), 0.3 * 0.2)  # drawn independently
    for s in samples:
        if s["subject_dropped"]:
            assert s["query"] == "" and torch.equal(s["clip_pixel_values"], torch.zeros(3, 8, 8))
        else:
            assert s["query"] != "" and s["clip_pixel_values"].abs().sum() > 0


# ----------------------------------------------------------------------------- determinism


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k], k


def test_same_seed_same_batches_any_worker_count(tiny_jsonl):
    def run(seed, num_workers, epoch=0):
        dm = make_dm(train_jsonl=str(tiny_jsonl.jsonl), image_root=str(tiny_jsonl.image_root), seed=seed,
                     num_workers=num_workers, prompt_dropout=0.5, subject_dropout=0.5)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return one_epoch(loader)

    reference = run(seed=7, num_workers=0)
    assert_same_batches(reference, run(seed=7, num_workers=0))
    assert_same_batches(reference, run(seed=7, num_workers=2))
    for other in (run(seed=8, num_workers=0), run(seed=7, num_workers=0, epoch=1)):
        assert [b["key"] for b in other] != [b["key"] for b in reference]


def test_webdataset_same_seed_same_batches(tiny_shards):
    def run(seed):
        dm = make_dm(train_shards=tiny_shards.pattern, batch_size=2, seed=seed, shuffle_buffer=4,
                     prompt_dropout=0.5, subject_dropout=0.5)
        dm.setup("fit")
        return one_epoch(dm.train_dataloader())

    reference = run(3)
    assert_same_batches(reference, run(3))
    assert [b["key"] for b in run(4)] != [b["key"] for b in reference]


# ----------------------------------------------------------------------------- resume


class KeyRecorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(list(batch["key"]))
        return (self.weight * batch["pixel_values"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(tiny_jsonl, tmp_path, max_steps, ckpt_path=None, callbacks=()):
    dm = make_dm(train_jsonl=str(tiny_jsonl.jsonl), image_root=str(tiny_jsonl.image_root),
                 resolution=8, clip_resolution=8)
    model = KeyRecorder()
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=bool(callbacks), callbacks=list(callbacks),
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen, dm, [str(w.message) for w in caught]


def test_resume_mid_epoch_continues_with_the_next_batch(tiny_jsonl, tmp_path):
    uninterrupted, _, _ = fit(tiny_jsonl, tmp_path / "a", max_steps=10)  # 4 batches an epoch: 2.5 epochs
    assert len(uninterrupted) == 10

    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    first, dm_first, _ = fit(tiny_jsonl, tmp_path / "b", max_steps=5, callbacks=[checkpoint])
    ckpt_file = tmp_path / "ckpt" / "epoch=1-step=5.ckpt"
    state = torch.load(ckpt_file, weights_only=True)["SubjectDataModule"]
    assert state["epoch"] == 1 and state["samples_consumed"] == 3  # one batch into epoch 1
    assert state["skipped"] == dm_first.skipped and sum(state["skipped"].values()) > 0

    second, dm_second, messages = fit(tiny_jsonl, tmp_path / "c", max_steps=10, ckpt_path=str(ckpt_file))
    assert first + second == uninterrupted
    assert not any("not resumable" in m for m in messages)
    assert all(dm_second.skipped.get(r, 0) >= n for r, n in state["skipped"].items())


def test_webdataset_epochs_follow_the_trainer(tiny_shards, tmp_path):
    dm = make_dm(train_shards=tiny_shards.pattern, batch_size=2, train_samples_per_epoch=6,
                 resolution=8, clip_resolution=8)
    model = KeyRecorder()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert len(model.seen) == 6  # 3 batches in each of 2 epochs
    assert model.seen[:3] != model.seen[3:]  # epoch 1 is shuffled differently


# ----------------------------------------------------------------------------- validation, errors


def test_validation_has_no_flip_or_dropout_and_its_own_skip_count(tiny_jsonl):
    dm = make_dm(train_jsonl=str(tiny_jsonl.jsonl), image_root=str(tiny_jsonl.image_root),
                 val_jsonl=str(tiny_jsonl.jsonl), prompt_dropout=1.0, subject_dropout=1.0, flip_prob=1.0)
    dm.setup("fit")
    batches = one_epoch(dm.val_dataloader())
    assert [k for b in batches for k in b["key"]][:3] == ["asym.png", "rgba.png", "gray.jpg"]
    first = batches[0]
    assert not first["subject_dropped"].any() and first["prompt"][0] == "an asymmetric picture"
    sd, clip = direct_views(Image.open(tiny_jsonl.image_root / "asym.png"), 32, 24, flip=False)
    assert max_diff(first["pixel_values"][0], sd) <= SD_TOL
    assert max_diff(first["clip_pixel_values"][0], clip) <= CLIP_TOL
    assert dm.val_skipped and not dm.skipped
    assert make_dm(train_jsonl=str(tiny_jsonl.jsonl), image_root=str(tiny_jsonl.image_root)).val_dataloader() == []


def test_oversized_images_are_skipped_unread(tiny_jsonl):
    dm = make_dm(train_jsonl=str(tiny_jsonl.jsonl), image_root=str(tiny_jsonl.image_root), max_image_pixels=1000)
    dm.setup("fit")
    # Rows 0-2 (48x40, 40x40, 36x50) exceed 1000 pixels, row 3 is corrupt, row 4 (30x20) is used.
    assert dm.train_dataset[0]["key"] == "plain_0.png"
    assert dm.skipped == {"too_large": 3, "corrupt_image": 1}


def test_configuration_errors_name_the_problem(tiny_jsonl, tiny_shards, tmp_path):
    with pytest.raises(ValueError, match="one of train_jsonl, train_shards, train_precomputed, not several"):
        make_dm(train_jsonl=str(tiny_jsonl.jsonl), train_shards=tiny_shards.pattern)
    with pytest.raises(ValueError, match="one of train_jsonl, train_shards, train_precomputed, not several"):
        make_dm(train_precomputed=tiny_shards.pattern, train_shards=tiny_shards.pattern)
    with pytest.raises(ValueError, match="no precompute.json beside the shards"):  # img2dataset shards
        make_dm(train_precomputed=tiny_shards.pattern).setup("fit")
    with pytest.raises(ValueError, match="prompt_dropout must be a probability"):
        make_dm(train_jsonl=str(tiny_jsonl.jsonl), prompt_dropout=1.5)
    with pytest.raises(ValueError, match="set train_jsonl, train_shards or train_precomputed"):
        make_dm().setup("fit")
    with pytest.raises(FileNotFoundError, match="00002.tar"):
        make_dm(train_shards=tiny_shards.pattern.replace("00001", "00002")).setup("fit")
    with pytest.raises(FileNotFoundError, match="image_root"):
        make_dm(train_jsonl=str(tiny_jsonl.jsonl), image_root=str(tmp_path / "nowhere")).setup("fit")
    (tmp_path / "empty").mkdir()
    dm = make_dm(train_jsonl=str(tiny_jsonl.jsonl), image_root=str(tmp_path / "empty"))
    dm.setup("fit")
    with pytest.raises(RuntimeError, match="none of its 14 rows is usable .* file_name is relative to image_root"):
        dm.train_dataset[0]


def test_every_init_argument_is_documented():
    """LightningCLI shows these docstrings in --help and they document the YAML keys."""
    import inspect

    doc = inspect.getdoc(SubjectDataModule.__init__)
    for name in list(inspect.signature(SubjectDataModule.__init__).parameters)[1:]:
        assert f"\n    {name}: " in doc or doc.startswith(f"{name}: "), name


def test_cycling_shards_without_usable_samples_raises_instead_of_spinning(tiny_shards):
    dm = make_dm(train_shards=tiny_shards.pattern, train_samples_per_epoch=4, max_image_pixels=10, shuffle_buffer=4)
    dm.setup("fit")
    with pytest.raises(RuntimeError, match="no usable samples"):
        one_epoch(dm.train_dataloader())
