"""Unlearning: answer-masked sequence losses (``losses``) and TOFU-style metrics (``metrics``).

The training-based methods themselves live in :mod:`loka.methods.train` with every other method.
``idontknow.jsonl`` holds TOFU's 99 refusal strings (MIT licence, see data/README.md).
"""
