"""SSRExport writes every requested format with normal file modes; each loads back to the
trained weights (a stand-in trainer; the full CLI run is covered in test_trainer_cli.py)."""
import os
import stat
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ssr.weights import PAIR_NAMES, load_ssr_weights  # noqa: E402
from tests.tiny_models import tiny_ssr_weights  # noqa: E402
from trainer.callbacks import SSRExport  # noqa: E402


def stand_ins(tmp_path, step):
    trainer = SimpleNamespace(global_step=step, strategy=object(), callbacks=[], is_global_zero=True,
                              log_dir=str(tmp_path), default_root_dir=str(tmp_path))
    weights = tiny_ssr_weights(4)
    module = SimpleNamespace(core=SimpleNamespace(ssr=weights), export_metadata=lambda: {"steps": str(step)})
    return trainer, module, weights


def test_all_formats_are_written_readable_and_equal(tmp_path):
    previous = os.umask(0o022)
    try:
        trainer, module, weights = stand_ins(tmp_path, 6)
        export = SSRExport(every_n_steps=3, formats=["single", "official", "reexport"])
        export.on_train_batch_end(trainer, module, None, None, 0)
    finally:
        os.umask(previous)
    folder = tmp_path / "export"
    assert sorted(os.listdir(folder)) == ["ssr-step0000006-official", "ssr-step0000006-reexport",
                                         "ssr-step0000006.safetensors"]
    assert sorted(os.listdir(folder / "ssr-step0000006-official")) == sorted(PAIR_NAMES[0])
    assert sorted(os.listdir(folder / "ssr-step0000006-reexport")) == sorted(PAIR_NAMES[1])
    for name in ("ssr-step0000006.safetensors", "ssr-step0000006-official", "ssr-step0000006-reexport"):
        loaded = load_ssr_weights(str(folder / name), expect_family=None)
        for key, value in weights.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), (name, key)
    for root, _, files in os.walk(folder):
        for name in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o644, name
    assert load_ssr_weights(str(folder / "ssr-step0000006.safetensors"), expect_family=None).metadata["steps"] == "6"


def test_only_the_pair_when_asked_and_bad_formats_refused(tmp_path):
    trainer, module, _ = stand_ins(tmp_path, 4)
    export = SSRExport(formats=["official"])
    export.on_train_end(trainer, module)
    assert os.listdir(tmp_path / "export") == ["ssr-last-official"]
    assert export.last_path == str(tmp_path / "export" / "ssr-last-official")
    with pytest.raises(ValueError, match="official"):
        SSRExport(formats=["diffusers"])
    with pytest.raises(ValueError, match="non-empty"):
        SSRExport(formats=[])
