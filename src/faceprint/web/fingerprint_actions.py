"""The web app's only door to faceprint.fingerprint: issue a fingerprinted copy, list the
registry, verify an image, and say what the owner's folder holds.

Everything here calls the library's public functions (faceprint.fingerprint.owner: Owner,
issue_instance, decode_images; the registry; faceprint.fingerprint.verification.verify), as
the command line does, so a change of fingerprint mechanism is adapted in this file alone.
Nothing returned by these functions holds the owner's key or a path inside the owner's folder.
"""

from __future__ import annotations

from pathlib import Path

from .jobs import Job
from .paths import WebError


def owner_of(config):
    from ..fingerprint.owner import Owner

    return Owner(config.owner_folder())


def status(config) -> dict:
    """What the page needs to know: is there a key, a calibration, how many instances."""
    owner = owner_of(config)
    n = 0
    reg = owner._local_registry()
    if reg is None or reg.exists():
        try:
            with owner.open_registry(create=False) as r:
                n = len(r)
        except Exception:  # noqa: BLE001 - an unreachable registry shows as 0, verify says why
            n = 0
    keyed = owner.secret_path.is_file()
    return {"has_key": owner.key_path.is_file() or keyed, "mechanism": "keyed-bank" if keyed else "datalevel-bank",
            "has_calibration": Path(owner.calibration).is_file() or (owner.folder / "calibration-keyed.json").is_file(),
            "instances": n}


def issue_job(models, config, name: str, recipient: str, instance: str, output: Path):
    """A job writing a fingerprinted copy of model ``name`` for ``recipient`` to ``output``."""

    def run(job: Job) -> dict:
        from ..fingerprint.owner import issue_instance
        from ..io import sha256_file

        source = models.path(name)
        gen = models.load(name)
        if getattr(gen, "fingerprint_", None):
            raise WebError(400, f"{name} is already a fingerprinted instance; issue copies from the unfingerprinted "
                                "model")
        job.report("drawing a code and writing the copy (the first copy also makes the owner's key)", 0, 0)
        entry, _ = issue_instance(gen, sha256_file(source), owner_of(config), recipient, instance, output=output)
        return {"model": output.name, "instance": entry.instance, "recipient": entry.recipient,
                "issued_at": entry.issued_at, "code_prefix": entry.code[:8],
                "download": f"/files/models/{output.name}"}

    return run


def registry(config) -> list[dict]:
    """The issued instances (no key material; the code shortened to its first 8 hex digits)."""
    owner = owner_of(config)
    try:
        with owner.open_registry(create=False) as reg:
            entries = reg.all()
    except Exception as e:  # noqa: BLE001
        from ..errors import FaceprintError

        if isinstance(e, FaceprintError) and "issue an instance first" in str(e):
            return []
        raise
    return [{"instance": e.instance, "recipient": e.recipient, "issued_at": e.issued_at, "code_prefix": e.code[:8],
             "mechanism": e.mechanism, "note": e.note} for e in entries]


def _rate_words(p: float) -> str:
    if p <= 0:
        return "never"
    return f"at most about 1 time in {max(1, round(1 / p)):,}"


def _verify_keyed(models, owner, entries, image: Path) -> dict:
    """keyed-bank: the instance whose secret pattern the image carries, with an exact bound."""
    import json

    from ..data.folder import load_image
    from ..fingerprint.owner import verify_keyed

    x = load_image(image, 128)[None]
    v = verify_keyed(x, owner, entries, models.autoencoder())[0]
    cal_path = owner.folder / "calibration-keyed.json"
    measured = None
    if cal_path.is_file():
        try:
            measured = json.loads(cal_path.read_text())
        except (OSError, ValueError):
            measured = None
    checked = (f"checked on {measured['pairs']:,} (image, code) pairs of images without this mark: scores had mean "
               f"{measured['mean']:.2f} and spread {measured['std']:.2f}, as expected 0 and 1") if measured else \
        "not yet checked on your own images (`faceprint fingerprint calibrate MODEL --negatives PHOTOS/`)"
    out = {"match": bool(v.match), "instance": v.instance, "recipient": v.recipient, "score": v.score,
           "threshold": v.threshold, "fpr_upper_bound": v.fpr_bound, "p_value": v.p_value,
           "nearest_instance": v.nearest_instance, "registry_size": v.registry_size, "edit": v.edit,
           "crop": v.crop, "prefilter": v.prefilter}
    out["details"] = [
        ["verdict", "match" if v.match else "no match"], ["copy", v.instance or "-"], ["recipient", v.recipient or "-"],
        ["score", f"{v.score:.1f} (a match needs {v.threshold:.2f}; images of other copies score about 0 +- 1)"],
        ["false-accusation bound", f"{v.fpr_bound:.2g} per image, over {v.registry_size} recipients" if v.match
         else "- (no match)"],
        ["bound checked", checked],
        ["read as", "the image as it is" if (v.edit == "none" and v.crop >= 1 and v.prefilter == "none") or not v.match
         else "; ".join(([f"an edited image ({v.edit}): the reference was edited alike"] if v.edit != "none" else [])
                        + ([f"a centre crop of {v.crop:.0%} of the side, put back in place"] if v.crop < 1 else [])
                        + ([f"through a light denoising filter ({v.prefilter}), the reference alike"]
                           if v.prefilter != "none" else []))]]
    if v.match:
        out["words"] = (f"This image was made by the copy {v.instance!r}, issued to {v.recipient!r}: it carries that "
                        f"copy's secret mark with a score of {v.score:.1f}, and a match needs {v.threshold:.2f}. "
                        + ("An image this copy did not make is pinned on it " if v.registry_size == 1 else
                           f"An image none of the {v.registry_size} issued copies made is pinned on one of them ")
                        + f"{_rate_words(v.fpr_bound)}.")
    else:
        out["words"] = (f"Not recognised: no copy issued from this server made this image, as far as its marks can "
                        f"tell. The closest copy, {v.nearest_instance!r}, scores {v.score:.1f}; a match needs "
                        f"{v.threshold:.2f} (images that carry no mark score about 0).")
    return out


