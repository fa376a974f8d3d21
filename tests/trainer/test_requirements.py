"""The trainer's declared requirements hold what the code relies on: a Lightning whose
``Trainer.fit`` takes ``weights_only`` (resuming never unpickles code) and ``accelerate``."""
import inspect
import os
import re

from lightning.pytorch import Trainer
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def declared(path):
    found = {}
    for line in open(os.path.join(ROOT, path), encoding="utf-8"):
        line = re.sub(r"\s+#.*", "", line).strip()
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            found[requirement.name] = requirement
    return found


def test_lightning_floor_is_one_whose_fit_takes_weights_only():
    requirement = declared("trainer/requirements.txt")["lightning"]
    floors = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    assert floors and min(floors) >= Version("2.6")
    assert "weights_only" in inspect.signature(Trainer.fit).parameters
    test_requirement = declared("requirements-test.txt")["lightning"]
    assert str(test_requirement.specifier) == str(requirement.specifier)


def test_accelerate_is_a_trainer_requirement():
    assert "accelerate" in declared("trainer/requirements.txt")
