"""`make bench [PART=...]`: run the benchmark parts and write bench/results/.

    python -m bench.run --part kernels|ring|data [--quick]
"""

from __future__ import annotations

import argparse

PARTS = ("kernels", "ring", "data")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", default="all", choices=("all", *PARTS))
    parser.add_argument("--quick", action="store_true", help="fewer, smaller configurations")
    args = parser.parse_args(argv)
    parts = PARTS if args.part == "all" else (args.part,)
    for part in parts:
        if part == "kernels":
            from bench import kernels

            kernels.main(quick=args.quick)
        elif part == "ring":
            from bench import ring

            ring.main(quick=args.quick)
        elif part == "data":
            from bench import data

            data.main(quick=args.quick)


if __name__ == "__main__":
    main()
