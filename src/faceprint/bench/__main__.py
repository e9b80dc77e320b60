"""python -m faceprint.bench NAME [options]: reproducible benchmark tables.

Each benchmark is a module of this package with add_arguments(parser) and run(args); only the
one asked for is imported, so a benchmark's heavy dependencies cost nothing to the others."""

import argparse
import importlib
import importlib.util
import sys

BENCHES = {
    "core": "fit/sample/refine/encode/decode speed and PCA loss",
    "quality": "FID/KID/precision/recall/coverage/memorization and timing table (papers/000 Table 1)",
    "fingerprint": "fingerprint mechanisms: bit accuracy, robustness, fidelity, attribution, false positives",
    "recognisers": "identity verification ROC and attribute classifier accuracy",
    "taming": "forget / rebalance / coverage tables",
    "attribution": "owner fingerprint: attribution of 100 instances, false matches among >= 10,000 negatives, FID",
    "scale": "fit time, memory, model size, synthesis speed and log-likelihood from 32 to 28,000 photos",
    "redteam": "the recipient as adversary: key recovery, removal, collusion and framing against the fingerprints",
    "reliability": "hostile and broken input: corpus of cases per command and kind, kill -9 trials, validation cost",
    "scale-out": "each Dask-distributed stage in one process and on 1 and 2 local workers: time, identical output",
    "mix": "texture mixer (papers/004 Ch. 3): canvas interpolation metrics, ablations, face hybrids, speed",
    "mix-marks": "fingerprints through a mix: hybrids and dissolves of fingerprinted faces, verified",
    "gan": "latent GAN (papers/004 Ch. 2): dual contrastive loss, G self-attention, D reference attention vs LR-GMM",
    "rewrite": "rewrite a model's rules from 1-3 edited faces (papers/001): success, preservation, projector table",
    "personalize": "new faces of one person from one photo with attribute prompts (papers/003): identity x prompt",
    "attribute": "learned attribution to the source model without a fingerprint (papers/004 Ch. 4): setups, baselines, immunisation, open set",
}
MODULES = {"scale-out": "scale_out", "mix-marks": "mix_marks"}  # bench names that are not module names


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m faceprint.bench", description="faceprint benchmarks")
    sub = parser.add_subparsers(dest="name", metavar="NAME")
    sub.required = True
    available = {n: h for n, h in BENCHES.items() if importlib.util.find_spec(f"{__package__}.{MODULES.get(n, n)}") is not None}
    modules = {}
    for name, text in available.items():
        p = sub.add_parser(name, help=text)
        if argv and argv[0] == name:  # import only the benchmark asked for
            modules[name] = importlib.import_module(f"{__package__}.{MODULES.get(name, name)}")
            modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    return modules[args.name].run(args)


if __name__ == "__main__":
    sys.exit(main())
