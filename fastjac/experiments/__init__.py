"""The paper's figures, reproduced: ``fastjac reproduce <experiment> --out DIR``.

One module per experiment (``identifiability``, ``structure``, ``objectives``, ``samples``), each
exposing ``add_arguments(parser)`` and ``run(args) -> int``; shared helpers: ``procrustes``
(rotation angle between latent sets), ``results`` (resumable, atomically written results.json and
progress lines) and ``plotting`` (PNG figures). Experiments sit on top of the package: they use
the public objectives and the model/training layer, never the other way round.
"""
