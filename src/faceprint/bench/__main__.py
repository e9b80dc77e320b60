"""python -m faceprint.bench {core} [options]"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m faceprint.bench", description="faceprint benchmarks")
    sub = parser.add_subparsers(dest="name", metavar="NAME")
    sub.required = True
    from . import core

    core.add_arguments(sub.add_parser("core", help="fit/sample/refine/encode/decode speed and PCA loss (issue: core)"))
    args = parser.parse_args(argv)
    return {"core": core.run}[args.name](args)


if __name__ == "__main__":
    sys.exit(main())
