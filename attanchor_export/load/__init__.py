"""Load: what comes from outside the project. Resolve MODEL (alias, Hub id, folder), download, load it with
its family, merge a LoRA adapter, reload an artifact's source; the tiny random and the trained tiny-vqa
checkpoints; data sets (easy-vqa, task questions, calibration and gate samples)."""
