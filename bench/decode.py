#!/usr/bin/env python
"""Decode speed figures (the same as `rwkv2rknn bench`), saved as JSON beside the printout.

python bench/decode.py                       # 430M-sized random RWKV-4
python bench/decode.py --layers 4 --width 256 --vocab 1000 --tokens 64
"""

import sys

from rwkv2rknn.cli import main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "bench", *sys.argv[1:]]
    main()
