"""Control what a fitted model may produce, by exact edits of its mixture and memory
(papers/002: taming a generative model; papers/004 ch. 7: minority coverage).

- :mod:`.forget`: take a person's photos out of the model (mixture and refinement memory).
- :mod:`.rebalance`: set how often attribute values appear (component split + minimum-KL weights).
- :mod:`.include`: guarantee a subgroup its own components and a share of the output.

Every operation returns a new Generator and records itself in the model's provenance.
"""

from .forget import ForgetReport, forget, match_training_photos
from .include import IncludeReport, include
from .rebalance import RebalanceReport, attribute_shares, rebalance, tilt_weights

__all__ = ["ForgetReport", "IncludeReport", "RebalanceReport", "attribute_shares", "forget", "include",
           "match_training_photos", "rebalance", "tilt_weights"]
