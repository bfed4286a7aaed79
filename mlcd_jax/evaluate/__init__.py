"""mlcd_jax.evaluate: how good are frozen features (:mod:`mlcd_jax.models.features`), in numbers and in pictures.

- :mod:`~mlcd_jax.evaluate.knn`: cosine k-NN with a temperature-weighted vote (``knn_classify``, ``knn_accuracy``).
- :mod:`~mlcd_jax.evaluate.linear_probe`: CLIP-protocol logistic-regression probe (``linear_probe``).
- :mod:`~mlcd_jax.evaluate.pictures`: patch-feature PCA pictures and cosine-over-training curves (PNG).
- :mod:`~mlcd_jax.evaluate.report`: printed results table and ``results.json``.

Nothing is re-exported here: ``linear_probe`` is both a module and its function, and re-exporting the
function would shadow the module; import from the submodules.
"""
