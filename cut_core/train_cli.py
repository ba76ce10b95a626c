"""`python -m cut_core.train_cli CONFIG.json`, the training entry of the flat layout: launchers and
scripts written for it keep working. The entry is `python -m cut_core.train.cli`."""

from cut_core.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
