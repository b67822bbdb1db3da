"""The `transformers` tasks plait compiles: what builds each, and what it
returns. No torch here: the CLI lists them in its help."""

from __future__ import annotations

from typing import NamedTuple


class Task(NamedTuple):
    auto_class: str  # the transformers Auto class that builds the model
    mapping: str  # transformers' table of its class names, per model type
    output: str  # the field of the model's output the compiled model returns


TASKS = {
    "causal-lm": Task("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "logits"),
    "masked-lm": Task("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "logits"),
    "sequence-classification": Task("AutoModelForSequenceClassification",
                                    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "logits"),
    "token-classification": Task("AutoModelForTokenClassification",
                                 "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "logits"),
    "feature-extraction": Task("AutoModel", "MODEL_MAPPING_NAMES", "last_hidden_state"),
}  # fmt: skip
