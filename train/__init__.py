"""Training: model configs (open_clip JSON, ``wit-tiny``), checkpoints, the data stream, the loop.

- ``models``      resolve a model name or JSON config; ships and registers ``wit-tiny``; LiT locks
- ``pretrained``  ``--pretrained``: an open_clip tag, ``hf-hub:ID`` or checkpoint URL -> the starting model
- ``checkpoint``  save/load checkpoints on any URL (atomic; ``weights_only=True``); ``load_model``
- ``config``      ``TrainConfig`` (frozen, validated; from YAML)
- ``data``        the resumable WebDataset stream over fsspec
- ``loss``, ``optim``, ``distributed``, ``metrics``   the pieces the loop wires together
- ``loop``        ``train(config, dataset_url, out_url, eval_callback=None) -> TrainResult``
"""
