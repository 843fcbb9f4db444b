"""What `uniil demo` runs: the attribute pool's datasets and the runs compared on synthetic-uniil.

Data, not code: each run is (run name, method, method options), the options going through the
method's typed declaration like any `--opt`, so the CLI holds nothing about a particular method.
"""

from __future__ import annotations

DEMO_SCENARIO = "synthetic-uniil"
DEMO_DATASETS = ("synthetic", "synthetic-digits", "synthetic-patterns")  # the datasets of DEMO_SCENARIO
DEMO_RUNS = (
    ("zeroshot", "zeroshot", {}),
    ("zeroshot-descriptions", "zeroshot", {"prototypes": "descriptions"}),
    ("finetune", "finetune", {}),
    ("moe-adapters", "moe-adapters", {}),
    ("mage", "mage", {}),
    ("mage-no-attributes", "mage", {"no_attributes": True}),
    ("calfuse", "calfuse", {}),
)
