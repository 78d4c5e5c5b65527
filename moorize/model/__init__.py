"""The MoORE model: the layer (``layer``), adapters, routed transformers models (load, inject,
merge, save_pretrained) and per-task classification heads."""
