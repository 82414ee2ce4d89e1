"""The torch side (docs/training.md). Imports nothing: ``python -m step5.nn.oneshot`` (or
``.worker``) must claim stdout before anything imports torch."""
