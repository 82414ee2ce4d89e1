"""Tree models trained in-process (xgboost, lightgbm, catboost): :mod:`step5.models.trees`
does what the libraries share, :mod:`step5.models.adapters` what differs. Neural nets live
on the torch side (:mod:`step5.nn`); this package never imports torch, and imports each
tree library only when it is used."""
