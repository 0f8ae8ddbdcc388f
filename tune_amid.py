"""`python tune_amid.py [options]` is `amid-ray tune [options]`; no options: the embedded demo."""

import sys

from amid_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
