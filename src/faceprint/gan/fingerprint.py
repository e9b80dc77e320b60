"""Model-level fingerprints for GAN models (papers/004, Ch. 6, Sec. 6.3.3: a fingerprinted copy
of the decoder, faceprint.fingerprint.modulated).

The two bank mechanisms of ``faceprint fingerprint issue`` (keyed-bank, datalevel-bank) mark
the latent bank that LR-GMM-NN copies pixels from. A GAN copies nothing, so a mark there would
never reach its faces. For a GAN model, ``issue`` therefore embeds the instance's code in the
decoder weights the model ships with (the "kernel" modulation of the TAEF2 output
convolution, :func:`faceprint.fingerprint.modulated.fingerprint_generator`). Every face of the
instance carries it, at no extra cost. The code is drawn and recorded in the owner's registry
as for the other mechanisms, under the mechanism name :data:`MECHANISM`.

Limitation, stated: the shipped detector of that modulation is owner-side and recovers each
latent pixel's host in the bank (what LR-GMM-NN copied). GAN faces have no such host, so
``faceprint verify`` does not read these codes yet. The instance is issued and recorded, and it
is not yet verifiable.
"""

from __future__ import annotations

import secrets

from ..errors import InputError

MECHANISM = "model-level-decoder"


def issue_gan_instance(gen, model_hash: str, owner, recipient: str, instance: str, *, seed: int | None = None,
                       note: str | None = None, output=None):
    """Draw a code in the owner's registry and return (entry, instance): a copy of the GAN model
    ``gen`` whose decoder carries the code. With ``output`` the instance is written there inside
    the registry's write transaction (the code is recorded only if the file was written)."""
    from ..fingerprint.modulated import ModulatedFingerprinter, fingerprint_generator
    from ..fingerprint.owner import discard_new_owner_files
    from ..fingerprint.registry import check_entry_fields
    from ..io import atomic_path
    from ..seeding import check_seed

    if getattr(gen, "latent_model_", None) is None:
        raise InputError("issue_gan_instance needs a GAN model (fitted with `faceprint train-gan`); use "
                         "faceprint.fingerprint.owner.issue_instance for the others")
    check_entry_fields(recipient, instance, model_hash, MECHANISM, note)
    if seed is not None:
        check_seed(seed)
    fp = ModulatedFingerprinter.load(autoencoder=gen.autoencoder)  # missing weights fail before any write
    folder_existed = owner.folder.exists()
    local = owner._local_registry()
    registry_existed = local is None or local.exists()
    box = {}

    def build(entry, path=None):
        info = {"instance": instance, "recipient": recipient, "issued_at": entry.issued_at}
        inst = fingerprint_generator(gen, entry.bits, info, fingerprinter=fp)
        inst.record_operation({"operation": "fingerprint", "mechanism": MECHANISM, "instance": instance,
                               "recipient": recipient, "base_model_sha256": model_hash})
        if path is not None:
            inst.save(path)
        box["inst"] = inst

    try:
        with owner.open_registry() as reg:
            if reg.instance_taken(instance):
                raise InputError(f"instance {instance!r} already has a code in registry {reg.url!r}; "
                                 "choose a new instance name (one code per model instance)")
            code_seed = secrets.randbits(62) if seed is None else seed
            if output is None:
                entry = reg.issue(recipient, instance, model_hash, MECHANISM, seed=code_seed, note=note,
                                  before_commit=build)
            else:
                with atomic_path(output) as tmp:
                    entry = reg.issue(recipient, instance, model_hash, MECHANISM, seed=code_seed, note=note,
                                      before_commit=lambda e: build(e, tmp))
    except BaseException:
        # a registry that already holds the built instance's code stays (the code was committed)
        discard_new_owner_files(owner, local, registry_existed=registry_existed or "inst" in box,
                                folder_existed=folder_existed)
        raise
    return entry, box["inst"]
