"""A resumed run continues with exactly the sample and augmentation an uninterrupted run would
have used next: for 0 and 2 DataLoader workers, gradient accumulation 1 and 2, and a resume
inside the first and inside a later epoch (issue 11 item 1).

A tiny LightningModule records, for every training batch, the sample keys and what the
augmentation did to them (prompt/subject dropout, and the left pixel column, which a flip
changes), so any difference in order or augmentation shows."""
import lightning.pytorch as pl
import pytest
import torch

from trainer.data import SubjectDataModule
from trainer.sampling import EpochPermutationSampler


class BatchRecorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        left_column = batch["pixel_values"][:, :, :, 0].sum(dim=(1, 2))
        self.seen.append((self.global_step, tuple(batch["key"]), tuple(batch["prompt"]), tuple(batch["query"]),
                          tuple(round(float(v), 3) for v in left_column)))
        return (self.weight * batch["pixel_values"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(tiny_jsonl, root, num_workers, accumulation, max_steps, ckpt_path=None):
    dm = SubjectDataModule(train_jsonl=str(tiny_jsonl.jsonl), image_root=str(tiny_jsonl.image_root), batch_size=2,
                           num_workers=num_workers, resolution=8, clip_resolution=8, seed=3, flip_prob=0.5,
                           prompt_dropout=0.5, subject_dropout=0.5)
    model = BatchRecorder()
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", filename="step{step}", every_n_train_steps=1,
                                               save_top_k=-1, auto_insert_metric_name=False)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, callbacks=[checkpoints],
                         accumulate_grad_batches=accumulation, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, limit_val_batches=0)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    return model.seen


# 14 rows and batch 2: 7 batches an epoch, so 7 optimizer steps an epoch without accumulation
# and 4 with accumulation 2 (the last one from a single batch).
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("accumulation,max_steps,resume_steps", [(1, 10, (3, 9)), (2, 6, (2, 5))])
def test_resume_continues_with_the_next_sample_and_augmentation(tiny_jsonl, tmp_path, num_workers, accumulation,
                                                                 max_steps, resume_steps):
    straight = fit(tiny_jsonl, tmp_path / "straight", num_workers, accumulation, max_steps)
    batches_per_epoch = 7
    for resume_step in resume_steps:  # one inside epoch 0, one inside epoch 1
        batches_done = sum(1 for record in straight if record[0] < resume_step)
        assert 0 < batches_done % batches_per_epoch, "the resume point must lie inside an epoch"
        ckpt = tmp_path / "straight" / "ckpt" / f"step{resume_step}.ckpt"
        resumed = fit(tiny_jsonl, tmp_path / f"resumed{resume_step}", num_workers, accumulation, max_steps,
                      ckpt_path=str(ckpt))
        assert resumed == straight[batches_done:], f"resume at step {resume_step}"


def test_devices_share_the_permutation_and_resume_at_the_same_global_position():
    """Two devices deal one permutation between them; after a resume with one device, the
    remaining rows are exactly those the two devices had not used yet (the position is kept
    in samples over all devices)."""
    dataset = list(range(20))
    whole = [row for _, row in EpochPermutationSampler(dataset, num_replicas=1, rank=0, seed=5, epoch_fn=lambda: 2)]
    per_device = [[row for _, row in EpochPermutationSampler(dataset, num_replicas=2, rank=r, seed=5,
                                                             epoch_fn=lambda: 2)] for r in (0, 1)]
    assert sorted(per_device[0] + per_device[1]) == sorted(whole) == dataset
    used = per_device[0][:3] + per_device[1][:3]  # three batches of 1 per device: 6 samples in all
    resumed = EpochPermutationSampler(dataset, num_replicas=1, rank=0, seed=5, epoch_fn=lambda: 2)
    resumed.resume_at(2, 6)
    rest = [row for _, row in resumed]
    assert sorted(rest + used) == dataset


def test_the_epoch_is_read_when_iteration_starts_not_when_set_epoch_was_last_called():
    """Lightning creates the first iterator of a run before it calls set_epoch; a worker
    prefetches at that moment. The sampler asks for the epoch then, not later."""
    epoch = {"now": 1}
    sampler = EpochPermutationSampler(list(range(10)), seed=0, epoch_fn=lambda: epoch["now"])
    sampler.set_epoch(0)  # a stale value, as before Lightning's own set_epoch
    iterator = iter(sampler)
    epoch["now"] = 4  # too late for this iterator
    assert {e for e, _ in iterator} == {1}
