"""Inference: the tokenizer, the one LR preprocessing step, one upscaler per model family.

Sits between ``models``/``eval`` and ``stages``: ``arsr upscale``, ``evaluate``, ``tokenize`` and the
training stages' validation previews all go through it, so a model sees at inference exactly the
tensors it was trained on. ``registry.FAMILIES`` lists the SR model families.
"""
