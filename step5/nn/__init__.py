"""The torch side: the MLP (``model``), the one training core (``trainer``, ``device_loop``),
jobs (``job``), checkpoints (``checkpoint``), the fold ensemble (``ensemble``), the
persistent worker (``worker``) and the one-shot trainer (``oneshot``).

This ``__init__`` imports nothing: ``python -m step5.nn.oneshot`` (or ``.worker``) must be
able to claim stdout before anything imports torch.
"""
