"""Training code shared by the trained tiny models (tiny-vqa, tiny-scenes, and other families later).

    data.py    the training set: questions, pixels, per-patch (colour, shape) labels; validation carved
               from train (the test split is never read here)
    layout.py  the AttAnchor input layout a model is trained on: the same AnchorInsert specification and
               candidate rule (words only) as the exported embedding graph; positions are a pluggable
               function of the layout (1-D for LLaVA; 3-D M-RoPE families bring their own)
    loop.py    stage A (patch/word alignment), stage B (LM loss on answer tokens, LoRA), a fixed step
               count, checkpoints every few minutes and resume, validation accuracy, the trained parts

scripts/train_tiny_vqa.py and scripts/train_tiny_scenes.py are thin wrappers over these.
"""
