"""The pipeline's stages, one module each (``tasks.stages.<stage>``), and their order.

This package imports none of the stage modules, so that a stage's code fingerprint
covers its own module and what it imports, not its siblings; and the command line can
read :data:`STAGES` without importing anything heavy.
"""

#: The pipeline's stages in DAG order (the config has one section per stage; a test
#: checks that the two agree).
STAGES = (
    "download",
    "tokenize",
    "pretrain",
    "load_gpt2",
    "finetune_spam",
    "baseline_spam",
    "finetune_instruct",
    "extract_responses",
    "judge",
)
