"""Step 5 of the survivor pipeline: Optuna search for a `holdout_quality` regressor.

The package is split by which side of the process boundary a module lives on:

* torch-free (imported by the parent optimizer, the pool, the WATCHER):
  ``errors``, ``jsonio``, ``protocol``, ``policy``, ``devices``, ``data``, ``signal_quality``,
  ``execution``, ``optimizer``, ``artifacts``, ``watcher``;
* torch side (imported only inside worker / one-shot subprocesses, or by Step 6 code):
  ``nn`` (model, training core, job runner, worker loop, one-shot trainer) and ``predictor``.

This ``__init__`` deliberately imports nothing, so ``import step5`` never pulls in torch.
"""
