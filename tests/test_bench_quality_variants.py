"""bench quality --variant: extra LR-GMM-NN rows named on the command line."""

import pytest

from faceprint.bench.quality import METHODS, parse_variants


def test_variants_parse_to_generator_settings():
    v = parse_variants(["cap:share_cap=0.5,seam_weight=1", "paper:refinement=paper", "free:share_cap=null"])
    assert v == {"cap": {"share_cap": 0.5, "seam_weight": 1}, "paper": {"refinement": "paper"},
                 "free": {"share_cap": None}}


@pytest.mark.parametrize("spec,needle", [
    ("cap", "NAME:KEY=VALUE"),
    ("cap:share_kap=0.5", "GeneratorConfig"),
    ("cap:share_cap=2", "max_share"),
    ("cap:sweeps=-1", "sweeps"),
    (f"{METHODS[0]}:share_cap=0.5", "built-in"),
])
def test_bad_variants_are_refused_with_the_reason(spec, needle):
    with pytest.raises(SystemExit, match=needle):
        parse_variants([spec])
