"""The commands (`lit-peft <command>`, or the checkout's scripts): finetune, merge, chat, eval, report, download,
convert-*, *-peft; the Hydra preflight, config validation and launchers, and the argument helpers they share.
"""
