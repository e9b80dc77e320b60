"""python -m faceprint.bench {core,quality} [options]"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m faceprint.bench", description="faceprint benchmarks")
    sub = parser.add_subparsers(dest="name", metavar="NAME")
    sub.required = True
    from . import core, quality

    core.add_arguments(sub.add_parser("core", help="fit/sample/refine/encode/decode speed and PCA loss"))
    quality.add_arguments(sub.add_parser("quality", help="FID/KID/precision/recall/coverage/memorization table"))
    args = parser.parse_args(argv)
    return {"core": core.run, "quality": quality.run}[args.name](args)


if __name__ == "__main__":
    sys.exit(main())
