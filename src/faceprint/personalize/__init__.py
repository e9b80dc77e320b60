"""Personalisation: new faces of one person from one photo, with chosen attributes
(papers/003, Face2Diffusion, adapted to faceprint's LR-GMM-NN generator without text).

- :mod:`.reference`: find, check and align the one face of a reference photo.
- :mod:`.features`: identity features (dlib, multi-scale latent, identity-discriminative
  projection) and their verification AUC; the face mask.
- :mod:`.mapping`: the conditioning space (identity coordinates of the face region) and the
  trained mapping f_map with expression dropout to a learned null; training, saving, loading.
- :mod:`.prompt`: attribute prompts, their checks, and the class model that realises them.
- :mod:`.personalizer`: encoding a person, consent checks, sampling, provenance.
- :mod:`.training`: descriptors of training photos (cached, mode 0600).
"""

from .features import FEATURE_KINDS, FeatureConfig, IdentityFeatures, face_mask, verification_auc
from .mapping import ConditioningSpace, MappingConfig, PersonalizeMapping, TrainingData, train_mapping
from .personalizer import ERROR_RATES, REFUSE_THRESHOLD, Identity, Personalizer, save_descriptor
from .prompt import Prompt, PromptWarning, make_prompt, prompt_model
from .reference import FaceFinder, Reference, find_reference

__all__ = ["ERROR_RATES", "FEATURE_KINDS", "REFUSE_THRESHOLD", "ConditioningSpace", "FaceFinder", "FeatureConfig",
           "Identity", "IdentityFeatures", "MappingConfig", "PersonalizeMapping", "Personalizer", "Prompt",
           "PromptWarning", "Reference", "TrainingData", "face_mask", "find_reference", "make_prompt",
           "prompt_model", "save_descriptor", "train_mapping", "verification_auc"]
