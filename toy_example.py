"""2D toy model of memorization and generalization; run `python toy_example.py --help`."""

from memgen.errors import run_cli
from memgen.toy.cli import main

if __name__ == "__main__":
    run_cli(main)
