"""The quality benchmark behind ``tools/quality.py`` (QUALITY.md): its plan of runs (``plan``), run keys and
re-keying (``keys``), one run in its own process and the records file (``runs``), the orchestration
(``benchmark``) and the report (``report``).

It shapes no result: it trains through ``trainer.train`` and scores through ``trainer.evaluation``. So it is
left out of the trainer revision every run key holds (``keys.TRAINER_FILES``): a change here re-keys nothing.
"""
