"""``python -m medfed``: the same command line as the ``medfed`` console script."""

from medfed.cli import main

if __name__ == "__main__":  # pragma: no cover
    main()
