"""The machine, versions and settings every benchmark table starts with."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe(extra: dict | None = None) -> dict:
    import numpy
    import torch

    from .. import __version__

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "faceprint": __version__,
    }
    try:
        import sklearn

        info["scikit-learn"] = sklearn.__version__
    except ImportError:
        pass
    info.update(extra or {})
    return info


def print_table(title: str, header: list[str], rows: list[list], file=None) -> None:
    """A Markdown table (to ``file``, default the current ``sys.stdout``, so that
    ``contextlib.redirect_stdout`` captures it)."""
    file = sys.stdout if file is None else file
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    print(f"\n### {title}\n", file=file)
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |", file=file)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=file)
    for r in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |", file=file)
    file.flush()


def datasets_dir(given=None, *, needs: str = "celeba-10k"):
    """The shared datasets folder (the one holding celeba-10k/, celeba-id/, utkface/): ``given``
    when a bench's --data names it, else ../shared/datasets beside the repository or the working
    directory. Exits with a message naming the option when there is none."""
    from pathlib import Path

    if given is not None:
        return Path(given)
    from ..cli.main import _default_demo_data

    d = _default_demo_data()  # .../datasets/celeba-10k/images
    if d is None:
        raise SystemExit(f"no data: pass --data (the folder holding {needs}/)")
    return d.parent.parent


def write_results(out, stem: str, md: str, results: dict, publish=None) -> None:
    """OUT/STEM.md and OUT/STEM.json (written atomically), printed, and copied to ``publish``
    (docs/results) when given."""
    import json
    import shutil
    from pathlib import Path

    from ..io import atomic_write_text

    out = Path(out)
    atomic_write_text(out / f"{stem}.md", md)
    atomic_write_text(out / f"{stem}.json", json.dumps(results, indent=1, default=str))
    print(md)
    if publish is not None:
        publish = Path(publish)
        publish.mkdir(parents=True, exist_ok=True)
        for name in (f"{stem}.md", f"{stem}.json"):
            shutil.copyfile(out / name, publish / name)
