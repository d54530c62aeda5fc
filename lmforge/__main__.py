"""`python -m lmforge` and `torchrun -m lmforge` run the same CLI as the `lmforge` script."""

from lmforge.cli import main

if __name__ == "__main__":
    main()
