"""`python -m offroad_seg` is the CLI (torchrun launches it this way)."""

from offroad_seg.cli import main

if __name__ == "__main__":
    main()
