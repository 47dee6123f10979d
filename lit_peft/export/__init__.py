"""From a trained run to other formats: a merged LitGPT checkpoint (merge.py), a Hugging Face transformers folder
(hf.py) and a Hugging Face PEFT adapter, both ways (peft.py).
"""
