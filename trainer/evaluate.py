"""``python -m trainer.evaluate {generate,score,all}`` (see trainer/evaluation/cli.py)."""
import sys

from trainer.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
