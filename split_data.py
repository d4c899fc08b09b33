"""Split MNIST among N clients plus one common test set (see `python split_data.py --help`)."""

import sys

from fedmnist.cli import main_split

if __name__ == "__main__":
    sys.exit(main_split())
