"""Our training application (``main_maskedkd.py``'s engine, data, checkpoints, torchrun set-up, demo, reproduction).

Not part of the plugin: a DeiT user copies ``losses.py`` and ``deit_patch/`` only, and nothing there imports this
package. It may require a current timm (see README's version floors).
"""
