"""The teacher wing: everything of featcache that knows mmdet3d detectors.

The storage core (``featcache/``: format, codecs, store, writer, reader, verify, export, inspection)
knows arrays, never a detector; this package turns a teacher into cache rows: mmdet3d configs and
datasets (:mod:`~featcache.teacher.models`), sample keys and scans (:mod:`~featcache.teacher.samples`), checkpoints
(:mod:`~featcache.teacher.checkpoint`), the detector wrapper that runs it
(:mod:`~featcache.teacher.detector`), forward hooks (:mod:`~featcache.teacher.recording`), dense head
outputs (:mod:`~featcache.teacher.heads`), build options (:mod:`~featcache.teacher.options`), the
build itself (:mod:`~featcache.teacher.build`, with its resume checks :mod:`~featcache.teacher.resume`,
regression outputs kept at box centres :mod:`~featcache.teacher.centres`, non-zero statistics
:mod:`~featcache.teacher.nonzero` and progress bar :mod:`~featcache.teacher.progress`) and ``inspect --fidelity``'s re-run
(:mod:`~featcache.teacher.fidelity`). Imports point from here into the core, never back.
Nothing is imported here, so ``import featcache.teacher.options`` stays free of torch.
"""
