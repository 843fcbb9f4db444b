"""What `uniil demo` runs: the attribute pool's datasets and the runs compared on synthetic-uniil.

Data, not code: each run is (run name, method, method options), the options going through the
method's typed declaration like any `--opt`, so the CLI holds nothing about a particular method.
"""

from __future__ import annotations

DEMO_SCENARIO = "synthetic-uniil"
# The demo trains with a fifth of the scenario recipe's budget (100 of 200 training images per
# class, 2 of 5 epochs, 10 test images per class), so that it runs in a few minutes; everything
# else (learning rates, options) is the recipe's. `uniil bench` runs the full recipe.
DEMO_SETTINGS = {"synthetic_train_per_class": 100, "synthetic_test_per_class": 10, "epochs": 2}
DEMO_DATASETS = ("synthetic", "synthetic-digits", "synthetic-patterns")  # the datasets of DEMO_SCENARIO
# Two attribute pools: "llm" (the embedded LLM's answers) and "reference" (data/attributes/*.json,
# the reference annotator's, imported with `uniil attrs import`).
DEMO_RUNS = (  # (run name, method, options, pool); ablations are `uniil bench`'s job
    ("zeroshot", "zeroshot", {}, "llm"),
    ("finetune", "finetune", {}, "llm"),
    ("moe-adapters", "moe-adapters", {}, "llm"),
    ("mage", "mage", {}, "llm"),
    ("mage-reference", "mage", {}, "reference"),
    ("calfuse", "calfuse", {}, "llm"),
)
