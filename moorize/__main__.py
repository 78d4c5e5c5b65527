"""``python -m moorize`` (and ``torchrun -m moorize convert ...``)."""

from .cli import main

if __name__ == "__main__":
    main()