def verify_image(models, config, image: Path) -> dict:
    """The verdict for one image file, with a sentence a non-expert can read."""
    from ..data.folder import load_image
    from ..fingerprint.owner import decode_images
    from ..fingerprint.verification import verify

    owner = owner_of(config)
    if owner.secret_path.is_file():
        with owner.open_registry(create=False) as reg:
            entries = reg.all()
        if any(e.mechanism == "keyed-bank" for e in entries):
            return _verify_keyed(models, owner, entries, image)
    if not owner.key_path.is_file():
        raise WebError(409, "no fingerprint key on this server yet: issue a fingerprinted copy first (section "
                            "'Fingerprinted copies'); only images of issued copies can be recognised")
    if not Path(owner.calibration).is_file():
        raise WebError(409, "verification is not calibrated yet: the owner must first measure how often images "
                            "without a code match by chance, with `faceprint fingerprint calibrate MODEL "
                            "--negatives PHOTOS/`")
    key = owner.load_key()
    cal = owner.load_calibration()
    x = load_image(image, 128)[None]
    bits = decode_images(x, key, models.autoencoder())
    with owner.open_registry(create=False) as reg:
        v = verify(bits, cal, registry=reg)[0]
    out = {"match": bool(v.match), "instance": v.instance, "recipient": v.recipient,
           "bit_accuracy": float(v.bit_accuracy), "matching_bits": int(v.matching_bits), "n_bits": int(v.n_bits),
           "threshold": int(v.threshold), "fpr_upper_bound": float(v.fpr_upper_bound),
           "p_value": float(v.p_value), "nearest_instance": v.nearest_instance,
           "calibrated_on": int(cal.n_negatives)}
    # what the page's table shows, label -> value, in this order (the page prints these only)
    out["details"] = [
        ["verdict", "match" if v.match else "no match"], ["copy", v.instance or "-"], ["recipient", v.recipient or "-"],
        ["matching code bits", f"{v.matching_bits} of {v.n_bits} (a match needs {v.threshold})"],
        ["bit accuracy", f"{v.bit_accuracy:.3f}"],
        ["false-positive bound", f"{v.fpr_upper_bound:.2g}" if v.match else "- (no match)"],
        ["calibrated on", f"{cal.n_negatives:,} images without a code"]]
    if v.match:
        out["words"] = (f"This image was made by the copy {v.instance!r}, issued to {v.recipient!r}. "
                        f"{v.matching_bits} of its {v.n_bits} code bits match ({v.bit_accuracy:.0%}); a match needs "
                        f"{v.threshold}. An image that does not come from this copy matches this well "
                        f"{_rate_words(v.fpr_upper_bound)} (false-positive bound {v.fpr_upper_bound:.2g}, measured "
                        f"on {cal.n_negatives:,} images without a code).")
    else:
        near = f" The closest copy, {v.nearest_instance!r}," if v.nearest_instance else " The closest code"
        out["words"] = (f"Not recognised: no copy issued from this server made this image, as far as its code can "
                        f"tell.{near} matches {v.matching_bits} of {v.n_bits} bits, and a match needs "
                        f"{v.threshold} (chance alone gives about {v.n_bits // 2}).")
    return out
