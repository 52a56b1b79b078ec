"""Our training application, started by ``main_maskedkd.py``: flags, building, training, demo, reproduction.

Not part of the plugin: a DeiT user copies ``losses.py`` and ``deit_patch/`` only, and nothing there imports this
package. It may require a current timm (see README's version floors).
"""
