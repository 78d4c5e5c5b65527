"""The MoORE → LoRA bridge: every task of a ``task``-router model as a PEFT LoRA adapter on the source model.

Per task and layer the routed model is one dense matrix W_t (what ``moorize merge`` writes); its
difference from the source weight, ΔW_t = W_t − W, truncated by SVD, is the best LoRA of each rank, with
a known error. Engines that batch LoRA adapters (vLLM, SGLang, LoRAX, PEFT) then serve every task.

``options`` (no torch) holds the choices, ``delta`` the per-layer ΔW_t and its truncation, ``peft_format``
the adapter files as PEFT and the engines read them, ``export`` the streamed pipeline and its report.
"""
