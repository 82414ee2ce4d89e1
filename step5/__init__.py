"""Step 5 of the survivor pipeline: Optuna search for a `holdout_quality` regressor.

Only ``step5.nn`` and ``step5.predictor`` import torch (tests/test_layout.py); this ``__init__``
deliberately imports nothing, so ``import step5`` never pulls in torch.
"""
