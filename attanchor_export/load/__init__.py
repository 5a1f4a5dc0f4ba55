"""Load: what comes from outside the project. Resolve MODEL (alias, Hub id, folder), download, pick the
architecture class, merge a LoRA adapter; the tiny random and the trained tiny-vqa checkpoints; easy-vqa data."""
