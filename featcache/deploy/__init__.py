"""Deploying a CenterPoint-pillar student to ONNX Runtime, split where mmdeploy splits it.

- :mod:`featcache.deploy.export` (torch + mmdet3d): ``featcache deploy`` writes ``DIR/model.onnx``, the
  network from the hard-voxelised pillars (``voxels``, ``num_points``, ``coors``) to the CenterHead's
  dense per-task maps, and ``DIR/deploy.json`` (:class:`featcache.deploy.spec.DeploySpec`), everything
  the pre- and post-processing need plus where the model came from; :mod:`featcache.deploy.quantize`
  (onnxruntime's quantisation tools) adds ``DIR/model.int8.onnx`` for ``--quantize int8``.
- :mod:`featcache.deploy.runtime` (numpy + onnxruntime only): ``featcache predict``; points in, boxes /
  scores / labels out in mmdet3d's layout. It imports nothing of torch, mmcv or mmdet3d, and neither do
  the modules it uses (:mod:`~featcache.deploy.spec`, :mod:`~featcache.deploy.voxelize`,
  :mod:`~featcache.deploy.postprocess`, :mod:`~featcache.deploy.errors`).

Nothing is imported here, so ``import featcache.deploy.runtime`` stays free of the export's imports.
"""
