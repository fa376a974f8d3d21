"""``python -m trainer fit --config trainer/configs/<name>.yaml`` (see trainer/cli.py)."""
from trainer.cli import main

if __name__ == "__main__":
    main()
