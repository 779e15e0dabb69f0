import os

# On a GPU, tests use the fixed tile config: autotuning every (dtype, head dim, segments) combination
# the suite touches would spend minutes compiling. test_every_autotune_config_is_correct covers the
# others; the benchmark suites run with autotuning on.
os.environ.setdefault("FASTGEN_AUTOTUNE", "0")
