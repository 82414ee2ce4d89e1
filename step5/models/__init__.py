"""Tree models trained in-process (xgboost, lightgbm, catboost); never imports torch (neural
nets live in :mod:`step5.nn`), and imports each tree library only when it is used."""
