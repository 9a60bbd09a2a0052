"""`make bench [PART=...]`: run the benchmark parts and write bench/results/.

    python -m bench.run --part kernels|ring|data|train|long|compile|plan [--quick]

`plan` (no GPU): ringlwm.plan against real CPU steps (bench/results/plan_validation.csv) and the Llama-3.1-8B
length table (bench/results/plan_8b.csv); tens of minutes on 2 cores (bench/plan.py).

`compile` needs no GPU: it compiles every autotune configuration of the Triton kernels for sm_80 and sm_90 and
reports registers, spills, shared memory and tensor-core instructions (bench/compile.py; minutes on 2 cores).
"""

from __future__ import annotations

import argparse

PARTS = ("kernels", "ring", "data", "train")
EXTRA = ("long", "compile", "plan")  # not in the default run: minutes of compute


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", default="all", choices=("all", *PARTS, *EXTRA))
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
            ring.main_layouts(quick=args.quick)
            ring.main_memory(quick=args.quick)
        elif part == "data":
            from bench import data

            data.main(quick=args.quick)
        elif part == "train":
            from bench import train

            train.main(quick=args.quick)
        elif part == "long":
            from bench import ring

            ring.main_long()
        elif part == "plan":
            from bench import plan as plan_bench

            plan_bench.main(quick=args.quick)
        elif part == "compile":
            from bench import compile as compile_report

            compile_report.main(quick=args.quick)
    from bench import report

    report.main()


if __name__ == "__main__":
    main()
