"""Cache-side benchmark code of ``tools/bench.py`` (BENCHMARKS.md): the figures that need no trainer (build,
storage, read path, scale, HDF5, cost model), the measurements they are made of, and the machine facts the
report states. The training-step and response figures stay in the tool (the trainer depends on featcache,
never the reverse). It uses the teacher wing (``featcache.testing``, builds); the storage core never imports it.
"""
