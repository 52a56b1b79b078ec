"""maskedkd plugin: the parts ``losses.py`` composes (capture, masking, teachers, teacher input, cost).

This package is what a DeiT or timm user copies beside ``losses.py``. It never imports ``maskedkd_app`` (our
training application) and runs on the timm their script already has (0.4.12 to 1.0.x).
"""
